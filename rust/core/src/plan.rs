//! Plan: the result of a solve. Blocks with their devices, the coarsest device map (accelerate's
//! format), bytes per device, the staging reserve, and why anything left the GPUs.

use crate::device::{bits_to_bytes, Device, BITS_PER_BYTE};
use crate::tree::NodeId;

/// A block whose weights live off the device that computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    /// The block's node.
    pub node: NodeId,
    /// Where its weights live (CPU or disk).
    pub device: Device,
    /// Its size in bits.
    pub bits: u64,
    /// Why it left the GPUs, as a sentence for users.
    pub reason: String,
}

/// What one device holds and keeps free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    /// The device.
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

/// The result of a solve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The strategy that ran (after resolving "auto").
    pub strategy: &'static str,
    /// Every block and its device, in model order.
    pub assignments: Vec<(NodeId, Device)>,
    /// Every block and the device that computes it, in model order: its own device on a GPU; for an
    /// offloaded block the GPU that stages it or the CPU (without GPUs, the CPU for every block).
    pub execution: Vec<(NodeId, Device)>,
    /// The coarsest equivalent map, in model order.
    pub device_map: Vec<(NodeId, Device)>,
    /// One entry per device of the spec, in placement order.
    pub usage: Vec<DeviceUsage>,
    /// Blocks on CPU or disk and the reason for each.
    pub offloaded: Vec<Offload>,
}

// Byte views for front ends: the core keeps bits (a bool is 1 bit), users see whole bytes. Used sizes
// round up (a partly used byte is used); a capacity rounds down (never promise a byte that is not there).
impl Offload {
    /// Bytes of this block, rounded up.
    pub fn bytes(&self) -> u64 {
        bits_to_bytes(self.bits)
    }
}

impl DeviceUsage {
    /// Capacity in whole bytes, rounded down (`None`: unbounded disk).
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.capacity_bits.map(|bits| bits / BITS_PER_BYTE)
    }

    /// Bytes of weights, rounded up.
    pub fn weight_bytes(&self) -> u64 {
        bits_to_bytes(self.weight_bits)
    }

    /// Bytes of runtime memory, rounded up.
    pub fn runtime_bytes(&self) -> u64 {
        bits_to_bytes(self.runtime_bits)
    }

    /// Bytes kept free, rounded up.
    pub fn reserve_bytes(&self) -> u64 {
        bits_to_bytes(self.reserve_bits)
    }
}

impl Plan {
    /// The device of a block node (`None` for nodes that are not blocks).
    pub fn device_of(&self, node: NodeId) -> Option<Device> {
        self.assignments.iter().find(|(n, _)| *n == node).map(|(_, d)| *d)
    }

    /// The execution device of a block node (`None` for nodes that are not blocks).
    pub fn execution_of(&self, node: NodeId) -> Option<Device> {
        self.execution.iter().find(|(n, _)| *n == node).map(|(_, d)| *d)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(capacity_bits: Option<u64>, weight_bits: u64, runtime_bits: u64, reserve_bits: u64) -> DeviceUsage {
        DeviceUsage {
            device: Device::Gpu(0),
            capacity_bits,
            weight_bits,
            runtime_bits,
            reserve_bits,
            compute: 0,
            blocks: Vec::new(),
        }
    }

    #[test]
    fn used_bytes_round_up_and_capacity_rounds_down() {
        let u = usage(Some(8 * 100 + 7), 8 * 10 + 1, 3, 8 * 4);
        assert_eq!(u.capacity_bytes(), Some(100));
        assert_eq!(u.weight_bytes(), 11);
        assert_eq!(u.runtime_bytes(), 1);
        assert_eq!(u.reserve_bytes(), 4);
        assert_eq!(usage(None, 0, 0, 0).capacity_bytes(), None);
        assert_eq!(usage(None, 0, 0, 0).weight_bytes(), 0);
    }

    #[test]
    fn offload_bytes_round_up() {
        let o = Offload {
            node: 0,
            device: Device::Cpu,
            bits: 17,
            reason: String::new(),
        };
        assert_eq!(o.bytes(), 3);
    }
}
