//! devicemap._core: thin PyO3 wrappers over devicemap-core. Convert arguments, release the GIL around
//! the work, map errors (see errors.rs). No placement logic lives here.

mod checkpoint;
mod errors;
mod module_walk;
mod records;

use devicemap_core::speed_program::{solve_chain as solve_speed_chain, Mode as SpeedMode, SpeedBlock, SpeedChain};
use devicemap_core::strategy::accelerate_budget::balanced_budget as core_budget;
use devicemap_core::strategy::accelerate_compat::{self, CompatOptions};
use devicemap_core::strategy::accelerate_version::AccelerateVersion;
use devicemap_core::strategy::Balance;
use devicemap_core::{
    Device, DeviceSpec, ModuleTree, NodeKind, PlacementError as CoreError, SolveOptions, Strategy, TreeColumns,
};
use errors::guarded;
use pyo3::prelude::*;
use records::{named_devices, DeviceKey, DeviceUsageRecord, OffloadRecord, SolveResult};
use std::sync::Arc;

/// `Tree.columns()`: what `Tree(...)` takes, in its argument order.
type ColumnTuple = (
    Vec<String>,
    Vec<i64>,
    Vec<u16>,
    Vec<u32>,
    Vec<String>,
    Vec<u64>,
    Vec<bool>,
    Vec<i64>,
);

/// An immutable module size tree owned by Rust (build it with `devicemap.ModuleTree`).
#[pyclass(frozen, module = "devicemap._core")]
struct Tree {
    inner: Arc<ModuleTree>,
}

#[pymethods]
impl Tree {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        names: Vec<String>,
        parents: Vec<i64>,
        kinds: Vec<u8>,
        classes: Vec<u32>,
        class_names: Vec<String>,
        bits: Vec<u64>,
        duplicate: Vec<bool>,
        tie: Vec<i64>,
    ) -> PyResult<Tree> {
        let columns = TreeColumns {
            names,
            parents,
            kinds,
            classes,
            class_names,
            bits,
            duplicate,
            tie,
        };
        let tree = guarded(py, move || ModuleTree::from_columns(columns))?;
        Ok(Tree { inner: Arc::new(tree) })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn name(&self, node: u32) -> PyResult<String> {
        self.check(node)?;
        Ok(self.inner.name(node).to_string())
    }

    fn find(&self, name: &str) -> Option<u32> {
        self.inner.find(name)
    }

    fn subtree_bits(&self, node: u32) -> PyResult<u64> {
        self.check(node)?;
        Ok(self.inner.subtree_bits(node))
    }

    fn class_name(&self, node: u32) -> PyResult<String> {
        self.check(node)?;
        Ok(self.inner.class_name(node).to_string())
    }

    fn kind(&self, node: u32) -> PyResult<&'static str> {
        self.check(node)?;
        Ok(match self.inner.kind(node) {
            k if k.is_parameter() => "parameter",
            k if k.is_buffer() => "buffer",
            _ => "module",
        })
    }

    fn tie_groups(&self) -> Vec<Vec<String>> {
        self.inner
            .tie_groups()
            .iter()
            .map(|g| g.iter().map(|&m| self.inner.name(m).to_string()).collect())
            .collect()
    }

    /// The columns `Tree(...)` takes, read back: (names, parents, kinds, classes, class_names, bits,
    /// duplicate, tie); `Tree(*tree.columns())` is the same tree.
    fn columns(&self) -> ColumnTuple {
        let c = self.inner.to_columns();
        // kinds as ints: pyo3 would hand a Vec<u8> to Python as bytes
        let kinds = c.kinds.into_iter().map(u16::from).collect();
        (
            c.names,
            c.parents,
            kinds,
            c.classes,
            c.class_names,
            c.bits,
            c.duplicate,
            c.tie,
        )
    }

    fn suggest(&self, name: &str) -> Vec<String> {
        self.inner.suggest(name)
    }

    /// Names of the modules of one class, in model order.
    fn modules_of_class(&self, class_name: &str) -> Vec<String> {
        (0..self.inner.len() as u32)
            .filter(|&i| !self.inner.is_tensor(i) && self.inner.class_name(i) == class_name)
            .map(|i| self.inner.name(i).to_string())
            .collect()
    }
}

impl Tree {
    /// Hand a built tree to Python.
    fn wrap(tree: ModuleTree) -> Tree {
        Tree { inner: Arc::new(tree) }
    }

    fn check(&self, node: u32) -> PyResult<()> {
        if (node as usize) < self.inner.len() {
            Ok(())
        } else {
            Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "node {node} is out of range ({} nodes)",
                self.inner.len()
            )))
        }
    }
}

fn parse_devices(devices: Vec<(String, Option<u64>)>) -> Result<Vec<(Device, Option<u64>)>, CoreError> {
    devices
        .into_iter()
        .map(|(key, cap)| Ok((Device::parse(&key)?, cap)))
        .collect()
}

