//! The export walk of `ModuleTree.from_module`, reading each module's `_parameters`, `_buffers` and
//! `_modules` dicts through the CPython API and filling the core's columns directly: no tuple, list or
//! string object per node on the Python side. The rules (which tensor is sized how) stay in Python:
//! the walk asks `element_bits(dtype)` once per dtype, or `named_bits(full_name, tensor)` per tensor when
//! sizes depend on names (special dtypes, quantizers).
//!
//! Nodes come as torch's `named_parameters` / `named_buffers` / `named_children` list them: pre-order, a
//! module, its parameters, its buffers, then its child modules' subtrees. Module graphs need not be
//! trees. A module met again under another parent (T5's `encoder.embed_tokens` is `shared`) is listed
//! there too, as accelerate and `state_dict` list it, with its tensors as tied aliases; but only the
//! subtree of its first walk is copied there (through the edges it was first reached by), and a module
//! met again inside such a copy contributes its own tensors only. Naive re-walking is exponential for
//! nested sharing; this is at most one copy per extra edge. A module that is its own ancestor (a cycle)
//! is never entered again, as in `named_modules`.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use devicemap_core::{Columns, ModuleTree, NameList, NodeKind};
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyType};

use crate::errors::{guarded, panic_to_err};
use crate::Tree;

/// How a module is walked: its first time (everything), a copy of its first walk under another
/// parent, or its own tensors only (a module met again inside a copy).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    First,
    Copy,
    Own,
}

/// A module waiting on the walk's stack.
struct Pending<'py> {
    module: Bound<'py, PyAny>,
    parent: u32,
    name: Bound<'py, PyString>,
    mode: Mode,
}

/// Hashes an object's address (its `id()`) with one multiplication: the walk looks up a few addresses
/// per node, and SipHash's DoS resistance buys nothing for keys Python allocated.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, address: usize) {
        // Objects are 16-byte aligned: the low bits carry nothing; the high bits of the product mix
        // every input bit, and hashbrown takes its bucket from the top 7 and the low bits.
        self.0 = ((address as u64) >> 4)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(32);
    }
}

/// Maps keyed by object addresses.
type AddressMap<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;
type AddressSet = HashSet<usize, BuildHasherDefault<AddressHasher>>;

/// The root's parent in the walk's own bookkeeping (the columns say -1).
const NO_PARENT: u32 = u32::MAX;

/// The columns of one exported module graph, and what `from_module` needs besides them (tie groups,
/// the parameter nodes in `named_parameters(remove_duplicate=False)` order, the Python types met).
#[pyclass(module = "devicemap._core")]
pub struct ModuleWalk {
    columns: Option<Columns<NameList>>,
    /// Parents as the walk keeps them (the columns get them at `build`).
    parents: Vec<u32>,
    /// Tensors met again: (node of the first name, a later node), in walk order.
    param_repeats: Vec<(u32, u32)>,
    buffer_repeats: Vec<(u32, u32)>,
    /// Total bits of the counted tensors (wider than the core's 64 bits, for the caller's check).
    total_bits: u128,
    types: Vec<Py<PyType>>,
}

/// The walk's working state.
struct Walker<'py> {
    py: Python<'py>,
    element_bits: Bound<'py, PyAny>,
    named_bits: Option<Bound<'py, PyAny>>,
    untie: bool,
    like_named_children: bool,
    names: NameList,
    parents: Vec<u32>,
    kinds: Vec<u8>,
    classes: Vec<u32>,
    bits: Vec<u64>,
    duplicate: Vec<bool>,
    /// id() of the module at each node (0 for tensors): the cycle and copy checks compare it.
    module_key: Vec<usize>,
    first_node: AddressMap<u32>,
    param_first: AddressMap<u32>,
    buffer_first: AddressMap<u32>,
    param_repeats: Vec<(u32, u32)>,
    buffer_repeats: Vec<(u32, u32)>,
    type_ids: AddressMap<u32>,
    types: Vec<Py<PyType>>,
    class_ids: HashMap<String, u32>,
    class_names: Vec<String>,
    per_dtype: AddressMap<u128>,
    total_bits: u128,
}

/// An int from Python as u128, saturating (the caller's 2^64 check then refuses the model).
fn saturating_u128(value: &Bound<'_, PyAny>) -> PyResult<u128> {
    match value.extract::<u128>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(value.py()) => Ok(u128::MAX),
        Err(e) => Err(e),
    }
}

