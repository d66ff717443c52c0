//! What `solve` hands to Python: named records in bytes, devices already as Python uses them. The core
//! counts bits; the rounding to bytes happens once, here, through the core's byte views.

use devicemap_core::plan::{DeviceUsage, Offload};
use devicemap_core::{Device, ModuleTree, Plan};
use pyo3::prelude::*;

/// A device as accelerate's maps spell it: an int GPU index, or "mps" / "cpu" / "disk".
#[derive(Debug, Clone, Copy, PartialEq, Eq, IntoPyObject, IntoPyObjectRef)]
pub enum DeviceKey {
    Index(u32),
    Name(&'static str),
}

impl From<Device> for DeviceKey {
    fn from(device: Device) -> Self {
        match device {
            Device::Gpu(i) => DeviceKey::Index(i),
            Device::Mps => DeviceKey::Name("mps"),
            Device::Cpu => DeviceKey::Name("cpu"),
            Device::Disk => DeviceKey::Name("disk"),
        }
    }
}

impl DeviceKey {
    /// As Python's repr() spells the value: `0` or `'cpu'`.
    fn repr(self) -> String {
        match self {
            DeviceKey::Index(i) => i.to_string(),
            DeviceKey::Name(name) => format!("'{name}'"),
        }
    }
}

/// What one device holds in a plan, in bytes.
#[derive(Clone)]
#[pyclass(frozen, get_all, module = "devicemap._core")]
pub struct DeviceUsageRecord {
    device: DeviceKey,
    /// Bytes the plan may use (None: unbounded disk).
    capacity: Option<u64>,
    weights: u64,
    runtime: u64,
    reserve: u64,
    compute: u64,
    /// Block names on this device, in model order.
    blocks: Vec<String>,
}

/// A block placed on CPU or disk, its size in bytes, and why.
#[derive(Clone)]
#[pyclass(frozen, get_all, module = "devicemap._core")]
pub struct OffloadRecord {
    name: String,
    device: DeviceKey,
    bytes: u64,
    reason: String,
}

/// The result of `solve`: the strategy that ran, the maps as (module name, device) pairs in model order,
/// per-device usage and offloads.
#[pyclass(frozen, get_all, module = "devicemap._core")]
pub struct SolveResult {
    strategy: &'static str,
    device_map: Vec<(String, DeviceKey)>,
    assignments: Vec<(String, DeviceKey)>,
    /// Every block and the device that computes it (the GPU staging an offloaded block, or "cpu").
    execution_map: Vec<(String, DeviceKey)>,
    usage: Vec<DeviceUsageRecord>,
    offloaded: Vec<OffloadRecord>,
}

#[pymethods]
impl DeviceUsageRecord {
    fn __repr__(&self) -> String {
        format!(
            "DeviceUsageRecord(device={}, capacity={}, weights={}, runtime={}, reserve={}, compute={}, blocks={})",
            self.device.repr(),
            self.capacity.map_or("None".to_string(), |c| c.to_string()),
            self.weights,
            self.runtime,
            self.reserve,
            self.compute,
            self.blocks.len()
        )
    }
}

#[pymethods]
impl OffloadRecord {
    fn __repr__(&self) -> String {
        format!(
            "OffloadRecord(name={:?}, device={}, bytes={}, reason={:?})",
            self.name,
            self.device.repr(),
            self.bytes,
            self.reason
        )
    }
}

/// Module names and devices of (node, device) pairs.
pub fn named_devices(tree: &ModuleTree, pairs: &[(u32, Device)]) -> Vec<(String, DeviceKey)> {
    pairs
        .iter()
        .map(|(node, device)| (tree.name(*node).to_string(), (*device).into()))
        .collect()
}

fn usage_record(tree: &ModuleTree, u: &DeviceUsage) -> DeviceUsageRecord {
    DeviceUsageRecord {
        device: u.device.into(),
        capacity: u.capacity_bytes(),
        weights: u.weight_bytes(),
        runtime: u.runtime_bytes(),
        reserve: u.reserve_bytes(),
        compute: u.compute,
        blocks: u.blocks.iter().map(|b| tree.name(*b).to_string()).collect(),
    }
}

fn offload_record(tree: &ModuleTree, o: &Offload) -> OffloadRecord {
    OffloadRecord {
        name: tree.name(o.node).to_string(),
        device: o.device.into(),
        bytes: o.bytes(),
        reason: o.reason.clone(),
    }
}

#[pymethods]
impl SolveResult {
    fn __repr__(&self) -> String {
        format!(
            "SolveResult(strategy='{}', blocks={}, devices={}, offloaded={})",
            self.strategy,
            self.assignments.len(),
            self.usage.len(),
            self.offloaded.len()
        )
    }
}

impl SolveResult {
    /// Records of a plan (no Python needed, so this runs with the GIL released).
    pub fn new(tree: &ModuleTree, plan: &Plan) -> Self {
        SolveResult {
            strategy: plan.strategy,
            device_map: named_devices(tree, &plan.device_map),
            assignments: named_devices(tree, &plan.assignments),
            execution_map: named_devices(tree, &plan.execution),
            usage: plan.usage.iter().map(|u| usage_record(tree, u)).collect(),
            offloaded: plan.offloaded.iter().map(|o| offload_record(tree, o)).collect(),
        }
    }
}