type NamedDevice = (String, String);
/// `speed_program`'s answer (seconds, mode index per block) if any, and (labels, largest, bound).
type SpeedProgramResult = (Option<(f64, Vec<usize>)>, (u64, u64, u64));
/// accelerate's map (devices as its keys: int GPU index or str), and the facts behind its warnings: bits
/// used per device, modules placed whole on CPU/disk, devices left empty (device, bits needed, the names
/// those bits come from).
type CompatReport = (
    Vec<(String, DeviceKey)>,
    Vec<(String, i128)>,
    Vec<NamedDevice>,
    Vec<(String, i128, Vec<String>)>,
);

fn named_values(tree: &ModuleTree, values: Vec<(String, u64)>, what: &str) -> Result<Vec<(u32, u64)>, CoreError> {
    values
        .into_iter()
        .map(|(name, v)| {
            tree.find(&name)
                .map(|id| (id, v))
                .ok_or_else(|| CoreError::UnknownModule {
                    name,
                    context: what.to_string(),
                    suggestions: Vec::new(),
                })
        })
        .collect()
}

/// Solve a placement. Devices are (key, capacity in bits) pairs; keys as accelerate's max_memory keys.
/// `runtime` and `compute` attach values to module names (bits of KV cache/logits; compute cost).
/// `execution_device` (a device key) forces where offloaded blocks execute: a GPU, or "cpu".
/// Returns a `SolveResult` of named records in bytes, devices as accelerate's keys (int GPU index or str).
#[pyfunction]
#[pyo3(signature = (
    tree, devices, strategy, no_split_module_classes, pins, offload_buffers,
    runtime = Vec::new(), activation_bits = 0, compute = Vec::new(), balance = "memory".to_string(),
    gpu0_reserve_bits = 0, execution_device = None
))]
#[allow(clippy::too_many_arguments)]
fn solve(
    py: Python<'_>,
    tree: &Tree,
    devices: Vec<(String, Option<u64>)>,
    strategy: String,
    no_split_module_classes: Vec<String>,
    pins: Vec<(String, String)>,
    offload_buffers: bool,
    runtime: Vec<(String, u64)>,
    activation_bits: u64,
    compute: Vec<(String, u64)>,
    balance: String,
    gpu0_reserve_bits: u64,
    execution_device: Option<String>,
) -> PyResult<SolveResult> {
    let t = Arc::clone(&tree.inner);
    guarded(py, move || {
        let spec = DeviceSpec::new(parse_devices(devices)?)?;
        let pins = pins
            .into_iter()
            .map(|(n, d)| Ok((n, Device::parse(&d)?)))
            .collect::<Result<Vec<_>, CoreError>>()?;
        let balance = Balance::parse(&balance)?;
        let execution_device = execution_device.as_deref().map(Device::parse).transpose()?;
        let options = SolveOptions {
            strategy: Strategy::parse(&strategy)?,
            no_split_module_classes,
            pins,
            offload_buffers,
            runtime_bits: named_values(&t, runtime, "workload runtime memory")?,
            activation_bits,
            compute: named_values(&t, compute, "compute costs")?,
            balance,
            gpu0_reserve_bits,
            execution_device,
        };
        let plan = devicemap_core::solve(&t, &spec, &options)?;
        Ok(SolveResult::new(t, plan))
    })
}

/// accelerate's infer_auto_device_map on a tree; max_memory as (key, capacity bits) in accelerate order,
/// as the accelerate release `accelerate_version` (major, minor, patch) computes it.
#[pyfunction]
#[pyo3(signature = (tree, max_memory, no_split_module_classes, fallback_allocation, clean_result, accelerate_version))]
fn infer_auto_device_map(
    py: Python<'_>,
    tree: &Tree,
    max_memory: Vec<(String, u64)>,
    no_split_module_classes: Vec<String>,
    fallback_allocation: bool,
    clean_result: bool,
    accelerate_version: (u32, u32, u32),
) -> PyResult<CompatReport> {
    let t = Arc::clone(&tree.inner);
    guarded(py, move || {
        let mm = max_memory
            .into_iter()
            .map(|(k, c)| Ok((Device::parse(&k)?, c)))
            .collect::<Result<Vec<_>, CoreError>>()?;
        let options = CompatOptions {
            no_split_module_classes,
            fallback_allocation,
            clean_result,
            accelerate_version: AccelerateVersion::new(
                accelerate_version.0,
                accelerate_version.1,
                accelerate_version.2,
            ),
        };
        let result = accelerate_compat::infer_auto_device_map(&t, &mm, &options)?;
        let named = |(n, d): &(u32, Device)| (t.name(*n).to_string(), d.to_string());
        Ok((
            named_devices(&t, &result.device_map),
            result
                .used_bits
                .iter()
                .map(|(d, bits)| (d.to_string(), *bits))
                .collect(),
            result.offloaded_modules.iter().map(named).collect(),
            result
                .unassigned
                .iter()
                .map(|u| {
                    let parts = u.parts.iter().map(|n| t.name(*n).to_string()).collect();
                    (u.device.to_string(), u.bits, parts)
                })
                .collect(),
        ))
    })
}

