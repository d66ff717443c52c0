//! `sequential`: fill GPU 0, then GPU 1, ... each up to its capacity.

use super::chain::{greedy, Chain, Lane};

pub fn assign(chain: Chain, lanes: &[Lane]) -> Vec<usize> {
    greedy(Chain::by_memory(chain.memory), lanes, u64::MAX)
}
