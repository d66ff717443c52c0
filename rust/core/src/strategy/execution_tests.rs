//! The execution-device rule ([`super::execution`]): one test per rule, and the staging GPU checked
//! against brute force on small instances.

use super::*;
use crate::error::Shortfall;
use crate::plan::Plan;
use crate::tree::TreeBuilder;

/// `embed` (untied), `n` layers of `layer` bytes, `head` (untied): a big-vocabulary shape.
fn lm(embed: u64, n: usize, layer: u64, head: u64) -> ModuleTree {
    let mut b = TreeBuilder::new("LM");
    let e = b.module(0, "embed", "Embedding");
    b.param(e, "weight", embed);
    let layers = b.module(0, "layers", "ModuleList");
    for i in 0..n {
        let l = b.module(layers, &i.to_string(), "Layer");
        b.param(l, "w", layer);
    }
    let h = b.module(0, "head", "Linear");
    b.param(h, "weight", head);
    b.build().unwrap()
}

fn spec(devices: &[(Device, Option<u64>)]) -> DeviceSpec {
    DeviceSpec::new(devices.iter().map(|(d, c)| (*d, c.map(|b| b * 8))).collect()).unwrap()
}

fn gpus_cpu(gpus: &[u64], cpu: u64) -> DeviceSpec {
    let mut devices: Vec<(Device, Option<u64>)> = gpus
        .iter()
        .enumerate()
        .map(|(i, c)| (Device::Gpu(i as u32), Some(*c)))
        .collect();
    devices.push((Device::Cpu, Some(cpu)));
    spec(&devices)
}

fn sequential() -> SolveOptions {
    SolveOptions {
        strategy: Strategy::Sequential,
        ..Default::default()
    }
}

fn on(t: &ModuleTree, plan: &Plan, name: &str) -> Device {
    plan.device_of(t.find(name).unwrap()).unwrap()
}

fn runs(t: &ModuleTree, plan: &Plan, name: &str) -> Device {
    plan.execution_of(t.find(name).unwrap()).unwrap()
}

fn reserve(plan: &Plan, device: Device) -> u64 {
    plan.usage.iter().find(|u| u.device == device).unwrap().reserve_bits / 8
}

fn reason(t: &ModuleTree, plan: &Plan, name: &str) -> String {
    let node = t.find(name).unwrap();
    plan.offloaded.iter().find(|o| o.node == node).unwrap().reason.clone()
}

fn within_capacity(plan: &Plan) -> bool {
    plan.usage.iter().all(|u| {
        u.capacity_bits
            .is_none_or(|c| u.weight_bits + u.runtime_bits + u.reserve_bits <= c)
    })
}

#[test]
fn rule_a_gpu0_stages_when_it_can_and_the_plan_is_unchanged() {
    let t = lm(50, 8, 100, 50);
    let plan = solve(&t, &gpus_cpu(&[500], 10_000), &sequential()).unwrap();
    assert_eq!(reserve(&plan, Device::Gpu(0)), 100);
    assert_eq!(on(&t, &plan, "layers.2"), Device::Gpu(0));
    assert_eq!(on(&t, &plan, "layers.3"), Device::Cpu);
    for o in &plan.offloaded {
        assert_eq!(plan.execution_of(o.node), Some(Device::Gpu(0)));
        assert!(!o.reason.contains("runs on"), "{}", o.reason);
    }
    // GPU-resident blocks run where they are.
    assert_eq!(runs(&t, &plan, "layers.0"), Device::Gpu(0));
    assert_eq!(plan.execution.len(), plan.assignments.len());
}

