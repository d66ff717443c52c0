//! Strategies: turn a tree, a device spec and constraints into a [`Plan`].
//!
//! Every strategy shares one pipeline: cut the tree into blocks, group tied blocks and resolve pins into
//! units, decide how much of the chain of free units stays on the GPUs (reserving staging room only if
//! something is offloaded), lay that prefix over the GPUs (the strategy proper), then put the rest on the
//! CPU and finally on disk.

pub mod accelerate_budget;
pub mod accelerate_compat;
pub mod balanced;
pub mod chain;
pub mod low_zero;
pub mod offload;
pub mod sequential;

use crate::blocks::{cut_blocks, no_split_mask, Block};
use crate::clean::clean_device_map;
use crate::constraints::{build_units, Unit};
use crate::device::{bits_to_bytes, Device, DeviceSpec};
use crate::error::{PlacementError, Result};
use crate::plan::{DeviceUsage, Offload, Plan};
use crate::tree::ModuleTree;
use chain::Lane;
use offload::{split_point, OffloadInput};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One GPU: `sequential`; several: `balanced`; none: CPU then disk.
    Auto,
    Sequential,
    Balanced,
    BalancedLow0,
}

impl Strategy {
    pub fn parse(name: &str) -> Result<Strategy> {
        match name {
            "auto" => Ok(Strategy::Auto),
            "sequential" => Ok(Strategy::Sequential),
            "balanced" => Ok(Strategy::Balanced),
            "balanced_low_0" => Ok(Strategy::BalancedLow0),
            other => Err(PlacementError::UnknownModule {
                name: other.to_string(),
                context: "strategy names".into(),
                suggestion: "; use \"auto\", \"balanced\", \"balanced_low_0\" or \"sequential\""
                    .into(),
            }),
        }
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

#[derive(Debug, Clone)]
pub struct SolveOptions {
    pub strategy: Strategy,
    pub no_split_module_classes: Vec<String>,
    /// Module or tensor name -> device fixed by the user.
    pub pins: Vec<(String, Device)>,
    /// Offload buffers with their blocks (otherwise they stay on the execution device).
    pub offload_buffers: bool,
}

impl Default for SolveOptions {
    fn default() -> Self {
        SolveOptions {
            strategy: Strategy::Auto,
            no_split_module_classes: Vec::new(),
            pins: Vec::new(),
            offload_buffers: false,
        }
    }
}

/// Bits as a readable size ("512 B", "1.50 MiB", "70.00 GiB").
fn gib(bits: u64) -> String {
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

pub fn solve(tree: &ModuleTree, spec: &DeviceSpec, options: &SolveOptions) -> Result<Plan> {
    let no_split = no_split_mask(tree, &options.no_split_module_classes);
    let blocks = cut_blocks(tree, &no_split);
    let units = build_units(tree, &blocks, &options.pins, spec)?;
    let gpus: Vec<(Device, u64)> = spec.gpus().collect();
    let strategy = match options.strategy {
        Strategy::Auto if gpus.len() > 1 => Strategy::Balanced,
        Strategy::Auto => Strategy::Sequential,
        s => s,
    };

    let free: Vec<&Unit> = units.iter().filter(|u| u.pinned.is_none()).collect();
    let weights: Vec<u64> = free.iter().map(|u| u.bits).collect();
    let buffers: Vec<u64> = free.iter().map(|u| u.buffer_bits).collect();
    let mut pinned_load = vec![0u64; spec.devices().len()];
    let device_index = |d: Device| {
        spec.devices()
            .iter()
            .position(|(x, _)| *x == d)
            .expect("pins are validated")
    };
    let (mut pin_off_max, mut pin_off_buf, mut any_pin_off) = (0u64, 0u64, false);
    for u in units.iter().filter(|u| u.pinned.is_some()) {
        let d = u.pinned.expect("filtered");
        pinned_load[device_index(d)] += u.bits;
        if !d.is_gpu_like() {
            any_pin_off = true;
            pin_off_max = pin_off_max.max(u.bits);
            pin_off_buf += u.buffer_bits;
        }
    }

    let gpu_lanes: Vec<Lane> = gpus
        .iter()
        .map(|(d, cap)| Lane {
            base: pinned_load[device_index(*d)],
            capacity: *cap,
        })
        .collect();
    for ((d, cap), lane) in gpus.iter().zip(&gpu_lanes) {
        if lane.base > *cap {
            return Err(PlacementError::DoesNotFit {
                detail: format!(
                    "modules pinned to GPU {d} need {} but it has {}; pin fewer modules there or raise its max_memory",
                    gib(lane.base),
                    gib(*cap)
                ),
            });
        }
    }

    let input = OffloadInput {
        weights: &weights,
        buffers: &buffers,
        pinned_offloaded_max: pin_off_max,
        pinned_offloaded_buffers: pin_off_buf,
        any_pinned_offloaded: any_pin_off,
        offload_buffers: options.offload_buffers,
    };
    // With GPUs, GPU 0 executes offloaded blocks; without, the CPU does (disk blocks are staged there).
    let cpu_lane = spec.capacity(Device::Cpu).map(|cap| Lane {
        base: pinned_load[device_index(Device::Cpu)],
        capacity: cap.unwrap_or(u64::MAX),
    });
    let mut reserve = vec![0u64; spec.devices().len()];
    let mut device_of_unit: Vec<Device> = vec![Device::Disk; free.len()];
    let mut next = 0usize;
    let staging_error = |device: Device, lane: &Lane, r: u64| {
        PlacementError::DoesNotFit {
        detail: format!(
            "{device} executes the offloaded layers and needs {} free to stage the largest of them, but has {} \
             ({} already pinned there); give it more memory or offload less",
            gib(r),
            gib(lane.capacity),
            gib(lane.base),
        ),
    }
    };
    if !gpu_lanes.is_empty() {
        let (k, r) = split_point(&input, &gpu_lanes);
        if gpu_lanes[0].base.saturating_add(r) > gpu_lanes[0].capacity {
            return Err(staging_error(gpus[0].0, &gpu_lanes[0], r));
        }
        let mut lanes = gpu_lanes.clone();
        lanes[0].base += r;
        reserve[device_index(gpus[0].0)] = r;
        let prefix = &weights[..k];
        let counts = match strategy {
            Strategy::Sequential | Strategy::Auto => sequential::assign(prefix, &lanes),
            Strategy::Balanced => balanced::assign(prefix, &lanes),
            Strategy::BalancedLow0 => low_zero::assign(prefix, &lanes),
        };
        for ((d, _), count) in gpus.iter().zip(counts) {
            for slot in &mut device_of_unit[next..next + count] {
                *slot = *d;
            }
            next += count;
        }
        debug_assert_eq!(next, k);
        if let Some(cpu) = cpu_lane {
            let take = chain::placed(&chain::greedy(&weights[next..], &[cpu], u64::MAX));
            for slot in &mut device_of_unit[next..next + take] {
                *slot = Device::Cpu;
            }
            next += take;
        }
    } else if let Some(cpu) = cpu_lane {
        let (k, r) = split_point(&input, &[cpu]);
        if cpu.base.saturating_add(r) > cpu.capacity {
            return Err(staging_error(Device::Cpu, &cpu, r));
        }
        reserve[device_index(Device::Cpu)] = r;
        for slot in &mut device_of_unit[..k] {
            *slot = Device::Cpu;
        }
        next = k;
    }

    let leftover: u64 = weights[next..].iter().sum();
    if next < weights.len() && !spec.contains(Device::Disk) {
        let held: Vec<String> = spec
            .devices()
            .iter()
            .map(|(d, cap)| {
                format!(
                    "{d}: {}",
                    cap.map(gib).unwrap_or_else(|| "unbounded".into())
                )
            })
            .collect();
        return Err(PlacementError::DoesNotFit {
            detail: format!(
                "{} of weights ({} blocks from {:?} on) fit on no device (capacities {}, staging reserve {}); \
                 add \"disk\" to max_memory to offload them, or give the devices more memory",
                gib(leftover),
                weights.len() - next,
                tree.name(blocks[free[next].blocks[0]].node),
                held.join(", "),
                gib(reserve.iter().copied().max().unwrap_or(0)),
            ),
        });
    }

    build_plan(
        tree,
        spec,
        strategy,
        &blocks,
        &units,
        &free,
        &device_of_unit,
        &reserve,
        options.offload_buffers,
    )
}

#[allow(clippy::too_many_arguments)]
fn build_plan(
    tree: &ModuleTree,
    spec: &DeviceSpec,
    strategy: Strategy,
    blocks: &[Block],
    units: &[Unit],
    free: &[&Unit],
    device_of_free: &[Device],
    reserve: &[u64],
    offload_buffers: bool,
) -> Result<Plan> {
    let mut block_device = vec![Device::Disk; blocks.len()];
    let mut free_iter = free.iter().zip(device_of_free);
    let mut reasons: Vec<Option<String>> = vec![None; blocks.len()];
    for unit in units {
        let device = match unit.pinned {
            Some(d) => {
                for &b in &unit.blocks {
                    reasons[b] = Some(format!("pinned to {d}"));
                }
                d
            }
            None => {
                let (_, d) = free_iter.next().expect("one device per free unit");
                *d
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
                Device::Cpu => "did not fit on the GPUs after the blocks before it".to_string(),
                _ => "did not fit on the GPUs or the CPU".to_string(),
            });
        }
    }

    let mut usage: Vec<DeviceUsage> = spec
        .devices()
        .iter()
        .zip(reserve)
        .map(|((d, cap), r)| DeviceUsage {
            device: *d,
            capacity_bits: *cap,
            weight_bits: 0,
            reserve_bits: *r,
            blocks: Vec::new(),
        })
        .collect();
    let has_gpu = spec.gpus().next().is_some();
    // Offloaded = executed on another device: CPU and disk blocks with GPUs, disk blocks without.
    let is_offloaded = |d: Device| {
        if has_gpu {
            !d.is_gpu_like()
        } else {
            d == Device::Disk
        }
    };
    let mut offloaded = Vec::new();
    let mut assignments = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let device = block_device[i];
        assignments.push((block.node, device));
        let u = usage
            .iter_mut()
            .find(|u| u.device == device)
            .expect("device in spec");
        // Buffers of offloaded blocks live on the execution device; they are counted in its reserve.
        let kept_buffers = if is_offloaded(device) && !offload_buffers {
            block.buffer_bits
        } else {
            0
        };
        u.weight_bits += block.bits - kept_buffers;
        u.blocks.push(block.node);
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
    Ok(Plan {
        strategy: strategy.name(),
        assignments,
        device_map,
        usage,
        offloaded,
    })
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
        DeviceSpec::new(
            devices
                .iter()
                .map(|(d, c)| (*d, c.map(|b| b * 8)))
                .collect(),
        )
        .unwrap()
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
        let bigger = decoder(10, 100); // 1051 bytes: GPU 0 takes the fewest leading blocks possible
        let low = solve(&bigger, &s, &opts(Strategy::BalancedLow0)).unwrap();
        assert_eq!(bytes(&low, Device::Gpu(0)), 150);
        assert_eq!(bytes(&low, Device::Gpu(1)), 901);
        // auto on two GPUs is balanced
        assert_eq!(
            solve(&t, &s, &opts(Strategy::Auto)).unwrap().strategy,
            "balanced"
        );
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
            pins: vec![
                ("model.embed".into(), Device::Gpu(0)),
                ("head".into(), Device::Gpu(1)),
            ],
            ..opts(Strategy::Balanced)
        };
        let err = solve(&t, &s, &split).unwrap_err();
        assert!(
            matches!(err, PlacementError::TiedPinConflict { .. }),
            "{err}"
        );
        let unknown = SolveOptions {
            pins: vec![("model.layer.0".into(), Device::Gpu(0))],
            ..opts(Strategy::Auto)
        };
        let err = solve(&t, &s, &unknown).unwrap_err();
        assert!(
            err.to_string().contains("did you mean model.layers.0"),
            "{err}"
        );
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
}
