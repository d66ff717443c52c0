//! `balanced`: contiguous runs over the GPUs with the smallest possible largest GPU load (memory, or
//! compute when balancing by compute), exact.

use super::chain::{greedy, min_max, Chain, Lane};

pub fn assign(chain: Chain, lanes: &[Lane]) -> Vec<usize> {
    // The caller only hands over a prefix that fits, so min_max succeeds; fall back to greedy otherwise.
    min_max(chain, lanes)
        .map(|(_, counts)| counts)
        .unwrap_or_else(|| greedy(chain, lanes, u64::MAX))
}
