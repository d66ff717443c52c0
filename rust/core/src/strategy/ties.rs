//! Tie groups on any GPU.
//!
//! A free unit of several blocks (blocks sharing a tied tensor, e.g. an input embedding and the output
//! head) must sit on one device, but that device need not be where its first block falls in the chain:
//! BERT's decoder belongs next to the last layers, its embedding next to the first. The exact
//! formulation: the untied units keep contiguous runs in model order, and each tie group is one item
//! on any GPU, its memory (and cost) added to that GPU's load. The optimum is the best over every
//! choice of GPU per group, each choice solved exactly by the chain algorithms. Placing each group at
//! its first block's position is one of those choices; it is tried first and kept on equal scores,
//! so plans only change when moving a group helps. `sequential` keeps that choice whenever it fits and
//! moves groups only when that keeps more units on the GPUs. What is offloaded stays the tail of the
//! chain in model order (a group counted at its first block).
//!
//! The choices are enumerated while there are at most [`MAX_CHOICES`] of them (and the work stays
//! under [`MAX_WORK`] block visits); beyond that, each group stays at its first block's position,
//! which is then exact only among such plans.

use super::chain::{placed, Chain, Lane, Span, Totals};
use super::{balanced, low_zero, sequential, ResolvedStrategy as Strategy};

/// Most GPU choices (GPUs ^ tie groups) tried exhaustively.
pub const MAX_CHOICES: usize = 4096;
/// Most choices x chain length tried per question (keeps a solve of a huge tree interactive).
const MAX_WORK: usize = 1 << 22;

/// A prefix of the free units: their chain, and which of them are tie groups (several blocks).
#[derive(Debug, Clone, Copy)]
pub struct Units<'a> {
    pub chain: Chain<'a>,
    pub is_group: &'a [bool],
}

impl<'a> Units<'a> {
    #[cfg(test)]
    fn prefix(&self, k: usize) -> Units<'a> {
        Units {
            chain: self.chain.slice(0..k),
            is_group: &self.is_group[..k],
        }
    }

    fn groups(&self) -> Vec<usize> {
        (0..self.chain.len()).filter(|&i| self.is_group[i]).collect()
    }
}

/// Every GPU choice for the groups (lane index per group), in a fixed order; `None` when too many.
fn choices(groups: usize, lanes: usize, chain_len: usize) -> Option<Vec<Vec<usize>>> {
    if groups == 0 {
        return Some(vec![Vec::new()]);
    }
    let mut count = 1usize;
    for _ in 0..groups {
        count = count.checked_mul(lanes).filter(|c| *c <= MAX_CHOICES)?;
    }
    if count.saturating_mul(chain_len + 1) > MAX_WORK {
        return None;
    }
    Some(
        (0..count)
            .map(|mut c| {
                (0..groups)
                    .map(|_| {
                        let lane = c % lanes;
                        c /= lanes;
                        lane
                    })
                    .collect()
            })
            .collect(),
    )
}

/// The units with what every question about them reuses: running sums of the whole chain and of the
/// untied units (which every GPU choice for the groups lays out alike; only the lanes change). Each
/// prefix and each choice is then a [`Span`] and a set of lanes, with no copy of the chain.
pub struct Indexed<'a> {
    units: Units<'a>,
    all: Totals,
    groups: Vec<usize>,
    /// Indices of the untied units, and their running sums (empty without groups).
    untied: Vec<usize>,
    untied_totals: Totals,
}

impl<'a> Indexed<'a> {
    pub fn new(units: Units<'a>) -> Indexed<'a> {
        let groups = units.groups();
        let untied: Vec<usize> = if groups.is_empty() {
            Vec::new()
        } else {
            (0..units.chain.len()).filter(|&i| !units.is_group[i]).collect()
        };
        Indexed {
            units,
            all: Totals::new(units.chain),
            untied_totals: Totals::of_picked(units.chain, &untied),
            groups,
            untied,
        }
    }

    /// The groups among the first `k` units, and how many untied units those are.
    fn within(&self, k: usize) -> (&[usize], usize) {
        let groups = &self.groups[..self.groups.partition_point(|&g| g < k)];
        (groups, k - groups.len())
    }

    /// The first `u` untied units.
    fn untied_span(&self, u: usize) -> Span<'_> {
        self.untied_totals.span().slice(0..u)
    }

