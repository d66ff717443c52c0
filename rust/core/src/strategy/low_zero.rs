//! `balanced_low_0`: GPU 0 holds as little as possible (it is left for activations and `generate`), the
//! other GPUs share the rest with the smallest possible largest load.

use super::chain::{greedy, min_max, placed, Lane};

pub fn assign(weights: &[u64], lanes: &[Lane]) -> Vec<usize> {
    if lanes.len() < 2 {
        return super::balanced::assign(weights, lanes);
    }
    let rest_fits =
        |p: usize| placed(&greedy(&weights[p..], &lanes[1..], u64::MAX)) == weights.len() - p;
    // Fewest blocks on GPU 0 such that the rest fits on the others (monotone in p: binary search).
    let (mut lo, mut hi) = (0, weights.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if rest_fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let p = lo;
    let mut counts = vec![p];
    match min_max(&weights[p..], &lanes[1..]) {
        Some((_, rest)) => counts.extend(rest),
        None => return super::balanced::assign(weights, lanes),
    }
    counts
}
