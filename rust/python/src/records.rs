//! What `solve` hands to Python: named records in bytes, devices already as Python uses them. The core
//! counts bits; the rounding to bytes happens once, here, through the core's byte views. Python objects
//! are made when Python asks for them, not by the solve.

use std::collections::HashMap;
use std::sync::Arc;

use devicemap_core::device::bits_to_bytes;
use devicemap_core::plan::{DeviceUsage, Offload};
use devicemap_core::{Device, ModuleTree, Plan};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

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
#[pyclass(frozen, module = "devicemap._core")]
pub struct DeviceUsageRecord {
    #[pyo3(get)]
    device: DeviceKey,
    /// Bytes the plan may use (None: unbounded disk).
    #[pyo3(get)]
    capacity: Option<u64>,
    #[pyo3(get)]
    weights: u64,
    #[pyo3(get)]
    runtime: u64,
    #[pyo3(get)]
    reserve: u64,
    #[pyo3(get)]
    compute: u64,
    /// Block names on this device, in model order (the result's shared strings).
    blocks: Vec<Py<PyString>>,
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
///
/// It holds the core's plan and the tree and makes Python objects only when asked: a leaf-only plan of
/// a large model has a block per Linear, and naming them all on every solve cost more than the solve.
/// Block names are made once, on first use, and shared by every map and record.
#[pyclass(frozen, module = "devicemap._core")]
pub struct SolveResult {
    tree: Arc<ModuleTree>,
    plan: Plan,
    /// Each block's name (in `plan.assignments` order) as a Python string.
    names: PyOnceLock<Vec<Py<PyString>>>,
}

#[pymethods]
impl DeviceUsageRecord {
    /// Block names on this device, in model order.
    #[getter]
    fn blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.blocks.iter().map(|b| b.bind(py)))
    }

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

fn offload_record(tree: &ModuleTree, o: &Offload) -> OffloadRecord {
    OffloadRecord {
        name: tree.name(o.node).to_string(),
        device: o.device.into(),
        bytes: o.bytes(),
        reason: o.reason.clone(),
    }
}

/// Each device of the plan as one Python object, so a map of a million blocks shares a handful.
struct DeviceObjects<'py>(Vec<(Device, Bound<'py, PyAny>)>);

impl<'py> DeviceObjects<'py> {
    fn new(py: Python<'py>, plan: &Plan) -> PyResult<Self> {
        let objects = plan
            .usage
            .iter()
            .map(|u| Ok((u.device, DeviceKey::from(u.device).into_pyobject(py)?.into_any())))
            .collect::<PyResult<_>>()?;
        Ok(DeviceObjects(objects))
    }

    fn get(&self, py: Python<'py>, device: Device) -> PyResult<Bound<'py, PyAny>> {
        match self.0.iter().find(|(d, _)| *d == device) {
            Some((_, object)) => Ok(object.clone()),
            None => Ok(DeviceKey::from(device).into_pyobject(py)?.into_any()),
        }
    }
}

impl SolveResult {
    /// Wrap a plan of `tree` (no Python needed, so this runs with the GIL released).
    pub fn new(tree: Arc<ModuleTree>, plan: Plan) -> Self {
        SolveResult {
            tree,
            plan,
            names: PyOnceLock::new(),
        }
    }

    /// Block names as Python strings, in `plan.assignments` order (made on first use).
    fn names(&self, py: Python<'_>) -> &[Py<PyString>] {
        self.names.get_or_init(py, || {
            self.plan
                .assignments
                .iter()
                .map(|(node, _)| PyString::new(py, self.tree.name(*node)).unbind())
                .collect()
        })
    }

    /// (name, device) pairs of one block map (`assignments` or `execution`) as a list of tuples.
    fn block_pairs<'py>(&self, py: Python<'py>, pairs: &[(u32, Device)]) -> PyResult<Bound<'py, PyList>> {
        let devices = DeviceObjects::new(py, &self.plan)?;
        let names = self.names(py);
        let items = names
            .iter()
            .zip(pairs)
            .map(|(name, (_, device))| PyTuple::new(py, [name.bind(py).clone().into_any(), devices.get(py, *device)?]))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// One block map as a dict {name: device}.
    fn block_dict<'py>(&self, py: Python<'py>, pairs: &[(u32, Device)]) -> PyResult<Bound<'py, PyDict>> {
        let devices = DeviceObjects::new(py, &self.plan)?;
        let dict = PyDict::new(py);
        for (name, (_, device)) in self.names(py).iter().zip(pairs) {
            dict.set_item(name.bind(py), devices.get(py, *device)?)?;
        }
        Ok(dict)
    }

    fn usage_record(&self, u: &DeviceUsage, blocks: Vec<Py<PyString>>) -> DeviceUsageRecord {
        DeviceUsageRecord {
            device: u.device.into(),
            capacity: u.capacity_bytes(),
            weights: u.weight_bytes(),
            runtime: u.runtime_bytes(),
            reserve: u.reserve_bytes(),
            compute: u.compute,
            blocks,
        }
    }
}