    /// The longest prefix of the units that fits on `lanes` with some GPU choice for its groups.
    pub fn longest_prefix(&self, lanes: &[Lane]) -> usize {
        // An unbounded cost limit: memory alone decides what fits.
        let fits_in_place = placed(&self.all.span().greedy(lanes, u64::MAX));
        if self.groups.is_empty() || lanes.len() < 2 {
            return fits_in_place; // nothing to move, or nowhere else to move it
        }
        let fits = |k: usize| {
            let (groups, u) = self.within(k);
            let Some(choices) = choices(groups.len(), lanes.len(), k) else {
                return false;
            };
            let chain = self.untied_span(u);
            choices.iter().any(|choice| {
                let moved = moved_lanes(self.units, groups, choice, lanes);
                groups_fit(&moved, lanes) && placed(&chain.greedy(&moved, u64::MAX)) == u
            })
        };
        // Fitting is monotone in k (dropping the last unit only frees room): binary search above the
        // in-place answer, which always fits.
        let (mut lo, mut hi) = (fits_in_place, self.units.chain.len());
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// The lane of each of the first `k` units under `strategy`, all of them placed within capacity;
    /// `None` if no layout fits (the caller only hands over a prefix that `longest_prefix` accepted).
    pub fn lay_out(&self, strategy: Strategy, k: usize, lanes: &[Lane]) -> Option<Vec<usize>> {
        let units = Units {
            chain: self.units.chain.slice(0..k),
            is_group: &self.units.is_group[..k],
        };
        let mut best = None;

        // Each group at its first block's position (the stable choice, kept on equal scores).
        let counts = counts_for(strategy, self.all.span().slice(0..k), lanes);
        let in_place = lanes_of(0..k, &counts, k);
        keep_if_better(&mut best, strategy, units, lanes, in_place, placed(&counts) == k);
        if best.is_some() && matches!(strategy, Strategy::Sequential) {
            return best.map(|(_, lane_of)| lane_of);
        }

        let (groups, u) = self.within(k);
        if let Some(choices) = choices(groups.len(), lanes.len(), k).filter(|_| !groups.is_empty()) {
            let chain = self.untied_span(u);
            for choice in choices {
                let moved = moved_lanes(units, groups, &choice, lanes);
                if !groups_fit(&moved, lanes) || cannot_beat(strategy, chain, &moved, best.as_ref().map(|b| b.0)) {
                    continue;
                }
                let counts = counts_for(strategy, chain, &moved);
                let mut lane_of = lanes_of(self.untied[..u].iter().copied(), &counts, k);
                for (&g, &lane) in groups.iter().zip(&choice) {
                    lane_of[g] = lane;
                }
                let all_placed = placed(&counts) == u;
                keep_if_better(&mut best, strategy, units, lanes, lane_of, all_placed);
            }
        }
        best.map(|(_, lane_of)| lane_of)
    }
}

/// The lanes with each group's memory and cost added where `choice` puts it.
fn moved_lanes(units: Units, groups: &[usize], choice: &[usize], lanes: &[Lane]) -> Vec<Lane> {
    let mut moved = lanes.to_vec();
    for (&g, &lane) in groups.iter().zip(choice) {
        let l = &mut moved[lane];
        l.base = l.base.saturating_add(units.chain.memory[g]);
        l.cost_base = l.cost_base.saturating_add(units.chain.cost[g]);
    }
    moved
}

/// No group pushed a lane past its capacity (a lane already full without groups is simply unused).
fn groups_fit(moved: &[Lane], lanes: &[Lane]) -> bool {
    moved
        .iter()
        .zip(lanes)
        .all(|(moved, l)| moved.base <= moved.capacity || moved.base == l.base)
}

/// Lane of each unit when lane `i` takes the next `counts[i]` units of `order`.
fn lanes_of(order: impl Iterator<Item = usize>, counts: &[usize], len: usize) -> Vec<usize> {
    let mut lane_of = vec![0; len];
    let mut order = order;
    for (lane, &count) in counts.iter().enumerate() {
        for unit in order.by_ref().take(count) {
            lane_of[unit] = lane;
        }
    }
    lane_of
}

/// The longest prefix of `units` that fits on `lanes` with some GPU choice for its groups.
#[cfg(test)]
pub fn longest_prefix(units: Units, lanes: &[Lane]) -> usize {
    Indexed::new(units).longest_prefix(lanes)
}

/// What a strategy minimises over complete layouts (lexicographically); `None` if a lane overflows.
fn score(strategy: Strategy, units: Units, lanes: &[Lane], lane_of: &[usize]) -> Option<(u64, u64)> {
    let mut load: Vec<u64> = lanes.iter().map(|l| l.base).collect();
    let mut cost: Vec<u64> = lanes.iter().map(|l| l.cost_base).collect();
    for (i, &lane) in lane_of.iter().enumerate() {
        load[lane] = load[lane].saturating_add(units.chain.memory[i]);
        cost[lane] = cost[lane].saturating_add(units.chain.cost[i]);
    }
    if load.iter().zip(lanes).any(|(l, lane)| *l > lane.capacity) {
        return None;
    }
    let peak = |from: usize| cost[from..].iter().copied().max().unwrap_or(0);
    Some(match strategy {
        Strategy::Sequential => (0, 0),
        Strategy::BalancedLow0 if lanes.len() > 1 => (load[0], peak(1)),
        Strategy::Balanced | Strategy::BalancedLow0 => (peak(0), 0),
    })
}

fn counts_for(strategy: Strategy, chain: Span, lanes: &[Lane]) -> Vec<usize> {
    match strategy {
        Strategy::Sequential => sequential::assign(chain, lanes),
        Strategy::Balanced => balanced::assign(chain, lanes),
        Strategy::BalancedLow0 => low_zero::assign(chain, lanes),
    }
}

/// A cheap test that a GPU choice cannot score strictly below `best` (most choices fail it, and skipping
/// them keeps the enumeration to about one greedy pass per choice).
fn cannot_beat(strategy: Strategy, untied: Span, moved: &[Lane], best: Option<(u64, u64)>) -> bool {
    let Some((first, _)) = best else {
        return false;
    };
    match strategy {
        Strategy::Balanced => first == 0 || placed(&untied.greedy(moved, first - 1)) < untied.len(),
        Strategy::BalancedLow0 if moved.len() > 1 => moved[0].base > first,
        _ => false,
    }
}

/// Keep `lane_of` if every unit was placed, it fits and it scores strictly better than `best`.
fn keep_if_better(
    best: &mut Option<((u64, u64), Vec<usize>)>,
    strategy: Strategy,
    units: Units,
    lanes: &[Lane],
    lane_of: Vec<usize>,
    all_placed: bool,
) {
    if !all_placed {
        return;
    }
    if let Some(s) = score(strategy, units, lanes, &lane_of) {
        if best.as_ref().is_none_or(|(b, _)| s < *b) {
            *best = Some((s, lane_of));
        }
    }
}

/// The lane of each unit under `strategy`, all units placed within capacity; `None` if no layout
/// fits (the caller only hands over a prefix that `longest_prefix` accepted).
#[cfg(test)]
pub fn lay_out(strategy: Strategy, units: Units, lanes: &[Lane]) -> Option<Vec<usize>> {
    Indexed::new(units).lay_out(strategy, units.chain.len(), lanes)
}

#[cfg(test)]
mod tests {
    use super::Strategy as Placement;
    use super::*;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest, ProptestConfig, Strategy};

