//! A ModuleTree from a checkpoint's tensor names alone (no model instantiated).
//!
//! Names give the module hierarchy ("model.layers.3.mlp.up_proj.weight"). What names do not give is
//! worked out as transformers models are laid out: the definition order of siblings (embeddings, then
//! encoder/decoder/layers, then norms, then output heads; numbered layers in numeric order), which
//! modules are unsplittable blocks (every entry of the model's layer lists, see [`layer_lists`], and
//! names matching a pattern), and tied weights (missing tied names are added so the map covers them).

use crate::error::{PlacementError, Result};
use crate::natural_order::{natural_cmp, rank};
use crate::safetensors::{dtype_bits, is_floating, Checkpoint, TensorEntry};
use crate::tree::{full_name_budget, ModuleTree, NodeKind, TreeColumns};
use foldhash::{HashMap as FoldMap, HashMapExt};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The class given to block modules; pass it as a no-split class when planning.
pub const BLOCK_CLASS: &str = "CheckpointBlock";

/// How to group a checkpoint's tensors into a tree.
#[derive(Debug, Clone, Default)]
pub struct CheckpointTreeOptions {
    /// Globs over dotted module names, `*` standing for one name component (e.g. "model.layers.*").
    pub block_patterns: Vec<String>,
    /// Layer counts from the config (num_hidden_layers, num_decoder_layers, ...): they pick the
    /// layer lists whose entries are blocks (see [`layer_lists`]). Empty: no layer list is guessed.
    pub layer_counts: Vec<u64>,
    /// Tensor names sharing one storage; the first name present is counted, missing names are added.
    /// A name starting with `*` stands for the first tensor (in name order) ending with the rest, e.g.
    /// `"*embed_tokens.weight"` for whichever input embedding the checkpoint has.
    pub tie_groups: Vec<Vec<String>>,
    /// Size floating tensors as this many bits per element at most (accelerate's dtype rule).
    pub dtype_bits: Option<u64>,
}

/// No tie group.
const UNTIED: usize = usize::MAX;
/// No node (the end of a trie sibling list).
const NONE: u32 = u32::MAX;
/// Children a lookup scans (newest first) before it asks the map; wider nodes are in the map.
const SCANNED: u32 = 8;

/// A name component of the checkpoint, as a node of the module tree being rebuilt.
///
/// Every dotted prefix of every tensor name (and of added tied names) gets a node; only the ones a
/// placed tensor runs through are `placed` and become part of the tree. The others are the paths of
/// quantization states, which load with the tensor they nest under.
struct Node<'a> {
    /// The component (the local name in the tree).
    name: &'a str,
    parent: u32,
    /// Placed children as a list in the order tensors were placed (the order [`layer_lists`] walks):
    /// the first and last child, the next sibling ([`NONE`]: none). Links, not a Vec per node.
    first_placed: u32,
    last_placed: u32,
    next_placed: u32,
    /// Trie links: the newest child, the previous sibling, how many children ([`NONE`]: none).
    last_child: u32,
    prev_sibling: u32,
    child_count: u32,
    /// (bits, tie group or [`UNTIED`]) of the tensor placed here.
    tensor: Option<(u64, usize)>,
    duplicate: bool,
    /// A tensor of the checkpoint has this full name (placed or not).
    named: bool,
    placed: bool,
    /// Bits of the quantization states held by the tensor of this name.
    state_bits: u64,
}

impl<'a> Node<'a> {
    fn new(name: &'a str, parent: u32) -> Self {
        Node {
            name,
            parent,
            first_placed: NONE,
            last_placed: NONE,
            next_placed: NONE,
            last_child: NONE,
            prev_sibling: NONE,
            child_count: 0,
            tensor: None,
            duplicate: false,
            named: false,
            placed: false,
            state_bits: 0,
        }
    }
}

/// The name components of a checkpoint as a trie of [`Node`]s, names borrowed from the checkpoint.
struct Trie<'a> {
    nodes: Vec<Node<'a>>,
    /// The children of nodes with more than [`SCANNED`] children: name lookups there would scan long
    /// sibling lists. Narrow nodes (most: a module and its `weight`) never touch the map, whose random
    /// accesses miss the cache. foldhash: several times faster than SipHash here, still seeded per process.
    wide_children: FoldMap<(u32, &'a str), u32>,
    /// The last name looked up, and its node path with the byte offset where each component ends:
    /// consecutive names share most of their prefix.
    last_name: &'a str,
    last_path: Vec<(u32, usize)>,
}

