//! Cutting a tree into placement blocks: the finest pieces that may go to different devices.
//!
//! A block is a module that may not be split (no child modules, or a no-split class) or a tensor that
//! sits directly in a module that is split. Blocks partition every tensor of the tree and are listed in
//! model (pre-order) order, so "contiguous runs of blocks" means "consecutive layers".

use crate::error::{PlacementError, Result};
use crate::tree::{ModuleTree, NodeId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub node: NodeId,
    /// Bits of tensors counted in this block (tied storage counted once, at its first name).
    pub bits: u64,
    /// Bits of buffers in this block (kept on the execution device when the block is offloaded and
    /// buffers are not offloaded).
    pub buffer_bits: u64,
}

/// Whether `node` is kept whole: a tensor, a no-split class, or a module none of whose child modules
/// holds a tensor (children without weights, such as activation functions, give nothing to split off —
/// and a checkpoint, which only names tensors, could not see them). The root is never kept whole for
/// its class: a model listing its own class in `_no_split_modules` (it does so for its nested copies)
/// would otherwise become one block that fits nowhere; accelerate never treats the root as atomic.
fn is_atomic(tree: &ModuleTree, no_split: &[bool], node: NodeId) -> bool {
    tree.is_tensor(node)
        || (node != tree.root() && no_split[tree.class_id(node) as usize])
        || !tree.child_modules(node).any(|child| tree.holds_tensors(child))
}

/// Per class id: whether the class is listed in `no_split_module_classes`.
pub fn no_split_mask(tree: &ModuleTree, no_split_classes: &[String]) -> Vec<bool> {
    tree.class_names()
        .iter()
        .map(|c| no_split_classes.iter().any(|n| n == c))
        .collect()
}

/// The blocks of `tree`, in model order. Nodes are numbered in pre-order (a subtree is `node..end`), so
/// one scan finds them: a node reached is a block if it is kept whole (and the scan skips its subtree),
/// else the scan enters it. A split module's tensors are blocks, as tensors are kept whole.
pub fn cut_blocks(tree: &ModuleTree, no_split: &[bool]) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut node = tree.root();
    while (node as usize) < tree.len() {
        if is_atomic(tree, no_split, node) {
            blocks.push(make_block(tree, node));
            node = tree.end(node);
        } else {
            node += 1;
        }
    }
    blocks
}

/// Spread per-node values (runtime memory, compute) over blocks: a value on a node inside (or at) a block
/// goes to that block; a value on a module that was split goes to the first block under it. Without
/// values the list is empty (read it with [`value_of`]: every block has 0).
pub fn attach_to_blocks(tree: &ModuleTree, blocks: &[Block], values: &[(NodeId, u64)]) -> Result<Vec<u64>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let mut per_block = vec![0u64; blocks.len()];
    for &(node, value) in values {
        if node as usize >= tree.len() {
            return Err(PlacementError::InvalidTree(format!(
                "a value names node {node}, but the tree has {}",
                tree.len()
            )));
        }
        // The last block starting at or before `node` contains it, unless `node` is a split module.
        let at_or_before = blocks.partition_point(|b| b.node <= node);
        let index = match at_or_before.checked_sub(1) {
            Some(i) if blocks[i].node == node || tree.is_strict_descendant(node, blocks[i].node) => i,
            _ if at_or_before < blocks.len() && blocks[at_or_before].node < tree.end(node) => at_or_before,
            _ => continue, // a module without tensors: nothing of it is placed
        };
        per_block[index] = per_block[index].saturating_add(value);
    }
    Ok(per_block)
}

/// Block `i`'s value in a list made by [`attach_to_blocks`].
pub fn value_of(per_block: &[u64], i: usize) -> u64 {
    per_block.get(i).copied().unwrap_or(0)
}

