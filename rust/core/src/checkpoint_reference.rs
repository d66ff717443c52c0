//! A plain reference checkpoint tree builder (a generic map per path component, an allocating sibling
//! sort), for tests only: the faster builder in `checkpoint_tree.rs` and the sibling order in
//! `natural_order.rs` must give the very same trees, errors and order.

use crate::checkpoint_tree::{CheckpointTreeOptions, BLOCK_CLASS};
use crate::error::{PlacementError, Result};
use crate::safetensors::{dtype_bits, is_floating, Checkpoint, TensorEntry};
use crate::tree::{ModuleTree, NodeKind, TreeColumns};
use std::collections::{HashMap, HashSet};

#[derive(Default)]
struct Node {
    children: Vec<(String, usize)>,
    tensor: Option<(u64, usize)>, // (bits, tie group or usize::MAX)
    duplicate: bool,
}

/// Where a sibling goes in definition order: embeddings, containers, norms, heads.
pub(crate) fn rank(name: &str) -> (u8, u64) {
    if let Ok(n) = name.parse::<u64>() {
        return (2, n);
    }
    let lower = name.to_ascii_lowercase();
    let r = if lower.contains("embed") || ["wte", "wpe", "shared", "word_embeddings"].contains(&lower.as_str()) {
        0
    } else if lower == "encoder" {
        1
    } else if lower.contains("norm") || lower.starts_with("ln_f") {
        3
    } else if ["lm_head", "head", "output", "classifier", "score"].contains(&lower.as_str()) {
        4
    } else {
        2
    };
    (r, 0)
}

/// Name order within a rank: digit runs compare as numbers ("layer2" before "layer10").
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (x, y) = (chunks(a), chunks(b));
    for ((dx, cx), (dy, cy)) in x.iter().zip(&y) {
        let order = if *dx && *dy {
            cx.len().cmp(&cy.len()).then_with(|| cx.cmp(cy)) // same digits, no overflow on long runs
        } else {
            cx.cmp(cy)
        };
        if order != std::cmp::Ordering::Equal {
            return order;
        }
    }
    x.len().cmp(&y.len())
}

fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    p.len() == n.len() && p.iter().zip(&n).all(|(a, b)| *a == "*" || a == b)
}

/// Resolve `*suffix` names of tie groups against the checkpoint's tensor names.
fn resolve_ties(entries: &[TensorEntry], groups: &[Vec<String>]) -> Vec<Vec<String>> {
    let mut sorted: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    sorted.sort_unstable();
    groups
        .iter()
        .map(|group| {
            let mut seen = std::collections::HashSet::new();
            group
                .iter()
                .filter_map(|name| match name.strip_prefix('*') {
                    Some(suffix) => sorted.iter().find(|n| n.ends_with(suffix)).map(|n| n.to_string()),
                    None => Some(name.clone()),
                })
                .filter(|n| seen.insert(n.clone()))
                .collect()
        })
        .collect()
}

/// The tensor a name is the quantization state of: bitsandbytes saves `proj.weight.absmax`,
/// `proj.weight.quant_map`, `proj.weight.quant_state.bitsandbytes__nf4` beside `proj.weight`. No module
/// holds such a name; its bytes load with (and are counted in) the tensor it nests under.
fn state_holder<'a>(name: &'a str, tensors: &HashMap<&str, &TensorEntry>) -> Option<&'a str> {
    name.match_indices('.')
        .map(|(dot, _)| &name[..dot])
        .find(|prefix| tensors.contains_key(prefix))
}

/// A tensor name that cannot be a module path, reported against the file that holds it.
fn bad_name(file: &std::path::Path, reason: String) -> PlacementError {
    PlacementError::Checkpoint {
        path: file.display().to_string(),
        reason,
    }
}

