//! The program against brute force on small chains: exact with units of one byte; with coarser units its
//! answers fit and are no slower than the best placement of the reduced capacities; labels within bound.

use super::*;
use proptest::prelude::*;

/// Seconds of `modes` under the program's rules, or `None` when one is broken (a mode the block does not
/// allow, GPU runs out of order, a device over capacity).
fn evaluate(chain: &SpeedChain, modes: &[Mode]) -> Option<f64> {
    let gpus = chain.gpu_capacity.len();
    let mut gpu_used = vec![0u64; gpus];
    let (mut cpu_used, mut cpu_runs, mut room) = (0u64, false, 0u64);
    let mut highest: Option<usize> = None;
    let mut seconds = 0.0;
    let mut previous: Option<usize> = None;
    for (block, mode) in chain.blocks.iter().zip(modes) {
        let (index, device) = match *mode {
            Mode::Gpu(g) => (g as usize, g as usize),
            Mode::Cpu => (gpus, gpus),
            Mode::Disk => (gpus + 1, gpus),
        };
        seconds += block.cost.get(index).copied().flatten()?;
        if let Mode::Gpu(g) = *mode {
            let g = g as usize;
            if highest.is_some_and(|h| g < h) {
                return None;
            }
            if highest != Some(g) {
                gpu_used[g] += chain.activation;
            }
            highest = Some(g);
            gpu_used[g] += block.weight + block.runtime;
        } else {
            if !cpu_runs {
                cpu_used += chain.activation;
            }
            cpu_runs = true;
            cpu_used += block.runtime;
            if *mode == Mode::Cpu {
                cpu_used += block.weight;
            } else {
                room = room.max(block.weight);
            }
        }
        if let Some(p) = previous {
            if p != device {
                seconds += chain.switch[p][device];
            }
        }
        previous = Some(device);
    }
    let fits = gpu_used.iter().zip(&chain.gpu_capacity).all(|(u, c)| u <= c)
        && chain.cpu_capacity.is_none_or(|cap| cpu_used + room <= cap);
    fits.then_some(seconds)
}

fn brute_force(chain: &SpeedChain) -> Option<f64> {
    let gpus = chain.gpu_capacity.len();
    let all: Vec<Mode> = (0..gpus as u32).map(Mode::Gpu).chain([Mode::Cpu, Mode::Disk]).collect();
    let n = chain.blocks.len();
    let mut best: Option<f64> = None;
    let mut choice = vec![0usize; n];
    loop {
        let modes: Vec<Mode> = choice.iter().map(|&i| all[i]).collect();
        if let Some(s) = evaluate(chain, &modes) {
            best = Some(best.map_or(s, |b: f64| b.min(s)));
        }
        let mut i = 0;
        while i < n && choice[i] + 1 == all.len() {
            choice[i] = 0;
            i += 1;
        }
        if i == n {
            return best;
        }
        choice[i] += 1;
    }
}

fn chains() -> impl Strategy<Value = SpeedChain> {
    (1usize..=2, any::<bool>(), proptest::option::of(0u64..120)).prop_flat_map(|(gpus, disk, cpu)| {
        let block = (
            1u64..30,
            0u64..5,
            proptest::collection::vec(1u32..20, gpus),
            1u32..60,
            0u32..40,
            any::<bool>(),
        )
            .prop_map(move |(weight, runtime, on_gpus, on_cpu, slower, no_gpu)| {
                let mut cost: Vec<Option<f64>> = on_gpus.iter().map(|&s| Some(f64::from(s))).collect();
                if no_gpu && weight % 7 == 0 {
                    cost[0] = None; // now and then a mode a block does not allow
                }
                cost.push(Some(f64::from(on_cpu)));
                if disk {
                    cost.push(Some(f64::from(on_cpu + slower)));
                }
                SpeedBlock { weight, runtime, cost }
            });
        (
            proptest::collection::vec(block, 1..if gpus == 1 { 7 } else { 6 }),
            proptest::collection::vec(0u64..80, gpus),
            0u64..6,
            proptest::collection::vec(proptest::collection::vec(0u32..10, gpus + 1), gpus + 1),
        )
            .prop_map(move |(blocks, gpu_capacity, activation, switch)| SpeedChain {
                blocks,
                gpu_capacity,
                cpu_capacity: cpu,
                activation,
                switch: switch
                    .into_iter()
                    .map(|row| row.into_iter().map(f64::from).collect())
                    .collect(),
            })
    })
}

