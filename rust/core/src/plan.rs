//! Plan: the result of a solve. Blocks with their devices, the coarsest device map (accelerate's
//! format), bytes per device, the staging reserve, and why anything left the GPUs.

use crate::device::Device;
use crate::tree::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    pub node: NodeId,
    pub device: Device,
    pub bits: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device: Device,
    /// Capacity in bits (`None`: unbounded disk).
    pub capacity_bits: Option<u64>,
    /// Bits of weights (parameters and buffers) placed here.
    pub weight_bits: u64,
    /// Runtime memory here: KV cache / logits of the blocks computed here, and the activation buffer.
    pub runtime_bits: u64,
    /// Bits kept free: staging of offloaded blocks (with their runtime memory, and their buffers when
    /// buffers are not offloaded) and any explicit GPU 0 reserve.
    pub reserve_bits: u64,
    /// Compute cost of the blocks held here (as given in the options).
    pub compute: u64,
    /// Block (leaf-level) nodes placed here, in model order.
    pub blocks: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The strategy that ran (after resolving "auto").
    pub strategy: &'static str,
    /// Every block and its device, in model order.
    pub assignments: Vec<(NodeId, Device)>,
    /// The coarsest equivalent map, in model order.
    pub device_map: Vec<(NodeId, Device)>,
    /// One entry per device of the spec, in placement order.
    pub usage: Vec<DeviceUsage>,
    /// Blocks on CPU or disk and the reason for each.
    pub offloaded: Vec<Offload>,
}

impl Plan {
    pub fn device_of(&self, node: NodeId) -> Option<Device> {
        self.assignments.iter().find(|(n, _)| *n == node).map(|(_, d)| *d)
    }

    /// Largest per-GPU load (weights + reserve) in bits.
    pub fn peak_gpu_bits(&self) -> u64 {
        self.usage
            .iter()
            .filter(|u| u.device.is_gpu_like())
            .map(|u| u.weight_bits + u.runtime_bits + u.reserve_bits)
            .max()
            .unwrap_or(0)
    }
}