/// accelerate's get_balanced_memory numbers: (model bits, per-GPU budget bits).
#[pyfunction]
fn balanced_budget(
    py: Python<'_>,
    tree: &Tree,
    no_split_module_classes: Vec<String>,
    share_devices: u64,
) -> PyResult<(u64, u64)> {
    let t = Arc::clone(&tree.inner);
    guarded(py, move || {
        let b = core_budget(&t, &no_split_module_classes, share_devices);
        Ok((b.total_bits, b.per_gpu_bits))
    })
}

/// Parse "20GiB"-style sizes strictly; returns bytes.
#[pyfunction]
fn parse_size(py: Python<'_>, text: String) -> PyResult<u64> {
    guarded(py, move || devicemap_core::parse_size(&text))
}

/// A device key as accelerate normalises it (the one parser, see `Device::parse`): a GPU index, or
/// "mps", "cpu", "disk".
#[pyfunction]
fn parse_device(py: Python<'_>, key: String) -> PyResult<DeviceKey> {
    guarded(py, move || Device::parse(&key)).map(DeviceKey::from)
}

/// The speed objective's program over a chain (`devicemap_core::speed_program`): per block its weight and
/// runtime bytes and its seconds per mode (GPU 0..G, CPU, disk; `None`: not allowed). Returns the answer
/// (seconds, one mode index per block) or `None` when nothing fits, and the work done
/// (labels kept, most kept after one block, the bound on that).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn speed_program(
    py: Python<'_>,
    weights: Vec<u64>,
    runtimes: Vec<u64>,
    costs: Vec<Vec<Option<f64>>>,
    gpu_capacity: Vec<u64>,
    cpu_capacity: Option<u64>,
    activation: u64,
    switch: Vec<Vec<f64>>,
    unit: u64,
    cpu_unit: u64,
) -> PyResult<SpeedProgramResult> {
    guarded(py, move || {
        if weights.len() != runtimes.len() || weights.len() != costs.len() {
            return Err(CoreError::InvalidOption {
                what: "speed program blocks".into(),
                value: format!(
                    "{} weights, {} runtimes, {} cost lists",
                    weights.len(),
                    runtimes.len(),
                    costs.len()
                ),
                expected: vec!["one of each per block".into()],
            });
        }
        let blocks = weights
            .into_iter()
            .zip(runtimes)
            .zip(costs)
            .map(|((weight, runtime), cost)| SpeedBlock { weight, runtime, cost })
            .collect();
        let gpus = gpu_capacity.len();
        let chain = SpeedChain {
            blocks,
            gpu_capacity,
            cpu_capacity,
            activation,
            switch,
        };
        let (answer, stats) = solve_speed_chain(&chain, unit, cpu_unit)?;
        let answer = answer.map(|a| {
            let modes = a
                .modes
                .iter()
                .map(|m| match *m {
                    SpeedMode::Gpu(g) => g as usize,
                    SpeedMode::Cpu => gpus,
                    SpeedMode::Disk => gpus + 1,
                })
                .collect();
            (a.seconds, modes)
        });
        Ok((answer, (stats.labels, stats.largest, stats.bound)))
    })
}

/// Raise InternalError from a deliberate panic (tests check that panics never abort Python).
#[pyfunction]
fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    guarded(py, || -> Result<(), CoreError> { panic!("deliberate test panic") })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tree>()?;
    m.add_class::<module_walk::ModuleWalk>()?;
    m.add_class::<SolveResult>()?;
    m.add_class::<DeviceUsageRecord>()?;
    m.add_class::<OffloadRecord>()?;
    m.add_function(wrap_pyfunction!(solve, m)?)?;
    m.add_function(wrap_pyfunction!(infer_auto_device_map, m)?)?;
    m.add_function(wrap_pyfunction!(balanced_budget, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(parse_device, m)?)?;
    m.add_function(wrap_pyfunction!(speed_program, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::tree_from_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::checkpoint_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    errors::register(m)?;
    // Node kind codes of the `kinds` column (the core's NodeKind discriminants, defined once there).
    for (name, kind) in [
        ("KIND_MODULE", NodeKind::Module),
        ("KIND_PARAMETER", NodeKind::Parameter),
        ("KIND_BUFFER", NodeKind::Buffer),
        ("KIND_NON_PERSISTENT_BUFFER", NodeKind::NonPersistentBuffer),
        ("KIND_PARAMETER_ALIAS", NodeKind::ParameterAlias),
    ] {
        m.add(name, kind as u8)?;
    }
    m.add("BLOCK_CLASS", devicemap_core::checkpoint_tree::BLOCK_CLASS)?;
    // The option names the core parses: Python types and checks its arguments against these.
    m.add("STRATEGIES", Strategy::ALL.map(Strategy::name).to_vec())?;
    m.add("BALANCES", Balance::ALL.map(Balance::name).to_vec())?;
    m.add("ACCELERATORS", devicemap_core::device::ACCELERATORS.to_vec())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