#[test]
fn rule_b_a_small_gpu0_leaves_staging_to_the_gpu_keeping_most_on_the_gpus() {
    let t = lm(50, 8, 100, 50);
    // GPU 0 holds the embedding but cannot stage a 100-byte layer; GPUs 1 and 2 can, and either keeps
    // 7 layers on the GPUs: the lowest index stages.
    let plan = solve(&t, &gpus_cpu(&[60, 500, 300], 10_000), &sequential()).unwrap();
    assert_eq!(reserve(&plan, Device::Gpu(0)), 0);
    assert_eq!(reserve(&plan, Device::Gpu(1)), 100);
    assert_eq!(reserve(&plan, Device::Gpu(2)), 0);
    assert_eq!(on(&t, &plan, "embed"), Device::Gpu(0));
    assert_eq!(on(&t, &plan, "layers.6"), Device::Gpu(2));
    assert_eq!(on(&t, &plan, "layers.7"), Device::Cpu);
    assert_eq!(runs(&t, &plan, "layers.7"), Device::Gpu(1));
    assert_eq!(on(&t, &plan, "head"), Device::Cpu);
    assert_eq!(runs(&t, &plan, "head"), Device::Gpu(1));
    assert!(
        reason(&t, &plan, "head").ends_with("; runs on GPU 1"),
        "{}",
        reason(&t, &plan, "head")
    );
    assert!(within_capacity(&plan));
    // GPU 2 alone can stage (GPU 1 has room for neither a layer nor its staging).
    let plan = solve(&t, &gpus_cpu(&[60, 90, 500], 10_000), &sequential()).unwrap();
    assert_eq!(reserve(&plan, Device::Gpu(1)), 0);
    assert_eq!(reserve(&plan, Device::Gpu(2)), 100);
    assert!(plan
        .offloaded
        .iter()
        .all(|o| plan.execution_of(o.node) == Some(Device::Gpu(2))));
}

#[test]
fn rule_c_a_head_larger_than_any_gpu_executes_on_the_cpu() {
    let t = lm(50, 4, 100, 900);
    let plan = solve(&t, &gpus_cpu(&[300, 300], 10_000), &sequential()).unwrap();
    assert_eq!(on(&t, &plan, "head"), Device::Cpu);
    assert_eq!(runs(&t, &plan, "head"), Device::Cpu);
    assert!(
        plan.usage.iter().all(|u| u.reserve_bits == 0),
        "nothing is staged on a GPU"
    );
    assert!(plan.assignments[..5].iter().all(|(_, d)| d.is_gpu_like()));
    assert!(
        reason(&t, &plan, "head").contains("runs on the CPU: no GPU can stage its 900 B"),
        "{}",
        reason(&t, &plan, "head")
    );
    // The head's KV-free runtime (logits) and the activation buffer count on the CPU.
    let workload = SolveOptions {
        runtime_bits: vec![(t.find("head").unwrap(), 40 * 8)],
        activation_bits: 5 * 8,
        ..sequential()
    };
    let plan = solve(&t, &gpus_cpu(&[300, 300], 10_000), &workload).unwrap();
    let cpu = plan.usage.iter().find(|u| u.device == Device::Cpu).unwrap();
    assert_eq!(cpu.runtime_bits / 8, 45);
}

#[test]
fn rule_c_stages_what_it_can_and_runs_only_the_too_large_blocks_on_the_cpu() {
    // The embedding (first in the chain) fits on no GPU, so the whole chain is offloaded (as
    // accelerate does); the layers are still staged on GPU 0, only the embedding runs on the CPU.
    let t = lm(500, 4, 100, 50);
    let plan = solve(&t, &gpus_cpu(&[300, 300], 10_000), &sequential()).unwrap();
    assert_eq!(runs(&t, &plan, "embed"), Device::Cpu);
    assert_eq!(runs(&t, &plan, "layers.0"), Device::Gpu(0));
    assert_eq!(runs(&t, &plan, "head"), Device::Gpu(0));
    assert_eq!(reserve(&plan, Device::Gpu(0)), 100);
    assert!(within_capacity(&plan));
    // The longest GPU prefix comes first: with no layer staged, GPU 0 keeps two layers, so the
    // offloaded layers run on the CPU too. Disk-stored blocks executed on the CPU need room there to be
    // loaded (700 for the head), which sends layer 3 to disk as well.
    let s = spec(&[
        (Device::Gpu(0), Some(300)),
        (Device::Cpu, Some(800)),
        (Device::Disk, None),
    ]);
    let t = lm(50, 4, 100, 700);
    let plan = solve(&t, &s, &sequential()).unwrap();
    assert_eq!(on(&t, &plan, "layers.1"), Device::Gpu(0));
    assert_eq!(
        (on(&t, &plan, "layers.2"), runs(&t, &plan, "layers.2")),
        (Device::Cpu, Device::Cpu)
    );
    assert_eq!(
        (on(&t, &plan, "layers.3"), runs(&t, &plan, "layers.3")),
        (Device::Disk, Device::Cpu)
    );
    assert_eq!(
        (on(&t, &plan, "head"), runs(&t, &plan, "head")),
        (Device::Disk, Device::Cpu)
    );
    assert_eq!(reserve(&plan, Device::Cpu), 700);
    assert_eq!(reserve(&plan, Device::Gpu(0)), 0);
    assert!(within_capacity(&plan));
}

