//! Contiguous placement of a chain of blocks over ordered lanes (one lane per GPU).
//!
//! Each block has a memory footprint and a cost (the quantity to balance: the same memory, or compute).
//! Each lane has a memory base (pinned blocks, reserves) and capacity, and a cost base. `greedy` lets
//! each lane take the longest run that keeps its memory within capacity and its cost within `bound`; for
//! a fixed lane order this places the longest possible prefix, so it is an exact feasibility test for a
//! bound (both limits only get harder as a run grows). `min_max` finds the smallest feasible bound by
//! binary search.
//!
//! The planners ask many such questions of one chain (every step of a binary search, every GPU choice
//! of a tie group), so they ask them of a [`Span`] of [`Totals`]: running sums built once in O(m), after
//! which a lane's longest run is a binary search. A greedy pass is then O(lanes · log m) instead of O(m)
//! and `min_max` O(m + lanes · log m · log C) for costs up to C. The plain `greedy` stays the
//! definition (and the test oracle).

use std::ops::Range;

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
#[cfg(test)]
pub fn min_max(chain: Chain, lanes: &[Lane]) -> Option<(u64, Vec<usize>)> {
    Totals::new(chain).span().min_max(lanes)
}

/// Cost of each lane (cost base + run) for the given counts.
#[cfg(test)]
pub fn costs(chain: Chain, lanes: &[Lane], counts: &[usize]) -> Vec<u64> {
    sums(chain.cost, lanes.iter().map(|l| l.cost_base), counts)
}

/// Running sums of a chain: entry `i` is the total of blocks `..i`. The cost column is left out when
/// the chain balances its memory.
pub struct Totals {
    memory: Sums,
    cost: Option<Sums>,
}

/// One column of running sums: u64 when the column's total fits (always, for sizes in bits of a real
/// model: half the memory to build and to search), u128 otherwise, so no sum ever overflows.
enum Sums {
    Narrow(Vec<u64>),
    Wide(Vec<u128>),
}

fn running<T: Copy + From<u64> + std::ops::Add<Output = T>>(values: impl ExactSizeIterator<Item = u64>) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len() + 1);
    let mut total = T::from(0);
    out.push(total);
    for v in values {
        total = total + T::from(v);
        out.push(total);
    }
    out
}

/// The last index `j` in `from..=to` with `sums[j] - sums[from] <= room` (sums never decrease).
fn run_end<T: Copy + Into<u128>>(sums: &[T], from: usize, to: usize, room: u128) -> usize {
    let limit = sums[from].into() + room;
    from + sums[from..=to].partition_point(|&s| s.into() <= limit) - 1
}

impl Sums {
    fn new(values: impl ExactSizeIterator<Item = u64> + Clone) -> Sums {
        let fits = values.clone().try_fold(0u64, |total, v| total.checked_add(v)).is_some();
        if fits {
            Sums::Narrow(running(values))
        } else {
            Sums::Wide(running(values))
        }
    }

    fn len(&self) -> usize {
        match self {
            Sums::Narrow(s) => s.len(),
            Sums::Wide(s) => s.len(),
        }
    }

    fn at(&self, i: usize) -> u128 {
        match self {
            Sums::Narrow(s) => u128::from(s[i]),
            Sums::Wide(s) => s[i],
        }
    }

    fn run_end(&self, from: usize, to: usize, room: u128) -> usize {
        match self {
            Sums::Narrow(s) => run_end(s, from, to, room),
            Sums::Wide(s) => run_end(s, from, to, room),
        }
    }
}

impl Totals {
    /// The running sums of `chain` (O(m), once per chain).
    pub fn new(chain: Chain) -> Totals {
        let same = std::ptr::eq(chain.memory, chain.cost);
        Totals {
            memory: Sums::new(chain.memory.iter().copied()),
            cost: (!same).then(|| Sums::new(chain.cost.iter().copied())),
        }
    }

    /// The running sums of the blocks `picked` of `chain`, in that order, as a chain of their own.
    pub fn of_picked(chain: Chain, picked: &[usize]) -> Totals {
        let same = std::ptr::eq(chain.memory, chain.cost);
        Totals {
            memory: Sums::new(picked.iter().map(|&i| chain.memory[i])),
            cost: (!same).then(|| Sums::new(picked.iter().map(|&i| chain.cost[i]))),
        }
    }

    /// The whole chain.
    pub fn span(&self) -> Span<'_> {
        Span {
            totals: self,
            from: 0,
            to: self.memory.len() - 1,
        }
    }
}

/// Consecutive blocks `from..to` of a chain with its [`Totals`]: what the layout algorithms work on.
#[derive(Clone, Copy)]
pub struct Span<'a> {
    totals: &'a Totals,
    from: usize,
    to: usize,
}

impl<'a> Span<'a> {
    pub fn len(&self) -> usize {
        self.to - self.from
    }

