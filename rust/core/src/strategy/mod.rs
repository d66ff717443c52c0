//! Strategies: turn a tree, a device spec and constraints into a [`Plan`].
//!
//! Every strategy shares one pipeline: cut the tree into blocks, group tied blocks and resolve pins into
//! units, decide how much of the chain of free units stays on the GPUs (reserving staging room only if
//! something is offloaded), lay that prefix over the GPUs (the strategy proper; tie groups may sit on any
//! GPU, see [`ties`]), then put the rest on the CPU and finally on disk.
//!
//! Memory on a GPU is weights + runtime memory (KV cache and logits attached to blocks, and one
//! activation buffer per computing device). An offloaded block's weights go to CPU/disk, but it runs on
//! the execution device (GPU 0), so its runtime memory and the staging room land there.

pub mod accelerate_budget;
pub mod accelerate_compat;
pub mod balanced;
pub mod chain;
pub mod low_zero;
pub mod offload;
pub mod sequential;
pub mod ties;

use crate::blocks::{attach_to_blocks, cut_blocks, no_split_mask, Block};
use crate::clean::clean_device_map;
use crate::constraints::{build_units, Unit};
use crate::device::{bits_to_bytes, Device, DeviceSpec};
use crate::error::{PlacementError, Result};
use crate::plan::{DeviceUsage, Offload, Plan};
use crate::tree::{ModuleTree, NodeId};
use chain::{Chain, Lane};
use offload::{split_point, OffloadInput};
use ties::Units;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// One GPU: `sequential`; several: `balanced`; none: CPU then disk.
    #[default]
    Auto,
    Sequential,
    Balanced,
    BalancedLow0,
}

impl Strategy {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [Strategy; 4] = [
        Strategy::Auto,
        Strategy::Balanced,
        Strategy::BalancedLow0,
        Strategy::Sequential,
    ];

    /// Read a strategy name ("auto", "balanced", "balanced_low_0", "sequential").
    pub fn parse(name: &str) -> Result<Strategy> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| invalid_option("strategy", name, Strategy::ALL.map(Strategy::name)))
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::Sequential => "sequential",
            Strategy::Balanced => "balanced",
            Strategy::BalancedLow0 => "balanced_low_0",
        }
    }
}

/// What the balanced strategies equalise across GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Memory (weights + runtime memory) per GPU.
    #[default]
    Memory,
    /// Compute per GPU (the `compute` values of the options), within each GPU's memory.
    Compute,
}

impl Balance {
    /// Every balance mode.
    pub const ALL: [Balance; 2] = [Balance::Memory, Balance::Compute];

    /// Read a balance mode ("memory" or "compute").
    pub fn parse(name: &str) -> Result<Balance> {
        Balance::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| invalid_option("balance", name, Balance::ALL.map(Balance::name)))
    }

    pub fn name(self) -> &'static str {
        match self {
            Balance::Memory => "memory",
            Balance::Compute => "compute",
        }
    }
}

/// The error for an option value that is none of `expected`.
fn invalid_option<const N: usize>(what: &str, value: &str, expected: [&str; N]) -> PlacementError {
    PlacementError::InvalidOption {
        what: what.into(),
        value: value.into(),
        expected: expected.map(String::from).to_vec(),
    }
}

#[derive(Debug, Clone, Default)]
pub struct SolveOptions {
    pub strategy: Strategy,
    pub no_split_module_classes: Vec<String>,
    /// Module or tensor name -> device fixed by the user.
    pub pins: Vec<(String, Device)>,
    /// Offload buffers with their blocks (otherwise they stay on the execution device).
    pub offload_buffers: bool,
    /// Runtime memory in bits attached to nodes (e.g. a decoder layer's KV cache, the head's logits).
    pub runtime_bits: Vec<(NodeId, u64)>,
    /// Working memory in bits every computing device needs once (activations).
    pub activation_bits: u64,
    /// Compute cost attached to nodes (e.g. FLOPs per token), used by `Balance::Compute`.
    pub compute: Vec<(NodeId, u64)>,
    pub balance: Balance,
    /// Bits kept free on GPU 0 on top of everything else (e.g. for generate's outputs).
    pub gpu0_reserve_bits: u64,
}