    /// Every way to cut `m` units into `lanes` consecutive runs.
    fn all_splits(m: usize, lanes: usize) -> Vec<Vec<usize>> {
        if lanes == 1 {
            return vec![vec![m]];
        }
        (0..=m)
            .flat_map(|first| {
                all_splits(m - first, lanes - 1).into_iter().map(move |mut rest| {
                    rest.insert(0, first);
                    rest
                })
            })
            .collect()
    }

    /// Brute force: every GPU for every group, every contiguous split of the untied units. Yields the
    /// (memory, cost) per lane of every layout that fits.
    fn every_layout(units: Units, lanes: &[Lane]) -> Vec<(Vec<u64>, Vec<u64>)> {
        let groups = units.groups();
        let untied: Vec<usize> = (0..units.chain.len()).filter(|&i| !units.is_group[i]).collect();
        let mut out = Vec::new();
        for choice in 0..lanes.len().pow(groups.len() as u32) {
            for split in all_splits(untied.len(), lanes.len()) {
                let mut memory: Vec<u64> = lanes.iter().map(|l| l.base).collect();
                let mut cost: Vec<u64> = lanes.iter().map(|l| l.cost_base).collect();
                let mut c = choice;
                for &g in &groups {
                    let lane = c % lanes.len();
                    c /= lanes.len();
                    memory[lane] += units.chain.memory[g];
                    cost[lane] += units.chain.cost[g];
                }
                let mut next = 0;
                for (lane, &count) in split.iter().enumerate() {
                    for &u in &untied[next..next + count] {
                        memory[lane] += units.chain.memory[u];
                        cost[lane] += units.chain.cost[u];
                    }
                    next += count;
                }
                if memory.iter().zip(lanes).all(|(m, l)| *m <= l.capacity) {
                    out.push((memory, cost));
                }
            }
        }
        out
    }

