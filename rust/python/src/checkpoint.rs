//! Checkpoint functions of `devicemap._core`: a size tree from safetensors headers, and the tensors
//! those headers list (for loading). Both go through the core's one checkpoint reader.

use crate::errors::guarded;
use crate::Tree;
use devicemap_core::checkpoint_tree::CheckpointTreeOptions;
use devicemap_core::safetensors::read_checkpoint;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use std::collections::HashMap;
use std::sync::Arc;

/// A size tree from a safetensors checkpoint's headers (a file, an index, or a folder); no tensor data
/// is read. Block modules get the class `CheckpointBlock`.
#[pyfunction]
#[pyo3(signature = (path, block_patterns, layer_counts, tie_groups, dtype_bits = None))]
pub fn tree_from_checkpoint(
    py: Python<'_>,
    path: std::path::PathBuf,
    block_patterns: Vec<String>,
    layer_counts: Vec<u64>,
    tie_groups: Vec<Vec<String>>,
    dtype_bits: Option<u64>,
) -> PyResult<Tree> {
    let tree = guarded(py, move || {
        let checkpoint = read_checkpoint(&path)?;
        let options = CheckpointTreeOptions {
            block_patterns,
            layer_counts,
            tie_groups,
            dtype_bits,
        };
        devicemap_core::checkpoint_tree::tree_from_checkpoint(&checkpoint, &options)
    })?;
    Ok(Tree { inner: Arc::new(tree) })
}

/// Tensors of a checkpoint's headers: (name, dtype, shape, file path, begin, end) with data offsets.
///
/// The headers are read without the GIL. Each file path and dtype becomes one Python string shared by
/// all its tensors (a checkpoint has few files and dtypes but tens of thousands of tensors).
#[pyfunction]
pub fn checkpoint_tensors(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Bound<'_, PyList>> {
    // The same reader as planning: a file plan_checkpoint refuses is refused here too.
    let checkpoint = guarded(py, move || read_checkpoint(&path))?;
    let files: Vec<Bound<'_, PyString>> = checkpoint
        .files
        .iter()
        .map(|f| PyString::new(py, &f.display().to_string()))
        .collect();
    let mut dtypes: HashMap<&str, Bound<'_, PyString>> = HashMap::new();
    let mut rows = Vec::with_capacity(checkpoint.entries.len());
    for e in &checkpoint.entries {
        let dtype = dtypes
            .entry(e.dtype.as_str())
            .or_insert_with(|| PyString::new(py, &e.dtype))
            .clone();
        let file = files[e.file].clone();
        rows.push((e.name.as_str(), dtype, &e.shape, file, e.begin, e.end).into_pyobject(py)?);
    }
    PyList::new(py, rows)
}
