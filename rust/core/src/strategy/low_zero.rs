//! `balanced_low_0`: GPU 0 holds as little as possible (it is left for activations and `generate`), the
//! other GPUs share the rest with the smallest possible largest load.

use super::chain::{placed, Lane, Span};

pub fn assign(chain: Span, lanes: &[Lane]) -> Vec<usize> {
    if lanes.len() < 2 {
        return super::balanced::assign(chain, lanes);
    }
    let n = chain.len();
    // An unbounded cost limit: memory alone decides whether the rest fits.
    let rest_fits = |p: usize| placed(&chain.slice(p..n).greedy(&lanes[1..], u64::MAX)) == n - p;
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
    match chain.slice(lo..n).min_max(&lanes[1..]) {
        Some((_, rest)) => std::iter::once(lo).chain(rest).collect(),
        None => super::balanced::assign(chain, lanes),
    }
}