#[test]
fn rule_d_a_pinned_block_follows_the_same_rules() {
    let t = lm(50, 4, 100, 900);
    let pinned = SolveOptions {
        pins: vec![("head".into(), Device::Cpu)],
        ..sequential()
    };
    let plan = solve(&t, &gpus_cpu(&[1000, 1000], 10_000), &pinned).unwrap();
    assert_eq!(runs(&t, &plan, "head"), Device::Gpu(0), "GPU 0 can stage it: rule a");
    assert_eq!(reserve(&plan, Device::Gpu(0)), 900);
    let plan = solve(&t, &gpus_cpu(&[500, 500], 10_000), &pinned).unwrap();
    assert_eq!(runs(&t, &plan, "head"), Device::Cpu);
    assert!(plan.usage.iter().all(|u| u.reserve_bits == 0));
    // Without GPUs the CPU runs everything and stages the disk blocks.
    let s = spec(&[(Device::Cpu, Some(2000)), (Device::Disk, None)]);
    let to_disk = SolveOptions {
        pins: vec![("head".into(), Device::Disk)],
        ..sequential()
    };
    let plan = solve(&t, &s, &to_disk).unwrap();
    assert!(plan.execution.iter().all(|(_, d)| *d == Device::Cpu));
    assert_eq!(reserve(&plan, Device::Cpu), 900);
}

