//! `balanced`: contiguous runs over the GPUs with the smallest possible largest GPU load (exact).

use super::chain::{greedy, min_max, Lane};

pub fn assign(weights: &[u64], lanes: &[Lane]) -> Vec<usize> {
    // The caller only hands over a prefix that fits, so min_max succeeds; fall back to greedy otherwise.
    min_max(weights, lanes)
        .map(|(_, counts)| counts)
        .unwrap_or_else(|| greedy(weights, lanes, u64::MAX))
}
