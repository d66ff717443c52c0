//! `balanced`: contiguous runs over the GPUs with the smallest possible largest GPU load (memory, or
//! compute when balancing by compute), exact.

use super::chain::{Lane, Span};

pub fn assign(chain: Span, lanes: &[Lane]) -> Vec<usize> {
    // The caller only hands over a prefix that fits, so min_max succeeds; fall back to greedy otherwise.
    chain
        .min_max(lanes)
        .map(|(_, counts)| counts)
        .unwrap_or_else(|| chain.greedy(lanes, u64::MAX))
}