#[test]
fn rule_e_execution_device_forces_the_staging_device() {
    let t = lm(50, 8, 100, 50);
    let s = gpus_cpu(&[400, 400], 10_000);
    let forced = |device| SolveOptions {
        execution_device: Some(device),
        ..sequential()
    };
    let on_cpu = solve(&t, &s, &forced(Device::Cpu)).unwrap();
    assert!(on_cpu.usage.iter().all(|u| u.reserve_bits == 0));
    assert!(on_cpu
        .offloaded
        .iter()
        .all(|o| on_cpu.execution_of(o.node) == Some(Device::Cpu)));
    assert!(on_cpu.offloaded[0]
        .reason
        .ends_with("; runs on the CPU (execution_device)"));
    let on_1 = solve(&t, &s, &forced(Device::Gpu(1))).unwrap();
    assert_eq!(reserve(&on_1, Device::Gpu(0)), 0);
    assert_eq!(reserve(&on_1, Device::Gpu(1)), 100);
    assert!(on_1
        .offloaded
        .iter()
        .all(|o| on_1.execution_of(o.node) == Some(Device::Gpu(1))));
    // GPU 0 forced is the default plan (with the device named in the reasons).
    let default = solve(&t, &s, &sequential()).unwrap();
    let on_0 = solve(&t, &s, &forced(Device::Gpu(0))).unwrap();
    assert_eq!((&on_0.assignments, &on_0.usage), (&default.assignments, &default.usage));
    for bad in [Device::Gpu(5), Device::Disk] {
        let err = solve(&t, &s, &forced(bad)).unwrap_err();
        assert_eq!(
            err,
            PlacementError::InvalidExecutionDevice {
                device: bad,
                available: vec![Device::Gpu(0), Device::Gpu(1), Device::Cpu],
            }
        );
        assert!(err.to_string().contains(r#"use one of "0", "1" or "cpu""#), "{err}");
    }
    let no_cpu = spec(&[(Device::Gpu(0), Some(500)), (Device::Disk, None)]);
    assert!(solve(&t, &no_cpu, &forced(Device::Cpu)).is_err());
}

#[test]
fn rule_f_refused_only_without_a_runnable_plan_naming_the_block() {
    // No CPU: a 900-byte head can be staged nowhere and run nowhere.
    let t = lm(50, 4, 100, 900);
    let s = spec(&[
        (Device::Gpu(0), Some(500)),
        (Device::Gpu(1), Some(500)),
        (Device::Disk, None),
    ]);
    let err = solve(&t, &s, &sequential()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, PlacementError::DoesNotFit(Shortfall::Staging { .. })),
        "{err}"
    );
    assert!(msg.contains(r#"the largest offloaded block "head""#), "{msg}");
    assert!(
        msg.contains(r#"it cannot run on the CPU: max_memory has no "cpu""#),
        "{msg}"
    );
    // A CPU without room for the head's logits cannot run it either.
    let workload = SolveOptions {
        runtime_bits: vec![(t.find("head").unwrap(), 5000 * 8)],
        ..sequential()
    };
    let s = spec(&[(Device::Gpu(0), Some(500)), (Device::Cpu, Some(2000))]);
    let msg = solve(&t, &s, &workload).unwrap_err().to_string();
    assert!(msg.contains("GPU 0 executes the offloaded layers"), "{msg}");
    assert!(
        msg.contains("it cannot run on the CPU: cpu executes the offloaded layers"),
        "{msg}"
    );
}

/// The longest prefix of `sizes` that fits on GPUs of `caps` with `reserve` on GPU `g`, by brute force
/// over contiguous splits.
fn brute_prefix(sizes: &[u64], caps: &[u64], g: usize) -> Option<usize> {
    fn fits(sizes: &[u64], caps: &[u64]) -> bool {
        match caps.split_first() {
            None => sizes.is_empty(),
            Some((cap, rest)) => {
                (0..=sizes.len()).any(|c| sizes[..c].iter().sum::<u64>() <= *cap && fits(&sizes[c..], rest))
            }
        }
    }
    (0..=sizes.len()).rev().find(|&k| {
        let reserve = sizes[k..].iter().copied().max().unwrap_or(0);
        let mut lanes = caps.to_vec();
        lanes[g] = match lanes[g].checked_sub(reserve) {
            Some(c) => c,
            None => return false,
        };
        fits(&sizes[..k], &lanes)
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    #[test]
    fn the_staging_gpu_is_the_best_of_all_gpus(
        sizes in proptest::collection::vec(1u64..60, 1..7),
        caps in proptest::collection::vec(0u64..150, 1..4),
    ) {
        let mut b = TreeBuilder::new("Net");
        for (i, size) in sizes.iter().enumerate() {
            let l = b.module(0, &format!("l{i}"), "Layer");
            b.param(l, "w", *size);
        }
        let t = b.build().unwrap();
        let mut devices: Vec<(Device, Option<u64>)> =
            caps.iter().enumerate().map(|(i, c)| (Device::Gpu(i as u32), Some(*c))).collect();
        devices.push((Device::Cpu, Some(10_000)));
        let plan = solve(&t, &spec(&devices), &SolveOptions::default()).unwrap();
        let on_gpus = plan.assignments.iter().filter(|(_, d)| d.is_gpu_like()).count();
        let per_gpu: Vec<Option<usize>> = (0..caps.len()).map(|g| brute_prefix(&sizes, &caps, g)).collect();
        let staging = plan.usage.iter().filter(|u| u.reserve_bits > 0).map(|u| u.device).collect::<Vec<_>>();
        proptest::prop_assert!(within_capacity(&plan));
        if let Some(k) = per_gpu[0] {
            // Rule a: GPU 0 can stage, so it stages everything offloaded.
            proptest::prop_assert_eq!(on_gpus, k);
            proptest::prop_assert!(staging.iter().all(|d| *d == Device::Gpu(0)));
            proptest::prop_assert!(plan.offloaded.iter().all(|o| plan.execution_of(o.node) == Some(Device::Gpu(0))));
        } else if let Some(best) = per_gpu.iter().flatten().max() {
            // Rule b: the lowest GPU reaching the longest prefix stages, and only it reserves.
            let g = per_gpu.iter().position(|k| *k == Some(*best)).unwrap();
            proptest::prop_assert_eq!(on_gpus, *best);
            proptest::prop_assert_eq!(staging, vec![Device::Gpu(g as u32)]);
            proptest::prop_assert!(plan.offloaded.iter().all(|o| plan.execution_of(o.node) == Some(Device::Gpu(g as u32))));
        } else {
            // Rule c: no GPU stages everything; some block runs on the CPU, at most one GPU stages.
            proptest::prop_assert!(plan.offloaded.iter().any(|o| plan.execution_of(o.node) == Some(Device::Cpu)));
            proptest::prop_assert!(staging.len() <= 1);
        }
    }
}

#[test]
fn without_disk_the_cpu_keeps_no_loading_room_and_the_refusal_says_what_does_not_fit() {
    let t = lm(50, 8, 100, 50); // 900 bytes
    let s = spec(&[(Device::Gpu(0), Some(60)), (Device::Cpu, Some(300))]);
    let msg = solve(&t, &s, &sequential()).unwrap_err().to_string();
    assert!(
        msg.contains("GPU 0 executes the offloaded layers and needs 100 B"),
        "{msg}"
    );
    assert!(
        msg.contains("it cannot run on the CPU: ") && msg.contains("fit on no device"),
        "{msg}"
    );
    assert!(!msg.contains("cpu executes"), "{msg}");
    // Every layer is as large: the first of them is named.
    assert!(msg.contains(r#"the largest offloaded block "layers.0""#), "{msg}");
}

/// BERT's masked-LM shape: the embedding tied with the decoder, `n` layers, a small transform between
/// the last layer and the decoder.
fn tied_lm(embed: u64, n: usize, layer: u64, transform: u64) -> ModuleTree {
    let mut b = TreeBuilder::new("MaskedLM");
    let e = b.module(0, "embed", "Embedding");
    b.tied_param(e, "weight", embed, 0, false);
    let layers = b.module(0, "layers", "ModuleList");
    for i in 0..n {
        let l = b.module(layers, &i.to_string(), "Layer");
        b.param(l, "w", layer);
    }
    let tr = b.module(0, "transform", "Linear");
    b.param(tr, "w", transform);
    let d = b.module(0, "decoder", "Linear");
    b.tied_param(d, "weight", embed, 0, true);
    b.build().unwrap()
}

#[test]
fn a_tied_model_refused_for_its_last_small_blocks_puts_them_in_room_left_on_a_gpu() {
    // The shape of bert, ernie and data2vec-text with a small GPU 0: GPU 0 cannot hold a layer, GPU 1
    // takes the tied embedding + decoder and one layer, the CPU all other layers but not the small
    // transform after them, and there is no disk. accelerate's map keeps the transform on GPU 1 with the
    // tied head's module, so a refusal would be wrong: the tail goes to room left on a GPU.
    let t = tied_lm(30, 4, 20, 2);
    let s = gpus_cpu(&[15, 60], 60);
    for strategy in Strategy::ALL {
        let plan = solve(
            &t,
            &s,
            &SolveOptions {
                strategy,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(within_capacity(&plan), "{strategy:?}");
        assert_eq!(on(&t, &plan, "embed"), on(&t, &plan, "decoder"));
        assert!(on(&t, &plan, "embed").is_gpu_like());
        assert_eq!(
            (on(&t, &plan, "transform"), runs(&t, &plan, "transform")),
            (Device::Gpu(0), Device::Gpu(0))
        );
        assert_eq!(
            (on(&t, &plan, "layers.3"), runs(&t, &plan, "layers.3")),
            (Device::Cpu, Device::Cpu)
        );
        // Nothing is staged: no GPU keeps staging room.
        assert!(plan.usage.iter().all(|u| u.reserve_bits == 0), "{strategy:?}");
    }
    // With a disk the tail goes there: the move to GPU room applies only to plans refused otherwise.
    let s = spec(&[
        (Device::Gpu(0), Some(15)),
        (Device::Gpu(1), Some(60)),
        (Device::Cpu, Some(60)),
        (Device::Disk, None),
    ]);
    let plan = solve(&t, &s, &sequential()).unwrap();
    assert_eq!(on(&t, &plan, "transform"), Device::Disk);
}

#[test]
fn a_tied_group_too_big_to_stage_on_gpu0_is_staged_by_another_gpu_or_runs_on_the_cpu() {
    // An embedding, four layers, then a projection and an output head sharing one 60-byte weight: the
    // tied pair is the last unit, offloaded, and staging either block loads the shared weight.
    let mut b = TreeBuilder::new("Net");
    let e = b.module(0, "embed", "Embedding");
    b.param(e, "w", 10);
    let layers = b.module(0, "layers", "ModuleList");
    for i in 0..4 {
        let l = b.module(layers, &i.to_string(), "Layer");
        b.param(l, "w", 20);
    }
    for (i, name) in ["proj", "head"].into_iter().enumerate() {
        let m = b.module(0, name, "Linear");
        b.param(m, "bias", 1);
        b.tied_param(m, "weight", 60, 0, i == 1);
    }
    let t = b.build().unwrap();
    // GPU 0 (30) cannot stage 61 bytes; GPU 1 can.
    let plan = solve(&t, &gpus_cpu(&[30, 100], 1000), &sequential()).unwrap();
    assert!(within_capacity(&plan));
    for name in ["proj", "head"] {
        assert_eq!(
            (on(&t, &plan, name), runs(&t, &plan, name)),
            (Device::Cpu, Device::Gpu(1)),
            "{name}"
        );
    }
    assert_eq!(reserve(&plan, Device::Gpu(0)), 0);
    assert_eq!(reserve(&plan, Device::Gpu(1)), 61);
    // No GPU can stage it: the pair runs on the CPU where its weights are; the layers after GPU 1's run
    // are staged on GPU 1 (only what it stages is reserved there).
    let plan = solve(&t, &gpus_cpu(&[30, 50], 1000), &sequential()).unwrap();
    assert!(within_capacity(&plan));
    for name in ["proj", "head"] {
        assert_eq!(
            (on(&t, &plan, name), runs(&t, &plan, name)),
            (Device::Cpu, Device::Cpu),
            "{name}"
        );
        assert!(
            reason(&t, &plan, name).contains("runs on the CPU"),
            "{}",
            reason(&t, &plan, name)
        );
    }
    assert!(reserve(&plan, Device::Gpu(1)) < 61);
    assert_eq!(on(&t, &plan, "layers.0"), Device::Gpu(0));
}

/// A chain of layers with layers `a < b` tied through a tensor of `tied` bytes (counted in `a`), as
/// units in chain order: (bits, staged bits, is the group).
fn tied_units(sizes: &[u64], a: usize, b: usize, tied: u64) -> Vec<(u64, u64, bool)> {
    (0..sizes.len())
        .filter(|&i| i != b)
        .map(|i| {
            if i == a {
                (sizes[a] + sizes[b] + tied, sizes[a].max(sizes[b]) + tied, true)
            } else {
                (sizes[i], sizes[i], false)
            }
        })
        .collect()
}

/// Whether the units fit on GPUs of `caps`: the group on any GPU, the others in contiguous runs.
fn prefix_fits(units: &[(u64, u64, bool)], caps: &[u64]) -> bool {
    let untied: Vec<u64> = units.iter().filter(|u| !u.2).map(|u| u.0).collect();
    let fits = |caps: &[u64]| {
        let mut next = 0;
        for cap in caps {
            let mut load = 0;
            while next < untied.len() && load + untied[next] <= *cap {
                load += untied[next];
                next += 1;
            }
        }
        next == untied.len()
    };
    match units.iter().find(|u| u.2) {
        None => fits(caps),
        Some(group) => (0..caps.len()).any(|g| {
            let mut left = caps.to_vec();
            left[g] >= group.0 && {
                left[g] -= group.0;
                fits(&left)
            }
        }),
    }
}

/// Brute force over the plans the execution rule searches: a prefix of the units on the GPUs, the rest
/// on the CPU, each offloaded unit staged on one GPU (room for the largest it stages, tied tensor
/// included) or run on the CPU where it is stored.
fn runnable_plan_exists(units: &[(u64, u64, bool)], gpus: &[u64], cpu: u64) -> bool {
    (0..=units.len()).any(|k| {
        let offloaded = &units[k..];
        if offloaded.iter().map(|u| u.0).sum::<u64>() > cpu {
            return false;
        }
        let limits: Vec<u64> = offloaded.iter().map(|u| u.1).chain([u64::MAX]).collect();
        let cpu_runs_all = prefix_fits(&units[..k], gpus);
        cpu_runs_all
            || (0..gpus.len()).any(|g| {
                limits.iter().any(|&limit| {
                    let room = offloaded.iter().map(|u| u.1).filter(|s| *s <= limit).max().unwrap_or(0);
                    let mut caps = gpus.to_vec();
                    caps[g] >= room && {
                        caps[g] -= room;
                        prefix_fits(&units[..k], &caps)
                    }
                })
            })
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    /// A tie group is placed, staged and run like any unit: a plan is refused only when no plan of the
    /// rule's family runs, and every plan keeps room on each staging GPU for the tied weight its
    /// blocks load.
    #[test]
    fn a_tied_group_is_staged_elsewhere_or_run_on_the_cpu_whenever_that_runs(
        sizes in proptest::collection::vec(1u64..60, 2..7),
        pair in (0usize..7, 0usize..7),
        tied in 1u64..80,
        gpus in proptest::collection::vec(0u64..160, 1..4),
        cpu in 0u64..400,
    ) {
        let n = sizes.len();
        let (a, b) = (pair.0 % n, pair.1 % n);
        proptest::prop_assume!(a != b);
        let (a, b) = (a.min(b), a.max(b));
        let mut builder = TreeBuilder::new("Net");
        for (i, size) in sizes.iter().enumerate() {
            let l = builder.module(0, &format!("l{i}"), "Layer");
            builder.param(l, "w", *size);
            if i == a || i == b {
                builder.tied_param(l, "tied", tied, 0, i == b);
            }
        }
        let t = builder.build().unwrap();
        let exists = runnable_plan_exists(&tied_units(&sizes, a, b, tied), &gpus, cpu);
        for strategy in Strategy::ALL {
            match solve(&t, &gpus_cpu(&gpus, cpu), &SolveOptions { strategy, ..Default::default() }) {
                Ok(plan) => {
                    proptest::prop_assert!(within_capacity(&plan));
                    let (la, lb) = (format!("l{a}"), format!("l{b}"));
                    proptest::prop_assert_eq!(on(&t, &plan, &la), on(&t, &plan, &lb));
                    proptest::prop_assert_eq!(runs(&t, &plan, &la), runs(&t, &plan, &lb));
                    for (node, device) in &plan.assignments {
                        let runs_on = plan.execution_of(*node).unwrap();
                        if !device.is_gpu_like() && runs_on.is_gpu_like() {
                            // Staged: the GPU keeps room for the block with the tied tensor it loads.
                            let i: usize = t.name(*node)[1..].parse().unwrap();
                            let staged = sizes[i] + if i == a || i == b { tied } else { 0 };
                            proptest::prop_assert!(reserve(&plan, runs_on) >= staged);
                        }
                    }
                }
                Err(err) => proptest::prop_assert!(!exists, "{:?} refused a runnable plan: {}", strategy, err),
            }
        }
    }
}
