//! The sentences a solve writes: why a block sits where it does, and why a model does not fit.

use crate::blocks::Block;
use crate::constraints::Unit;
use crate::device::{human, Device, DeviceSpec};
use crate::error::{PlacementError, Shortfall};
use crate::tree::ModuleTree;

use super::chain::Lane;

/// Where the first unit that went to disk met a full CPU.
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuFull {
    /// Index (among the free units) of the first unit that did not fit on the CPU.
    pub(super) first: usize,
    /// CPU room left then.
    pub(super) room: u64,
    /// Staging room kept on the CPU (when it executes).
    pub(super) reserve: u64,
}

/// The execution device has no room to stage the offloaded blocks (and, without disk, whether the
/// model exceeds everything the devices hold together).
pub(super) fn no_staging_room(
    spec: &DeviceSpec,
    total_weights: u64,
    device: Device,
    block: Option<String>,
    lane: &Lane,
    reserve: u64,
) -> PlacementError {
    let room = spec
        .devices()
        .iter()
        .filter_map(|(_, cap)| *cap)
        .fold(0u64, |a, c| a.saturating_add(c));
    let beyond_all = !spec.contains(Device::Disk) && total_weights > room;
    PlacementError::DoesNotFit(Shortfall::Staging {
        device,
        block,
        reserve,
        base: lane.base,
        capacity: lane.capacity,
        total: beyond_all.then_some((total_weights, room)),
        elsewhere: None,
    })
}

/// Why each free unit from `first_on_disk` on went to disk (one entry per such unit). Units keep model
/// order, so once one does not fit on the CPU every later one goes to disk too, however small: say which
/// one filled the CPU.
pub(super) fn disk_reasons(
    tree: &ModuleTree,
    blocks: &[Block],
    free: &[&Unit],
    first_on_disk: usize,
    cpu_full: Option<CpuFull>,
    has_gpu: bool,
) -> Vec<Option<String>> {
    let not_gpus = if has_gpu { "did not fit on the GPUs, and " } else { "" };
    let mut why = Vec::with_capacity(free.len().saturating_sub(first_on_disk));
    for j in first_on_disk..free.len() {
        why.push(Some(match cpu_full {
            Some(CpuFull { first, room, reserve }) => {
                let left = if reserve > 0 {
                    format!(
                        "{} left on the CPU (which keeps {} to stage offloaded blocks)",
                        human(room),
                        human(reserve)
                    )
                } else {
                    format!("{} left on the CPU", human(room))
                };
                if j == first {
                    format!("{not_gpus}needs {} but only {left}", human(free[j].bits))
                } else {
                    format!(
                        "{not_gpus}blocks keep model order: {:?} ({}) did not fit in the {left} before it, so every \
                         block after it goes to disk",
                        tree.name(blocks[free[first].blocks[0]].node),
                        human(free[first].bits),
                    )
                }
            }
            None if has_gpu => "did not fit on the GPUs and max_memory has no \"cpu\"".to_string(),
            None => "max_memory has no GPU and no \"cpu\"".to_string(),
        }));
    }
    why
}

/// Why a unit's leader block sits on `device` when no more specific reason was given.
pub(super) fn placement_reason(device: Device, has_gpu: bool, why_disk: Option<String>) -> String {
    match device {
        Device::Cpu if has_gpu => "did not fit on the GPUs after the blocks before it".to_string(),
        Device::Cpu => "no GPU in the device spec".to_string(),
        _ => why_disk.unwrap_or_else(|| "did not fit on the GPUs or the CPU".to_string()),
    }
}