impl<'py> Walker<'py> {
    /// Add a node; `bits` wider than the core's 64 bits only count towards `total_bits` (which the
    /// caller checks before building).
    fn push_row(&mut self, name: &str, parent: u32, kind: NodeKind, class: u32, bits: u128, duplicate: bool) {
        self.names.push(name);
        self.parents.push(parent);
        self.kinds.push(kind as u8);
        self.classes.push(class);
        self.bits.push(u64::try_from(bits).unwrap_or(u64::MAX));
        self.duplicate.push(duplicate);
        self.module_key.push(0);
        self.total_bits = self.total_bits.saturating_add(bits);
    }

    /// The class id of a Python type; accelerate compares class *names*, so two classes with one name
    /// share an id.
    fn class_of(&mut self, cls: &Bound<'py, PyType>) -> PyResult<u32> {
        let key = cls.as_ptr() as usize;
        if let Some(&id) = self.type_ids.get(&key) {
            return Ok(id);
        }
        let name = cls.name()?.to_str()?.to_owned();
        let next = self.class_names.len() as u32;
        let id = *self.class_ids.entry(name.clone()).or_insert_with(|| {
            self.class_names.push(name);
            next
        });
        self.type_ids.insert(key, id);
        self.types.push(cls.clone().unbind());
        Ok(id)
    }

    /// Full dotted name of a tensor `local` of the module at node `parent`.
    fn full_name(&self, parent: u32, local: &str) -> String {
        let mut parts = vec![local];
        let mut at = parent;
        while at != 0 && at != NO_PARENT {
            parts.push(self.names.get(at as usize));
            at = self.parents[at as usize];
        }
        parts.reverse();
        parts.join(".")
    }

    /// Bits of one tensor under the caller's rules.
    fn tensor_bits(&mut self, parent: u32, local: &str, tensor: &Bound<'py, PyAny>) -> PyResult<u128> {
        if let Some(named) = &self.named_bits {
            let name = self.full_name(parent, local);
            return saturating_u128(&named.call1((name, tensor))?);
        }
        let dtype = tensor.getattr(intern!(self.py, "dtype"))?;
        let key = dtype.as_ptr() as usize;
        let per = match self.per_dtype.get(&key) {
            Some(&per) => per,
            None => {
                let per = saturating_u128(&self.element_bits.call1((&dtype,))?)?;
                // dtypes are interned singletons, alive as long as torch: their ids stay valid keys.
                self.per_dtype.insert(key, per);
                per
            }
        };
        let numel = saturating_u128(&tensor.call_method0(intern!(self.py, "numel"))?)?;
        Ok(numel.saturating_mul(per))
    }

    /// Whether the module `key` is the module at `node` or one of its ancestors.
    fn is_ancestor(&self, mut node: u32, key: usize) -> bool {
        while node != NO_PARENT {
            if self.module_key[node as usize] == key {
                return true;
            }
            node = self.parents[node as usize];
        }
        false
    }