    /// Blocks `range` of this span (indices relative to its start).
    pub fn slice(&self, range: Range<usize>) -> Span<'a> {
        assert!(range.start <= range.end && range.end <= self.len());
        Span {
            totals: self.totals,
            from: self.from + range.start,
            to: self.from + range.end,
        }
    }

    fn cost_sums(&self) -> &'a Sums {
        self.totals.cost.as_ref().unwrap_or(&self.totals.memory)
    }

    /// Cost of blocks `from..to` (absolute indices), saturated to u64.
    fn cost_between(&self, from: usize, to: usize) -> u64 {
        let sums = self.cost_sums();
        u64::try_from(sums.at(to) - sums.at(from)).unwrap_or(u64::MAX)
    }

    /// [`greedy`] on this span: each lane's run ends where its memory or cost would pass its limit.
    /// A limit of `u64::MAX` never binds (the plain loop's saturating sums never pass it).
    pub fn greedy(&self, lanes: &[Lane], bound: u64) -> Vec<usize> {
        let mut counts = vec![0; lanes.len()];
        let mut next = self.from;
        for (lane, count) in lanes.iter().zip(counts.iter_mut()) {
            if next == self.to {
                break;
            }
            if lane.base > lane.capacity || lane.cost_base > bound {
                continue;
            }
            let mut end = self.to;
            if lane.capacity != u64::MAX {
                end = self
                    .totals
                    .memory
                    .run_end(next, end, u128::from(lane.capacity - lane.base));
            }
            if bound != u64::MAX {
                end = self.cost_sums().run_end(next, end, u128::from(bound - lane.cost_base));
            }
            *count = end - next;
            next = end;
        }
        counts
    }

    /// [`min_max`] on this span: binary search on the bound, each step one greedy pass.
    pub fn min_max(&self, lanes: &[Lane]) -> Option<(u64, Vec<usize>)> {
        if lanes.is_empty() {
            return (self.len() == 0).then(|| (0, Vec::new()));
        }
        if lanes.iter().any(|l| l.base > l.capacity) {
            return None;
        }
        let all = |bound: u64| placed(&self.greedy(lanes, bound)) == self.len();
        let heaviest_base = lanes.iter().map(|l| l.cost_base).max().unwrap_or(0);
        let mut hi = heaviest_base.saturating_add(self.cost_between(self.from, self.to));
        if !all(hi) {
            return None;
        }
        // No bound below the heaviest cost base or the heaviest single block can hold.
        let heaviest_block = (self.from..self.to)
            .map(|j| self.cost_between(j, j + 1))
            .max()
            .unwrap_or(0);
        let mut lo = heaviest_base.max(heaviest_block).min(hi);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if all(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let counts = self.greedy(lanes, lo);
        let peak = self.costs(lanes, &counts).into_iter().max().unwrap_or(0);
        Some((peak, counts))
    }

    /// Cost of each lane (cost base + run) for the given counts.
    pub fn costs(&self, lanes: &[Lane], counts: &[usize]) -> Vec<u64> {
        let mut next = self.from;
        lanes
            .iter()
            .zip(counts)
            .map(|(lane, &c)| {
                let run = self.cost_between(next, next + c);
                next += c;
                lane.cost_base.saturating_add(run)
            })
            .collect()
    }
}

/// Memory of each lane (base + run) for the given counts.
#[cfg(test)]
fn loads(chain: Chain, lanes: &[Lane], counts: &[usize]) -> Vec<u64> {
    sums(chain.memory, lanes.iter().map(|l| l.base), counts)
}

#[cfg(test)]
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
        fn span_greedy_matches_the_plain_loop(
            blocks in prop::collection::vec((0u64..40, 0u64..40), 0..12),
            raw in prop::collection::vec((0u64..30, 0u64..120, 0u64..20, any::<bool>()), 1..5),
            bound in prop_oneof![0u64..150, Just(u64::MAX)],
            cut in (0usize..13, 0usize..13),
            by_memory in any::<bool>(),
        ) {
            let memory: Vec<u64> = blocks.iter().map(|b| b.0).collect();
            let cost: Vec<u64> = if by_memory { memory.clone() } else { blocks.iter().map(|b| b.1).collect() };
            // Some lanes unbounded (u64::MAX, as an unbounded CPU), some already over capacity.
            let lanes: Vec<Lane> = raw
                .into_iter()
                .map(|(base, extra, cost_base, unbounded)| Lane {
                    base,
                    capacity: if unbounded { u64::MAX } else { (base + extra).saturating_sub(10) },
                    cost_base,
                })
                .collect();
            let (a, b) = (cut.0.min(memory.len()), cut.1.min(memory.len()));
            let range = a.min(b)..a.max(b);
            let chain = Chain { memory: &memory, cost: if by_memory { &memory } else { &cost } };
            let totals = Totals::new(chain);
            let span = totals.span().slice(range.clone());
            prop_assert_eq!(span.greedy(&lanes, bound), greedy(chain.slice(range.clone()), &lanes, bound));
            if let Some((peak, counts)) = span.min_max(&lanes) {
                prop_assert_eq!(span.costs(&lanes, &counts), costs(chain.slice(range), &lanes, &counts));
                prop_assert_eq!(*span.costs(&lanes, &counts).iter().max().unwrap(), peak);
            }
        }

        #[test]
        fn span_greedy_matches_the_plain_loop_when_totals_pass_u64(
            blocks in prop::collection::vec((0u64..u64::MAX / 3, 0u64..u64::MAX / 3), 0..10),
            raw in prop::collection::vec((0u64..u64::MAX / 2, 0u64..u64::MAX / 2, 0u64..u64::MAX / 4), 1..4),
            bound in 0u64..u64::MAX - 1,
        ) {
            // Running totals past u64 take the wide column; limits stay finite (the plain loop's own
            // sums would overflow past an unbounded one).
            let memory: Vec<u64> = blocks.iter().map(|b| b.0).collect();
            let cost: Vec<u64> = blocks.iter().map(|b| b.1).collect();
            let lanes: Vec<Lane> = raw
                .into_iter()
                .map(|(base, extra, cost_base)| Lane { base, capacity: base + extra, cost_base })
                .collect();
            let chain = Chain { memory: &memory, cost: &cost };
            let totals = Totals::new(chain);
            prop_assert_eq!(totals.span().greedy(&lanes, bound), greedy(chain, &lanes, bound));
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
