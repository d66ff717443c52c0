//! The solve pipeline, one method per step: collect blocks and units ([`Solver::new`]), book the pins
//! ([`Solver::pin`]), lay the free chain over the GPUs ([`Solver::fill_gpus`]) or, without GPUs, over
//! the CPU ([`Solver::fill_cpu_only`]), check that the rest has somewhere to go
//! ([`Solver::check_leftover`]) and assemble the [`Plan`] ([`Solver::finish`]).

use crate::blocks::{attach_to_blocks, cut_blocks, no_split_mask, Block};
use crate::clean::clean_device_map;
use crate::constraints::{build_units, Unit};
use crate::device::{Device, DeviceSpec};
use crate::error::{PlacementError, Result, Shortfall};
use crate::plan::{DeviceUsage, Offload, Plan};
use crate::tree::ModuleTree;

use super::chain::{self, Chain, Lane};
use super::offload::{split_point, OffloadInput};
use super::reasons::{self, CpuFull};
use super::ties::{self, Units};
use super::{Balance, ResolvedStrategy, SolveOptions};

/// Per-device accumulators while solving, indexed like the spec's devices.
struct Ledger {
    devices: Vec<Device>,
    pinned: Vec<u64>,
    pinned_cost: Vec<u64>,
    reserve: Vec<u64>,
    runtime: Vec<u64>,
}

impl Ledger {
    fn new(spec: &DeviceSpec) -> Ledger {
        let n = spec.devices().len();
        Ledger {
            devices: spec.devices().iter().map(|(d, _)| *d).collect(),
            pinned: vec![0; n],
            pinned_cost: vec![0; n],
            reserve: vec![0; n],
            runtime: vec![0; n],
        }
    }

    fn index(&self, d: Device) -> usize {
        self.devices
            .iter()
            .position(|x| *x == d)
            .expect("devices come from the spec")
    }

    /// The lane of device `d`: what is already booked on it, and its cost base for balancing.
    fn lane(&self, d: Device, capacity: u64, balance: Balance) -> Lane {
        let i = self.index(d);
        let base = self.pinned[i] + self.runtime[i] + self.reserve[i];
        let cost_base = match balance {
            Balance::Memory => base,
            Balance::Compute => self.pinned_cost[i],
        };
        Lane {
            base,
            capacity,
            cost_base,
        }
    }
}

/// What units pinned to CPU or disk (executed elsewhere) need on the execution device.
#[derive(Default)]
struct PinnedOffload {
    /// The largest staged size among them.
    max_staged: u64,
    /// What stays on the execution device for them (runtime memory, maybe buffers).
    stays: u64,
    any: bool,
}

/// The free (unpinned) units in chain order, as the columns the layout algorithms read.
struct FreeChain {
    weights: Vec<u64>,
    staged: Vec<u64>,
    is_group: Vec<bool>,
    /// Weights + runtime memory: what a unit takes on a GPU.
    footprint: Vec<u64>,
    /// What balancing equalises (the footprint, or the compute cost).
    cost: Vec<u64>,
    /// What stays on the execution device when the unit is offloaded.
    stays: Vec<u64>,
}

/// Where the free units went so far.
struct Placement {
    device_of_unit: Vec<Device>,
    /// Units before `next` are placed; the rest go to disk.
    next: usize,
    cpu_full: Option<CpuFull>,
}

/// One solve: the inputs, what was derived from them, and the per-device ledger.
pub(super) struct Solver<'a> {
    tree: &'a ModuleTree,
    spec: &'a DeviceSpec,
    options: &'a SolveOptions,
    strategy: ResolvedStrategy,
    blocks: Vec<Block>,
    /// Runtime memory and compute cost per block.
    runtime: Vec<u64>,
    compute: Vec<u64>,
    units: Vec<Unit>,
    gpus: Vec<(Device, u64)>,
    /// The devices that compute: the GPUs, or the CPU when there is no GPU (then it is the execution
    /// device, and a block on it is not offloaded).
    computing: Vec<Device>,
    ledger: Ledger,
    pinned_offload: PinnedOffload,
    total_weights: u64,
}

