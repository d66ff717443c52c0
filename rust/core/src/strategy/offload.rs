//! How much of the chain stays on the GPUs once the staging reserve is accounted for.
//!
//! Offloaded blocks run on the execution device (the first GPU), which must keep room for the largest
//! of them (with the tied tensors it uses: accelerate's hooks stage one block at a time, so a tied unit
//! of many layers needs room for one of its layers, not for all), for their runtime memory (KV cache: it
//! lives where the layer runs) and, when buffers are not offloaded, for their buffers. The reserve is
//! only taken when something is offloaded. It grows as fewer units stay, so the answer is a fixed
//! point: start with no reserve, place the longest prefix, reserve for what is left, repeat. The
//! prefixes only shrink and every feasible prefix stays at or below each of them, so it stops at the
//! longest feasible one.

use super::chain::{Chain, Lane};
use super::ties::{longest_prefix, Units};

/// The chain and what is offloaded regardless (pinned to CPU/disk).
pub struct OffloadInput<'a> {
    /// Footprint of each unit on a GPU (weights + runtime memory).
    pub footprint: &'a [u64],
    /// Which units are tie groups (free to sit on any GPU).
    pub is_group: &'a [bool],
    /// Most of each unit staged at once when it is offloaded (its largest block with its tied tensors).
    pub staged: &'a [u64],
    /// Memory that stays on the execution device when the unit is offloaded (runtime, maybe buffers).
    pub stays: &'a [u64],
    pub pinned_offloaded_max: u64,
    pub pinned_offloaded_stays: u64,
    pub any_pinned_offloaded: bool,
}

impl OffloadInput<'_> {
    /// Reserve needed on the execution device when the chain from `k` on is offloaded.
    pub fn reserve(&self, k: usize) -> u64 {
        if k == self.staged.len() && !self.any_pinned_offloaded {
            return 0;
        }
        let largest = self.staged[k..]
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
    let units = Units {
        chain: Chain::by_memory(input.footprint),
        is_group: input.is_group,
    };
    let fit = |reserve: u64| {
        let mut with_reserve = lanes.to_vec();
        with_reserve[0].base = with_reserve[0].base.saturating_add(reserve);
        longest_prefix(units, &with_reserve)
    };
    let mut k = input.staged.len();
    loop {
        let reserve = input.reserve(k);
        let next = fit(reserve).min(k);
        if next == k {
            return (k, reserve);
        }
        k = next;
    }
}
