//! Contiguous placement of a chain of weights over ordered lanes (one lane per GPU).
//!
//! Each lane has a fixed base load (pinned blocks, staging reserve) and a capacity. `greedy` lets each
//! lane take the longest run that keeps it under `min(bound, capacity)`; for a fixed lane order this
//! places the longest possible prefix, so it is an exact feasibility test for a bound. `min_max` finds the
//! smallest feasible bound by binary search: O(m log C) for m weights and capacities up to C bits.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub base: u64,
    pub capacity: u64,
}

/// How many consecutive weights each lane takes. The counts may sum to less than `weights.len()`.
pub fn greedy(weights: &[u64], lanes: &[Lane], bound: u64) -> Vec<usize> {
    let mut counts = vec![0; lanes.len()];
    let mut next = 0;
    for (lane, count) in lanes.iter().zip(counts.iter_mut()) {
        let limit = bound.min(lane.capacity);
        if lane.base > limit {
            continue;
        }
        let mut load = lane.base;
        while next < weights.len() && load.saturating_add(weights[next]) <= limit {
            load += weights[next];
            next += 1;
            *count += 1;
        }
    }
    counts
}

pub fn placed(counts: &[usize]) -> usize {
    counts.iter().sum()
}

/// The smallest achievable largest lane load (base included) with every weight placed, and the counts
/// that achieve it; `None` if the weights do not fit at all.
pub fn min_max(weights: &[u64], lanes: &[Lane]) -> Option<(u64, Vec<usize>)> {
    if lanes.is_empty() {
        return weights.is_empty().then(|| (0, Vec::new()));
    }
    if lanes.iter().any(|l| l.base > l.capacity) {
        return None;
    }
    let all = |bound: u64| placed(&greedy(weights, lanes, bound)) == weights.len();
    let mut hi = lanes.iter().map(|l| l.capacity).max().unwrap_or(0);
    if !all(hi) {
        return None;
    }
    // No bound below the heaviest base or the heaviest single weight can hold.
    let mut lo = lanes
        .iter()
        .map(|l| l.base)
        .max()
        .unwrap_or(0)
        .max(weights.iter().copied().max().unwrap_or(0));
    lo = lo.min(hi);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if all(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let counts = greedy(weights, lanes, lo);
    let peak = loads(weights, lanes, &counts)
        .into_iter()
        .max()
        .unwrap_or(0);
    Some((peak, counts))
}

/// Load of each lane (base + run) for the given counts.
pub fn loads(weights: &[u64], lanes: &[Lane], counts: &[usize]) -> Vec<u64> {
    let mut next = 0;
    lanes
        .iter()
        .zip(counts)
        .map(|(lane, &c)| {
            let run: u64 = weights[next..next + c].iter().sum();
            next += c;
            lane.base + run
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every way to cut `m` weights into `lanes` consecutive runs (brute force oracle).
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

    fn brute_force(weights: &[u64], lanes: &[Lane]) -> Option<u64> {
        all_splits(weights.len(), lanes.len())
            .into_iter()
            .filter_map(|counts| {
                let l = loads(weights, lanes, &counts);
                l.iter()
                    .zip(lanes)
                    .all(|(load, lane)| *load <= lane.capacity)
                    .then(|| *l.iter().max().unwrap())
            })
            .min()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn min_max_matches_brute_force(
            weights in prop::collection::vec(0u64..50, 0..9),
            lanes in prop::collection::vec((0u64..20, 0u64..180), 1..4),
        ) {
            let lanes: Vec<Lane> = lanes.into_iter().map(|(base, extra)| Lane { base, capacity: base + extra }).collect();
            let got = min_max(&weights, &lanes);
            let want = brute_force(&weights, &lanes);
            prop_assert_eq!(got.as_ref().map(|g| g.0), want);
            if let Some((peak, counts)) = got {
                prop_assert_eq!(placed(&counts), weights.len());
                let l = loads(&weights, &lanes, &counts);
                for (load, lane) in l.iter().zip(&lanes) {
                    prop_assert!(*load <= lane.capacity);
                }
                prop_assert_eq!(*l.iter().max().unwrap(), peak);
            }
        }

        #[test]
        fn greedy_places_the_longest_prefix(
            weights in prop::collection::vec(0u64..50, 0..9),
            lanes in prop::collection::vec((0u64..20, 0u64..100), 1..4),
        ) {
            let lanes: Vec<Lane> = lanes.into_iter().map(|(base, extra)| Lane { base, capacity: base + extra }).collect();
            let best = (0..=weights.len()).rev().find(|&k| brute_force(&weights[..k], &lanes).is_some()).unwrap();
            prop_assert_eq!(placed(&greedy(&weights, &lanes, u64::MAX)), best);
        }
    }
}