    fn totals(units: Units, lanes: &[Lane], lane_of: &[usize]) -> (Vec<u64>, Vec<u64>) {
        let mut memory: Vec<u64> = lanes.iter().map(|l| l.base).collect();
        let mut cost: Vec<u64> = lanes.iter().map(|l| l.cost_base).collect();
        for (i, &lane) in lane_of.iter().enumerate() {
            memory[lane] += units.chain.memory[i];
            cost[lane] += units.chain.cost[i];
        }
        (memory, cost)
    }

    /// Untied units of a layout form contiguous runs in lane order.
    fn untied_runs_are_contiguous(units: Units, lane_of: &[usize]) -> bool {
        let untied: Vec<usize> = (0..lane_of.len())
            .filter(|&i| !units.is_group[i])
            .map(|i| lane_of[i])
            .collect();
        untied.windows(2).all(|w| w[0] <= w[1])
    }

    /// Up to 8 units, 1-2 of them tie groups, and 1-3 lanes.
    fn instance() -> impl Strategy<Value = (Vec<(u64, u64)>, Vec<bool>, Vec<Lane>)> {
        (
            prop::collection::vec((0u64..50, 0u64..30), 1..8),
            prop::collection::vec(0usize..8, 1..3),
            prop::collection::vec((0u64..20, 0u64..160, 0u64..15), 1..4),
        )
            .prop_map(|(items, group_at, raw)| {
                let mut is_group = vec![false; items.len()];
                for g in group_at {
                    is_group[g % items.len()] = true;
                }
                let lanes = raw
                    .into_iter()
                    .map(|(base, extra, cost_base)| Lane {
                        base,
                        capacity: base + extra,
                        cost_base,
                    })
                    .collect();
                (items, is_group, lanes)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(600))]

        #[test]
        fn balanced_with_tie_groups_matches_brute_force((items, is_group, lanes) in instance(), by_memory in any::<bool>()) {
            let memory: Vec<u64> = items.iter().map(|i| i.0).collect();
            let cost: Vec<u64> = if by_memory { memory.clone() } else { items.iter().map(|i| i.1).collect() };
            let lanes: Vec<Lane> = if by_memory {
                lanes.iter().map(|l| Lane::memory(l.base, l.capacity)).collect()
            } else {
                lanes
            };
            let units = Units { chain: Chain { memory: &memory, cost: &cost }, is_group: &is_group };
            let best = every_layout(units, &lanes).into_iter().map(|(_, c)| *c.iter().max().unwrap()).min();
            let got = lay_out(Placement::Balanced, units, &lanes);
            prop_assert_eq!(got.is_some(), best.is_some());
            if let Some(lane_of) = got {
                let (mem, c) = totals(units, &lanes, &lane_of);
                prop_assert!(mem.iter().zip(&lanes).all(|(m, l)| *m <= l.capacity));
                prop_assert!(untied_runs_are_contiguous(units, &lane_of));
                prop_assert_eq!(Some(*c.iter().max().unwrap()), best);
            }
        }

        #[test]
        fn low_zero_with_tie_groups_matches_brute_force((items, is_group, lanes) in instance()) {
            let memory: Vec<u64> = items.iter().map(|i| i.0).collect();
            let lanes: Vec<Lane> = lanes.iter().map(|l| Lane::memory(l.base, l.capacity)).collect();
            let units = Units { chain: Chain::by_memory(&memory), is_group: &is_group };
            let key = |m: &[u64]| if m.len() > 1 { (m[0], *m[1..].iter().max().unwrap()) } else { (m[0], 0) };
            let best = every_layout(units, &lanes).into_iter().map(|(m, _)| key(&m)).min();
            let got = lay_out(Placement::BalancedLow0, units, &lanes);
            prop_assert_eq!(got.is_some(), best.is_some());
            if let Some(lane_of) = got {
                let (mem, _) = totals(units, &lanes, &lane_of);
                prop_assert_eq!(Some(key(&mem)), best);
            }
        }

        #[test]
        fn longest_prefix_with_tie_groups_matches_brute_force((items, is_group, lanes) in instance()) {
            let memory: Vec<u64> = items.iter().map(|i| i.0).collect();
            let lanes: Vec<Lane> = lanes.iter().map(|l| Lane::memory(l.base, l.capacity)).collect();
            let units = Units { chain: Chain::by_memory(&memory), is_group: &is_group };
            let best = (0..=memory.len())
                .rev()
                .find(|&k| !every_layout(units.prefix(k), &lanes).is_empty())
                .unwrap();
            let k = longest_prefix(units, &lanes);
            prop_assert_eq!(k, best);
            let layout = lay_out(Placement::Sequential, units.prefix(k), &lanes);
            prop_assert!(layout.is_some());
        }
    }

