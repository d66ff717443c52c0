//! The solve pipeline, one method per step: collect blocks and units ([`Solver::new`]), book the pins
//! ([`Solver::pin`]), choose where offloaded blocks execute ([`Solver::choose_execution`], the rule is in
//! [`super::execution`]) by laying the free chain over the GPUs for each candidate
//! ([`Solver::fill_gpus`]) or, without GPUs, over the CPU ([`Solver::fill_cpu_only`]), check that the
//! rest has somewhere to go ([`Solver::check_leftover`]) and assemble the [`Plan`] ([`Solver::finish`]).

use crate::blocks::{attach_to_blocks, cut_blocks, no_split_mask, value_of, Block};
use crate::clean::clean_device_map;
use crate::constraints::{build_units, staged_bits, Unit};
use crate::device::{human, label, Device, DeviceSpec};
use crate::error::{PlacementError, Result, Shortfall};
use crate::plan::{DeviceUsage, Offload, Plan};
use crate::tree::ModuleTree;

use super::chain::{self, Chain, Lane};
use super::execution::{self, Forced, Outcome, Staging};
use super::offload::{split_point, OffloadInput, PinnedUnit};
use super::reasons::{self, CpuFull};
use super::ties::{Indexed, Units};
use super::{Balance, ResolvedStrategy, SolveOptions};

/// Per-device accumulators while solving, indexed like the spec's devices.
#[derive(Clone)]
struct Ledger {
    devices: Vec<Device>,
    pinned: Vec<u64>,
    pinned_cost: Vec<u64>,
    /// Staging room: memory the staged blocks use while they run (load, like weights).
    reserve: Vec<u64>,
    /// Room kept free on top of everything (`gpu0_reserve`): capacity removed, not load to balance.
    headroom: Vec<u64>,
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
            headroom: vec![0; n],
            runtime: vec![0; n],
        }
    }

    fn index(&self, d: Device) -> usize {
        self.devices
            .iter()
            .position(|x| *x == d)
            .expect("devices come from the spec")
    }

    /// The lane of device `d`: what is already booked on it, and its cost base for balancing. Headroom
    /// counts against the capacity but is no load: balancing memory equalises what the GPUs hold, so a
    /// GPU keeping room free is not made to hold less for it (it only has less room).
    fn lane(&self, d: Device, capacity: u64, balance: Balance) -> Lane {
        let i = self.index(d);
        let load = self.pinned[i] + self.runtime[i] + self.reserve[i];
        let base = load.saturating_add(self.headroom[i]);
        let cost_base = match balance {
            Balance::Memory => load,
            Balance::Compute => self.pinned_cost[i],
        };
        Lane {
            base,
            capacity,
            cost_base,
        }
    }
}

/// The free (unpinned) units in chain order, as the columns the layout algorithms read.
struct FreeChain {
    weights: Vec<u64>,
    staged: Vec<u64>,
    is_group: Vec<bool>,
    /// Weights + runtime memory, when some unit has runtime memory (`None`: the footprint is the
    /// weights; a leaf-only plan without a workload keeps one column instead of three).
    with_runtime: Option<Vec<u64>>,
    /// What balancing equalises when it is not the footprint (the compute cost); `None`: the footprint.
    compute: Option<Vec<u64>>,
    /// What stays on the execution device when the unit is offloaded, when some unit has runtime
    /// memory (`None`: the buffers, or nothing when buffers are offloaded).
    stays: Option<Vec<u64>>,
    /// Runtime memory of each unit (empty: none has any).
    runtime: Vec<u64>,
    /// Buffers of each unit.
    buffers: Vec<u64>,
    offload_buffers: bool,
}

impl FreeChain {
    /// Weights + runtime memory: what each unit takes on a GPU.
    fn footprint(&self) -> &[u64] {
        self.with_runtime.as_deref().unwrap_or(&self.weights)
    }

    /// What stays on the execution device when each unit is offloaded (empty: nothing).
    fn stays(&self) -> &[u64] {
        match &self.stays {
            Some(stays) => stays,
            None if self.offload_buffers => &[],
            None => &self.buffers,
        }
    }

    /// Runtime memory of unit `j`.
    fn runtime(&self, j: usize) -> u64 {
        value_of(&self.runtime, j)
    }