/// The module tree implied by a checkpoint's tensor names: modules from the dotted prefixes, blocks
/// (class [`BLOCK_CLASS`]) where the patterns or the config's layer counts say, ties from the groups.
pub fn tree_from_checkpoint(checkpoint: &Checkpoint, options: &CheckpointTreeOptions) -> Result<ModuleTree> {
    let entries = &checkpoint.entries[..];
    let tie_groups = resolve_ties(entries, &options.tie_groups);
    let mut nodes: Vec<Node> = vec![Node::default()];
    let mut child_of: HashMap<(usize, String), usize> = HashMap::with_capacity(entries.len() * 2);
    // `file` is the file holding the tensor, or the checkpoint itself for a tied name it lacks.
    let present: HashMap<&str, &TensorEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut insert = |name: &str, file: &std::path::Path, tensor: (u64, usize), duplicate: bool| -> Result<()> {
        let mut at = 0;
        for part in name.split('.') {
            if part.is_empty() {
                return Err(bad_name(
                    file,
                    format!(
                        "tensor name {name:?} has an empty component (\"a..b\", \".a\", \"a.\" or \"\"), so it \
                         names no module; rename the tensor in the checkpoint"
                    ),
                ));
            }
            if nodes[at].tensor.is_some() {
                return Err(bad_name(
                    file,
                    format!("tensor {name:?} nests under another tensor, which no module can hold"),
                ));
            }
            let key = (at, part.to_string());
            at = match child_of.get(&key) {
                Some(i) => *i,
                None => {
                    nodes.push(Node::default());
                    let i = nodes.len() - 1;
                    nodes[at].children.push((part.to_string(), i));
                    child_of.insert(key, i);
                    i
                }
            };
        }
        if nodes[at].tensor.is_some() || !nodes[at].children.is_empty() {
            return Err(bad_name(
                file,
                format!("tensor {name:?} is also the name of a module (other tensors nest under it)"),
            ));
        }
        nodes[at].tensor = Some(tensor);
        nodes[at].duplicate = duplicate;
        Ok(())
    };

    let mut group_of: HashMap<&str, usize> = HashMap::new();
    for (g, group) in tie_groups.iter().enumerate() {
        for name in group {
            group_of.insert(name, g);
        }
    }
    let mut group_counted = vec![false; tie_groups.len()];
    let sized = |e: &TensorEntry| {
        let own = dtype_bits(&e.dtype).expect("validated when read");
        let bits = match options.dtype_bits {
            Some(target) if is_floating(&e.dtype) => own.min(target),
            _ => own,
        };
        e.numel() * bits
    };
    let mut state_bits: HashMap<&str, u64> = HashMap::new();
    for e in entries {
        if let Some(holder) = state_holder(&e.name, &present) {
            *state_bits.entry(holder).or_default() += sized(e);
        }
    }
    for e in entries {
        if state_holder(&e.name, &present).is_some() {
            continue; // counted with its tensor
        }
        let bits = sized(e) + state_bits.get(e.name.as_str()).copied().unwrap_or(0);
        let group = group_of.get(e.name.as_str()).copied();
        let duplicate = group.is_some_and(|g| std::mem::replace(&mut group_counted[g], true));
        insert(
            &e.name,
            checkpoint.file_of(e),
            (bits, group.unwrap_or(usize::MAX)),
            duplicate,
        )?;
    }
    for (g, group) in tie_groups.iter().enumerate() {
        if !group.iter().any(|n| present.contains_key(n.as_str())) {
            continue; // none of it is in this checkpoint
        }
        for name in group.iter().filter(|n| !present.contains_key(n.as_str())) {
            insert(name, &checkpoint.path, (0, g), true)?;
        }
    }
    emit(&nodes, options)
}