    fn run(&mut self, model: Bound<'py, PyAny>) -> PyResult<()> {
        let py = self.py;
        let mut stack = vec![Pending {
            module: model,
            parent: NO_PARENT,
            name: PyString::new(py, ""),
            mode: Mode::First,
        }];
        let mut seen_here: Vec<usize> = Vec::new();
        let mut seen_children = AddressSet::default();
        let mut found: Vec<Pending<'py>> = Vec::new();
        while let Some(Pending {
            module,
            parent,
            name,
            mut mode,
        }) = stack.pop()
        {
            let node = self.names.len() as u32;
            let module_key = module.as_ptr() as usize;
            if mode == Mode::First && !self.first_node.contains_key(&module_key) {
                self.first_node.insert(module_key, node);
            } else {
                if self.is_ancestor(parent, module_key) {
                    continue; // a cycle: torch's named_modules never re-enters it either
                }
                if mode == Mode::First {
                    mode = Mode::Copy;
                }
            }
            let class = self.class_of(&module.get_type())?;
            self.push_row(name.to_str()?, parent, NodeKind::Module, class, 0, false);
            self.module_key[node as usize] = module_key;

            let params = module.getattr(intern!(py, "_parameters"))?;
            let params = params.cast::<PyDict>()?;
            if !params.is_empty() {
                seen_here.clear();
                for (local, param) in params.iter() {
                    if param.is_none() {
                        continue;
                    }
                    let local = local.cast_into::<PyString>()?;
                    let local = local.to_str()?;
                    let key = param.as_ptr() as usize;
                    let index = self.names.len() as u32;
                    // A parameter held twice by one module: torch lists the second name only when
                    // asked for duplicates, so it is an alias (tied, counted once, never placed alone).
                    let kind = if seen_here.contains(&key) {
                        NodeKind::ParameterAlias
                    } else {
                        NodeKind::Parameter
                    };
                    seen_here.push(key);
                    // untie: every name is its own storage (aliases inside one module stay one).
                    let own_storage = self.untie && kind == NodeKind::Parameter;
                    let class = self.class_of(&param.get_type())?;
                    let first = if own_storage {
                        None
                    } else {
                        self.param_first.get(&key).copied()
                    };
                    if let Some(first) = first {
                        self.param_repeats.push((first, index));
                        self.push_row(local, node, kind, class, 0, true);
                        continue;
                    }
                    // Under untie the latest first name wins, so an alias finds its own module's.
                    self.param_first.insert(key, index);
                    let size = self.tensor_bits(node, local, &param)?;
                    self.push_row(local, node, kind, class, size, false);
                }
            }

            let buffers = module.getattr(intern!(py, "_buffers"))?;
            let buffers = buffers.cast::<PyDict>()?;
            if !buffers.is_empty() {
                let non_persistent = module.getattr(intern!(py, "_non_persistent_buffers_set"))?;
                for (local, buf) in buffers.iter() {
                    if buf.is_none() {
                        continue;
                    }
                    let kind = if non_persistent.contains(&local)? {
                        NodeKind::NonPersistentBuffer
                    } else {
                        NodeKind::Buffer
                    };
                    let local = local.cast_into::<PyString>()?;
                    let local = local.to_str()?;
                    let key = buf.as_ptr() as usize;
                    let index = self.names.len() as u32;
                    let class = self.class_of(&buf.get_type())?;
                    if let Some(&first) = self.buffer_first.get(&key) {
                        self.buffer_repeats.push((first, index));
                        self.push_row(local, node, kind, class, 0, true);
                    } else {
                        self.buffer_first.insert(key, index);
                        let size = self.tensor_bits(node, local, &buf)?;
                        self.push_row(local, node, kind, class, size, false);
                    }
                }
            }

            let children = module.getattr(intern!(py, "_modules"))?;
            let children = children.cast::<PyDict>()?;
            if mode == Mode::Own || children.is_empty() {
                continue;
            }
            if mode == Mode::First && children.len() == 1 {
                if let Some((local, child)) = children.iter().next() {
                    if !child.is_none() {
                        stack.push(Pending {
                            module: child,
                            parent: node,
                            name: local.cast_into::<PyString>()?,
                            mode: Mode::First,
                        });
                    }
                }
                continue;
            }
            seen_children.clear();
            found.clear();
            for (local, child) in children.iter() {
                let child_key = child.as_ptr() as usize;
                if child.is_none() {
                    continue;
                }
                // accelerate walks named_children(), which lists a module held twice by one parent once.
                if self.like_named_children && !seen_children.insert(child_key) {
                    continue;
                }
                let local = local.cast_into::<PyString>()?;
                let child_mode = if mode == Mode::Copy {
                    // Inside a copy, only the edges of the first walk are followed again.
                    let tree_edge = self.first_node.get(&child_key).is_some_and(|&first| {
                        let first_parent = self.parents[first as usize];
                        first_parent != NO_PARENT
                            && self.module_key[first_parent as usize] == module_key
                            && local.to_str().is_ok_and(|l| l == self.names.get(first as usize))
                    });
                    if tree_edge {
                        Mode::Copy
                    } else {
                        Mode::Own
                    }
                } else {
                    Mode::First
                };
                found.push(Pending {
                    module: child,
                    parent: node,
                    name: local,
                    mode: child_mode,
                });
            }
            stack.extend(found.drain(..).rev());
        }
        Ok(())
    }
}

/// Group repeats by their first node: the groups (first node, then the later ones in walk order), in
/// the order of their first nodes (as a dict keyed by storage lists them).
fn groups_of(repeats: &[(u32, u32)]) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = Vec::new();
    let mut members: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(first, later) in repeats {
        members
            .entry(first)
            .or_insert_with(|| {
                order.push(first);
                vec![first]
            })
            .push(later);
    }
    order.sort_unstable();
    order
        .into_iter()
        .map(|f| members.remove(&f).unwrap_or_default())
        .collect()
}

