//! How much of the chain stays on the GPUs once the staging reserve is accounted for.
//!
//! Offloaded blocks run on the execution device (the first GPU), which must keep room for the largest
//! of them, for their runtime memory (KV cache: it lives where the layer runs) and, when buffers are not
//! offloaded, for their buffers. The reserve is only taken when something is offloaded. It grows as fewer
//! blocks stay, so the answer is a fixed point: start with no reserve, place the longest prefix, reserve
//! for what is left, repeat. The prefixes only shrink and every feasible prefix stays at or below each of
//! them, so it stops at the longest feasible one.

use super::chain::{greedy, placed, Chain, Lane};

/// The chain and what is offloaded regardless (pinned to CPU/disk).
pub struct OffloadInput<'a> {
    /// Footprint of each block on a GPU (weights + runtime memory).
    pub footprint: &'a [u64],
    /// Weights alone (what must be staged when the block is offloaded).
    pub weights: &'a [u64],
    /// Memory that stays on the execution device when the block is offloaded (runtime, maybe buffers).
    pub stays: &'a [u64],
    pub pinned_offloaded_max: u64,
    pub pinned_offloaded_stays: u64,
    pub any_pinned_offloaded: bool,
}

impl OffloadInput<'_> {
    /// Reserve needed on the execution device when the chain from `k` on is offloaded.
    pub fn reserve(&self, k: usize) -> u64 {
        if k == self.weights.len() && !self.any_pinned_offloaded {
            return 0;
        }
        let largest = self.weights[k..]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.pinned_offloaded_max);
        largest + self.stays[k..].iter().sum::<u64>() + self.pinned_offloaded_stays
    }
}

/// The longest prefix that fits on `lanes` (lane 0 is the execution device), and its reserve.
pub fn split_point(input: &OffloadInput, lanes: &[Lane]) -> (usize, u64) {
    if lanes.is_empty() {
        return (0, input.reserve(0));
    }
    let fit = |reserve: u64| {
        let mut with_reserve = lanes.to_vec();
        with_reserve[0].base = with_reserve[0].base.saturating_add(reserve);
        placed(&greedy(Chain::by_memory(input.footprint), &with_reserve, u64::MAX))
    };
    let mut k = input.weights.len();
    loop {
        let reserve = input.reserve(k);
        let next = fit(reserve).min(k);
        if next == k {
            return (k, reserve);
        }
        k = next;
    }
}