    /// The chain the layouts read: footprints, what balancing equalises (the same slice when balancing
    /// memory, so the layouts keep one column of running sums), and the tie groups.
    fn units(&self) -> Units<'_> {
        Units {
            chain: Chain {
                memory: self.footprint(),
                cost: self.compute.as_deref().unwrap_or(self.footprint()),
            },
            is_group: &self.is_group,
        }
    }
}

/// Where the free units went so far.
struct Placement {
    device_of_unit: Vec<Device>,
    /// Units before `next` are placed; the rest go to disk.
    next: usize,
    cpu_full: Option<CpuFull>,
}

/// One candidate execution choice laid out: the ledger with its reserves, and where the units went.
struct Attempt {
    ledger: Ledger,
    placement: Placement,
    cpu_executed_bits: u64,
}

impl Outcome for Attempt {
    fn on_gpus(&self) -> usize {
        self.placement.device_of_unit.iter().filter(|d| d.is_gpu_like()).count()
    }

    fn cpu_executed_bits(&self) -> u64 {
        self.cpu_executed_bits
    }
}

/// The execution choice a plan was made with.
#[derive(Debug, Clone, Copy)]
struct Chosen {
    staging: Staging,
    forced: bool,
}

/// One solve: the inputs, what was derived from them, and the per-device ledger.
pub(super) struct Solver<'a> {
    tree: &'a ModuleTree,
    spec: &'a DeviceSpec,
    options: &'a SolveOptions,
    strategy: ResolvedStrategy,
    blocks: Vec<Block>,
    /// Runtime memory and compute cost per block (empty lists when none is given: see `value_of`).
    runtime: Vec<u64>,
    compute: Vec<u64>,
    /// What each block stages when offloaded (empty without ties: its own bits; see `Unit::staged_bits`).
    staged: Vec<u64>,
    units: Vec<Unit>,
    gpus: Vec<(Device, u64)>,
    /// The devices that compute: the GPUs, or the CPU when there is no GPU (then it is the execution
    /// device, and a block on it is not offloaded).
    computing: Vec<Device>,
    ledger: Ledger,
    /// Indices (into `units`) of the units pinned to CPU or disk, which execute elsewhere.
    pinned_offload: Vec<usize>,
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
        let units = build_units(tree, &blocks, &options.pins, spec)?;
        let staged = staged_bits(tree, &blocks);
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
            staged,
            units,
            gpus,
            computing,
            ledger: Ledger::new(spec),
            pinned_offload: Vec::new(),
        })
    }

    /// Solve: each step in order.
    pub(super) fn solve(mut self) -> Result<Plan> {
        let forced = self.forced()?;
        self.pin()?;
        let free = self.free_chain();
        // Every layout question below is asked of this chain: its running sums are built once.
        let indexed = Indexed::new(free.units());
        if self.gpus.is_empty() {
            let placement = self.fill_cpu_only(&free, &indexed)?;
            self.check_leftover(&free, &placement, &self.ledger)?;
            return Ok(self.finish(placement, None));
        }
        // A model that fits in model order keeps that plan; only a model refused that way gets its
        // leftover tail placed in room the GPUs' runs left (see `tail_to_gpus`).
        let (staging, attempt) = match self.choose_execution(&free, &indexed, forced, false) {
            Ok(found) => found,
            Err(error) => self
                .choose_execution(&free, &indexed, forced, true)
                .map_err(|_| error)?,
        };
        self.ledger = attempt.ledger;
        let chosen = Chosen {
            staging,
            forced: forced.is_some(),
        };
        Ok(self.finish(attempt.placement, Some(chosen)))
    }

    /// The execution device the options force, checked against the spec.
    fn forced(&self) -> Result<Option<Forced>> {
        let Some(device) = self.options.execution_device else {
            return Ok(None);
        };
        let gpus: Vec<Device> = self.gpus.iter().map(|g| g.0).collect();
        let forced = execution::forced(device, &gpus, self.spec.contains(Device::Cpu))?;
        // Without GPUs the CPU executes everything anyway.
        Ok((!gpus.is_empty()).then_some(forced))
    }

    /// Where offloaded units execute: the rule of [`execution`], each candidate laid out in full.
    fn choose_execution(
        &self,
        free: &FreeChain,
        indexed: &Indexed,
        forced: Option<Forced>,
        tail: bool,
    ) -> Result<(Staging, Attempt)> {
        let limits: Vec<u64> = free
            .staged
            .iter()
            .copied()
            .chain(self.pinned_offload.iter().map(|&u| self.staged_of(&self.units[u])))
            .collect();
        execution::choose(
            self.gpus.len(),
            self.spec.contains(Device::Cpu),
            forced,
            &limits,
            |staging| self.fill_gpus(free, indexed, staging, tail),
        )
    }

    /// What a unit stages when offloaded.
    fn staged_of(&self, u: &Unit) -> u64 {
        u.staged_bits(&self.staged)
    }

    /// A unit's runtime memory (KV cache, logits).
    fn runtime_of(&self, u: &Unit) -> u64 {
        u.sum_of(&self.runtime)
    }

    /// Memory a unit leaves on its execution device when it is offloaded.
    fn stays(&self, u: &Unit) -> u64 {
        self.runtime_of(u) + if self.options.offload_buffers { 0 } else { u.buffer_bits }
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
        let mut off = Vec::new();
        for (index, u) in self.units.iter().enumerate() {
            let Some(d) = u.pinned else { continue };
            let i = self.ledger.index(d);
            self.ledger.pinned[i] += u.bits;
            self.ledger.pinned_cost[i] += u.sum_of(&self.compute);
            if self.computing.contains(&d) {
                self.ledger.runtime[i] += self.runtime_of(u);
            } else {
                off.push(index);
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
            self.ledger.headroom[i] += self.options.gpu0_reserve_bits;
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

    /// The free units as columns, in one pass over the units (columns that would repeat another, or be
    /// all zeros, are left out: see the accessors).
    fn free_chain(&self) -> FreeChain {
        let n = self.units.len() - self.pinned_offload.len();
        let by_compute = self.options.balance == Balance::Compute;
        let any_runtime = self.free_units().any(|u| self.runtime_of(u) > 0);
        let column = |wanted: bool| wanted.then(|| Vec::with_capacity(n));
        let mut free = FreeChain {
            weights: Vec::with_capacity(n),
            staged: Vec::with_capacity(n),
            is_group: Vec::with_capacity(n),
            with_runtime: column(any_runtime),
            compute: column(by_compute),
            stays: column(any_runtime),
            runtime: column(any_runtime).unwrap_or_default(),
            buffers: Vec::with_capacity(n),
            offload_buffers: self.options.offload_buffers,
        };
        for u in self.free_units() {
            free.weights.push(u.bits);
            free.staged.push(self.staged_of(u));
            free.is_group.push(u.blocks.len() > 1);
            free.buffers.push(u.buffer_bits);
            if let Some(compute) = free.compute.as_mut() {
                compute.push(u.sum_of(&self.compute));
            }
            if any_runtime {
                let runtime = self.runtime_of(u);
                free.runtime.push(runtime);
                free.with_runtime
                    .as_mut()
                    .expect("made with runtime")
                    .push(u.bits + runtime);
                free.stays.as_mut().expect("made with runtime").push(self.stays(u));
            }
        }
        free
    }

    fn pinned_units(&self) -> Vec<PinnedUnit> {
        self.pinned_offload
            .iter()
            .map(|&u| PinnedUnit {
                staged: self.staged_of(&self.units[u]),
                stays: self.stays(&self.units[u]),
            })
            .collect()
    }

    fn offload_input<'f>(&self, free: &'f FreeChain, pinned: &'f [PinnedUnit], staging: Staging) -> OffloadInput<'f> {
        OffloadInput {
            staged: &free.staged,
            stays: free.stays(),
            pinned,
            staging,
        }
    }

    /// The first block of the largest unit from free unit `k` on (and the pinned offloaded units) that
    /// `runs` selects: the block a staging shortfall is about.
    fn largest_offloaded(&self, free: &FreeChain, k: usize, runs: impl Fn(u64) -> bool) -> Option<String> {
        let free_units: Vec<&Unit> = self.free_units().collect();
        let pinned = self.pinned_offload.iter().map(|&u| &self.units[u]);
        let unit = free_units[k.min(free.staged.len())..]
            .iter()
            .copied()
            .chain(pinned)
            .map(|u| (u, self.staged_of(u)))
            .filter(|&(_, staged)| runs(staged))
            // The first of the largest: the block a reader meets first in model order.
            .fold(None, |best: Option<(&Unit, u64)>, (u, staged)| match best {
                Some(b) if b.1 >= staged => Some(b),
                _ => Some((u, staged)),
            })?
            .0;
        Some(self.tree.name(self.blocks[unit.blocks[0]].node).to_string())
    }

    /// Lay out one execution choice: how many free units stay on the GPUs (keeping staging room on the
    /// staging GPU if it stages anything), the strategy's layout of them, then the rest on the CPU
    /// (with what CPU-executed units need there) and the disk; with `tail`, what is left for the disk
    /// when there is none goes to room left on the GPUs.
    fn fill_gpus(&self, free: &FreeChain, indexed: &Indexed, staging: Staging, tail: bool) -> Result<Attempt> {
        let mut ledger = self.ledger.clone();
        let gpu_lanes = self.gpu_lanes();
        let pinned = self.pinned_units();
        // Without CPU or disk nothing can be offloaded: no staging room, the leftover is an error later.
        let can_offload = self.spec.contains(Device::Cpu) || self.spec.contains(Device::Disk);
        let input = self.offload_input(free, &pinned, staging);
        let (k, r) = if can_offload {
            split_point(&input, indexed, &gpu_lanes)
        } else {
            (indexed.longest_prefix(&gpu_lanes), 0)
        };
        if let Some(g) = staging.gpu {
            let (device, lane) = (self.gpus[g].0, &gpu_lanes[g]);
            if lane.base.saturating_add(r) > lane.capacity {
                let block = self.largest_offloaded(free, k, |s| staging.stages(s));
                return Err(reasons::no_staging_room(
                    self.spec,
                    self.total_weights,
                    device,
                    block,
                    lane,
                    r,
                ));
            }
            let i = ledger.index(device);
            ledger.reserve[i] += r;
        }
        let lanes: Vec<Lane> = self
            .gpus
            .iter()
            .map(|(d, cap)| ledger.lane(*d, *cap, self.options.balance))
            .collect();
        let lane_of = self.lay_out_prefix(free, indexed, k, &lanes);
        let mut device_of_unit = vec![Device::Disk; free.weights.len()];
        for (unit, &l) in lane_of.iter().enumerate() {
            device_of_unit[unit] = self.gpus[l].0;
        }
        let mut placement = Placement {
            device_of_unit,
            next: lane_of.len(),
            cpu_full: None,
        };
        self.offload_to_cpu(free, &mut placement, &mut ledger, staging)?;
        if tail {
            if let Some(end) = self.tail_to_gpus(free, &mut placement, &lanes, &lane_of) {
                // The staging GPU keeps room only for the units still offloaded.
                if let Some(g) = staging.gpu {
                    let i = ledger.index(self.gpus[g].0);
                    ledger.reserve[i] -= r.saturating_sub(input.reserve_between(k, end));
                }
            }
        }
        self.check_leftover(free, &placement, &ledger)?;
        let pinned_on_cpu = self.pinned_offload.iter().map(|&u| &self.units[u]);
        let cpu_executed_bits = (placement.next.min(lane_of.len())..free.weights.len())
            .filter(|&j| !placement.device_of_unit[j].is_gpu_like() && !staging.stages(free.staged[j]))
            .map(|j| free.weights[j])
            .chain(
                pinned_on_cpu
                    .filter(|u| !staging.stages(self.staged_of(u)))
                    .map(|u| u.bits),
            )
            .sum();
        Ok(Attempt {
            ledger,
            placement,
            cpu_executed_bits,
        })
    }

    /// Without a disk, the units left after the CPU is full would be refused, yet a GPU may have room
    /// the chain could not use: its run stopped at a unit too large for it (a small GPU 0 before the
    /// first layer, the rest of a GPU after a tie group). The leftover tail (say the small blocks of an
    /// LM head after the last layer) then goes there, each unit on the first GPU with room for its
    /// footprint, resident and computing there, as accelerate's map would put them with the tied module.
    /// All or nothing: if one unit finds no room the plan stays refused. The room is sought with the
    /// staging room reserved for these units as offloaded (so it stays valid when that shrinks to what
    /// the units still offloaded need). Returns where the tail began, if it moved.
    fn tail_to_gpus(
        &self,
        free: &FreeChain,
        placement: &mut Placement,
        lanes: &[Lane],
        lane_of: &[usize],
    ) -> Option<usize> {
        let n = free.weights.len();
        if placement.next >= n || self.spec.contains(Device::Disk) {
            return None;
        }
        let footprint = free.footprint();
        let mut used: Vec<u64> = lanes.iter().map(|l| l.base).collect();
        for (unit, &l) in lane_of.iter().enumerate() {
            used[l] = used[l].saturating_add(footprint[unit]);
        }
        let mut lane_for = Vec::with_capacity(n - placement.next);
        for &need in &footprint[placement.next..] {
            let l = (0..lanes.len()).find(|&l| used[l].saturating_add(need) <= lanes[l].capacity)?;
            used[l] += need;
            lane_for.push(l);
        }
        let start = placement.next;
        for (j, l) in (start..n).zip(lane_for) {
            placement.device_of_unit[j] = self.gpus[l].0;
        }
        placement.next = n;
        placement.cpu_full = None;
        Some(start)
    }

    /// The GPU lane of each of the first `k` free units under the strategy.
    fn lay_out_prefix(&self, free: &FreeChain, indexed: &Indexed, k: usize, lanes: &[Lane]) -> Vec<usize> {
        indexed.lay_out(self.strategy, k, lanes).unwrap_or_else(|| {
            // Not reached (the prefix was found to fit); keep what fits in place rather than fail.
            let counts = chain::greedy(Chain::by_memory(&free.footprint()[..k]), lanes, u64::MAX);
            counts
                .iter()
                .enumerate()
                .flat_map(|(l, &c)| std::iter::repeat_n(l, c))
                .collect()
        })
    }

    /// Put the units after the GPU prefix on the CPU in order while they fit (weights only: the runtime
    /// memory of staged units is on the staging GPU). Units that execute on the CPU (not staged) keep
    /// their runtime memory and an activation buffer there, and those that land on disk also need room
    /// to be loaded and their kept buffers: like the GPU reserve, a fixed point (more room kept, fewer
    /// units on the CPU, more on disk to load).
    fn offload_to_cpu(
        &self,
        free: &FreeChain,
        placement: &mut Placement,
        ledger: &mut Ledger,
        staging: Staging,
    ) -> Result<()> {
        let Some(cap) = self.cpu_capacity() else { return Ok(()) };
        let next = placement.next;
        let n = free.weights.len();
        let runs_here = |j: &usize| !staging.stages(free.staged[*j]);
        let kept = |buffers: u64| if self.options.offload_buffers { 0 } else { buffers };
        let pinned: Vec<&Unit> = self
            .pinned_offload
            .iter()
            .map(|&u| &self.units[u])
            .filter(|u| !staging.stages(self.staged_of(u)))
            .collect();
        let any = (next..n).any(|j| runs_here(&j)) || !pinned.is_empty();
        let runtime: u64 = if any { self.options.activation_bits } else { 0 }
            + (next..n).filter(runs_here).map(|j| free.runtime(j)).sum::<u64>()
            + pinned.iter().map(|u| self.runtime_of(u)).sum::<u64>();
        let on_disk = pinned
            .iter()
            .filter(|u| u.pinned == Some(Device::Disk))
            .map(|u| (self.staged_of(u), kept(u.buffer_bits)));
        let has_disk = self.spec.contains(Device::Disk);
        let load_room = |first_disk: usize| -> u64 {
            if !has_disk {
                return 0; // nothing lands on disk: what the CPU cannot hold is refused by check_leftover
            }
            let mut loaded = (first_disk..n)
                .filter(runs_here)
                .map(|j| (free.staged[j], kept(free.buffers[j])))
                .chain(on_disk.clone())
                .peekable();
            if loaded.peek().is_none() {
                return 0;
            }
            let (largest, buffers) = loaded.fold((0u64, 0u64), |(m, s), (a, b)| (m.max(a), s + b));
            largest + buffers
        };
        let cpu = ledger.index(Device::Cpu);
        let base = ledger.pinned[cpu];
        let mut first_disk = n;
        let (take, room) = loop {
            let room = load_room(first_disk);
            let need = base.saturating_add(runtime).saturating_add(room);
            if need > cap {
                let block = self.largest_offloaded(free, next, |s| !staging.stages(s));
                return Err(PlacementError::DoesNotFit(Shortfall::Staging {
                    device: Device::Cpu,
                    block,
                    reserve: runtime + room,
                    base,
                    capacity: cap,
                    total: None,
                    elsewhere: None,
                }));
            }
            let take = chain::placed(&chain::greedy(
                Chain::by_memory(&free.weights[next..]),
                &[Lane::memory(need, cap)],
                u64::MAX,
            ));
            if next + take >= first_disk {
                break (take, room);
            }
            first_disk = next + take;
        };
        ledger.runtime[cpu] += runtime;
        ledger.reserve[cpu] += room;
        placement.device_of_unit[next..next + take].fill(Device::Cpu);
        placement.next += take;
        let used: u64 = free.weights[next..next + take].iter().sum();
        placement.cpu_full = (placement.next < n).then(|| CpuFull {
            first: placement.next,
            room: cap.saturating_sub(base + runtime + room + used),
            reserve: runtime + room,
        });
        Ok(())
    }

    /// Without GPUs the CPU executes: it takes the longest prefix that leaves room to stage the rest.
    fn fill_cpu_only(&mut self, free: &FreeChain, indexed: &Indexed) -> Result<Placement> {
        let mut placement = Placement {
            device_of_unit: vec![Device::Disk; free.weights.len()],
            next: 0,
            cpu_full: None,
        };
        let Some(cap) = self.cpu_capacity() else {
            return Ok(placement);
        };
        let cpu = self.lane(Device::Cpu, cap);
        let pinned = self.pinned_units();
        let (k, r) = split_point(&self.offload_input(free, &pinned, Staging::FIRST_GPU), indexed, &[cpu]);
        if cpu.base.saturating_add(r) > cpu.capacity {
            let block = self.largest_offloaded(free, k, |_| true);
            return Err(reasons::no_staging_room(
                self.spec,
                self.total_weights,
                Device::Cpu,
                block,
                &cpu,
                r,
            ));
        }
        let i = self.ledger.index(Device::Cpu);
        self.ledger.reserve[i] += r;
        placement.device_of_unit[..k].fill(Device::Cpu);
        placement.next = k;
        let used: u64 = free.footprint()[..k].iter().sum();
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
    fn check_leftover(&self, free: &FreeChain, placement: &Placement, ledger: &Ledger) -> Result<()> {
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
            staging: ledger
                .devices
                .iter()
                .copied()
                .zip(ledger.reserve.iter().copied())
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

    /// Where a unit stored on `device` executes under `chosen` (without GPUs: the CPU).
    fn execution_of(&self, device: Device, staged: u64, chosen: Option<Chosen>) -> Device {
        match chosen {
            _ if device.is_gpu_like() => device,
            None => Device::Cpu,
            Some(Chosen { staging, .. }) => match staging.gpu {
                Some(g) if staging.stages(staged) => self.gpus[g].0,
                _ => Device::Cpu,
            },
        }
    }

    /// What an offloaded unit's reason adds about where it runs, when that is not the usual GPU 0
    /// staging (plans staged there keep their sentences).
    fn execution_note(&self, execution: Device, staged: u64, chosen: Option<Chosen>) -> Option<String> {
        let chosen = chosen?;
        if chosen.staging == Staging::FIRST_GPU && !chosen.forced {
            return None;
        }
        Some(match execution {
            Device::Cpu if chosen.forced && chosen.staging == Staging::CPU => {
                "; runs on the CPU (execution_device)".to_string()
            }
            Device::Cpu => format!("; runs on the CPU: no GPU can stage its {}", human(staged)),
            gpu => format!("; runs on {}", label(gpu)),
        })
    }

    /// Each block's device, its execution device and, for each offloaded block, why it is there (block
    /// index and sentence, in block order: only offloaded blocks are asked why).
    fn block_devices(
        &self,
        placement: Placement,
        chosen: Option<Chosen>,
    ) -> (Vec<Device>, Vec<Device>, Vec<(usize, String)>) {
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
        let mut block_execution = vec![Device::Cpu; self.blocks.len()];
        let mut why: Vec<(usize, String)> = Vec::new();
        // The free units before the first one on disk have no disk reason.
        let why_disk = std::iter::repeat_n(None, placement.next.min(free.len())).chain(why_disk);
        let mut free_devices = placement.device_of_unit.into_iter().zip(why_disk);
        for unit in &self.units {
            let (device, mut why_unit) = match unit.pinned {
                Some(d) => (d, None),
                None => free_devices.next().expect("one device per free unit"),
            };
            let staged = self.staged_of(unit);
            let execution = self.execution_of(device, staged, chosen);
            for &b in &unit.blocks {
                block_device[b] = device;
                block_execution[b] = execution;
            }
            if !self.is_offloaded(device) {
                continue;
            }
            let note = self.execution_note(execution, staged, chosen);
            let leader = unit.blocks[0];
            for &b in &unit.blocks {
                let reason = match unit.pinned {
                    Some(d) => Some(format!("pinned to {d}")),
                    None if b != leader => Some(format!("tied to {:?}", self.tree.name(self.blocks[leader].node))),
                    None if !device.is_gpu_like() => Some(reasons::placement_reason(device, has_gpu, why_unit.take())),
                    None => None,
                };
                if let Some(mut reason) = reason {
                    if let Some(note) = &note {
                        reason.push_str(note);
                    }
                    why.push((b, reason));
                }
            }
        }
        // Tie groups list blocks out of model order.
        why.sort_unstable_by_key(|(b, _)| *b);
        (block_device, block_execution, why)
    }

    /// Assemble the plan: per-device usage, assignments, offloads with reasons, the clean device map.
    fn finish(self, placement: Placement, chosen: Option<Chosen>) -> Plan {
        let has_gpu = !self.gpus.is_empty();
        let (block_device, block_execution, why) = self.block_devices(placement, chosen);
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
                reserve_bits: self.ledger.reserve[i] + self.ledger.headroom[i],
                compute: 0,
                blocks: Vec::new(),
            })
            .collect();
        // With GPUs, a CPU that executes offloaded blocks needs an activation buffer and their runtime memory.
        if has_gpu && block_execution.contains(&Device::Cpu) {
            if let Some(cpu) = usage.iter_mut().find(|u| u.device == Device::Cpu) {
                cpu.runtime_bits += self.options.activation_bits;
            }
        }
        let mut offloaded = Vec::new();
        let mut assignments = Vec::with_capacity(self.blocks.len());
        let mut execution = Vec::with_capacity(self.blocks.len());
        let mut why = why.into_iter().peekable();
        for (i, block) in self.blocks.iter().enumerate() {
            let device = block_device[i];
            let runs_on = block_execution[i];
            let offload = self.is_offloaded(device);
            assignments.push((block.node, device));
            execution.push((block.node, runs_on));
            // Buffers of blocks executed elsewhere live on their execution device, counted in its reserve.
            let kept = if offload && !self.options.offload_buffers && runs_on != device {
                block.buffer_bits
            } else {
                0
            };
            let u = usage.iter_mut().find(|u| u.device == device).expect("device in spec");
            u.weight_bits += block.bits - kept;
            u.compute += value_of(&self.compute, i);
            u.blocks.push(block.node);
            if !offload {
                u.runtime_bits += value_of(&self.runtime, i);
            } else {
                if has_gpu && runs_on == Device::Cpu {
                    let cpu = usage
                        .iter_mut()
                        .find(|u| u.device == Device::Cpu)
                        .expect("CPU executes");
                    cpu.runtime_bits += value_of(&self.runtime, i);
                }
                let fallback = if device == Device::Disk {
                    "did not fit on the CPU"
                } else {
                    "offloaded"
                };
                offloaded.push(Offload {
                    node: block.node,
                    device,
                    bits: block.bits,
                    reason: why
                        .next_if(|(b, _)| *b == i)
                        .map_or_else(|| fallback.into(), |(_, reason)| reason),
                });
            }
        }
        let device_map = clean_device_map(self.tree, &assignments);
        Plan {
            strategy: self.strategy.name(),
            assignments,
            execution,
            device_map,
            usage,
            offloaded,
        }
    }
}