impl<'a> Solver<'a> {
    /// Cut the tree into blocks, attach runtime memory and compute, group ties and pins into units.
    pub(super) fn new(tree: &'a ModuleTree, spec: &'a DeviceSpec, options: &'a SolveOptions) -> Result<Self> {
        if spec.devices().is_empty() {
            return Err(PlacementError::DoesNotFit(Shortfall::NoDevice));
        }
        let no_split = no_split_mask(tree, &options.no_split_module_classes);
        let blocks = cut_blocks(tree, &no_split);
        let runtime = attach_to_blocks(tree, &blocks, &options.runtime_bits)?;
        let compute = attach_to_blocks(tree, &blocks, &options.compute)?;
        let units = build_units(tree, &blocks, &options.pins, spec, &runtime, &compute)?;
        let gpus: Vec<(Device, u64)> = spec.gpus().collect();
        let computing: Vec<Device> = if gpus.is_empty() {
            spec.contains(Device::Cpu).then_some(Device::Cpu).into_iter().collect()
        } else {
            gpus.iter().map(|g| g.0).collect()
        };
        Ok(Solver {
            tree,
            spec,
            options,
            strategy: options.strategy.resolve(gpus.len()),
            total_weights: units.iter().map(|u| u.bits).sum(),
            blocks,
            runtime,
            compute,
            units,
            gpus,
            computing,
            ledger: Ledger::new(spec),
            pinned_offload: PinnedOffload::default(),
        })
    }

    /// Solve: each step in order.
    pub(super) fn solve(mut self) -> Result<Plan> {
        self.pin()?;
        let free = self.free_chain();
        let placement = if self.gpus.is_empty() {
            self.fill_cpu_only(&free)?
        } else {
            self.fill_gpus(&free)?
        };
        self.check_leftover(&free, &placement)?;
        Ok(self.finish(placement))
    }

    /// Memory a unit leaves on its execution device when it is offloaded.
    fn stays(&self, u: &Unit) -> u64 {
        u.runtime_bits + if self.options.offload_buffers { 0 } else { u.buffer_bits }
    }

    fn lane(&self, d: Device, capacity: u64) -> Lane {
        self.ledger.lane(d, capacity, self.options.balance)
    }

    fn gpu_lanes(&self) -> Vec<Lane> {
        self.gpus.iter().map(|(d, cap)| self.lane(*d, *cap)).collect()
    }

    /// Book pinned units, activations and GPU 0's explicit reserve on their devices; fail if pins alone
    /// overflow a device or a GPU is full before any free unit.
    fn pin(&mut self) -> Result<()> {
        let mut off = PinnedOffload::default();
        for u in &self.units {
            let Some(d) = u.pinned else { continue };
            let i = self.ledger.index(d);
            self.ledger.pinned[i] += u.bits;
            self.ledger.pinned_cost[i] += u.compute;
            if self.computing.contains(&d) {
                self.ledger.runtime[i] += u.runtime_bits;
            } else {
                off.any = true;
                off.max_staged = off.max_staged.max(u.staged_bits);
                off.stays += self.stays(u);
            }
        }
        self.pinned_offload = off;
        for (i, (d, cap)) in self.spec.devices().iter().enumerate() {
            if let Some(cap) = cap.filter(|c| self.ledger.pinned[i] > *c) {
                return Err(PlacementError::DoesNotFit(Shortfall::Pinned {
                    device: *d,
                    needed: self.ledger.pinned[i],
                    capacity: cap,
                }));
            }
        }
        for d in &self.computing {
            let i = self.ledger.index(*d);
            self.ledger.runtime[i] += self.options.activation_bits;
        }
        if let Some((gpu0, _)) = self.gpus.first() {
            let i = self.ledger.index(*gpu0);
            self.ledger.reserve[i] += self.options.gpu0_reserve_bits;
        }
        for ((d, cap), l) in self.gpus.iter().zip(self.gpu_lanes()) {
            if l.base > *cap {
                return Err(PlacementError::DoesNotFit(Shortfall::BeforeFreeLayers {
                    device: *d,
                    needed: l.base,
                    capacity: *cap,
                }));
            }
        }
        Ok(())
    }

    fn free_units(&self) -> impl Iterator<Item = &Unit> {
        self.units.iter().filter(|u| u.pinned.is_none())
    }

    fn free_chain(&self) -> FreeChain {
        let footprint: Vec<u64> = self.free_units().map(|u| u.bits + u.runtime_bits).collect();
        FreeChain {
            weights: self.free_units().map(|u| u.bits).collect(),
            staged: self.free_units().map(|u| u.staged_bits).collect(),
            is_group: self.free_units().map(|u| u.blocks.len() > 1).collect(),
            cost: match self.options.balance {
                Balance::Memory => footprint.clone(),
                Balance::Compute => self.free_units().map(|u| u.compute).collect(),
            },
            stays: self.free_units().map(|u| self.stays(u)).collect(),
            footprint,
        }
    }