fn make_block(tree: &ModuleTree, node: NodeId) -> Block {
    let buffer_bits = (node..tree.end(node))
        .filter(|&i| tree.kind(i).is_buffer())
        .map(|i| tree.own_bits(i))
        .sum();
    Block {
        node,
        bits: tree.subtree_bits(node),
        buffer_bits,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tree::TreeBuilder;
    use proptest::prelude::*;

    /// A tree from `(depth pick, what, bits)` steps: modules of a few classes, parameters, buffers (some
    /// empty), each under the open module at the picked depth (closing the deeper ones: pre-order).
    pub(crate) fn random_tree(ops: &[(usize, u8, u64)]) -> ModuleTree {
        let mut b = TreeBuilder::new("Root");
        let mut open = vec![0];
        for (i, &(pick, what, bits)) in ops.iter().enumerate() {
            open.truncate(pick % open.len() + 1);
            let parent = *open.last().unwrap();
            let name = format!("n{i}");
            match what {
                0 => open.push(b.module(parent, &name, "Block")),
                1 => open.push(b.module(parent, &name, "Linear")),
                2 => {
                    b.param(parent, &name, bits);
                }
                _ => {
                    b.buffer(parent, &name, bits);
                }
            }
        }
        b.build().unwrap()
    }

    #[test]
    fn blocks_partition_the_tensors_in_model_order() {
        let mut b = TreeBuilder::new("Net");
        b.param(0, "scale", 4);
        let layers = b.module(0, "layers", "ModuleList");
        for i in 0..2 {
            let l = b.module(layers, &i.to_string(), "Layer");
            b.buffer(l, "mask", 2);
            let a = b.module(l, "attn", "Linear");
            b.param(a, "w", 10);
        }
        let t = b.build().unwrap();
        let cut = |classes: &[&str]| -> Vec<String> {
            let classes: Vec<String> = classes.iter().map(|s| s.to_string()).collect();
            cut_blocks(&t, &no_split_mask(&t, &classes))
                .iter()
                .map(|b| t.name(b.node).to_string())
                .collect()
        };
        assert_eq!(
            cut(&[]),
            vec![
                "scale",
                "layers.0.mask",
                "layers.0.attn",
                "layers.1.mask",
                "layers.1.attn"
            ]
        );
        assert_eq!(cut(&["Layer"]), vec!["scale", "layers.0", "layers.1"]);
        let blocks = cut_blocks(&t, &no_split_mask(&t, &["Layer".to_string()]));
        assert_eq!(blocks.iter().map(|b| b.bits).sum::<u64>(), t.subtree_bits(0));
        assert_eq!(blocks[1].buffer_bits, 16);
    }

    /// The cut as first written: a walk down the child lists from the root, sorted afterwards.
    fn cut_by_walking(tree: &ModuleTree, no_split: &[bool]) -> Vec<Block> {
        let mut blocks = Vec::new();
        let mut stack = vec![tree.root()];
        while let Some(node) = stack.pop() {
            if is_atomic(tree, no_split, node) {
                blocks.push(make_block(tree, node));
                continue;
            }
            for &child in tree.children(node) {
                if tree.is_tensor(child) {
                    blocks.push(make_block(tree, child));
                }
            }
            for child in tree.child_modules(node).collect::<Vec<_>>().into_iter().rev() {
                stack.push(child);
            }
        }
        blocks.sort_by_key(|b| b.node);
        blocks
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn the_scan_cuts_as_the_walk_does(ops in prop::collection::vec((0usize..64, 0u8..4, 0u64..5), 1..40), mask in any::<u8>()) {
            let tree = random_tree(&ops);
            let no_split: Vec<bool> = (0..tree.class_names().len()).map(|c| mask & (1 << (c % 8)) != 0).collect();
            prop_assert_eq!(cut_blocks(&tree, &no_split), cut_by_walking(&tree, &no_split));
        }
    }

    #[test]
    fn the_root_is_split_even_when_its_class_is_no_split() {
        // vibevoice's acoustic tokenizer lists its own class in `_no_split_modules`.
        let mut b = TreeBuilder::new("Tokenizer");
        for name in ["encoder", "decoder"] {
            let m = b.module(0, name, "Tokenizer");
            let l = b.module(m, "proj", "Linear");
            b.param(l, "w", 10);
        }
        let t = b.build().unwrap();
        let blocks = cut_blocks(&t, &no_split_mask(&t, &["Tokenizer".to_string()]));
        let names: Vec<&str> = blocks.iter().map(|b| t.name(b.node)).collect();
        assert_eq!(names, vec!["encoder", "decoder"]);
    }
}