/// Bits as a readable size ("512 B", "1.50 MiB", "70.00 GiB").
fn human(bits: u64) -> String {
    let bytes = bits_to_bytes(bits);
    for (unit, size) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= size {
            return format!("{:.2} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

/// A device as a sentence names it ("GPU 0", "mps", "cpu").
fn label(device: Device) -> String {
    match device {
        Device::Gpu(i) => format!("GPU {i}"),
        other => other.to_string(),
    }
}

/// Per-device accumulators while solving, indexed like the spec's devices.
struct Ledger {
    devices: Vec<Device>,
    pinned: Vec<u64>,
    pinned_cost: Vec<u64>,
    reserve: Vec<u64>,
    runtime: Vec<u64>,
}

impl Ledger {
    fn index(&self, d: Device) -> usize {
        self.devices
            .iter()
            .position(|x| *x == d)
            .expect("devices come from the spec")
    }
}

pub fn solve(tree: &ModuleTree, spec: &DeviceSpec, options: &SolveOptions) -> Result<Plan> {
    if spec.devices().is_empty() {
        return Err(PlacementError::DoesNotFit {
            detail: "max_memory names no device, so nothing can be placed; give at least one device with its \
                     size, e.g. {0: \"20GiB\", \"cpu\": \"64GiB\"}, or omit max_memory to use this machine's free memory"
                .into(),
        });
    }
    let no_split = no_split_mask(tree, &options.no_split_module_classes);
    let blocks = cut_blocks(tree, &no_split);
    let runtime = attach_to_blocks(tree, &blocks, &options.runtime_bits)?;
    let compute = attach_to_blocks(tree, &blocks, &options.compute)?;
    let units = build_units(tree, &blocks, &options.pins, spec, &runtime, &compute)?;
    let gpus: Vec<(Device, u64)> = spec.gpus().collect();
    let strategy = match options.strategy {
        Strategy::Auto if gpus.len() > 1 => Strategy::Balanced,
        Strategy::Auto => Strategy::Sequential,
        s => s,
    };
    let stays = |u: &Unit| u.runtime_bits + if options.offload_buffers { 0 } else { u.buffer_bits };

    // The devices that compute: the GPUs, or the CPU when there is no GPU (then it is the execution
    // device, and a block on it is not offloaded).
    let computing: Vec<Device> = if gpus.is_empty() {
        spec.contains(Device::Cpu).then_some(Device::Cpu).into_iter().collect()
    } else {
        gpus.iter().map(|g| g.0).collect()
    };

    let n = spec.devices().len();
    let mut ledger = Ledger {
        devices: spec.devices().iter().map(|(d, _)| *d).collect(),
        pinned: vec![0; n],
        pinned_cost: vec![0; n],
        reserve: vec![0; n],
        runtime: vec![0; n],
    };
    let (mut pin_off_max, mut pin_off_stays, mut any_pin_off) = (0u64, 0u64, false);
    for u in units.iter().filter(|u| u.pinned.is_some()) {
        let d = u.pinned.expect("filtered");
        let i = ledger.index(d);
        ledger.pinned[i] += u.bits;
        ledger.pinned_cost[i] += u.compute;
        if computing.contains(&d) {
            ledger.runtime[i] += u.runtime_bits;
        } else {
            any_pin_off = true;
            pin_off_max = pin_off_max.max(u.staged_bits);
            pin_off_stays += stays(u);
        }
    }
    for (i, (d, cap)) in spec.devices().iter().enumerate() {
        if let Some(cap) = cap.filter(|c| ledger.pinned[i] > *c) {
            return Err(PlacementError::DoesNotFit {
                detail: format!(
                    "modules pinned to {d} need {} but it has {}; pin fewer modules there or raise its max_memory",
                    human(ledger.pinned[i]),
                    human(cap)
                ),
            });
        }
    }
    for d in &computing {
        let i = ledger.index(*d);
        ledger.runtime[i] += options.activation_bits;
    }
    if let Some((gpu0, _)) = gpus.first() {
        let i = ledger.index(*gpu0);
        ledger.reserve[i] += options.gpu0_reserve_bits;
    }

    let free: Vec<&Unit> = units.iter().filter(|u| u.pinned.is_none()).collect();
    let weights: Vec<u64> = free.iter().map(|u| u.bits).collect();
    let staged: Vec<u64> = free.iter().map(|u| u.staged_bits).collect();
    let is_group: Vec<bool> = free.iter().map(|u| u.blocks.len() > 1).collect();
    let footprint: Vec<u64> = free.iter().map(|u| u.bits + u.runtime_bits).collect();
    let cost: Vec<u64> = match options.balance {
        Balance::Memory => footprint.clone(),
        Balance::Compute => free.iter().map(|u| u.compute).collect(),
    };
    let stay: Vec<u64> = free.iter().map(|u| stays(u)).collect();
    let lane = |d: Device, capacity: u64, ledger: &Ledger| {
        let i = ledger.index(d);
        let base = ledger.pinned[i] + ledger.runtime[i] + ledger.reserve[i];
        let cost_base = match options.balance {
            Balance::Memory => base,
            Balance::Compute => ledger.pinned_cost[i],
        };
        Lane {
            base,
            capacity,
            cost_base,
        }
    };
    let gpu_lanes: Vec<Lane> = gpus.iter().map(|(d, cap)| lane(*d, *cap, &ledger)).collect();
    for ((d, cap), l) in gpus.iter().zip(&gpu_lanes) {
        if l.base > *cap {
            return Err(PlacementError::DoesNotFit {
                detail: format!(
                    "{} needs {} before any free layer (pinned modules, runtime memory, reserve) but has {}; \
                     pin fewer modules there, shrink the workload or raise its max_memory",
                    label(*d),
                    human(l.base),
                    human(*cap)
                ),
            });
        }
    }
    let input = OffloadInput {
        footprint: &footprint,
        is_group: &is_group,
        staged: &staged,
        stays: &stay,
        pinned_offloaded_max: pin_off_max,
        pinned_offloaded_stays: pin_off_stays,
        any_pinned_offloaded: any_pin_off,
    };
    let total_weights: u64 = units.iter().map(|u| u.bits).sum();
    let staging_error = |device: Device, l: &Lane, r: u64| PlacementError::DoesNotFit {
        detail: format!(
            "{} executes the offloaded layers and needs {} free to stage them (the largest offloaded block \
             with the tied tensors it uses, plus their runtime memory and buffers) on top of {}, but has {}: \
             give it at least {} or offload less{}",
            label(device),
            human(r),
            human(l.base),
            human(l.capacity),
            human(l.base.saturating_add(r)),
            total_shortfall(spec, total_weights),
        ),
    };

    let mut device_of_unit: Vec<Device> = vec![Device::Disk; free.len()];
    let mut next = 0usize;
    let cpu_capacity = spec.capacity(Device::Cpu).map(|c| c.unwrap_or(u64::MAX));
    // Without CPU or disk nothing can be offloaded: no staging room, the leftover is an error below.
    let can_offload = spec.contains(Device::Cpu) || spec.contains(Device::Disk);
    // Where the first unit that went to disk met a full CPU: its index, the CPU room left then, and the
    // staging room kept on the CPU (when it executes).
    let mut cpu_full_at: Option<(usize, u64, u64)> = None;
    if !gpu_lanes.is_empty() {
        let (k, r) = if can_offload {
            split_point(&input, &gpu_lanes)
        } else {
            let units = Units {
                chain: Chain::by_memory(&footprint),
                is_group: &is_group,
            };
            (ties::longest_prefix(units, &gpu_lanes), 0)
        };
        if gpu_lanes[0].base.saturating_add(r) > gpu_lanes[0].capacity {
            return Err(staging_error(gpus[0].0, &gpu_lanes[0], r));
        }
        let i0 = ledger.index(gpus[0].0);
        ledger.reserve[i0] += r;
        let lanes: Vec<Lane> = gpus.iter().map(|(d, cap)| lane(*d, *cap, &ledger)).collect();
        let prefix = Units {
            chain: Chain {
                memory: &footprint[..k],
                cost: &cost[..k],
            },
            is_group: &is_group[..k],
        };
        let lane_of = ties::lay_out(strategy, prefix, &lanes).unwrap_or_else(|| {
            // Not reached (the prefix was found to fit); keep what fits in place rather than fail.
            let counts = chain::greedy(Chain::by_memory(&footprint[..k]), &lanes, u64::MAX);
            counts
                .iter()
                .enumerate()
                .flat_map(|(l, &c)| std::iter::repeat_n(l, c))
                .collect()
        });
        for (unit, &l) in lane_of.iter().enumerate() {
            device_of_unit[unit] = gpus[l].0;
        }
        next = lane_of.len();
        if let Some(cap) = cpu_capacity {
            // Offloaded weights only: their runtime memory is on the execution device.
            let base = ledger.pinned[ledger.index(Device::Cpu)];
            let cpu = Lane::memory(base, cap);
            let take = chain::placed(&chain::greedy(Chain::by_memory(&weights[next..]), &[cpu], u64::MAX));
            device_of_unit[next..next + take].fill(Device::Cpu);
            next += take;
            let used: u64 = weights[next - take..next].iter().sum();
            cpu_full_at = (next < weights.len()).then(|| (next, cap.saturating_sub(base + used), 0));
        }
    } else if let Some(cap) = cpu_capacity {
        let cpu = lane(Device::Cpu, cap, &ledger);
        let (k, r) = split_point(&input, &[cpu]);
        if cpu.base.saturating_add(r) > cpu.capacity {
            return Err(staging_error(Device::Cpu, &cpu, r));
        }
        let i = ledger.index(Device::Cpu);
        ledger.reserve[i] += r;
        device_of_unit[..k].fill(Device::Cpu);
        next = k;
        let used: u64 = footprint[..k].iter().sum();
        cpu_full_at = (next < weights.len()).then(|| (next, cap.saturating_sub(cpu.base + r + used), r));
    }

    if next < weights.len() && !spec.contains(Device::Disk) {
        let capacities: Vec<String> = spec
            .devices()
            .iter()
            .map(|(d, cap)| {
                format!(
                    "{}: {}",
                    label(*d),
                    cap.map(human).unwrap_or_else(|| "unbounded".into())
                )
            })
            .collect();
        let staging: Vec<String> = ledger
            .devices
            .iter()
            .zip(&ledger.reserve)
            .filter(|(_, r)| **r > 0)
            .map(|(d, r)| {
                format!(
                    "; {} of {} is kept free to stage offloaded layers",
                    human(*r),
                    label(*d)
                )
            })
            .collect();
        let staging = staging.concat();
        return Err(PlacementError::DoesNotFit {
            detail: format!(
                "{} of the model's {} of weights ({} blocks from {:?} on) fit on no device (capacities {}{}); \
                 add \"disk\" to max_memory to offload them, or give the devices more memory",
                human(weights[next..].iter().sum()),
                human(total_weights),
                weights.len() - next,
                tree.name(blocks[free[next].blocks[0]].node),
                capacities.join(", "),
                staging,
            ),
        });
    }

    let why_disk = disk_reasons(tree, &blocks, &free, &weights, next, cpu_full_at, !gpus.is_empty());
    Ok(build_plan(
        tree,
        spec,
        strategy,
        &blocks,
        &units,
        &device_of_unit,
        &why_disk,
        &ledger,
        &runtime,
        &compute,
        options,
    ))
}

/// ", and the model's T of weights exceed all the devices hold (C) by M" when, without disk, the
/// model could not fit even with perfect packing; empty otherwise.
fn total_shortfall(spec: &DeviceSpec, total_weights: u64) -> String {
    if spec.contains(Device::Disk) {
        return String::new();
    }
    let room = spec
        .devices()
        .iter()
        .filter_map(|(_, cap)| *cap)
        .fold(0u64, |a, c| a.saturating_add(c));
    if total_weights <= room {
        return String::new();
    }
    format!(
        "; besides, the model's {} of weights exceed all the devices hold together ({}) by {}: add \"disk\" \
         to max_memory or give the devices more memory",
        human(total_weights),
        human(room),
        human(total_weights - room)
    )
}

/// Why each free unit from `first_on_disk` on went to disk. Units keep model order, so once one does not
/// fit on the CPU every later one goes to disk too, however small: say which one filled the CPU.
fn disk_reasons(
    tree: &ModuleTree,
    blocks: &[Block],
    free: &[&Unit],
    weights: &[u64],
    first_on_disk: usize,
    cpu_full_at: Option<(usize, u64, u64)>,
    has_gpu: bool,
) -> Vec<Option<String>> {
    let not_gpus = if has_gpu { "did not fit on the GPUs, and " } else { "" };
    let mut why = vec![None; free.len()];
    for j in first_on_disk..free.len() {
        why[j] = Some(match cpu_full_at {
            Some((first, room, reserve)) => {
                let left = if reserve > 0 {
                    format!(
                        "{} left on the CPU (which keeps {} to stage offloaded blocks)",
                        human(room),
                        human(reserve)
                    )
                } else {
                    format!("{} left on the CPU", human(room))
                };
                if j == first {
                    format!("{not_gpus}needs {} but only {left}", human(weights[j]))
                } else {
                    format!(
                        "{not_gpus}blocks keep model order: {:?} ({}) did not fit in the {left} before it, so every \
                         block after it goes to disk",
                        tree.name(blocks[free[first].blocks[0]].node),
                        human(weights[first]),
                    )
                }
            }
            None if has_gpu => "did not fit on the GPUs and max_memory has no \"cpu\"".to_string(),
            None => "max_memory has no GPU and no \"cpu\"".to_string(),
        });
    }
    why
}

#[allow(clippy::too_many_arguments)]
fn build_plan(
    tree: &ModuleTree,
    spec: &DeviceSpec,
    strategy: Strategy,
    blocks: &[Block],
    units: &[Unit],
    device_of_free: &[Device],
    why_disk: &[Option<String>],
    ledger: &Ledger,
    runtime: &[u64],
    compute: &[u64],
    options: &SolveOptions,
) -> Plan {
    let has_gpu = spec.gpus().next().is_some();
    // Offloaded = executed on another device: CPU and disk blocks with GPUs, disk blocks without.
    let is_offloaded = |d: Device| if has_gpu { !d.is_gpu_like() } else { d == Device::Disk };
    let mut block_device = vec![Device::Disk; blocks.len()];
    let mut reasons: Vec<Option<String>> = vec![None; blocks.len()];
    let mut free_devices = device_of_free.iter().zip(why_disk);
    for unit in units {
        let (device, why) = match unit.pinned {
            Some(d) => {
                for &b in &unit.blocks {
                    reasons[b] = Some(format!("pinned to {d}"));
                }
                (d, None)
            }
            None => {
                let (d, why) = free_devices.next().expect("one device per free unit");
                (*d, why.clone())
            }
        };
        let leader = unit.blocks[0];
        for &b in &unit.blocks {
            block_device[b] = device;
            if b != leader && reasons[b].is_none() {
                reasons[b] = Some(format!("tied to {:?}", tree.name(blocks[leader].node)));
            }
        }
        if reasons[leader].is_none() && !device.is_gpu_like() {
            reasons[leader] = Some(match device {
                Device::Cpu if has_gpu => "did not fit on the GPUs after the blocks before it".to_string(),
                Device::Cpu => "no GPU in the device spec".to_string(),
                _ => why.unwrap_or_else(|| "did not fit on the GPUs or the CPU".to_string()),
            });
        }
    }

    let mut usage: Vec<DeviceUsage> = spec
        .devices()
        .iter()
        .enumerate()
        .map(|(i, (d, cap))| DeviceUsage {
            device: *d,
            capacity_bits: *cap,
            weight_bits: 0,
            runtime_bits: if (has_gpu && d.is_gpu_like()) || (!has_gpu && *d == Device::Cpu) {
                options.activation_bits
            } else {
                0
            },
            reserve_bits: ledger.reserve[i],
            compute: 0,
            blocks: Vec::new(),
        })
        .collect();
    let mut offloaded = Vec::new();
    let mut assignments = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let device = block_device[i];
        assignments.push((block.node, device));
        let u = usage.iter_mut().find(|u| u.device == device).expect("device in spec");
        // Buffers of offloaded blocks live on the execution device; they are counted in its reserve.
        let kept = if is_offloaded(device) && !options.offload_buffers {
            block.buffer_bits
        } else {
            0
        };
        u.weight_bits += block.bits - kept;
        u.compute += compute[i];
        u.blocks.push(block.node);
        if !is_offloaded(device) {
            u.runtime_bits += runtime[i];
        }
        if is_offloaded(device) {
            let fallback = if device == Device::Disk {
                "did not fit on the CPU"
            } else {
                "offloaded"
            };
            offloaded.push(Offload {
                node: block.node,
                device,
                bits: block.bits,
                reason: reasons[i].clone().unwrap_or_else(|| fallback.into()),
            });
        }
    }
    let device_map = clean_device_map(tree, &assignments);
    Plan {
        strategy: strategy.name(),
        assignments,
        device_map,
        usage,
        offloaded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeBuilder;

    /// embed (tied with head), `n` decoder layers of `layer` bytes, norm, head.
    fn decoder(n: usize, layer: u64) -> ModuleTree {
        let mut b = TreeBuilder::new("LM");
        let m = b.module(0, "model", "Model");
        let e = b.module(m, "embed", "Embedding");
        b.tied_param(e, "weight", 50, 0, false);
        let layers = b.module(m, "layers", "ModuleList");
        for i in 0..n {
            let l = b.module(layers, &i.to_string(), "Layer");
            b.param(l, "w", layer);
        }
        let norm = b.module(m, "norm", "Norm");
        b.param(norm, "w", 1);
        let head = b.module(0, "head", "Linear");
        b.tied_param(head, "weight", 50, 0, true);
        b.build().unwrap()
    }

    fn spec(devices: &[(Device, Option<u64>)]) -> DeviceSpec {
        DeviceSpec::new(devices.iter().map(|(d, c)| (*d, c.map(|b| b * 8))).collect()).unwrap()
    }

    fn on(tree: &ModuleTree, plan: &Plan, name: &str) -> Device {
        plan.device_of(tree.find(name).unwrap()).unwrap()
    }

    fn bytes(plan: &Plan, device: Device) -> u64 {
        plan.usage
            .iter()
            .find(|u| u.device == device)
            .map(|u| u.weight_bits / 8)
            .unwrap()
    }

    fn opts(strategy: Strategy) -> SolveOptions {
        SolveOptions {
            strategy,
            ..Default::default()
        }
    }

    #[test]
    fn balanced_splits_evenly_and_keeps_tied_head_with_embedding() {
        let t = decoder(8, 100);
        let s = spec(&[
            (Device::Gpu(0), Some(1000)),
            (Device::Gpu(1), Some(1000)),
            (Device::Cpu, Some(0)),
        ]);
        let plan = solve(&t, &s, &opts(Strategy::Balanced)).unwrap();
        assert_eq!(on(&t, &plan, "head"), on(&t, &plan, "model.embed"));
        // 50 (embed+head) + 8 * 100 + 1: best split is 450 / 401.
        assert_eq!(plan.peak_gpu_bits() / 8, 450);
        assert!(plan.offloaded.is_empty());
        assert!(plan.usage.iter().all(|u| u.reserve_bits == 0));
    }

    #[test]
    fn sequential_fills_gpu0_first_and_low_zero_empties_it() {
        let t = decoder(8, 100);
        let s = spec(&[
            (Device::Gpu(0), Some(1000)),
            (Device::Gpu(1), Some(1000)),
            (Device::Cpu, Some(0)),
        ]);
        let seq = solve(&t, &s, &opts(Strategy::Sequential)).unwrap();
        assert_eq!(bytes(&seq, Device::Gpu(0)), 851);
        let low = solve(&t, &s, &opts(Strategy::BalancedLow0)).unwrap();
        assert_eq!(bytes(&low, Device::Gpu(0)), 0); // 851 bytes fit on GPU 1 alone
                                                    // 1051 bytes: GPU 0 takes as little as possible, one layer; the tied embedding + head (50) move
                                                    // to GPU 1 with the rest.
        let bigger = decoder(10, 100);
        let low = solve(&bigger, &s, &opts(Strategy::BalancedLow0)).unwrap();
        assert_eq!(bytes(&low, Device::Gpu(0)), 100);
        assert_eq!(bytes(&low, Device::Gpu(1)), 951);
        assert_eq!(on(&bigger, &low, "head"), Device::Gpu(1));
        // auto on two GPUs is balanced
        assert_eq!(solve(&t, &s, &opts(Strategy::Auto)).unwrap().strategy, "balanced");
    }

    #[test]
    fn offloading_reserves_exactly_the_largest_offloaded_block_on_gpu0() {
        let t = decoder(8, 100);
        let s = spec(&[(Device::Gpu(0), Some(500)), (Device::Cpu, Some(10_000))]);
        let plan = solve(&t, &s, &opts(Strategy::Sequential)).unwrap();
        let gpu0 = &plan.usage[0];
        assert_eq!(gpu0.reserve_bits / 8, 100);
        assert!(gpu0.weight_bits + gpu0.reserve_bits <= 500 * 8);
        assert_eq!(bytes(&plan, Device::Gpu(0)), 350); // embed + 3 layers, 100 reserved
        assert_eq!(on(&t, &plan, "model.layers.3"), Device::Cpu);
        assert!(plan.offloaded.iter().all(|o| o.device == Device::Cpu));
    }

    #[test]
    fn spills_to_disk_only_when_allowed() {
        let t = decoder(8, 100);
        let tight = spec(&[(Device::Gpu(0), Some(300)), (Device::Cpu, Some(300))]);
        let err = solve(&t, &tight, &opts(Strategy::Sequential)).unwrap_err();
        assert!(matches!(err, PlacementError::DoesNotFit { .. }), "{err}");
        assert!(err.to_string().contains("add \"disk\""), "{err}");
        let with_disk = spec(&[
            (Device::Gpu(0), Some(300)),
            (Device::Cpu, Some(300)),
            (Device::Disk, None),
        ]);
        let plan = solve(&t, &with_disk, &opts(Strategy::Sequential)).unwrap();
        assert_eq!(on(&t, &plan, "model.norm"), Device::Disk);
        assert_eq!(on(&t, &plan, "model.layers.2"), Device::Cpu);
    }

    #[test]
    fn pins_win_and_conflicting_tied_pins_are_rejected() {
        let t = decoder(4, 100);
        let s = spec(&[(Device::Gpu(0), Some(1000)), (Device::Gpu(1), Some(1000))]);
        let pinned = SolveOptions {
            pins: vec![("model.layers.0".into(), Device::Gpu(1))],
            ..opts(Strategy::Balanced)
        };
        let plan = solve(&t, &s, &pinned).unwrap();
        assert_eq!(on(&t, &plan, "model.layers.0"), Device::Gpu(1));
        let split = SolveOptions {
            pins: vec![("model.embed".into(), Device::Gpu(0)), ("head".into(), Device::Gpu(1))],
            ..opts(Strategy::Balanced)
        };
        let err = solve(&t, &s, &split).unwrap_err();
        assert!(matches!(err, PlacementError::TiedPinConflict { .. }), "{err}");
        let unknown = SolveOptions {
            pins: vec![("model.layer.0".into(), Device::Gpu(0))],
            ..opts(Strategy::Auto)
        };
        let err = solve(&t, &s, &unknown).unwrap_err();
        assert!(err.to_string().contains("did you mean model.layers.0"), "{err}");
    }

    #[test]
    fn no_split_classes_keep_blocks_whole() {
        let mut b = TreeBuilder::new("Net");
        for i in 0..3 {
            let blk = b.module(0, &format!("b{i}"), "Block");
            for j in 0..2 {
                let l = b.module(blk, &format!("l{j}"), "Linear");
                b.param(l, "w", 60);
            }
        }
        let t = b.build().unwrap();
        let s = spec(&[(Device::Gpu(0), Some(200)), (Device::Gpu(1), Some(1000))]);
        let free = solve(&t, &s, &opts(Strategy::Sequential)).unwrap();
        assert_eq!(on(&t, &free, "b1.l0"), Device::Gpu(0));
        assert_eq!(on(&t, &free, "b1.l1"), Device::Gpu(1));
        let whole = SolveOptions {
            no_split_module_classes: vec!["Block".into()],
            ..opts(Strategy::Sequential)
        };
        let plan = solve(&t, &s, &whole).unwrap();
        assert_eq!(on(&t, &plan, "b1"), Device::Gpu(1));
        let names: Vec<&str> = plan.device_map.iter().map(|(n, _)| t.name(*n)).collect();
        assert_eq!(names, vec!["b0", "b1", "b2"]);
    }

    fn layer_runtime(t: &ModuleTree, n: usize, bits_each: u64) -> Vec<(NodeId, u64)> {
        (0..n)
            .map(|i| (t.find(&format!("model.layers.{i}")).unwrap(), bits_each))
            .collect()
    }

    #[test]
    fn kv_cache_lives_with_its_layer_and_on_gpu0_when_offloaded() {
        let t = decoder(4, 100);
        let s = spec(&[
            (Device::Gpu(0), Some(400)),
            (Device::Gpu(1), Some(400)),
            (Device::Cpu, Some(10_000)),
        ]);
        let workload = SolveOptions {
            runtime_bits: layer_runtime(&t, 4, 20 * 8),
            activation_bits: 10 * 8,
            ..opts(Strategy::Sequential)
        };
        let plan = solve(&t, &s, &workload).unwrap();
        // GPU 0: activations 10 + embed 50 + layers (100 + 20 KV) x 2 = 300; a third layer would need 420.
        let gpu0 = &plan.usage[0];
        assert_eq!((gpu0.weight_bits / 8, gpu0.runtime_bits / 8), (250, 50));
        let gpu1 = &plan.usage[1];
        assert_eq!((gpu1.weight_bits / 8, gpu1.runtime_bits / 8), (201, 50));
        assert!(plan.offloaded.is_empty());

        // Shrink GPU 1 below one layer: layers 2 and 3 go to the CPU; GPU 0 keeps room to stage the
        // largest (100) plus both their KV caches (2 x 20), which live where they run.
        let small = spec(&[
            (Device::Gpu(0), Some(450)),
            (Device::Gpu(1), Some(100)),
            (Device::Cpu, Some(10_000)),
        ]);
        let plan = solve(&t, &small, &workload).unwrap();
        assert_eq!(on(&t, &plan, "model.layers.2"), Device::Cpu);
        assert_eq!(on(&t, &plan, "model.layers.3"), Device::Cpu);
        assert_eq!(plan.usage[0].reserve_bits / 8, 100 + 2 * 20);
        for u in &plan.usage[..2] {
            assert!(u.weight_bits + u.runtime_bits + u.reserve_bits <= u.capacity_bits.unwrap());
        }
    }

    #[test]
    fn compute_balance_evens_flops_within_memory() {
        let t = decoder(6, 100);
        let s = spec(&[(Device::Gpu(0), Some(10_000)), (Device::Gpu(1), Some(10_000))]);
        // The embedding is large in memory but costs nothing to compute; layers cost 10 each.
        let mut compute = layer_runtime(&t, 6, 10);
        compute.push((t.find("head").unwrap(), 30));
        let by_memory = solve(
            &t,
            &s,
            &SolveOptions {
                compute: compute.clone(),
                ..opts(Strategy::Balanced)
            },
        )
        .unwrap();
        let by_compute = solve(
            &t,
            &s,
            &SolveOptions {
                compute,
                balance: Balance::Compute,
                ..opts(Strategy::Balanced)
            },
        )
        .unwrap();
        let peak = |p: &Plan| p.usage.iter().map(|u| u.compute).max().unwrap();
        // The tied head rides with the embedding on GPU 0: by memory it gets 3 layers too (compute 60
        // against 30); by compute the best is 50.
        assert_eq!(peak(&by_memory), 60);
        assert_eq!(peak(&by_compute), 50);
    }

    #[test]
    fn explicit_gpu0_reserve_is_kept_free() {
        let t = decoder(4, 100);
        let s = spec(&[(Device::Gpu(0), Some(500)), (Device::Gpu(1), Some(420))]);
        let plan = solve(
            &t,
            &s,
            &SolveOptions {
                gpu0_reserve_bits: 400 * 8,
                ..opts(Strategy::BalancedLow0)
            },
        )
        .unwrap();
        assert_eq!(plan.usage[0].reserve_bits / 8, 400);
        assert_eq!(plan.usage[0].weight_bits / 8, 50);
    }

    #[test]
    fn a_cpu_pin_in_a_cpu_only_plan_is_not_an_offload() {
        // Without a GPU the CPU executes: a block pinned there needs no staging room.
        let t = decoder(4, 100); // 451 bytes
        for executor in [Device::Cpu, Device::Mps] {
            let mut devices = vec![(executor, Some(451))];
            if executor == Device::Mps {
                devices.push((Device::Cpu, Some(0)));
            }
            let s = spec(&devices);
            let pinned = SolveOptions {
                pins: vec![("model.layers.0".into(), executor)],
                ..opts(Strategy::Auto)
            };
            let plan = solve(&t, &s, &pinned).unwrap();
            assert!(plan.assignments.iter().all(|(_, d)| *d == executor), "{executor}");
            assert!(plan.usage.iter().all(|u| u.reserve_bits == 0), "{executor}");
            assert!(plan.offloaded.is_empty());
        }
        // A disk pin in a CPU-only plan is offloaded: the CPU stages it.
        let s = spec(&[(Device::Cpu, Some(451)), (Device::Disk, None)]);
        let to_disk = SolveOptions {
            pins: vec![("model.layers.0".into(), Device::Disk)],
            ..opts(Strategy::Auto)
        };
        let plan = solve(&t, &s, &to_disk).unwrap();
        assert_eq!(plan.usage[0].reserve_bits / 8, 100);
    }

    /// `n` layers of `own` bytes each, all using one shared tensor of `shared` bytes (zamba's hybrid
    /// layers share one transformer block), then a head.
    fn shared_layers(n: usize, own: u64, shared: u64) -> ModuleTree {
        let mut b = TreeBuilder::new("Hybrid");
        let layers = b.module(0, "layers", "ModuleList");
        for i in 0..n {
            let l = b.module(layers, &i.to_string(), "Layer");
            b.param(l, "w", own);
            b.tied_param(l, "shared", shared, 0, i > 0);
        }
        let head = b.module(0, "head", "Linear");
        b.param(head, "w", 10);
        b.build().unwrap()
    }

    #[test]
    fn an_offloaded_tied_unit_stages_one_layer_with_its_tied_tensor() {
        let t = shared_layers(13, 100, 300); // one unit of 13 * 100 + 300 = 1600 bytes
        let s = spec(&[(Device::Gpu(0), Some(500)), (Device::Cpu, Some(10_000))]);
        let plan = solve(&t, &s, &opts(Strategy::Sequential)).unwrap();
        assert_eq!(on(&t, &plan, "layers.5"), Device::Cpu);
        // One layer (100) with the shared tensor (300), not the whole unit (1600).
        assert_eq!(plan.usage[0].reserve_bits / 8, 400);
    }

    /// Every way to cut `m` layers into `lanes` consecutive runs.
    fn splits(m: usize, lanes: usize) -> Vec<Vec<usize>> {
        if lanes == 1 {
            return vec![vec![m]];
        }
        let mut out = Vec::new();
        for first in 0..=m {
            for mut rest in splits(m - first, lanes - 1) {
                rest.insert(0, first);
                out.push(rest);
            }
        }
        out
    }

    /// Brute force over `solve`'s model: every GPU for every tie group, contiguous runs for the rest.
    fn best_peak(sizes: &[u64], groups: &[Vec<usize>], capacities: &[u64]) -> Option<u64> {
        let grouped: Vec<bool> = (0..sizes.len())
            .map(|i| groups.iter().any(|g| g.contains(&i)))
            .collect();
        let untied: Vec<u64> = (0..sizes.len()).filter(|&i| !grouped[i]).map(|i| sizes[i]).collect();
        let lanes = capacities.len();
        let mut best: Option<u64> = None;
        for choice in 0..lanes.pow(groups.len() as u32) {
            let mut base = vec![0u64; lanes];
            let mut c = choice;
            for g in groups {
                base[c % lanes] += g.iter().map(|&i| sizes[i]).sum::<u64>();
                c /= lanes;
            }
            for split in splits(untied.len(), lanes) {
                let mut load = base.clone();
                let mut next = 0;
                for (l, count) in split.into_iter().enumerate() {
                    load[l] += untied[next..next + count].iter().sum::<u64>();
                    next += count;
                }
                if load.iter().zip(capacities).all(|(x, c)| x <= c) {
                    let peak = *load.iter().max().unwrap();
                    best = Some(best.map_or(peak, |b| b.min(peak)));
                }
            }
        }
        best
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        #[test]
        fn balanced_with_tied_layers_is_the_brute_force_optimum(
            sizes in proptest::collection::vec(1u64..40, 2..7),
            ties in proptest::collection::vec((0usize..7, 0usize..7), 1..3),
            capacities in proptest::collection::vec(0u64..160, 1..4),
        ) {
            // Layers in order; tie group g joins two distinct layers through a tied tensor of 5 bytes.
            let n = sizes.len();
            let mut groups: Vec<Vec<usize>> = Vec::new();
            for (a, b) in ties {
                let (a, b) = (a % n, b % n);
                if a != b && !groups.iter().flatten().any(|&x| x == a || x == b) {
                    groups.push(vec![a.min(b), a.max(b)]);
                }
            }
            let mut builder = TreeBuilder::new("Net");
            let mut counted = sizes.clone();
            for (i, size) in sizes.iter().enumerate() {
                let l = builder.module(0, &format!("l{i}"), "Layer");
                builder.param(l, "w", *size);
                if let Some(g) = groups.iter().position(|g| g.contains(&i)) {
                    builder.tied_param(l, "tied", 5, g as i64, groups[g][0] != i);
                    if groups[g][0] == i {
                        counted[i] += 5;
                    }
                }
            }
            let t = builder.build().unwrap();
            let mut devices: Vec<(Device, Option<u64>)> =
                capacities.iter().enumerate().map(|(i, c)| (Device::Gpu(i as u32), Some(*c))).collect();
            devices.push((Device::Cpu, Some(10_000)));
            let best = best_peak(&counted, &groups, &capacities);
            match solve(&t, &spec(&devices), &opts(Strategy::Balanced)) {
                Ok(plan) if best.is_some() => {
                    proptest::prop_assert!(plan.offloaded.is_empty());
                    proptest::prop_assert_eq!(Some(plan.peak_gpu_bits() / 8), best);
                    for g in &groups {
                        let a = on(&t, &plan, &format!("l{}", g[0]));
                        proptest::prop_assert_eq!(a, on(&t, &plan, &format!("l{}", g[1])));
                    }
                }
                Ok(plan) => proptest::prop_assert!(!plan.offloaded.is_empty()),
                Err(err) => proptest::prop_assert!(best.is_none() && err.to_string().contains("stage"), "{}", err),
            }
        }
    }

    #[test]
    fn a_tied_head_moves_next_to_the_last_layers_when_that_balances_better() {
        // BERT's shape: embedding tied with the decoder, four layers, a small transform before the head.
        let mut b = TreeBuilder::new("MaskedLM");
        let e = b.module(0, "embed", "Embedding");
        b.tied_param(e, "weight", 30, 0, false);
        let layers = b.module(0, "layers", "ModuleList");
        for i in 0..4 {
            let l = b.module(layers, &i.to_string(), "Layer");
            b.param(l, "w", 20);
        }
        let tr = b.module(0, "transform", "Linear");
        b.param(tr, "w", 2);
        let head = b.module(0, "decoder", "Linear");
        b.tied_param(head, "weight", 30, 0, true);
        let t = b.build().unwrap();
        let s = spec(&[
            (Device::Gpu(0), Some(40)),
            (Device::Gpu(1), Some(40)),
            (Device::Gpu(2), Some(40)),
            (Device::Cpu, Some(1000)),
        ]);
        let plan = solve(&t, &s, &opts(Strategy::Balanced)).unwrap();
        assert!(plan.offloaded.is_empty());
        assert_eq!(plan.peak_gpu_bits() / 8, 40);
        assert_eq!(on(&t, &plan, "embed"), Device::Gpu(2));
        assert_eq!(on(&t, &plan, "decoder"), Device::Gpu(2));
        assert_eq!(on(&t, &plan, "layers.0"), Device::Gpu(0));
        // Sequential keeps everything on the GPUs too (in place, the embedding would block GPU 0).
        let seq = solve(&t, &s, &opts(Strategy::Sequential)).unwrap();
        assert!(seq.offloaded.is_empty());
    }

    #[test]
    fn an_empty_device_spec_says_so() {
        let err = solve(&decoder(2, 10), &spec(&[]), &opts(Strategy::Auto)).unwrap_err();
        assert!(matches!(err, PlacementError::DoesNotFit { .. }));
        assert!(err.to_string().contains("max_memory names no device"), "{err}");
        assert!(!err.to_string().contains("capacities ,"), "{err}");
    }

    #[test]
    fn a_far_too_big_model_reports_staging_and_the_total_shortfall() {
        let t = decoder(8, 100); // 851 bytes, layers of 100
        let s = spec(&[(Device::Gpu(0), Some(60)), (Device::Cpu, Some(300))]);
        let msg = solve(&t, &s, &opts(Strategy::Sequential)).unwrap_err().to_string();
        assert!(
            msg.contains("GPU 0 executes the offloaded layers and needs 100 B"),
            "{msg}"
        );
        assert!(
            msg.contains("851 B of weights exceed all the devices hold together (360 B) by 491 B"),
            "{msg}"
        );
    }

    #[test]
    fn a_small_block_on_disk_names_the_larger_block_that_filled_the_cpu() {
        let mut b = TreeBuilder::new("Net");
        for (i, size) in [10u64, 500, 10, 10].iter().enumerate() {
            let l = b.module(0, &format!("l{i}"), "Linear");
            b.param(l, "w", *size);
        }
        let t = b.build().unwrap();
        let s = spec(&[
            (Device::Gpu(0), Some(515)),
            (Device::Cpu, Some(100)),
            (Device::Disk, None),
        ]);
        let plan = solve(&t, &s, &opts(Strategy::Sequential)).unwrap();
        let reason = |name: &str| {
            let node = t.find(name).unwrap();
            plan.offloaded.iter().find(|o| o.node == node).unwrap().reason.clone()
        };
        assert_eq!(on(&t, &plan, "l3"), Device::Disk);
        assert!(
            reason("l1").contains("needs 500 B but only 100 B left on the CPU"),
            "{}",
            reason("l1")
        );
        let small = reason("l3");
        assert!(
            small.contains("\"l1\" (500 B) did not fit in the 100 B left on the CPU"),
            "{small}"
        );
        assert!(small.contains("blocks keep model order"), "{small}");
    }

    #[test]
    fn option_names_parse_and_bad_ones_are_invalid_options_listing_every_name() {
        for strategy in Strategy::ALL {
            assert_eq!(Strategy::parse(strategy.name()), Ok(strategy));
        }
        for balance in Balance::ALL {
            assert_eq!(Balance::parse(balance.name()), Ok(balance));
        }
        let err = Strategy::parse("greedy").unwrap_err();
        assert!(
            matches!(&err, PlacementError::InvalidOption { what, value, expected }
            if what == "strategy" && value == "greedy" && expected.len() == 4),
            "{err:?}"
        );
        assert!(err.to_string().contains(r#""balanced_low_0""#), "{err}");
        let err = Balance::parse("flops").unwrap_err();
        assert_eq!(err.to_string(), r#"invalid balance "flops"; use "memory" or "compute""#);
    }
}