/// The modules whose children are the model's numbered layers, each kept whole as a block.
///
/// A numbered list is a module whose children are all modules named 0, 1, 2, ...; only the outermost
/// ones count (the experts list inside a layer is part of that layer). With config layer counts, the
/// layer lists are every outermost list with at least as many entries as the smallest count: equal for
/// a plain decoder stack (and T5's encoder.block / decoder.block), more when the checkpoint carries
/// extra layers past `num_hidden_layers`, such as DeepSeek-V3's multi-token-prediction layer 61. When
/// none is that long (a truncated checkpoint, a single shard, layers shared ALBERT-style), the longest
/// outermost list is taken. Without config counts, no list is guessed (block patterns still apply).
fn layer_lists(nodes: &[Node], counts: &[u64]) -> HashSet<usize> {
    let Some(&fewest) = counts.iter().min() else {
        return HashSet::new();
    };
    let mut outermost: Vec<(usize, u64)> = Vec::new(); // (node, entries), in a fixed walk order
    let mut stack = vec![0];
    while let Some(node) = stack.pop() {
        let modules: Vec<&(String, usize)> = nodes[node]
            .children
            .iter()
            .filter(|(_, c)| nodes[*c].tensor.is_none())
            .collect();
        let numbered = !modules.is_empty()
            && modules.len() == nodes[node].children.len()
            && modules.iter().all(|(name, _)| name.parse::<u64>().is_ok());
        if numbered {
            outermost.push((node, modules.len() as u64));
        } else {
            stack.extend(modules.iter().rev().map(|(_, c)| *c));
        }
    }
    let long_enough: HashSet<usize> = outermost
        .iter()
        .filter(|(_, entries)| *entries >= fewest)
        .map(|(node, _)| *node)
        .collect();
    if !long_enough.is_empty() {
        return long_enough;
    }
    // The longest; the first met among equals.
    let longest = outermost.iter().rev().max_by_key(|(_, entries)| *entries);
    longest.map(|(node, _)| *node).into_iter().collect()
}

/// Pre-order columns: each module, its tensors, then its child modules (siblings in definition order).
fn emit(nodes: &[Node], options: &CheckpointTreeOptions) -> Result<ModuleTree> {
    let layer_lists = layer_lists(nodes, &options.layer_counts);
    let mut c = TreeColumns {
        class_names: vec!["Module".into(), BLOCK_CLASS.into(), "Parameter".into()],
        ..Default::default()
    };
    // Tie groups actually used, numbered densely in the order first met.
    let mut tie_ids: HashMap<usize, i64> = HashMap::new();
    // (node, parent row, local name, full name, is a block)
    let mut stack: Vec<(usize, i64, String, String, bool)> = vec![(0, -1, String::new(), String::new(), false)];
    while let Some((node, parent, local, full, is_block)) = stack.pop() {
        let index = c.names.len() as i64;
        c.names.push(local);
        c.parents.push(parent);
        c.kinds.push(NodeKind::Module as u8);
        c.classes.push(u32::from(is_block));
        c.bits.push(0);
        c.duplicate.push(false);
        c.tie.push(-1);
        let mut children: Vec<&(String, usize)> = nodes[node].children.iter().collect();
        children.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then_with(|| natural_cmp(&a.0, &b.0)));
        let layer_list = layer_lists.contains(&node);
        for (name, child) in &children {
            if let Some((bits, group)) = nodes[*child].tensor {
                let tie = if group == usize::MAX {
                    -1
                } else {
                    let next = tie_ids.len() as i64;
                    *tie_ids.entry(group).or_insert(next)
                };
                c.names.push(name.clone());
                c.parents.push(index);
                c.kinds.push(NodeKind::Parameter as u8);
                c.classes.push(2);
                c.bits.push(bits);
                c.duplicate.push(nodes[*child].duplicate);
                c.tie.push(tie);
            }
        }
        for (name, child) in children.iter().rev() {
            if nodes[*child].tensor.is_none() {
                let child_full = if full.is_empty() {
                    name.clone()
                } else {
                    format!("{full}.{name}")
                };
                let block = layer_list || options.block_patterns.iter().any(|p| matches(p, &child_full));
                stack.push((*child, index, name.clone(), child_full, block));
            }
        }
    }
    // A group with a single name present is no tie at all.
    let mut members: HashMap<i64, usize> = HashMap::new();
    for t in &c.tie {
        if *t >= 0 {
            *members.entry(*t).or_default() += 1;
        }
    }
    let mut renumber: HashMap<i64, i64> = HashMap::new();
    for t in c.tie.iter_mut().filter(|t| **t >= 0) {
        if members[t] < 2 {
            *t = -1;
        } else {
            let next = renumber.len() as i64;
            *t = *renumber.entry(*t).or_insert(next);
        }
    }
    ModuleTree::from_columns(c)
}
