//! `balanced_low_0`: GPU 0 holds as little as possible (it is left for activations and `generate`), the
//! other GPUs share the rest with the smallest possible largest load.

use super::chain::{greedy, min_max, placed, Chain, Lane};

pub fn assign(chain: Chain, lanes: &[Lane]) -> Vec<usize> {
    if lanes.len() < 2 {
        return super::balanced::assign(chain, lanes);
    }
    let n = chain.len();
    let rest_fits = |p: usize| placed(&greedy(Chain::by_memory(&chain.memory[p..]), &lanes[1..], u64::MAX)) == n - p;
    // Fewest blocks on GPU 0 such that the rest fits on the others (monotone in p: binary search).
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if rest_fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    match min_max(chain.slice(lo..n), &lanes[1..]) {
        Some((_, rest)) => std::iter::once(lo).chain(rest).collect(),
        None => super::balanced::assign(chain, lanes),
    }
}
