//! How much of the chain stays on the GPUs once the staging reserve is accounted for.
//!
//! Offloaded blocks run on an execution device; the one that stages them (a GPU chosen by
//! [`super::execution`], GPU 0 unless it cannot) must keep room for the largest of them (with the tied
//! tensors it uses: accelerate's hooks stage one block at a time, so a tied unit of many layers needs
//! room for one of its layers, not for all), for their runtime memory (KV cache: it lives where the layer
//! runs) and, when buffers are not offloaded, for their buffers. Blocks whose staged size is above the
//! staging limit run on the CPU instead and need no GPU room. The reserve is only taken when something
//! is staged. It grows as fewer units stay, so the answer is a fixed point: start with no reserve, place
//! the longest prefix, reserve for what is left, repeat. The prefixes only shrink and every feasible
//! prefix stays at or below each of them, so it stops at the longest feasible one.

use super::chain::Lane;
use super::execution::Staging;
use super::ties::Indexed;

/// A unit pinned to CPU or disk (executed elsewhere): what it stages and what stays with its executor.
#[derive(Debug, Clone, Copy)]
pub struct PinnedUnit {
    /// Most of it staged at once.
    pub staged: u64,
    /// Memory that stays on the execution device (runtime, maybe buffers).
    pub stays: u64,
}

/// What each unit of the chain stages and leaves behind when offloaded, and what is offloaded
/// regardless (pinned to CPU/disk).
pub struct OffloadInput<'a> {
    /// Most of each unit staged at once when it is offloaded (its largest block with its tied tensors).
    pub staged: &'a [u64],
    /// Memory that stays on the execution device when the unit is offloaded (runtime, maybe buffers);
    /// empty when nothing stays.
    pub stays: &'a [u64],
    /// Units pinned to CPU or disk.
    pub pinned: &'a [PinnedUnit],
    /// Which offloaded units the staging GPU stages.
    pub staging: Staging,
}

impl OffloadInput<'_> {
    /// Reserve needed on the staging GPU when the chain from `k` on is offloaded.
    pub fn reserve(&self, k: usize) -> u64 {
        self.reserve_between(k, self.staged.len())
    }

    /// Reserve needed on the staging GPU when free units `k..end` (and the pinned ones) are offloaded.
    pub fn reserve_between(&self, k: usize, end: usize) -> u64 {
        if self.staging.gpu.is_none() {
            return 0;
        }
        let free = (k..end).map(|j| (self.staged[j], self.stays.get(j).copied().unwrap_or(0)));
        let pinned = self.pinned.iter().map(|p| (p.staged, p.stays));
        let mut staged = free.chain(pinned).filter(|(s, _)| self.staging.stages(*s)).peekable();
        if staged.peek().is_none() {
            return 0;
        }
        let (largest, stays) = staged.fold((0u64, 0u64), |(m, s), (a, b)| (m.max(a), s.saturating_add(b)));
        largest.saturating_add(stays)
    }
}

/// The longest prefix of `units` (footprint on a GPU: weights + runtime memory) that fits on `lanes`
/// with the reserve on the staging lane, and that reserve.
pub fn split_point(input: &OffloadInput, units: &Indexed, lanes: &[Lane]) -> (usize, u64) {
    if lanes.is_empty() {
        return (0, input.reserve(0));
    }
    let stage = input.staging.gpu.unwrap_or(0);
    let fit = |reserve: u64| {
        let mut with_reserve = lanes.to_vec();
        with_reserve[stage].base = with_reserve[stage].base.saturating_add(reserve);
        units.longest_prefix(&with_reserve)
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