    #[test]
    fn a_group_stays_at_its_first_block_when_moving_it_does_not_help() {
        // Group (10) first, then four units of 10 over two lanes: 20 / 20 either way.
        let memory = [10, 10, 10, 10];
        let is_group = [true, false, false, false];
        let units = Units {
            chain: Chain::by_memory(&memory),
            is_group: &is_group,
        };
        let lanes = [Lane::memory(0, 100), Lane::memory(0, 100)];
        assert_eq!(lay_out(Placement::Balanced, units, &lanes), Some(vec![0, 0, 1, 1]));
    }

    #[test]
    fn a_group_moves_to_the_lane_that_balances_best() {
        // BERT's shape: the tied embedding + decoder (30) first, four layers of 20, a small head (2).
        let memory = [30, 20, 20, 20, 20, 2];
        let is_group = [true, false, false, false, false, false];
        let units = Units {
            chain: Chain::by_memory(&memory),
            is_group: &is_group,
        };
        let lanes = [Lane::memory(0, 40), Lane::memory(0, 40), Lane::memory(0, 40)];
        // In place the group opens lane 0 and the layers need 20 + 20 + 20 + 20 + 2 on two lanes: no fit.
        let lane_of = lay_out(Placement::Balanced, units, &lanes).unwrap();
        let (memory_per_lane, _) = totals(units, &lanes, &lane_of);
        assert_eq!(*memory_per_lane.iter().max().unwrap(), 40);
        assert_eq!(lane_of[0], 2); // with the head
        assert_eq!(longest_prefix(units, &lanes), 6);
    }
}
