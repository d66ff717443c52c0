//! End-to-end tests of `solve`: every strategy, offloading, pins, ties and the error sentences.

use super::*;
use crate::plan::Plan;
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

/// Layers of `sizes` bytes in order (and a compute cost per layer), the first two tied when `tied`.
fn layers_with_costs(sizes: &[u64], tied: bool) -> (ModuleTree, Vec<(NodeId, u64)>) {
    let mut b = TreeBuilder::new("Net");
    for (i, size) in sizes.iter().enumerate() {
        let l = b.module(0, &format!("l{i}"), "Layer");
        b.param(l, "w", *size);
        if tied && i < 2 && sizes.len() > 2 {
            b.tied_param(l, "tied", 3, 0, i == 1);
        }
    }
    let t = b.build().unwrap();
    let compute = (0..sizes.len())
        .map(|i| (t.find(&format!("l{i}")).unwrap(), (sizes[i] * 7 + i as u64 * 13) % 31))
        .collect();
    (t, compute)
}

#[test]
fn gpu0_reserve_is_headroom_not_load_for_the_balanced_split() {
    // The reserve only shrinks what GPU 0 can hold; it is not load. Counted as GPU 0's load, the min-max
    // objective would put a small model whole on GPU 1 (2 x 24 GiB with gpu0_reserve="2GiB").
    let t = decoder(8, 100); // 50 + 8 x 100 + 1 = 851 bytes
    let s = spec(&[(Device::Gpu(0), Some(2400)), (Device::Gpu(1), Some(2400))]);
    let plain = solve(&t, &s, &opts(Strategy::Balanced)).unwrap();
    let reserved = SolveOptions {
        gpu0_reserve_bits: 1900 * 8,
        ..opts(Strategy::Balanced)
    };
    let plan = solve(&t, &s, &reserved).unwrap();
    assert_eq!(plan.assignments, plain.assignments);
    assert_eq!(bytes(&plan, Device::Gpu(0)), 450);
    assert_eq!(plan.usage[0].reserve_bits / 8, 1900); // still shown as kept free
                                                      // When the reserve leaves GPU 0 less than its balanced share, GPU 0 is filled (three layers, the
                                                      // tied pair moves to GPU 1) and GPU 1 takes the rest.
    let tight = SolveOptions {
        gpu0_reserve_bits: 2100 * 8,
        ..opts(Strategy::Balanced)
    };
    let plan = solve(&t, &s, &tight).unwrap();
    assert_eq!(bytes(&plan, Device::Gpu(0)), 300);
    assert_eq!(bytes(&plan, Device::Gpu(1)), 551);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// A GPU 0 reserve is capacity removed: every strategy and balance plans exactly as on a GPU 0 that
    /// much smaller, and the balanced memory split is the brute-force optimum on those capacities.
    #[test]
    fn gpu0_reserve_plans_as_a_smaller_gpu0(
        sizes in proptest::collection::vec(1u64..40, 1..7),
        capacities in proptest::collection::vec(0u64..160, 1..4),
        reserve in 0u64..200,
        tied in proptest::bool::ANY,
        offload in proptest::bool::ANY,
    ) {
        let (t, compute) = layers_with_costs(&sizes, tied);
        let with_cpu = |caps: &[u64]| {
            let mut devices: Vec<(Device, Option<u64>)> =
                caps.iter().enumerate().map(|(i, c)| (Device::Gpu(i as u32), Some(*c))).collect();
            devices.push((Device::Cpu, Some(if offload { 10_000 } else { 0 })));
            spec(&devices)
        };
        let mut smaller = capacities.clone();
        smaller[0] = smaller[0].saturating_sub(reserve);
        for strategy in Strategy::ALL {
            for balance in Balance::ALL {
                let base = SolveOptions { strategy, balance, compute: compute.clone(), ..Default::default() };
                let with_reserve = SolveOptions { gpu0_reserve_bits: reserve * 8, ..base.clone() };
                let got = solve(&t, &with_cpu(&capacities), &with_reserve);
                if reserve > capacities[0] {
                    proptest::prop_assert!(got.is_err());
                    continue;
                }
                let expected = solve(&t, &with_cpu(&smaller), &base);
                match (&got, &expected) {
                    (Ok(a), Ok(b)) => {
                        proptest::prop_assert_eq!(&a.assignments, &b.assignments, "{:?} {:?}", strategy, balance);
                        proptest::prop_assert_eq!(&a.execution, &b.execution);
                        let gpu0 = &a.usage[0];
                        proptest::prop_assert_eq!(gpu0.reserve_bits, b.usage[0].reserve_bits + reserve * 8);
                        proptest::prop_assert!(
                            gpu0.weight_bits + gpu0.runtime_bits + gpu0.reserve_bits <= capacities[0] * 8
                        );
                    }
                    (Err(_), Err(_)) => {}
                    _ => proptest::prop_assert!(false, "{:?} {:?}: {:?} vs {:?}", strategy, balance, got, expected),
                }
                // The balanced memory split is the optimum on the smaller GPU 0.
                if strategy == Strategy::Balanced && balance == Balance::Memory && !tied {
                    if let Some(best) = best_peak(&sizes, &[], &smaller) {
                        let plan = got.as_ref().unwrap();
                        proptest::prop_assert!(plan.offloaded.is_empty());
                        let peak = plan
                            .usage
                            .iter()
                            .filter(|u| u.device.is_gpu_like())
                            .map(|u| u.weight_bits / 8)
                            .max()
                            .unwrap();
                        proptest::prop_assert_eq!(peak, best);
                    }
                }
            }
        }
    }
}
