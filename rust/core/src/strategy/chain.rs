//! Contiguous placement of a chain of blocks over ordered lanes (one lane per GPU).
//!
//! Each block has a memory footprint and a cost (the quantity to balance: the same memory, or compute).
//! Each lane has a memory base (pinned blocks, reserves) and capacity, and a cost base. `greedy` lets
//! each lane take the longest run that keeps its memory within capacity and its cost within `bound`; for
//! a fixed lane order this places the longest possible prefix, so it is an exact feasibility test for a
//! bound (both limits only get harder as a run grows). `min_max` finds the smallest feasible bound by
//! binary search: O(m log C) for m blocks and costs up to C.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub base: u64,
    pub capacity: u64,
    pub cost_base: u64,
}

impl Lane {
    /// A lane whose balanced cost is its memory (cost base = memory base).
    pub fn memory(base: u64, capacity: u64) -> Lane {
        Lane {
            base,
            capacity,
            cost_base: base,
        }
    }
}

/// Blocks in chain order: memory per block and cost per block (equal slices when balancing memory).
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a> {
    pub memory: &'a [u64],
    pub cost: &'a [u64],
}

impl<'a> Chain<'a> {
    pub fn by_memory(memory: &'a [u64]) -> Chain<'a> {
        Chain { memory, cost: memory }
    }

    pub fn len(&self) -> usize {
        self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    pub fn slice(&self, range: std::ops::Range<usize>) -> Chain<'a> {
        Chain {
            memory: &self.memory[range.clone()],
            cost: &self.cost[range],
        }
    }
}

/// How many consecutive blocks each lane takes. The counts may sum to less than the chain's length.
pub fn greedy(chain: Chain, lanes: &[Lane], bound: u64) -> Vec<usize> {
    let mut counts = vec![0; lanes.len()];
    let mut next = 0;
    for (lane, count) in lanes.iter().zip(counts.iter_mut()) {
        if lane.base > lane.capacity || lane.cost_base > bound {
            continue;
        }
        let (mut load, mut cost) = (lane.base, lane.cost_base);
        while next < chain.len()
            && load.saturating_add(chain.memory[next]) <= lane.capacity
            && cost.saturating_add(chain.cost[next]) <= bound
        {
            load += chain.memory[next];
            cost += chain.cost[next];
            next += 1;
            *count += 1;
        }
    }
    counts
}

pub fn placed(counts: &[usize]) -> usize {
    counts.iter().sum()
}

/// The smallest achievable largest lane cost (cost base included) with every block placed within memory,
/// and the counts that achieve it; `None` if the blocks do not fit at all.
pub fn min_max(chain: Chain, lanes: &[Lane]) -> Option<(u64, Vec<usize>)> {
    if lanes.is_empty() {
        return chain.is_empty().then(|| (0, Vec::new()));
    }
    if lanes.iter().any(|l| l.base > l.capacity) {
        return None;
    }
    let all = |bound: u64| placed(&greedy(chain, lanes, bound)) == chain.len();
    let heaviest_base = lanes.iter().map(|l| l.cost_base).max().unwrap_or(0);
    let mut hi = heaviest_base.saturating_add(chain.cost.iter().fold(0u64, |a, c| a.saturating_add(*c)));
    if !all(hi) {
        return None;
    }
    // No bound below the heaviest cost base or the heaviest single block can hold.
    let mut lo = heaviest_base.max(chain.cost.iter().copied().max().unwrap_or(0)).min(hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if all(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let counts = greedy(chain, lanes, lo);
    let peak = costs(chain, lanes, &counts).into_iter().max().unwrap_or(0);
    Some((peak, counts))
}

/// Cost of each lane (cost base + run) for the given counts.
pub fn costs(chain: Chain, lanes: &[Lane], counts: &[usize]) -> Vec<u64> {
    sums(chain.cost, lanes.iter().map(|l| l.cost_base), counts)
}

/// Memory of each lane (base + run) for the given counts.
#[cfg(test)]
fn loads(chain: Chain, lanes: &[Lane], counts: &[usize]) -> Vec<u64> {
    sums(chain.memory, lanes.iter().map(|l| l.base), counts)
}

fn sums(values: &[u64], bases: impl Iterator<Item = u64>, counts: &[usize]) -> Vec<u64> {
    let mut next = 0;
    bases
        .zip(counts)
        .map(|(base, &c)| {
            let run: u64 = values[next..next + c].iter().sum();
            next += c;
            base + run
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every way to cut `m` blocks into `lanes` consecutive runs (brute force oracle).
    fn all_splits(m: usize, lanes: usize) -> Vec<Vec<usize>> {
        if lanes == 1 {
            return vec![vec![m]];
        }
        let mut out = Vec::new();
        for first in 0..=m {
            for mut rest in all_splits(m - first, lanes - 1) {
                rest.insert(0, first);
                out.push(rest);
            }
        }
        out
    }

    fn brute_force(chain: Chain, lanes: &[Lane]) -> Option<u64> {
        all_splits(chain.len(), lanes.len())
            .into_iter()
            .filter_map(|counts| {
                let mem = loads(chain, lanes, &counts);
                let cost = costs(chain, lanes, &counts);
                mem.iter()
                    .zip(lanes)
                    .all(|(load, lane)| *load <= lane.capacity)
                    .then(|| *cost.iter().max().unwrap())
            })
            .min()
    }

    fn lanes_from(raw: Vec<(u64, u64, u64)>) -> Vec<Lane> {
        raw.into_iter()
            .map(|(base, extra, cost_base)| Lane {
                base,
                capacity: base + extra,
                cost_base,
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn memory_min_max_matches_brute_force(
            weights in prop::collection::vec(0u64..50, 0..9),
            raw in prop::collection::vec((0u64..20, 0u64..180, 0u64..1), 1..4),
        ) {
            let lanes: Vec<Lane> = lanes_from(raw).into_iter().map(|l| Lane::memory(l.base, l.capacity)).collect();
            let chain = Chain::by_memory(&weights);
            let got = min_max(chain, &lanes);
            prop_assert_eq!(got.as_ref().map(|g| g.0), brute_force(chain, &lanes));
            if let Some((peak, counts)) = got {
                prop_assert_eq!(placed(&counts), weights.len());
                for (load, lane) in loads(chain, &lanes, &counts).iter().zip(&lanes) {
                    prop_assert!(*load <= lane.capacity);
                }
                prop_assert_eq!(*costs(chain, &lanes, &counts).iter().max().unwrap(), peak);
            }
        }

        #[test]
        fn cost_min_max_under_memory_limits_matches_brute_force(
            blocks in prop::collection::vec((0u64..50, 0u64..30), 0..8),
            raw in prop::collection::vec((0u64..20, 0u64..150, 0u64..15), 1..4),
        ) {
            let memory: Vec<u64> = blocks.iter().map(|b| b.0).collect();
            let cost: Vec<u64> = blocks.iter().map(|b| b.1).collect();
            let lanes = lanes_from(raw);
            let chain = Chain { memory: &memory, cost: &cost };
            prop_assert_eq!(min_max(chain, &lanes).map(|g| g.0), brute_force(chain, &lanes));
        }

        #[test]
        fn greedy_places_the_longest_prefix(
            weights in prop::collection::vec(0u64..50, 0..9),
            raw in prop::collection::vec((0u64..20, 0u64..100, 0u64..1), 1..4),
        ) {
            let lanes: Vec<Lane> = lanes_from(raw).into_iter().map(|l| Lane::memory(l.base, l.capacity)).collect();
            let best = (0..=weights.len())
                .rev()
                .find(|&k| brute_force(Chain::by_memory(&weights[..k]), &lanes).is_some())
                .unwrap();
            prop_assert_eq!(placed(&greedy(Chain::by_memory(&weights), &lanes, u64::MAX)), best);
        }
    }
}
