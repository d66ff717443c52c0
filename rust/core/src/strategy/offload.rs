//! How much of the chain stays on the GPUs once the staging reserve is accounted for.
//!
//! Offloaded blocks run on the execution device (the first GPU), which must keep room for the largest
//! of them (and, when buffers are not offloaded, for their buffers). The reserve is only taken when
//! something is offloaded. The reserve grows as fewer blocks stay, so the answer is a fixed point:
//! start with no reserve, place the longest prefix, reserve for what is left, repeat. The sequence of
//! prefixes only shrinks and every feasible prefix stays below it, so it stops at the longest feasible one.

use super::chain::{greedy, placed, Lane};

/// Weights of the chain and what is offloaded regardless (pinned to CPU/disk).
pub struct OffloadInput<'a> {
    pub weights: &'a [u64],
    pub buffers: &'a [u64],
    pub pinned_offloaded_max: u64,
    pub pinned_offloaded_buffers: u64,
    pub any_pinned_offloaded: bool,
    pub offload_buffers: bool,
}

impl OffloadInput<'_> {
    /// Reserve needed on the execution device when the chain from `k` on is offloaded.
    pub fn reserve(&self, k: usize) -> u64 {
        let tail = &self.weights[k..];
        if tail.is_empty() && !self.any_pinned_offloaded {
            return 0;
        }
        let largest = tail
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.pinned_offloaded_max);
        let buffers = if self.offload_buffers {
            0
        } else {
            self.buffers[k..].iter().sum::<u64>() + self.pinned_offloaded_buffers
        };
        largest + buffers
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
        placed(&greedy(input.weights, &with_reserve, u64::MAX))
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
