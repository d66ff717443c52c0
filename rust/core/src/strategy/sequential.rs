//! `sequential`: fill GPU 0, then GPU 1, ... each up to its capacity.

use super::chain::{greedy, Lane};

pub fn assign(weights: &[u64], lanes: &[Lane]) -> Vec<usize> {
    greedy(weights, lanes, u64::MAX)
}