/// `chain` with every byte count times `factor` (the same placements fit).
fn scaled(chain: &SpeedChain, factor: u64) -> SpeedChain {
    SpeedChain {
        blocks: chain
            .blocks
            .iter()
            .map(|b| SpeedBlock {
                weight: b.weight * factor,
                runtime: b.runtime * factor,
                cost: b.cost.clone(),
            })
            .collect(),
        gpu_capacity: chain.gpu_capacity.iter().map(|c| c * factor).collect(),
        cpu_capacity: chain.cpu_capacity.map(|c| c * factor),
        activation: chain.activation * factor,
        switch: chain.switch.clone(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn with_byte_units_the_program_equals_brute_force(chain in chains(), bounded in any::<bool>()) {
        // Bytes x 64, so the first pass (64 cells per GPU) is coarser than bytes and the bound is used.
        let chain = scaled(&chain, 64);
        let (found, stats) = solve_chain_with(&chain, 1, 1, bounded).unwrap();
        let expected = brute_force(&chain);
        prop_assert_eq!(found.is_some(), expected.is_some());
        if let (Some(found), Some(expected)) = (found, expected) {
            prop_assert!(close(found.seconds, expected), "{} != {}", found.seconds, expected);
            let reached = evaluate(&chain, &found.modes);
            prop_assert!(reached.is_some_and(|s| close(s, found.seconds)), "{:?} vs {}", reached, found.seconds);
        }
        prop_assert!(stats.largest <= stats.bound);
    }

    #[test]
    fn the_rest_bound_never_exceeds_the_best_placement_of_the_rest(chain in chains(), from in 0usize..6) {
        // The rest of a chain from `from` on, alone, with every device's room: its best placement costs at
        // least the bound the whole chain's tables give at `from` (whose room is at most the capacities).
        let from = from.min(chain.blocks.len());
        let rest_chain = SpeedChain { blocks: chain.blocks[from..].to_vec(), ..chain.clone() };
        let setup = Setup::new(&chain, 1, 1);
        let level_of = |weight: u64| setup.level_of(weight);
        let read = ReadRoom { levels: &setup.levels, level_of: &level_of };
        let rest = RestBound::new(&chain.blocks, &chain.gpu_capacity, setup.tracked.then_some(setup.cpu_capacity), &read);
        if let Some(best) = brute_force(&rest_chain) {
            let room: u64 = chain.gpu_capacity.iter().sum();
            prop_assert!(
                !rest.exceeds(from, room, setup.cpu_capacity, 0, best + 1e-9),
                "the bound from block {} exceeds its best placement, {}", from, best
            );
        }
    }

    #[test]
    fn coarse_units_fit_and_beat_every_placement_of_the_reduced_capacities(
        chain in chains(), unit in 1u64..12, cpu_unit in 1u64..12, bounded in any::<bool>()
    ) {
        let (found, stats) = solve_chain_with(&chain, unit, cpu_unit, bounded).unwrap();
        prop_assert!(stats.largest <= stats.bound);
        let n = chain.blocks.len() as u64;
        let reduced = SpeedChain {
            gpu_capacity: chain.gpu_capacity.iter().map(|c| c.saturating_sub(n * unit)).collect(),
            cpu_capacity: chain.cpu_capacity.map(|c| c.saturating_sub((n + 1) * cpu_unit)),
            ..chain.clone()
        };
        if let Some(found) = &found {
            let reached = evaluate(&chain, &found.modes);
            prop_assert!(reached.is_some_and(|s| close(s, found.seconds)), "{:?} vs {}", reached, found.seconds);
        }
        if let Some(bound) = brute_force(&reduced) {
            let found = found.map(|f| f.seconds);
            prop_assert!(found.is_some_and(|s| s <= bound + 1e-9), "{:?} slower than {}", found, bound);
        }
    }
}

fn expert_layers(layers: usize, gpus: usize) -> SpeedChain {
    // attention (small, much faster on a GPU) then experts (large) per layer, as in a mixture of experts
    let mut blocks = Vec::new();
    for _ in 0..layers {
        let mut attention: Vec<Option<f64>> = vec![Some(1.0); gpus];
        attention.extend([Some(12.0), Some(12.0 + 0.1)]);
        blocks.push(SpeedBlock {
            weight: 90,
            runtime: 8,
            cost: attention,
        });
        let mut experts: Vec<Option<f64>> = vec![Some(8.0); gpus];
        experts.extend([Some(100.0), Some(100.0 + 28.0)]);
        blocks.push(SpeedBlock {
            weight: 2800,
            runtime: 0,
            cost: experts,
        });
    }
    let mut switch = vec![vec![0.01; gpus + 1]; gpus + 1];
    for (i, row) in switch.iter_mut().enumerate() {
        row[i] = 0.0;
    }
    SpeedChain {
        blocks,
        gpu_capacity: vec![24_000; gpus],
        cpu_capacity: Some(16_000),
        activation: 4,
        switch,
    }
}

#[test]
fn labels_per_block_stay_within_the_cells_and_the_work_follows() {
    for gpus in 1..=4 {
        let chain = expert_layers(32, gpus);
        let (found, stats) = solve_chain(&chain, 24_000 / 64, 16_000 / 32).unwrap();
        let found = found.expect("the model fits with disk");
        assert!(evaluate(&chain, &found.modes).is_some());
        // one label per key and cell at most: (GPU cells + 1) x 3 flags x read levels x CPU cells
        let levels = 3; // none, attention, experts (rounded up to CPU units)
        let expected = (gpus as u64 * 65 + 1) * 3 * levels * 33;
        assert_eq!(stats.bound, expected);
        assert!(stats.largest <= stats.bound, "{stats:?}");
        assert!(stats.labels <= stats.bound * chain.blocks.len() as u64);
    }
}

#[test]
fn attention_stays_on_the_gpu_and_experts_fill_the_rest() {
    let mut chain = expert_layers(4, 1);
    chain.gpu_capacity = vec![10_000];
    let (found, _) = solve_chain(&chain, 1, 1).unwrap();
    let modes = found.unwrap().modes;
    for layer in 0..4 {
        assert_eq!(modes[2 * layer], Mode::Gpu(0), "{modes:?}");
    }
    let on_gpu = modes.iter().filter(|m| matches!(m, Mode::Gpu(_))).count();
    assert_eq!(on_gpu, 4 + 3); // with the 4 attention blocks, 3 of the 2800-byte experts fit in 10000
}

#[test]
fn bad_inputs_are_errors_naming_them() {
    let mut chain = expert_layers(1, 1);
    let err = solve_chain(&chain, 0, 1).unwrap_err();
    assert!(err.to_string().contains("speed program unit"), "{err}");
    chain.switch.pop();
    assert!(solve_chain(&chain, 1, 1)
        .unwrap_err()
        .to_string()
        .contains("switch matrix"));
    let mut chain = expert_layers(1, 1);
    chain.blocks[0].cost[0] = Some(f64::NAN);
    assert!(solve_chain(&chain, 1, 1)
        .unwrap_err()
        .to_string()
        .contains("block cost"));
}

#[test]
fn nothing_fits_is_none() {
    let mut chain = expert_layers(2, 1);
    chain.gpu_capacity = vec![10];
    chain.cpu_capacity = Some(10);
    for block in &mut chain.blocks {
        block.cost.truncate(2); // no disk
    }
    assert_eq!(solve_chain(&chain, 1, 1).unwrap().0, None);
}

#[test]
fn where_everything_fits_the_gpus_the_bound_leaves_a_few_labels_per_block() {
    for gpus in 2..=4 {
        let mut chain = expert_layers(24, gpus);
        chain.gpu_capacity = vec![40_000; gpus]; // 24 layers of 2898 bytes fit 2 GPUs
        let (unit, cpu_unit) = (40_000 / 512, 16_000 / 64);
        let (bounded, with) = solve_chain_with(&chain, unit, cpu_unit, true).unwrap();
        let (plain, without) = solve_chain_with(&chain, unit, cpu_unit, false).unwrap();
        let (bounded, plain) = (bounded.unwrap(), plain.unwrap());
        assert!(
            close(bounded.seconds, plain.seconds),
            "{} vs {}",
            bounded.seconds,
            plain.seconds
        );
        assert!(
            bounded.modes.iter().all(|m| matches!(m, Mode::Gpu(_))),
            "{:?}",
            bounded.modes
        );
        assert!(with.pruned > 0 && with.first_pass_labels > 0, "{with:?}");
        // Without the bound each block keeps the labels of every split between the GPUs.
        assert!(
            with.largest <= 8 && with.largest * 10 <= without.largest,
            "{with:?} vs {without:?}"
        );
    }
}