impl<'a> Trie<'a> {
    fn with_capacity(names: usize) -> Self {
        // About two new components per tensor name: its leaf and a module above it.
        let mut nodes = Vec::with_capacity(names * 5 / 2);
        nodes.push(Node::new("", NONE));
        Trie {
            nodes,
            wide_children: FoldMap::new(),
            last_name: "",
            last_path: Vec::new(),
        }
    }

    /// The node of a dotted name, created with its prefixes when missing.
    ///
    /// The components it shares with the previous name are found with one byte comparison of the two
    /// names (sorted names share most of their prefix), not one string comparison per component.
    fn node_of(&mut self, name: &'a str) -> u32 {
        let common = name
            .bytes()
            .zip(self.last_name.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(name.len().min(self.last_name.len()));
        // A component of the last name is shared when both names hold it and then end or go on with '.'.
        let ends_here = |end: usize| name.len() == end || name.as_bytes()[end] == b'.';
        let shared = self
            .last_path
            .iter()
            .take_while(|(_, end)| {
                *end < common || (*end == common && self.last_name.len() == common && ends_here(common))
            })
            .count();
        self.last_path.truncate(shared);
        let (mut at, mut start) = match self.last_path.last() {
            Some(&(node, end)) => (node, end + 1),
            None => (0, 0),
        };
        if start <= name.len() {
            for part in name[start..].split('.') {
                at = self.child(at, part);
                start += part.len();
                self.last_path.push((at, start));
                start += 1;
            }
        }
        self.last_name = name;
        at
    }

    /// The module tree keeps every node's full dotted name: refuse names nested so deep that those would
    /// take memory quadratic in the depth (one 80k-component name of a 160 KB header took 6 GB).
    fn check_depth(&self, path: &Path, entries: &[TensorEntry]) -> Result<()> {
        let parents = self
            .nodes
            .iter()
            .map(|n| Some(n.parent as usize).filter(|&p| n.parent != NONE && p > 0));
        let lens = self.nodes.iter().map(|n| n.name.len());
        full_name_budget(parents, lens).map_err(|deep| {
            let name = entries.iter().map(|e| &e.name).max_by_key(|n| n.matches('.').count());
            let shown: String = name.map_or("", |n| n.as_str()).chars().take(80).collect();
            bad_name(path, format!("tensor names like {shown:?}…: {deep}"))
        })
    }

    fn child(&mut self, parent: u32, part: &'a str) -> u32 {
        if let Some(node) = self.find_child(parent, part) {
            return node;
        }
        let node = self.nodes.len() as u32;
        let mut created = Node::new(part, parent);
        let above = &mut self.nodes[parent as usize];
        created.prev_sibling = std::mem::replace(&mut above.last_child, node);
        above.child_count += 1;
        let count = above.child_count;
        self.nodes.push(created);
        if count == SCANNED + 1 {
            // Just became wide: every child goes into the map.
            let mut sibling = node;
            while sibling != NONE {
                let name = self.nodes[sibling as usize].name;
                self.wide_children.insert((parent, name), sibling);
                sibling = self.nodes[sibling as usize].prev_sibling;
            }
        } else if count > SCANNED + 1 {
            self.wide_children.insert((parent, part), node);
        }
        node
    }

    fn find_child(&self, parent: u32, part: &str) -> Option<u32> {
        let mut sibling = self.nodes[parent as usize].last_child;
        for _ in 0..SCANNED {
            if sibling == NONE {
                return None;
            }
            if self.nodes[sibling as usize].name == part {
                return Some(sibling);
            }
            sibling = self.nodes[sibling as usize].prev_sibling;
        }
        if sibling == NONE {
            return None;
        }
        self.wide_children.get(&(parent, part)).copied()
    }

    /// The node of a name some tensor of the checkpoint has.
    fn named(&self, name: &str) -> Option<u32> {
        let mut at = 0u32;
        for part in name.split('.') {
            at = self.find_child(at, part)?;
        }
        self.nodes[at as usize].named.then_some(at)
    }

    /// The tensor a name is the quantization state of: bitsandbytes saves `proj.weight.absmax`,
    /// `proj.weight.quant_map`, `proj.weight.quant_state.bitsandbytes__nf4` beside `proj.weight`. No
    /// module holds such a name; its bytes load with (and are counted in) the shortest tensor name it
    /// nests under.
    fn state_holder(&self, node: u32) -> Option<u32> {
        let mut holder = None;
        let mut at = self.nodes[node as usize].parent;
        while at != 0 {
            if self.nodes[at as usize].named {
                holder = Some(at);
            }
            at = self.nodes[at as usize].parent;
        }
        holder
    }

    /// Place a tensor at `leaf`: its path becomes modules of the tree. `path` is scratch space.
    fn place(
        &mut self,
        leaf: u32,
        full_name: &str,
        file: &Path,
        tensor: (u64, usize),
        duplicate: bool,
        path: &mut Vec<u32>,
    ) -> Result<()> {
        path.clear();
        let mut at = leaf;
        while at != 0 {
            path.push(at);
            at = self.nodes[at as usize].parent;
        }
        let mut parent = 0u32;
        for &node in path.iter().rev() {
            if self.nodes[node as usize].name.is_empty() {
                return Err(bad_name(
                    file,
                    format!(
                        "tensor name {full_name:?} has an empty component (\"a..b\", \".a\", \"a.\" or \"\"), so \
                         it names no module; rename the tensor in the checkpoint"
                    ),
                ));
            }
            if self.nodes[parent as usize].tensor.is_some() {
                return Err(bad_name(
                    file,
                    format!("tensor {full_name:?} nests under another tensor, which no module can hold"),
                ));
            }
            if !std::mem::replace(&mut self.nodes[node as usize].placed, true) {
                let last = std::mem::replace(&mut self.nodes[parent as usize].last_placed, node);
                if last == NONE {
                    self.nodes[parent as usize].first_placed = node;
                } else {
                    self.nodes[last as usize].next_placed = node;
                }
            }
            parent = node;
        }
        let leaf_node = &mut self.nodes[leaf as usize];
        if leaf_node.tensor.is_some() || leaf_node.first_placed != NONE {
            return Err(bad_name(
                file,
                format!("tensor {full_name:?} is also the name of a module (other tensors nest under it)"),
            ));
        }
        leaf_node.tensor = Some(tensor);
        leaf_node.duplicate = duplicate;
        Ok(())
    }
}

/// The placed children of `node`, in placement order, into `out` (cleared first).
fn placed_children(nodes: &[Node], node: u32, out: &mut Vec<u32>) {
    out.clear();
    let mut child = nodes[node as usize].first_placed;
    while child != NONE {
        out.push(child);
        child = nodes[child as usize].next_placed;
    }
}

/// A dotted module name matches a glob whose `*` stands for one name component.
fn matches(pattern: &str, name: &str) -> bool {
    let (mut p, mut n) = (pattern.split('.'), name.split('.'));
    loop {
        match (p.next(), n.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == "*" || a == b => {}
            _ => return false,
        }
    }
}

/// Resolve `*suffix` names of tie groups against the checkpoint's tensor names: the first name in
/// name order ending with the suffix.
fn resolve_ties(entries: &[TensorEntry], groups: &[Vec<String>]) -> Vec<Vec<String>> {
    groups
        .iter()
        .map(|group| {
            let mut seen = HashSet::new();
            group
                .iter()
                .filter_map(|name| match name.strip_prefix('*') {
                    Some(suffix) => entries
                        .iter()
                        .map(|e| e.name.as_str())
                        .filter(|n| n.ends_with(suffix))
                        .min()
                        .map(str::to_string),
                    None => Some(name.clone()),
                })
                .filter(|n| seen.insert(n.clone()))
                .collect()
        })
        .collect()
}

/// A tensor name that cannot be a module path, reported against the file that holds it.
fn bad_name(file: &Path, reason: String) -> PlacementError {
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
    let mut trie = Trie::with_capacity(entries.len());
    let leaves: Vec<u32> = entries.iter().map(|e| trie.node_of(&e.name)).collect();
    trie.check_depth(&checkpoint.path, entries)?;
    for &leaf in &leaves {
        trie.nodes[leaf as usize].named = true;
    }
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
    let holders: Vec<Option<u32>> = leaves.iter().map(|&leaf| trie.state_holder(leaf)).collect();
    for (e, holder) in entries.iter().zip(&holders) {
        if let Some(holder) = holder {
            trie.nodes[*holder as usize].state_bits += sized(e);
        }
    }
    let mut path = Vec::new();
    for ((e, &leaf), holder) in entries.iter().zip(&leaves).zip(&holders) {
        if holder.is_some() {
            continue; // counted with its tensor
        }
        let bits = sized(e) + trie.nodes[leaf as usize].state_bits;
        let group = if group_of.is_empty() {
            None
        } else {
            group_of.get(e.name.as_str()).copied()
        };
        let duplicate = group.is_some_and(|g| std::mem::replace(&mut group_counted[g], true));
        let tensor = (bits, group.unwrap_or(UNTIED));
        trie.place(leaf, &e.name, checkpoint.file_of(e), tensor, duplicate, &mut path)?;
    }
    for (g, group) in tie_groups.iter().enumerate() {
        if !group.iter().any(|n| trie.named(n).is_some()) {
            continue; // none of it is in this checkpoint
        }
        for name in group {
            if trie.named(name).is_none() {
                let leaf = trie.node_of(name);
                trie.place(leaf, name, &checkpoint.path, (0, g), true, &mut path)?;
            }
        }
    }
    emit(trie.nodes, options)
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
fn layer_lists(nodes: &[Node], counts: &[u64]) -> HashSet<u32> {
    let Some(&fewest) = counts.iter().min() else {
        return HashSet::new();
    };
    let is_module = |c: &u32| nodes[*c as usize].tensor.is_none();
    let mut outermost: Vec<(u32, u64)> = Vec::new(); // (node, entries), in a fixed walk order
    let mut stack = vec![0u32];
    let mut children = Vec::new();
    while let Some(node) = stack.pop() {
        placed_children(nodes, node, &mut children);
        let numbered = !children.is_empty()
            && children
                .iter()
                .all(|c| is_module(c) && nodes[*c as usize].name.parse::<u64>().is_ok());
        if numbered {
            outermost.push((node, children.len() as u64));
        } else {
            stack.extend(children.iter().rev().filter(|c| is_module(c)));
        }
    }
    let long_enough: HashSet<u32> = outermost
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
fn emit(nodes: Vec<Node>, options: &CheckpointTreeOptions) -> Result<ModuleTree> {
    let layer_lists = layer_lists(&nodes, &options.layer_counts);
    let mut children = Vec::new();
    let mut ranked = Vec::new();
    let rows = nodes.iter().filter(|n| n.placed).count() + 1;
    let mut c = TreeColumns {
        names: Vec::with_capacity(rows),
        parents: Vec::with_capacity(rows),
        kinds: Vec::with_capacity(rows),
        classes: Vec::with_capacity(rows),
        class_names: vec!["Module".into(), BLOCK_CLASS.into(), "Parameter".into()],
        bits: Vec::with_capacity(rows),
        duplicate: Vec::with_capacity(rows),
        tie: Vec::with_capacity(rows),
    };
    // Tie groups actually used, numbered densely in the order first met.
    let mut tie_ids: HashMap<usize, i64> = HashMap::new();
    // Full names are only needed to match block patterns.
    let named_blocks = !options.block_patterns.is_empty();
    // (node, parent row, full name when needed, is a block)
    let mut stack: Vec<(u32, i64, String, bool)> = vec![(0, -1, String::new(), false)];
    while let Some((node, parent, full, is_block)) = stack.pop() {
        let index = c.names.len() as i64;
        c.names.push(nodes[node as usize].name.to_string());
        c.parents.push(parent);
        c.kinds.push(NodeKind::Module as u8);
        c.classes.push(u32::from(is_block));
        c.bits.push(0);
        c.duplicate.push(false);
        c.tie.push(-1);
        placed_children(&nodes, node, &mut children);
        if children.len() > 1 {
            // Each sibling's rank once, not once per comparison.
            ranked.clear();
            ranked.extend(children.iter().map(|&c| (rank(nodes[c as usize].name), c)));
            ranked.sort_by(|(ra, a), (rb, b)| {
                ra.cmp(rb)
                    .then_with(|| natural_cmp(nodes[*a as usize].name, nodes[*b as usize].name))
            });
            children.clear();
            children.extend(ranked.iter().map(|&(_, c)| c));
        }
        for &child in &children {
            let child = &nodes[child as usize];
            if let Some((bits, group)) = child.tensor {
                let tie = if group == UNTIED {
                    -1
                } else {
                    let next = tie_ids.len() as i64;
                    *tie_ids.entry(group).or_insert(next)
                };
                c.names.push(child.name.to_string());
                c.parents.push(index);
                c.kinds.push(NodeKind::Parameter as u8);
                c.classes.push(2);
                c.bits.push(bits);
                c.duplicate.push(child.duplicate);
                c.tie.push(tie);
            }
        }
        let layer_list = layer_lists.contains(&node);
        for &child in children.iter().rev() {
            let name = nodes[child as usize].name;
            if nodes[child as usize].tensor.is_none() {
                let child_full = match (named_blocks, full.is_empty()) {
                    (false, _) => String::new(),
                    (true, true) => name.to_string(),
                    (true, false) => format!("{full}.{name}"),
                };
                let block = layer_list || options.block_patterns.iter().any(|p| matches(p, &child_full));
                stack.push((child, index, child_full, block));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str, dtype: &str, shape: &[u64]) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: dtype.into(),
            shape: shape.to_vec(),
            begin: 0,
            end: 0,
            file: 0,
        }
    }

    fn checkpoint(entries: Vec<TensorEntry>) -> Checkpoint {
        Checkpoint {
            path: "ckpt".into(),
            files: vec!["ckpt/model.safetensors".into()],
            entries,
        }
    }

    fn layers(count: u64, experts: u64) -> Vec<TensorEntry> {
        let mut entries = vec![entry("model.embed_tokens.weight", "F16", &[8, 2])];
        for i in 0..count {
            entries.push(entry(&format!("model.layers.{i}.attn.weight"), "F16", &[2, 2]));
            for e in 0..experts {
                entries.push(entry(&format!("model.layers.{i}.mlp.experts.{e}.weight"), "F16", &[2]));
            }
        }
        entries
    }

    fn blocks(t: &ModuleTree) -> Vec<&str> {
        (0..t.len() as u32)
            .filter(|&i| t.class_name(i) == BLOCK_CLASS)
            .map(|i| t.name(i))
            .collect()
    }

    #[test]
    fn every_layer_is_a_block_with_extra_or_missing_layers() {
        let options = |count| CheckpointTreeOptions {
            layer_counts: vec![count],
            ..Default::default()
        };
        let names = |n: u64| (0..n).map(|i| format!("model.layers.{i}")).collect::<Vec<_>>();
        // One extra (multi-token-prediction) layer past num_hidden_layers; many experts per layer.
        let t = tree_from_checkpoint(&checkpoint(layers(4, 6)), &options(3)).unwrap();
        assert_eq!(blocks(&t), names(4));
        // A truncated checkpoint: the longest list still holds the layers.
        let t = tree_from_checkpoint(&checkpoint(layers(2, 6)), &options(3)).unwrap();
        assert_eq!(blocks(&t), names(2));
        // No config count: nothing guessed.
        let t = tree_from_checkpoint(&checkpoint(layers(2, 6)), &CheckpointTreeOptions::default()).unwrap();
        assert!(blocks(&t).is_empty());
        // Encoder and decoder stacks of different lengths.
        let mut entries = vec![];
        for (stack, n) in [("encoder", 3), ("decoder", 2)] {
            for i in 0..n {
                entries.push(entry(&format!("{stack}.block.{i}.layer.0.w"), "F32", &[2]));
                entries.push(entry(&format!("{stack}.block.{i}.layer.1.w"), "F32", &[2]));
            }
        }
        let t = tree_from_checkpoint(
            &checkpoint(entries),
            &CheckpointTreeOptions {
                layer_counts: vec![2, 3],
                ..Default::default()
            },
        )
        .unwrap();
        let expected = [
            "encoder.block.0",
            "encoder.block.1",
            "encoder.block.2",
            "decoder.block.0",
            "decoder.block.1",
        ];
        assert_eq!(blocks(&t), expected);
    }

    #[test]
    fn names_no_module_can_hold_are_checkpoint_errors_naming_the_file() {
        for name in ["a..b", ".a", "a.", ""] {
            let entries = vec![entry("ok.w", "F32", &[1]), entry(name, "F32", &[1])];
            let err = tree_from_checkpoint(&checkpoint(entries), &CheckpointTreeOptions::default()).unwrap_err();
            assert!(matches!(err, PlacementError::Checkpoint { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.contains("ckpt/model.safetensors") && text.contains(&format!("{name:?}")),
                "{text}"
            );
        }
    }

    #[test]
    fn a_tensor_nested_under_a_tensor_counts_with_it() {
        // bitsandbytes' quantization state: "proj.weight.absmax" loads with "proj.weight"
        let entries = vec![
            entry("proj.weight", "U8", &[16]),
            entry("proj.weight.absmax", "F32", &[2]),
            entry("proj.bias", "F32", &[1]),
        ];
        let t = tree_from_checkpoint(&checkpoint(entries), &CheckpointTreeOptions::default()).unwrap();
        assert_eq!(t.subtree_bits(t.find("proj.weight").unwrap()), (16 + 8) * 8);
        assert!(t.find("proj.weight.absmax").is_none());
        assert_eq!(t.subtree_bits(t.root()), (16 + 8 + 4) * 8);
    }

    #[test]
    fn orders_groups_and_ties_like_the_model() {
        let mut entries = vec![
            entry("lm_head.weight", "BF16", &[10, 4]),
            entry("model.norm.weight", "BF16", &[4]),
            entry("model.embed_tokens.weight", "BF16", &[10, 4]),
        ];
        for i in (0..12).rev() {
            entries.push(entry(&format!("model.layers.{i}.mlp.weight"), "F32", &[4, 4]));
        }
        let options = CheckpointTreeOptions {
            layer_counts: vec![12],
            tie_groups: vec![vec!["model.embed_tokens.weight".into(), "lm_head.weight".into()]],
            dtype_bits: Some(16),
            ..Default::default()
        };
        let t = tree_from_checkpoint(&checkpoint(entries), &options).unwrap();
        let modules: Vec<&str> = (0..t.len() as u32)
            .filter(|&i| !t.is_tensor(i))
            .map(|i| t.name(i))
            .filter(|n| n.matches('.').count() < 3)
            .collect();
        assert_eq!(
            &modules[..5],
            &["", "model", "model.embed_tokens", "model.layers", "model.layers.0"]
        );
        assert_eq!(modules[4 + 11], "model.layers.11");
        assert_eq!(&modules[modules.len() - 2..], &["model.norm", "lm_head"]);
        assert_eq!(t.class_name(t.find("model.layers.7").unwrap()), BLOCK_CLASS);
        assert_eq!(t.class_name(t.find("model.layers").unwrap()), "Module");
        // F32 layers sized as bf16; the tied head counted once.
        assert_eq!(t.subtree_bits(0), (2 * 40 + 4 + 12 * 16) as u64 * 16 - 40 * 16);
        assert_eq!(t.tie_groups().len(), 1);
    }

    #[test]
    fn adds_missing_tied_names_and_matches_patterns() {
        let entries = vec![
            entry("shared.weight", "F32", &[8, 2]),
            entry("decoder.block.0.w", "F32", &[2]),
        ];
        let options = CheckpointTreeOptions {
            block_patterns: vec!["decoder.block.*".into()],
            tie_groups: vec![vec![
                "shared.weight".into(),
                "lm_head.weight".into(),
                "encoder.embed_tokens.weight".into(),
            ]],
            ..Default::default()
        };
        let t = tree_from_checkpoint(&checkpoint(entries), &options).unwrap();
        assert!(t.find("lm_head.weight").is_some() && t.find("encoder.embed_tokens").is_some());
        assert_eq!(t.subtree_bits(0), (16 + 2) * 32);
        assert_eq!(t.class_name(t.find("decoder.block.0").unwrap()), BLOCK_CLASS);
        assert!(matches("a.*.c", "a.7.c") && !matches("a.*", "a.7.c"));
    }

    /// A node as a plan sees it: name, parent, kind, class, own bits, subtree bits, duplicate.
    type NodeFacts = (String, Option<u32>, u8, String, u64, u64, bool);

    /// Everything a plan can see of a tree, node by node.
    fn fingerprint(t: &ModuleTree) -> Vec<NodeFacts> {
        (0..t.len() as u32)
            .map(|i| {
                let (name, parent, kind) = (t.name(i).to_string(), t.parent(i), t.kind(i) as u8);
                (
                    name,
                    parent,
                    kind,
                    t.class_name(i).to_string(),
                    t.own_bits(i),
                    t.subtree_bits(i),
                    t.is_duplicate(i),
                )
            })
            .collect()
    }

    /// A built tree's facts and tie groups, or the error message.
    type Outcome = std::result::Result<(Vec<NodeFacts>, Vec<Vec<u32>>), String>;

    fn outcome(result: Result<ModuleTree>) -> Outcome {
        result
            .map(|t| (fingerprint(&t), t.tie_groups().to_vec()))
            .map_err(|e| e.to_string())
    }

    fn random_entry() -> impl Strategy<Value = TensorEntry> {
        let part = prop_oneof![
            4 => Just("model"), 4 => Just("layers"), 4 => Just("0"), 3 => Just("1"), 2 => Just("10"), 2 => Just("2"),
            2 => Just("embed_tokens"), 2 => Just("Norm"), 2 => Just("lm_head"), 5 => Just("weight"),
            2 => Just("absmax"), 2 => Just("experts"), 1 => Just("w1"), 1 => Just(""),
        ];
        let name = proptest::collection::vec(part, 1..6).prop_map(|parts| parts.join("."));
        let dtype = prop_oneof![Just("F32"), Just("BF16"), Just("U8"), Just("BOOL"), Just("F8_E4M3")];
        (name, dtype, proptest::collection::vec(1u64..5, 0..3), 0usize..2).prop_map(|(name, dtype, shape, file)| {
            TensorEntry {
                name,
                dtype: dtype.into(),
                shape,
                begin: 0,
                end: 0,
                file,
            }
        })
    }

    fn random_options() -> impl Strategy<Value = CheckpointTreeOptions> {
        let tie_name = prop_oneof![
            Just("*weight".to_string()),
            Just("*embed_tokens.weight".to_string()),
            Just("lm_head.weight".to_string()),
            Just("model.embed_tokens.weight".to_string()),
            Just("lm_head.0.weight".to_string()),
        ];
        let groups = proptest::collection::vec(proptest::collection::vec(tie_name, 1..4), 0..3);
        let patterns = proptest::collection::vec(
            prop_oneof![Just("model.layers.*".to_string()), Just("*.0".to_string())],
            0..2,
        );
        let counts = proptest::collection::vec(0u64..4, 0..3);
        (
            patterns,
            counts,
            groups,
            proptest::option::of(prop_oneof![Just(8u64), Just(16u64)]),
        )
            .prop_map(
                |(block_patterns, layer_counts, tie_groups, dtype_bits)| CheckpointTreeOptions {
                    block_patterns,
                    layer_counts,
                    tie_groups,
                    dtype_bits,
                },
            )
    }

    proptest! {
        /// The trie builder gives the same tree (names, order, sizes, classes, ties) or the same error
        /// as the plain reference builder, on random names: nested states, empty components, numbered lists,
        /// repeats, ties with and without `*suffix` names.
        #[test]
        fn builds_the_same_tree_as_the_reference_builder(
            entries in proptest::collection::vec(random_entry(), 0..14),
            options in random_options(),
        ) {
            let checkpoint = Checkpoint {
                path: "ckpt".into(),
                files: vec!["ckpt/a.safetensors".into(), "ckpt/b.safetensors".into()],
                entries,
            };
            let expected = outcome(crate::checkpoint_reference::tree_from_checkpoint(&checkpoint, &options));
            prop_assert_eq!(outcome(tree_from_checkpoint(&checkpoint, &options)), expected);
        }
    }

    #[test]
    fn suffix_names_find_the_embedding() {
        let entries = vec![
            entry("transformer.wte.weight", "F16", &[8, 2]),
            entry("transformer.h.0.w", "F16", &[2]),
        ];
        let options = CheckpointTreeOptions {
            tie_groups: vec![vec!["*wte.weight".into(), "lm_head.weight".into()]],
            ..Default::default()
        };
        let t = tree_from_checkpoint(&checkpoint(entries), &options).unwrap();
        let group: Vec<&str> = t.tie_groups()[0].iter().map(|&i| t.name(i)).collect();
        assert_eq!(group, vec!["lm_head.weight", "transformer.wte.weight"]);
    }
}