#[pymethods]
impl SolveResult {
    /// The strategy that ran (after resolving "auto").
    #[getter]
    fn strategy(&self) -> &'static str {
        self.plan.strategy
    }

    /// The coarsest map, as (module name, device) pairs in model order.
    #[getter]
    fn device_map(&self) -> Vec<(String, DeviceKey)> {
        named_devices(&self.tree, &self.plan.device_map)
    }

    /// Every block and its device, in model order.
    #[getter]
    fn assignments<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.block_pairs(py, &self.plan.assignments)
    }

    /// Every block and the device that computes it, in model order.
    #[getter]
    fn execution_map<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.block_pairs(py, &self.plan.execution)
    }

    /// One record per device of the spec, in placement order.
    #[getter]
    fn usage(&self, py: Python<'_>) -> Vec<DeviceUsageRecord> {
        // Every block is on exactly one device, in model order: deal the shared names out by device.
        let mut blocks: Vec<Vec<Py<PyString>>> = self
            .plan
            .usage
            .iter()
            .map(|u| Vec::with_capacity(u.blocks.len()))
            .collect();
        for (name, (_, device)) in self.names(py).iter().zip(&self.plan.assignments) {
            if let Some(i) = self.plan.usage.iter().position(|u| u.device == *device) {
                blocks[i].push(name.clone_ref(py));
            }
        }
        self.plan
            .usage
            .iter()
            .zip(blocks)
            .map(|(u, b)| self.usage_record(u, b))
            .collect()
    }

    /// Blocks on CPU or disk, with their bytes and why.
    #[getter]
    fn offloaded(&self) -> Vec<OffloadRecord> {
        self.plan
            .offloaded
            .iter()
            .map(|o| offload_record(&self.tree, o))
            .collect()
    }

    /// The three maps as dicts {name: device}: `device_map`, `assignments`, `execution_map` (what the
    /// Python `Plan` keeps), built directly with the shared block names. The execution map is a copy of
    /// the assignments with the offloaded blocks changed (a copy is far cheaper than a dict built key by
    /// key).
    fn maps<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>, Bound<'py, PyDict>)> {
        let device_map = PyDict::new(py);
        for (name, device) in named_devices(&self.tree, &self.plan.device_map) {
            device_map.set_item(name, device)?;
        }
        let assignments = self.block_dict(py, &self.plan.assignments)?;
        let execution = assignments.copy()?;
        let devices = DeviceObjects::new(py, &self.plan)?;
        let pairs = self.plan.assignments.iter().zip(&self.plan.execution);
        for (name, ((_, stored), (_, runs))) in self.names(py).iter().zip(pairs) {
            if stored != runs {
                execution.set_item(name.bind(py), devices.get(py, *runs)?)?;
            }
        }
        Ok((device_map, assignments, execution))
    }

    /// Every offloaded block as a (name, device, bytes, reason) tuple, in model order, with the shared
    /// block names and one string per distinct reason (what the Python `Plan` keeps).
    fn offload_rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let names = self.names(py);
        let devices = DeviceObjects::new(py, &self.plan)?;
        let mut reasons: HashMap<&str, Bound<'py, PyString>> = HashMap::new();
        // Offloads and assignments are both in model (node) order: find each block with a cursor.
        let mut block = 0;
        let mut rows = Vec::with_capacity(self.plan.offloaded.len());
        for o in &self.plan.offloaded {
            while self.plan.assignments[block].0 != o.node {
                block += 1;
            }
            let reason = reasons
                .entry(o.reason.as_str())
                .or_insert_with(|| PyString::new(py, &o.reason))
                .clone();
            let row = (
                names[block].bind(py).clone(),
                devices.get(py, o.device)?,
                o.bytes(),
                reason,
            );
            rows.push(row.into_pyobject(py)?);
        }
        PyList::new(py, rows)
    }

    /// Names of the blocks larger than `limit` bytes (sizes rounded up), in model order.
    fn blocks_over(&self, py: Python<'_>, limit: u64) -> Vec<Py<PyString>> {
        let names = self.names(py);
        self.plan
            .assignments
            .iter()
            .zip(names)
            .filter(|((node, _), _)| bits_to_bytes(self.tree.subtree_bits(*node)) > limit)
            .map(|(_, name)| name.clone_ref(py))
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "SolveResult(strategy='{}', blocks={}, devices={}, offloaded={})",
            self.plan.strategy,
            self.plan.assignments.len(),
            self.plan.usage.len(),
            self.plan.offloaded.len()
        )
    }
}
