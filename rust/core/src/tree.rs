//! ModuleTree: an arena of a model's modules and tensors in definition order (pre-order), with sizes.
//!
//! Node ids are pre-order positions, so a node's subtree is the contiguous id range `id..end(id)`.
//! Tensors appear right after their owning module (parameters, then buffers), then its child modules.
//! A tensor reachable under several names (tied weights, shared modules) is counted once, under its
//! first name in definition order, exactly as `torch.nn.Module.named_parameters()` deduplicates.

use crate::error::{PlacementError, Result};
use std::collections::HashMap;
use std::sync::OnceLock;

pub type NodeId = u32;
const NO_PARENT: u32 = u32::MAX;
const NO_TIE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Module,
    Parameter,
    Buffer { persistent: bool },
}

impl NodeKind {
    pub fn is_tensor(self) -> bool {
        !matches!(self, NodeKind::Module)
    }
}

/// Column-wise description of a tree, as exported from torch (one entry per node, pre-order).
#[derive(Debug, Clone, Default)]
pub struct TreeColumns {
    /// Local (attribute) names; the root's is "".
    pub names: Vec<String>,
    /// Parent index, -1 for the root (index 0).
    pub parents: Vec<i64>,
    /// 0 module, 1 parameter, 2 persistent buffer, 3 non-persistent buffer, 4 parameter alias (a second
    /// name for a parameter inside the same module: listed by `named_parameters(remove_duplicate=False)`
    /// only, so it is tied but never an item of its own).
    pub kinds: Vec<u8>,
    /// Index into `class_names` (tensors use "Parameter" / "Tensor" like torch).
    pub classes: Vec<u32>,
    pub class_names: Vec<String>,
    /// Tensor size in bits (modules: 0).
    pub bits: Vec<u64>,
    /// The tensor was already seen under an earlier name and is not counted again.
    pub duplicate: Vec<bool>,
    /// Tied-parameter group of a parameter (>= 0), or -1. Groups are numbered in the order accelerate's
    /// `find_tied_parameters` lists them.
    pub tie: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct ModuleTree {
    names: Vec<String>,
    parent: Vec<u32>,
    kind: Vec<NodeKind>,
    class: Vec<u32>,
    class_names: Vec<String>,
    own_bits: Vec<u64>,
    duplicate: Vec<bool>,
    alias: Vec<bool>,
    tie: Vec<u32>,
    end: Vec<u32>,
    children: Vec<Vec<NodeId>>,
    subtree_bits: Vec<u64>,
    counted: Vec<bool>,
    holds_tensors: Vec<bool>,
    tie_groups: Vec<Vec<NodeId>>,
    /// Name -> node, built on first lookup (most solves never look a name up).
    index: OnceLock<HashMap<String, NodeId>>,
}

impl ModuleTree {
    /// Validate the columns and build the tree (full names, subtree ranges and sizes).
    pub fn from_columns(c: TreeColumns) -> Result<ModuleTree> {
        let n = c.names.len();
        let bad = |msg: String| Err(PlacementError::InvalidTree(msg));
        if n == 0 {
            return bad("the tree has no root".into());
        }
        for (what, len) in [
            ("parents", c.parents.len()),
            ("kinds", c.kinds.len()),
            ("classes", c.classes.len()),
            ("bits", c.bits.len()),
            ("duplicate", c.duplicate.len()),
            ("tie", c.tie.len()),
        ] {
            if len != n {
                return bad(format!("column {what} has {len} entries, names has {n}"));
            }
        }
        if n >= NO_PARENT as usize {
            return bad(format!("{n} nodes is more than this tree format holds"));
        }
        let mut kind = Vec::with_capacity(n);
        let alias: Vec<bool> = c.kinds.iter().map(|k| *k == 4).collect();
        for (i, k) in c.kinds.iter().enumerate() {
            kind.push(match k {
                0 => NodeKind::Module,
                1 | 4 => NodeKind::Parameter,
                2 => NodeKind::Buffer { persistent: true },
                3 => NodeKind::Buffer { persistent: false },
                other => return bad(format!("node {i} has unknown kind {other}")),
            });
        }
        if c.parents[0] != -1 || kind[0] != NodeKind::Module {
            return bad("node 0 must be the root module with parent -1".into());
        }
        for (i, class) in c.classes.iter().enumerate() {
            if *class as usize >= c.class_names.len() {
                return bad(format!(
                    "node {i} names class {class}, but only {} classes exist",
                    c.class_names.len()
                ));
            }
        }

        // Pre-order check with an ancestor stack; also computes full names and subtree ends.
        let mut names = Vec::with_capacity(n);
        let mut parent = vec![NO_PARENT; n];
        let mut end = vec![0u32; n];
        let mut children: Vec<Vec<NodeId>> = vec![Vec::new(); n];
        let mut stack: Vec<usize> = vec![0];
        names.push(String::new());
        #[allow(clippy::needless_range_loop)] // i is a node id used across several columns
        for i in 1..n {
            let p = c.parents[i];
            if p < 0 || p as usize >= i {
                return bad(format!(
                    "node {i} ({:?}) has parent {p}; parents must come before children",
                    c.names[i]
                ));
            }
            let p = p as usize;
            while let Some(&top) = stack.last() {
                if top == p {
                    break;
                }
                end[top] = i as u32;
                stack.pop();
            }
            if stack.is_empty() {
                return bad(format!(
                    "node {i} ({:?}) is not in pre-order under its parent {p}",
                    c.names[i]
                ));
            }
            if kind[p].is_tensor() {
                return bad(format!("node {i} has a tensor ({:?}) as parent", names[p]));
            }
            let local = &c.names[i];
            if local.is_empty() || local.contains('.') {
                return bad(format!(
                    "node {i} has local name {local:?}; names must be non-empty and dot-free"
                ));
            }
            names.push(if p == 0 {
                local.clone()
            } else {
                format!("{}.{}", names[p], local)
            });
            parent[i] = p as u32;
            children[p].push(i as u32);
            stack.push(i);
        }
        for top in stack {
            end[top] = n as u32;
        }

        let mut own_bits = vec![0u64; n];
        let mut subtree_bits = vec![0u64; n];
        let mut counted = vec![false; n];
        let mut holds_tensors = vec![false; n];
        for i in (0..n).rev() {
            holds_tensors[i] |= kind[i].is_tensor();
            if alias[i] && !c.duplicate[i] {
                return bad(format!("parameter alias {:?} must be marked duplicate", names[i]));
            }
            if kind[i].is_tensor() && !c.duplicate[i] {
                own_bits[i] = c.bits[i];
                counted[i] = true;
            } else if !kind[i].is_tensor() && c.bits[i] != 0 {
                return bad(format!(
                    "module {:?} has bits {}; module sizes come from their tensors",
                    names[i], c.bits[i]
                ));
            }
            subtree_bits[i] = subtree_bits[i].saturating_add(own_bits[i]);
            if i > 0 {
                let p = parent[i] as usize;
                subtree_bits[p] = subtree_bits[p].saturating_add(subtree_bits[i]);
                counted[p] |= counted[i];
                holds_tensors[p] |= holds_tensors[i];
            }
        }

        let mut tie = vec![NO_TIE; n];
        let mut tie_groups: Vec<Vec<NodeId>> = Vec::new();
        for (i, t) in c.tie.iter().enumerate() {
            if *t < 0 {
                continue;
            }
            // Parameters shared by several modules, or buffers of a module registered under several parents.
            if !kind[i].is_tensor() {
                return bad(format!("node {:?} is tied but is not a tensor", names[i]));
            }
            let t = *t as usize;
            if t > n {
                return bad(format!("tie group {t} of {:?} is out of range", names[i]));
            }
            if tie_groups.len() <= t {
                tie_groups.resize(t + 1, Vec::new());
            }
            tie_groups[t].push(i as u32);
            tie[i] = t as u32;
        }
        for (g, members) in tie_groups.iter_mut().enumerate() {
            if members.len() < 2 {
                return bad(format!(
                    "tie group {g} has {} member(s); a tie needs two names",
                    members.len()
                ));
            }
            members.sort_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
        }

        // Full names are unique exactly when no parent has two children of one local name.
        let mut siblings: Vec<(u32, &str)> = (1..n).map(|i| (parent[i], c.names[i].as_str())).collect();
        siblings.sort_unstable();
        if let Some(pair) = siblings.windows(2).find(|w| w[0] == w[1]) {
            let (p, local) = pair[0];
            let full = if p == 0 {
                local.to_string()
            } else {
                format!("{}.{local}", names[p as usize])
            };
            return bad(format!("the name {full:?} appears twice"));
        }

        Ok(ModuleTree {
            names,
            parent,
            kind,
            class: c.classes,
            class_names: c.class_names,
            own_bits,
            duplicate: c.duplicate,
            alias,
            tie,
            end,
            children,
            subtree_bits,
            counted,
            holds_tensors,
            tie_groups,
            index: OnceLock::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn root(&self) -> NodeId {
        0
    }

    pub fn name(&self, id: NodeId) -> &str {
        &self.names[id as usize]
    }

    pub fn kind(&self, id: NodeId) -> NodeKind {
        self.kind[id as usize]
    }

    pub fn is_tensor(&self, id: NodeId) -> bool {
        self.kind[id as usize].is_tensor()
    }

    pub fn class_name(&self, id: NodeId) -> &str {
        &self.class_names[self.class[id as usize] as usize]
    }

    pub fn class_id(&self, id: NodeId) -> u32 {
        self.class[id as usize]
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn parent(&self, id: NodeId) -> Option<NodeId> {
        let p = self.parent[id as usize];
        (p != NO_PARENT).then_some(p)
    }

    /// End (exclusive) of the node's pre-order range: its subtree is `id..end(id)`.
    pub fn end(&self, id: NodeId) -> NodeId {
        self.end[id as usize]
    }

    /// Whether `id` lies strictly inside `ancestor`'s subtree.
    pub fn is_strict_descendant(&self, id: NodeId, ancestor: NodeId) -> bool {
        ancestor < id && id < self.end(ancestor)
    }

    /// All direct children (tensors first, then modules), in definition order.
    pub fn children(&self, id: NodeId) -> &[NodeId] {
        &self.children[id as usize]
    }

    pub fn child_modules(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.children(id).iter().copied().filter(|c| !self.is_tensor(*c))
    }

    /// Direct parameters as `named_parameters(recurse=False)` lists them (aliases left out).
    pub fn direct_parameters(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.children(id)
            .iter()
            .copied()
            .filter(|c| self.kind(*c) == NodeKind::Parameter && !self.alias[*c as usize])
    }

    /// A second name for a parameter within the same module.
    pub fn is_alias(&self, id: NodeId) -> bool {
        self.alias[id as usize]
    }

    pub fn direct_buffers(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.children(id)
            .iter()
            .copied()
            .filter(|c| matches!(self.kind(*c), NodeKind::Buffer { .. }))
    }

    pub fn has_child_modules(&self, id: NodeId) -> bool {
        self.child_modules(id).next().is_some()
    }

    /// Bits of the node's own tensor (0 for modules and for tensors counted under an earlier name).
    pub fn own_bits(&self, id: NodeId) -> u64 {
        self.own_bits[id as usize]
    }

    /// Bits of every tensor in the subtree, each storage counted once.
    pub fn subtree_bits(&self, id: NodeId) -> u64 {
        self.subtree_bits[id as usize]
    }

    /// Whether the subtree holds any tensor (counted here or under an earlier name).
    pub fn holds_tensors(&self, id: NodeId) -> bool {
        self.holds_tensors[id as usize]
    }

    /// Whether the subtree holds a tensor counted here (accelerate's `module_sizes` has the key).
    pub fn is_counted(&self, id: NodeId) -> bool {
        self.counted[id as usize]
    }

    pub fn is_duplicate(&self, id: NodeId) -> bool {
        self.duplicate[id as usize]
    }

    pub fn tie_group_of(&self, id: NodeId) -> Option<usize> {
        let t = self.tie[id as usize];
        (t != NO_TIE).then_some(t as usize)
    }

    /// Tied parameter groups (members sorted by name), in accelerate's order.
    pub fn tie_groups(&self) -> &[Vec<NodeId>] {
        &self.tie_groups
    }

    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.index
            .get_or_init(|| {
                self.names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.clone(), i as NodeId))
                    .collect()
            })
            .get(name)
            .copied()
    }

    /// Ancestors of `id` from the root's child down to the parent (the root itself excluded).
    pub fn ancestors_top_down(&self, id: NodeId) -> Vec<NodeId> {
        let mut chain = Vec::new();
        let mut cur = self.parent(id);
        while let Some(p) = cur {
            if p == self.root() {
                break;
            }
            chain.push(p);
            cur = self.parent(p);
        }
        chain.reverse();
        chain
    }

    /// A few existing names close to `name`, for "did you mean" hints.
    pub fn suggest(&self, name: &str) -> Vec<String> {
        let mut scored: Vec<(usize, &String)> = self
            .names
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| (edit_distance(n, name), n))
            .collect();
        scored.sort();
        let limit = (name.len() / 3).max(2);
        scored
            .into_iter()
            .filter(|(d, _)| *d <= limit)
            .take(3)
            .map(|(_, n)| n.clone())
            .collect()
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Build trees by hand in Rust tests and benchmarks.
#[derive(Debug, Default)]
pub struct TreeBuilder {
    columns: TreeColumns,
    classes: HashMap<String, u32>,
}

impl TreeBuilder {
    /// Start a tree whose root module has class `class`.
    pub fn new(class: &str) -> TreeBuilder {
        let mut b = TreeBuilder::default();
        b.push("", -1, 0, class, 0, false, -1);
        b
    }

    #[allow(clippy::too_many_arguments)]
    fn push(&mut self, name: &str, parent: i64, kind: u8, class: &str, bits: u64, dup: bool, tie: i64) -> NodeId {
        let next = self.classes.len() as u32;
        let class_id = *self.classes.entry(class.to_string()).or_insert_with(|| {
            self.columns.class_names.push(class.to_string());
            next
        });
        self.columns.names.push(name.to_string());
        self.columns.parents.push(parent);
        self.columns.kinds.push(kind);
        self.columns.classes.push(class_id);
        self.columns.bits.push(bits);
        self.columns.duplicate.push(dup);
        self.columns.tie.push(tie);
        (self.columns.names.len() - 1) as NodeId
    }

    /// Add a child module (call in pre-order).
    pub fn module(&mut self, parent: NodeId, name: &str, class: &str) -> NodeId {
        self.push(name, parent as i64, 0, class, 0, false, -1)
    }

    /// Add a parameter of `bytes` bytes.
    pub fn param(&mut self, parent: NodeId, name: &str, bytes: u64) -> NodeId {
        self.push(name, parent as i64, 1, "Parameter", bytes * 8, false, -1)
    }

    /// Add a parameter that shares the storage of an earlier one (`tie` is the group number).
    pub fn tied_param(&mut self, parent: NodeId, name: &str, bytes: u64, tie: i64, duplicate: bool) -> NodeId {
        self.push(name, parent as i64, 1, "Parameter", bytes * 8, duplicate, tie)
    }

    /// Add a persistent buffer of `bytes` bytes.
    pub fn buffer(&mut self, parent: NodeId, name: &str, bytes: u64) -> NodeId {
        self.push(name, parent as i64, 2, "Tensor", bytes * 8, false, -1)
    }

    pub fn build(self) -> Result<ModuleTree> {
        ModuleTree::from_columns(self.columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModuleTree {
        let mut b = TreeBuilder::new("Net");
        let emb = b.module(0, "emb", "Embedding");
        b.tied_param(emb, "weight", 100, 0, false);
        let layers = b.module(0, "layers", "ModuleList");
        for i in 0..2 {
            let l = b.module(layers, &i.to_string(), "Block");
            b.param(l, "w", 10);
            b.buffer(l, "mask", 1);
        }
        let head = b.module(0, "head", "Linear");
        b.tied_param(head, "weight", 100, 0, true);
        b.build().unwrap()
    }

    #[test]
    fn sizes_count_tied_storage_once() {
        let t = small();
        assert_eq!(t.subtree_bits(0), (100 + 2 * 11) * 8);
        let head = t.find("head").unwrap();
        assert_eq!(t.subtree_bits(head), 0);
        assert!(!t.is_counted(head));
        assert_eq!(t.tie_groups().len(), 1);
        let names: Vec<&str> = t.tie_groups()[0].iter().map(|i| t.name(*i)).collect();
        assert_eq!(names, vec!["emb.weight", "head.weight"]);
    }

    #[test]
    fn subtree_ranges_are_contiguous() {
        let t = small();
        let layers = t.find("layers").unwrap();
        let inside: Vec<&str> = (layers + 1..t.end(layers)).map(|i| t.name(i)).collect();
        assert_eq!(
            inside,
            vec![
                "layers.0",
                "layers.0.w",
                "layers.0.mask",
                "layers.1",
                "layers.1.w",
                "layers.1.mask"
            ]
        );
        assert!(t.is_strict_descendant(t.find("layers.1.w").unwrap(), layers));
        assert!(!t.is_strict_descendant(layers, layers));
    }

    #[test]
    fn rejects_malformed_columns() {
        let mut c = TreeColumns {
            names: vec!["".into(), "a".into()],
            parents: vec![-1, 0],
            kinds: vec![0, 1],
            classes: vec![0, 0],
            class_names: vec!["M".into()],
            bits: vec![0, 8],
            duplicate: vec![false, false],
            tie: vec![-1, -1],
        };
        assert!(ModuleTree::from_columns(c.clone()).is_ok());
        c.parents[1] = 5;
        assert!(matches!(
            ModuleTree::from_columns(c.clone()),
            Err(PlacementError::InvalidTree(_))
        ));
        c.parents[1] = 0;
        c.kinds[1] = 9;
        assert!(ModuleTree::from_columns(c.clone()).is_err());
        c.kinds[1] = 1;
        c.names[1] = "a.b".into();
        assert!(ModuleTree::from_columns(c).is_err());
    }

    #[test]
    fn suggests_close_names() {
        let t = small();
        assert_eq!(t.suggest("layer.0")[0], "layers.0");
    }
}