#[pymethods]
impl ModuleWalk {
    /// Walk `model`. `element_bits(dtype)` gives the bits per element of a dtype; `named_bits(name,
    /// tensor)`, when given, sizes every tensor from its full name instead.
    #[new]
    #[pyo3(signature = (model, element_bits, named_bits = None, untie = false, like_named_children = false))]
    fn new(
        model: &Bound<'_, PyAny>,
        element_bits: &Bound<'_, PyAny>,
        named_bits: Option<&Bound<'_, PyAny>>,
        untie: bool,
        like_named_children: bool,
    ) -> PyResult<ModuleWalk> {
        let py = model.py();
        let mut walker = Walker {
            py,
            element_bits: element_bits.clone(),
            named_bits: named_bits.cloned(),
            untie,
            like_named_children,
            names: NameList::default(),
            parents: Vec::new(),
            kinds: Vec::new(),
            classes: Vec::new(),
            bits: Vec::new(),
            duplicate: Vec::new(),
            module_key: Vec::new(),
            first_node: AddressMap::default(),
            param_first: AddressMap::default(),
            buffer_first: AddressMap::default(),
            param_repeats: Vec::new(),
            buffer_repeats: Vec::new(),
            type_ids: AddressMap::default(),
            types: Vec::new(),
            class_ids: HashMap::new(),
            class_names: Vec::new(),
            per_dtype: AddressMap::default(),
            total_bits: 0,
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| walker.run(model.clone())));
        match outcome {
            Ok(result) => result?,
            Err(payload) => return Err(panic_to_err(payload)),
        }
        let Walker {
            names,
            parents,
            kinds,
            classes,
            bits,
            duplicate,
            param_repeats,
            buffer_repeats,
            types,
            class_names,
            total_bits,
            ..
        } = walker;
        let n = kinds.len();
        Ok(ModuleWalk {
            columns: Some(Columns {
                names,
                parents: Vec::new(),
                kinds,
                classes,
                class_names,
                bits,
                duplicate,
                tie: vec![-1; n],
            }),
            parents,
            param_repeats,
            buffer_repeats,
            total_bits,
            types,
        })
    }

    /// Parameters met under several names: one list of nodes per storage, first name first, in the
    /// order of the first names.
    fn parameter_groups(&self) -> Vec<Vec<u32>> {
        groups_of(&self.param_repeats)
    }

    /// Buffers met under several names (a shared module's), as `parameter_groups`.
    fn buffer_groups(&self) -> Vec<Vec<u32>> {
        groups_of(&self.buffer_repeats)
    }

    /// Every parameter node (aliases included), in `named_parameters(remove_duplicate=False)` order.
    fn parameter_nodes(&self) -> PyResult<Vec<u32>> {
        let columns = self.columns()?;
        Ok((0..columns.kinds.len() as u32)
            .filter(|&i| NodeKind::from_u8(columns.kinds[i as usize]).is_some_and(NodeKind::is_parameter))
            .collect())
    }

    /// Full dotted names of `nodes`.
    fn full_names(&self, nodes: Vec<u32>) -> PyResult<Vec<String>> {
        let columns = self.columns()?;
        let len = columns.kinds.len();
        nodes
            .into_iter()
            .map(|node| {
                if node as usize >= len {
                    return Err(pyo3::exceptions::PyIndexError::new_err(format!(
                        "node {node} is out of range ({len} nodes)"
                    )));
                }
                let mut parts = Vec::new();
                let mut at = node;
                while at != 0 && at != NO_PARENT {
                    parts.push(columns.names.get(at as usize));
                    at = self.parents[at as usize];
                }
                parts.reverse();
                Ok(parts.join("."))
            })
            .collect()
    }

    /// Bits of every tensor, each storage once (may exceed 2^64).
    #[getter]
    fn total_bits(&self) -> u128 {
        self.total_bits
    }

    /// The Python types of the modules, parameters and buffers met.
    fn types<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyType>> {
        self.types.iter().map(|t| t.bind(py).clone()).collect()
    }

    /// Build the tree with these tie groups (lists of nodes; numbered in the order given). The walk's
    /// columns move into the tree: a second call raises.
    fn build(&mut self, py: Python<'_>, tie_groups: Vec<Vec<u32>>) -> PyResult<Tree> {
        let mut columns = self
            .columns
            .take()
            .ok_or_else(|| PyTypeError::new_err("this ModuleWalk was already built into a Tree"))?;
        let parents = std::mem::take(&mut self.parents);
        let tree = guarded(py, move || {
            columns.parents = parents
                .into_iter()
                .map(|p| if p == NO_PARENT { -1 } else { i64::from(p) })
                .collect();
            for (number, nodes) in tie_groups.into_iter().enumerate() {
                for node in nodes {
                    if let Some(slot) = columns.tie.get_mut(node as usize) {
                        *slot = number as i64;
                    }
                }
            }
            ModuleTree::from_columns(columns)
        })?;
        Ok(Tree::wrap(tree))
    }
}

impl ModuleWalk {
    fn columns(&self) -> PyResult<&Columns<NameList>> {
        self.columns
            .as_ref()
            .ok_or_else(|| PyTypeError::new_err("this ModuleWalk was already built into a Tree"))
    }
}