    fn offload_input<'f>(&self, free: &'f FreeChain) -> OffloadInput<'f> {
        OffloadInput {
            footprint: &free.footprint,
            is_group: &free.is_group,
            staged: &free.staged,
            stays: &free.stays,
            pinned_offloaded_max: self.pinned_offload.max_staged,
            pinned_offloaded_stays: self.pinned_offload.stays,
            any_pinned_offloaded: self.pinned_offload.any,
        }
    }

    /// Reserve `reserve` on `device` to stage offloaded blocks, or fail if it has no room for it.
    fn reserve_staging(&mut self, device: Device, lane: &Lane, reserve: u64) -> Result<()> {
        if lane.base.saturating_add(reserve) > lane.capacity {
            return Err(reasons::no_staging_room(
                self.spec,
                self.total_weights,
                device,
                lane,
                reserve,
            ));
        }
        let i = self.ledger.index(device);
        self.ledger.reserve[i] += reserve;
        Ok(())
    }

    /// Choose how many free units stay on the GPUs (keeping staging room on GPU 0 if anything is
    /// offloaded), lay them out with the strategy, then offload the rest to the CPU.
    fn fill_gpus(&mut self, free: &FreeChain) -> Result<Placement> {
        let gpu_lanes = self.gpu_lanes();
        // Without CPU or disk nothing can be offloaded: no staging room, the leftover is an error later.
        let can_offload = self.spec.contains(Device::Cpu) || self.spec.contains(Device::Disk);
        let (k, r) = if can_offload {
            split_point(&self.offload_input(free), &gpu_lanes)
        } else {
            let units = Units {
                chain: Chain::by_memory(&free.footprint),
                is_group: &free.is_group,
            };
            (ties::longest_prefix(units, &gpu_lanes), 0)
        };
        self.reserve_staging(self.gpus[0].0, &gpu_lanes[0], r)?;
        let lanes = self.gpu_lanes();
        let lane_of = self.lay_out_prefix(free, k, &lanes);
        let mut device_of_unit = vec![Device::Disk; free.weights.len()];
        for (unit, &l) in lane_of.iter().enumerate() {
            device_of_unit[unit] = self.gpus[l].0;
        }
        let mut placement = Placement {
            device_of_unit,
            next: lane_of.len(),
            cpu_full: None,
        };
        self.offload_to_cpu(free, &mut placement);
        Ok(placement)
    }

    /// The GPU lane of each of the first `k` free units under the strategy.
    fn lay_out_prefix(&self, free: &FreeChain, k: usize, lanes: &[Lane]) -> Vec<usize> {
        let prefix = Units {
            chain: Chain {
                memory: &free.footprint[..k],
                cost: &free.cost[..k],
            },
            is_group: &free.is_group[..k],
        };
        ties::lay_out(self.strategy, prefix, lanes).unwrap_or_else(|| {
            // Not reached (the prefix was found to fit); keep what fits in place rather than fail.
            let counts = chain::greedy(Chain::by_memory(&free.footprint[..k]), lanes, u64::MAX);
            counts
                .iter()
                .enumerate()
                .flat_map(|(l, &c)| std::iter::repeat_n(l, c))
                .collect()
        })
    }

    /// Put the units after the GPU prefix on the CPU in order while they fit (weights only: their
    /// runtime memory is on the execution device).
    fn offload_to_cpu(&self, free: &FreeChain, placement: &mut Placement) {
        let Some(cap) = self.cpu_capacity() else { return };
        let next = placement.next;
        let base = self.ledger.pinned[self.ledger.index(Device::Cpu)];
        let cpu = Lane::memory(base, cap);
        let take = chain::placed(&chain::greedy(
            Chain::by_memory(&free.weights[next..]),
            &[cpu],
            u64::MAX,
        ));
        placement.device_of_unit[next..next + take].fill(Device::Cpu);
        placement.next += take;
        let used: u64 = free.weights[next..next + take].iter().sum();
        placement.cpu_full = (placement.next < free.weights.len()).then(|| CpuFull {
            first: placement.next,
            room: cap.saturating_sub(base + used),
            reserve: 0,
        });
    }

    /// Without GPUs the CPU executes: it takes the longest prefix that leaves room to stage the rest.
    fn fill_cpu_only(&mut self, free: &FreeChain) -> Result<Placement> {
        let mut placement = Placement {
            device_of_unit: vec![Device::Disk; free.weights.len()],
            next: 0,
            cpu_full: None,
        };
        let Some(cap) = self.cpu_capacity() else {
            return Ok(placement);
        };
        let cpu = self.lane(Device::Cpu, cap);
        let (k, r) = split_point(&self.offload_input(free), &[cpu]);
        self.reserve_staging(Device::Cpu, &cpu, r)?;
        placement.device_of_unit[..k].fill(Device::Cpu);
        placement.next = k;
        let used: u64 = free.footprint[..k].iter().sum();
        placement.cpu_full = (k < free.weights.len()).then(|| CpuFull {
            first: k,
            room: cap.saturating_sub(cpu.base + r + used),
            reserve: r,
        });
        Ok(placement)
    }

    /// The CPU's capacity (unbounded as `u64::MAX`), if the spec has a CPU.
    fn cpu_capacity(&self) -> Option<u64> {
        self.spec.capacity(Device::Cpu).map(|c| c.unwrap_or(u64::MAX))
    }

    /// Units left after the GPUs and the CPU need a disk.
    fn check_leftover(&self, free: &FreeChain, placement: &Placement) -> Result<()> {
        let next = placement.next;
        if next >= free.weights.len() || self.spec.contains(Device::Disk) {
            return Ok(());
        }
        let first = self.free_units().nth(next).expect("next < free units").blocks[0];
        Err(PlacementError::DoesNotFit(Shortfall::NoDisk {
            left: free.weights[next..].iter().sum(),
            total: self.total_weights,
            units: free.weights.len() - next,
            first: self.tree.name(self.blocks[first].node).to_string(),
            capacities: self.spec.devices().to_vec(),
            staging: self
                .ledger
                .devices
                .iter()
                .copied()
                .zip(self.ledger.reserve.iter().copied())
                .filter(|(_, r)| *r > 0)
                .collect(),
        }))
    }

    /// Whether a block on `device` executes elsewhere: CPU and disk blocks with GPUs, disk blocks
    /// without.
    fn is_offloaded(&self, device: Device) -> bool {
        if self.gpus.is_empty() {
            device == Device::Disk
        } else {
            !device.is_gpu_like()
        }
    }

    /// Each block's device and, off the GPUs, why it is there.
    fn block_devices(&self, placement: Placement) -> (Vec<Device>, Vec<Option<String>>) {
        let has_gpu = !self.gpus.is_empty();
        let free: Vec<&Unit> = self.free_units().collect();
        let why_disk = reasons::disk_reasons(
            self.tree,
            &self.blocks,
            &free,
            placement.next,
            placement.cpu_full,
            has_gpu,
        );
        let mut block_device = vec![Device::Disk; self.blocks.len()];
        let mut why: Vec<Option<String>> = vec![None; self.blocks.len()];
        let mut free_devices = placement.device_of_unit.into_iter().zip(why_disk);
        for unit in &self.units {
            let (device, why_unit) = match unit.pinned {
                Some(d) => {
                    for &b in &unit.blocks {
                        why[b] = Some(format!("pinned to {d}"));
                    }
                    (d, None)
                }
                None => free_devices.next().expect("one device per free unit"),
            };
            let leader = unit.blocks[0];
            for &b in &unit.blocks {
                block_device[b] = device;
                if b != leader && why[b].is_none() {
                    why[b] = Some(format!("tied to {:?}", self.tree.name(self.blocks[leader].node)));
                }
            }
            if why[leader].is_none() && !device.is_gpu_like() {
                why[leader] = Some(reasons::placement_reason(device, has_gpu, why_unit));
            }
        }
        (block_device, why)
    }

    /// Assemble the plan: per-device usage, assignments, offloads with reasons, the clean device map.
    fn finish(self, placement: Placement) -> Plan {
        let has_gpu = !self.gpus.is_empty();
        let (block_device, why) = self.block_devices(placement);
        let mut usage: Vec<DeviceUsage> = self
            .spec
            .devices()
            .iter()
            .enumerate()
            .map(|(i, (d, cap))| DeviceUsage {
                device: *d,
                capacity_bits: *cap,
                weight_bits: 0,
                runtime_bits: if (has_gpu && d.is_gpu_like()) || (!has_gpu && *d == Device::Cpu) {
                    self.options.activation_bits
                } else {
                    0
                },
                reserve_bits: self.ledger.reserve[i],
                compute: 0,
                blocks: Vec::new(),
            })
            .collect();
        let mut offloaded = Vec::new();
        let mut assignments = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let device = block_device[i];
            let offload = self.is_offloaded(device);
            assignments.push((block.node, device));
            let u = usage.iter_mut().find(|u| u.device == device).expect("device in spec");
            // Buffers of offloaded blocks live on the execution device; they are counted in its reserve.
            let kept = if offload && !self.options.offload_buffers {
                block.buffer_bits
            } else {
                0
            };
            u.weight_bits += block.bits - kept;
            u.compute += self.compute[i];
            u.blocks.push(block.node);
            if !offload {
                u.runtime_bits += self.runtime[i];
            } else {
                let fallback = if device == Device::Disk {
                    "did not fit on the CPU"
                } else {
                    "offloaded"
                };
                offloaded.push(Offload {
                    node: block.node,
                    device,
                    bits: block.bits,
                    reason: why[i].clone().unwrap_or_else(|| fallback.into()),
                });
            }
        }
        let device_map = clean_device_map(self.tree, &assignments);
        Plan {
            strategy: self.strategy.name(),
            assignments,
            device_map,
            usage,
            offloaded,
        }
    }
}
