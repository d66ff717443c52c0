//! The model-dependent numbers of accelerate 1.x's `get_balanced_memory`: the per-GPU budget it hands
//! to `infer_auto_device_map` for "balanced" and "balanced_low_0". The dictionary bookkeeping around
//! them (min with the user's values, the low-zero share) stays in Python, where the numeric types of
//! the user's values are kept as they are.

use crate::tree::{ModuleTree, NodeId};

/// The model-dependent numbers of `get_balanced_memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalancedBudget {
    /// `module_sizes[""]`: the whole model, in bits.
    pub total_bits: u64,
    /// `model size // num_gpus + 1.25 * max(largest no-split block, mean leaf module)`, in bits.
    pub per_gpu_bits: u64,
}

/// `share_devices` is accelerate's divisor (the number of GPUs, minus one for low_zero).
pub fn balanced_budget(tree: &ModuleTree, no_split: &[String], share_devices: u64) -> BalancedBudget {
    let total_bits = tree.subtree_bits(tree.root());
    let share = share_devices.max(1);
    // Floor division in bytes, which may be fractional (bool tensors): floor(total / n) whole bytes.
    let per_share_bits = total_bits / (8 * share) * 8;

    // The first module of each no-split class, in the order accelerate's module_sizes dict lists keys.
    let mut block_bits: u64 = 0;
    if !no_split.is_empty() {
        let mut seen_class = vec![false; tree.class_names().len()];
        let wanted: Vec<bool> = tree.class_names().iter().map(|c| no_split.contains(c)).collect();
        for key in module_sizes_key_order(tree) {
            let class = tree.class_id(key) as usize;
            if wanted[class] && !seen_class[class] {
                seen_class[class] = true;
                block_bits = block_bits.max(tree.subtree_bits(key));
            }
        }
    }

    // Mean size of the "final" modules: counted modules none of whose child modules is counted.
    let (mut leaf_bits, mut leaves) = (0u64, 0u64);
    for id in 1..tree.len() as NodeId {
        if !tree.is_tensor(id) && tree.is_counted(id) && !tree.child_modules(id).any(|c| tree.is_counted(c)) {
            leaf_bits += tree.subtree_bits(id);
            leaves += 1;
        }
    }
    let mean_leaves = ((leaf_bits as f64 / 8.0) / leaves.max(1) as f64).trunc();
    let block_bytes = block_bits as f64 / 8.0;
    let buffer = (1.25 * block_bytes.max(mean_leaves)).trunc() as u64;
    BalancedBudget {
        total_bits,
        per_gpu_bits: per_share_bits + buffer * 8,
    }
}

/// Keys of accelerate's `compute_module_sizes` dict in insertion order, root excluded: every prefix of
/// each counted parameter (in `named_parameters` order), then of each counted buffer.
fn module_sizes_key_order(tree: &ModuleTree) -> Vec<NodeId> {
    let mut seen = vec![false; tree.len()];
    let mut order = Vec::new();
    let params = (0..tree.len() as NodeId).filter(|&i| tree.kind(i).is_parameter());
    let buffers = (0..tree.len() as NodeId).filter(|&i| tree.kind(i).is_buffer());
    for t in params.chain(buffers) {
        if tree.is_duplicate(t) {
            continue;
        }
        for node in tree.ancestors_top_down(t).into_iter().chain(std::iter::once(t)) {
            if !seen[node as usize] {
                seen[node as usize] = true;
                order.push(node);
            }
        }
    }
    order
}
