//! `sequential`: fill GPU 0, then GPU 1, ... each up to its capacity.

use super::chain::{Lane, Span};

pub fn assign(chain: Span, lanes: &[Lane]) -> Vec<usize> {
    // An unbounded cost limit: memory alone decides.
    chain.greedy(lanes, u64::MAX)
}
