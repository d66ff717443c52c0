//! ModuleTree: an arena of a model's modules and tensors in definition order (pre-order), with sizes.
//!
//! Node ids are pre-order positions, so a node's subtree is the contiguous id range `id..end(id)`.
//! Tensors appear right after their owning module (parameters, then buffers), then its child modules.
//! A tensor reachable under several names (tied weights, shared modules) is counted once, under its
//! first name in definition order, exactly as `torch.nn.Module.named_parameters()` deduplicates.

use crate::error::{PlacementError, Result};
#[cfg(test)]
use std::collections::HashMap;

/// A node's position in the tree's pre-order (the root is 0).
pub type NodeId = u32;
const NO_PARENT: u32 = u32::MAX;

/// What a node is. The discriminants are the codes of [`TreeColumns::kinds`], the one place they are
/// defined (the binding exports them to Python as `_core.KIND_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NodeKind {
    /// A `torch.nn.Module`.
    Module = 0,
    /// A parameter under its own name.
    Parameter = 1,
    /// A buffer saved in the state dict.
    Buffer = 2,
    /// A buffer registered with `persistent=False` (not in the state dict, still on the device).
    NonPersistentBuffer = 3,
    /// A second name for a parameter inside the same module: listed by
    /// `named_parameters(remove_duplicate=False)` only, so it is tied but never an item of its own.
    ParameterAlias = 4,
}

impl NodeKind {
    /// Every kind, in code order.
    pub const ALL: [NodeKind; 5] = [
        NodeKind::Module,
        NodeKind::Parameter,
        NodeKind::Buffer,
        NodeKind::NonPersistentBuffer,
        NodeKind::ParameterAlias,
    ];

    /// The kind with this column code, if any.
    pub fn from_u8(code: u8) -> Option<NodeKind> {
        NodeKind::ALL.into_iter().find(|k| *k as u8 == code)
    }

    /// Parameters and buffers (anything that is not a module).
    pub fn is_tensor(self) -> bool {
        !matches!(self, NodeKind::Module)
    }

    /// A parameter, under its own name or as an alias.
    pub fn is_parameter(self) -> bool {
        matches!(self, NodeKind::Parameter | NodeKind::ParameterAlias)
    }

    /// A buffer, persistent or not.
    pub fn is_buffer(self) -> bool {
        matches!(self, NodeKind::Buffer | NodeKind::NonPersistentBuffer)
    }
}

/// Names stored back to back in one buffer: no allocation per name, 8 bytes of bookkeeping each.
#[derive(Debug, Clone, Default)]
pub struct NameList {
    text: String,
    ends: Vec<usize>,
}

impl NameList {
    /// An empty list with room for `names` names of `bytes` bytes in all.
    pub fn with_capacity(names: usize, bytes: usize) -> NameList {
        NameList {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(names),
        }
    }

    /// Append a name.
    pub fn push(&mut self, name: &str) {
        self.text.push_str(name);
        self.ends.push(self.text.len());
    }

    /// Append `prefix.name` (or `name` alone when `prefix` is "") where `prefix` is the name at `at`:
    /// a full dotted name built from its parent's without a temporary string.
    fn push_dotted(&mut self, at: usize, name: &str) {
        let (start, end) = self.bounds(at);
        if start < end {
            // SAFETY: `start..end` spans one whole name pushed as a `&str`, so the bytes appended are
            // valid UTF-8, and so is the ASCII dot after them.
            unsafe {
                let bytes = self.text.as_mut_vec();
                bytes.extend_from_within(start..end);
                bytes.push(b'.');
            }
        }
        self.push(name);
    }

    fn bounds(&self, i: usize) -> (usize, usize) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (start, self.ends[i])
    }

    /// The `i`-th name.
    pub fn get(&self, i: usize) -> &str {
        let (start, end) = self.bounds(i);
        &self.text[start..end]
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the list holds no name.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of all names together.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }
}

/// Where a tree's local names come from: one `String` each, or a [`NameList`].
pub trait LocalNames {
    /// Number of names.
    fn count(&self) -> usize;
    /// The `i`-th name.
    fn local(&self, i: usize) -> &str;
}

impl LocalNames for Vec<String> {
    fn count(&self) -> usize {
        self.len()
    }
    fn local(&self, i: usize) -> &str {
        &self[i]
    }
}

impl LocalNames for NameList {
    fn count(&self) -> usize {
        self.len()
    }
    fn local(&self, i: usize) -> &str {
        self.get(i)
    }
}

/// Column-wise description of a tree with one `String` per local name (see [`Columns`]).
pub type TreeColumns = Columns<Vec<String>>;

/// Column-wise description of a tree, as exported from torch (one entry per node, pre-order); the
/// local names are a `Vec<String>` ([`TreeColumns`]) or a [`NameList`] (a native walk's).
#[derive(Debug, Clone, Default)]
pub struct Columns<N> {
    /// Local (attribute) names; the root's is "".
    pub names: N,
    /// Parent index, -1 for the root (index 0).
    pub parents: Vec<i64>,
    /// [`NodeKind`] codes (`NodeKind::Module as u8`, ...).
    pub kinds: Vec<u8>,
    /// Index into `class_names` (tensors use "Parameter" / "Tensor" like torch).
    pub classes: Vec<u32>,
    /// The distinct class names `classes` points into.
    pub class_names: Vec<String>,
    /// Tensor size in bits (modules: 0).
    pub bits: Vec<u64>,
    /// The tensor was already seen under an earlier name and is not counted again.
    pub duplicate: Vec<bool>,
    /// Tied-parameter group of a parameter (>= 0), or -1. Groups are numbered in the order accelerate's
    /// `find_tied_parameters` lists them.
    pub tie: Vec<i64>,
}

/// Full names may take at most this many bytes beyond [`FULL_NAME_FACTOR`] times the local names.
pub const FULL_NAME_ALLOWANCE: u64 = 256 << 20;
/// Full names of real models are a few times their local names long (about three for transformers).
pub const FULL_NAME_FACTOR: u64 = 64;

/// Names nested so deep that their full dotted names would take memory quadratic in the depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    /// Bytes the full names would take.
    pub bytes: u64,
    /// The budget they exceed.
    pub budget: u64,
    /// Index of the deepest node (most components).
    pub deepest: usize,
    /// Its number of components.
    pub depth: u64,
}

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "names nest too deep: the full dotted names would take {} bytes (limit {}), one of them {} \
             components deep; module paths of real models are a few dozen components at most",
            self.bytes, self.budget, self.depth
        )
    }
}

/// Check that full dotted names stay within a budget linear in the local names, before building them.
/// `parents[i]`: node `i`'s parent, `None` for the root and its children (whose full name is their
/// local name); parents come before children. `local_lens[i]`: the byte length of node `i`'s local name.
pub fn full_name_budget(
    parents: impl Iterator<Item = Option<usize>>,
    local_lens: impl Iterator<Item = usize>,
) -> std::result::Result<(), TooDeep> {
    let mut full: Vec<u64> = Vec::new();
    let mut depth: Vec<u32> = Vec::new();
    let (mut total, mut local_total) = (0u64, 0u64);
    for (parent, local) in parents.zip(local_lens) {
        let local = local as u64;
        let i = full.len();
        let (len, d) = match parent.filter(|&p| p < i) {
            Some(p) => (full[p].saturating_add(1 + local), depth[p].saturating_add(1)),
            None => (local, 1),
        };
        full.push(len);
        depth.push(d);
        total = total.saturating_add(len);
        local_total = local_total.saturating_add(local);
    }
    let budget = FULL_NAME_ALLOWANCE.saturating_add(FULL_NAME_FACTOR.saturating_mul(local_total));
    if total <= budget {
        return Ok(());
    }
    let deepest = (0..depth.len()).max_by_key(|&i| depth[i]).unwrap_or(0);
    Err(TooDeep {
        bytes: total,
        budget,
        deepest,
        depth: u64::from(depth[deepest]),
    })
}

/// A validated tree: full names, parents, subtree ranges and sizes, tie groups.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    names: NameList,
    parent: Vec<u32>,
    kind: Vec<NodeKind>,
    class: Vec<u32>,
    class_names: Vec<String>,
    own_bits: Vec<u64>,
    duplicate: Vec<bool>,
    end: Vec<u32>,
    /// Children of node `i` are `child_list[child_start[i]..child_start[i + 1]]` (one allocation in
    /// all rather than one per module).
    child_start: Vec<u32>,
    child_list: Vec<NodeId>,
    subtree_bits: Vec<u64>,
    counted: Vec<bool>,
    holds_tensors: Vec<bool>,
    tie_groups: Vec<Vec<NodeId>>,
}

/// The error for malformed columns.
fn bad<T>(msg: String) -> Result<T> {
    Err(PlacementError::InvalidTree(msg))
}

/// Full names, parents, subtree ends and children, from the parent column.
struct Links {
    names: NameList,
    parent: Vec<u32>,
    end: Vec<u32>,
    child_start: Vec<u32>,
    child_list: Vec<NodeId>,
}

impl Links {
    fn children(&self, id: usize) -> &[NodeId] {
        &self.child_list[self.child_start[id] as usize..self.child_start[id + 1] as usize]
    }
}

/// Per-node sizes, summed bottom-up.
struct Sizes {
    own_bits: Vec<u64>,
    subtree_bits: Vec<u64>,
    counted: Vec<bool>,
    holds_tensors: Vec<bool>,
}

/// Every column has one entry per node, and there is a root; returns the node count.
fn check_lengths<N: LocalNames>(c: &Columns<N>) -> Result<usize> {
    let n = c.names.count();
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
    Ok(n)
}

/// Decode the kind codes; node 0 must be the root module, and every class index must exist.
fn read_kinds<N: LocalNames>(c: &Columns<N>) -> Result<Vec<NodeKind>> {
    let mut kind = Vec::with_capacity(c.kinds.len());
    for (i, &code) in c.kinds.iter().enumerate() {
        match NodeKind::from_u8(code) {
            Some(k) => kind.push(k),
            None => return bad(format!("node {i} has unknown kind {code}")),
        }
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
    Ok(kind)
}

/// Check pre-order with an ancestor stack (parents before children, each subtree contiguous, only
/// modules as parents, dot-free local names) and build full names, subtree ends and children.
fn link_parents<N: LocalNames>(c: &Columns<N>, kind: &[NodeKind]) -> Result<Links> {
    let n = c.names.count();
    let mut text = 0;
    for i in 0..n {
        text += c.names.local(i).len();
    }
    let parents = c.parents.iter().map(|&p| usize::try_from(p).ok().filter(|&p| p > 0));
    if let Err(deep) = full_name_budget(parents, (0..n).map(|i| c.names.local(i).len())) {
        return bad(deep.to_string());
    }
    // Full names are about three local names long on model trees; this only sizes the first buffer.
    let mut names = NameList::with_capacity(n, text * 3);
    let mut parent = vec![NO_PARENT; n];
    let mut end = vec![0u32; n];
    let mut child_count = vec![0u32; n + 1];
    let mut stack: Vec<usize> = vec![0];
    names.push("");
    #[allow(clippy::needless_range_loop)] // i is a node id used across several columns
    for i in 1..n {
        let p = c.parents[i];
        let local = c.names.local(i);
        if p < 0 || p as usize >= i {
            return bad(format!(
                "node {i} ({local:?}) has parent {p}; parents must come before children"
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
            return bad(format!("node {i} ({local:?}) is not in pre-order under its parent {p}"));
        }
        if kind[p].is_tensor() {
            return bad(format!("node {i} has a tensor ({:?}) as parent", names.get(p)));
        }
        if local.is_empty() || local.contains('.') {
            return bad(format!(
                "node {i} has local name {local:?}; names must be non-empty and dot-free"
            ));
        }
        names.push_dotted(p, local);
        parent[i] = p as u32;
        child_count[p] += 1;
        stack.push(i);
    }
    for top in stack {
        end[top] = n as u32;
    }
    // Children grouped by parent, each group in node order (definition order).
    let mut child_start = child_count;
    let mut total = 0u32;
    for slot in child_start.iter_mut() {
        let count = *slot;
        *slot = total;
        total += count;
    }
    let mut fill = child_start.clone();
    let mut child_list = vec![0 as NodeId; total as usize];
    for (i, &p) in parent.iter().enumerate().skip(1) {
        let at = &mut fill[p as usize];
        child_list[*at as usize] = i as NodeId;
        *at += 1;
    }
    Ok(Links {
        names,
        parent,
        end,
        child_start,
        child_list,
    })
}

/// Sum tensor sizes bottom-up, each storage once (duplicates add nothing); modules carry no bits of
/// their own and aliases must be marked duplicate.
fn sum_sizes<N: LocalNames>(c: &Columns<N>, kind: &[NodeKind], links: &Links) -> Result<Sizes> {
    let n = kind.len();
    let mut own_bits = vec![0u64; n];
    let mut subtree_bits = vec![0u64; n];
    let mut counted = vec![false; n];
    let mut holds_tensors = vec![false; n];
    for i in (0..n).rev() {
        holds_tensors[i] |= kind[i].is_tensor();
        if kind[i] == NodeKind::ParameterAlias && !c.duplicate[i] {
            return bad(format!(
                "parameter alias {:?} must be marked duplicate",
                links.names.get(i)
            ));
        }
        if kind[i].is_tensor() && !c.duplicate[i] {
            own_bits[i] = c.bits[i];
            counted[i] = true;
        } else if !kind[i].is_tensor() && c.bits[i] != 0 {
            return bad(format!(
                "module {:?} has bits {}; module sizes come from their tensors",
                links.names.get(i),
                c.bits[i]
            ));
        }
        subtree_bits[i] = subtree_bits[i].saturating_add(own_bits[i]);
        if i > 0 {
            let p = links.parent[i] as usize;
            subtree_bits[p] = subtree_bits[p].saturating_add(subtree_bits[i]);
            counted[p] |= counted[i];
            holds_tensors[p] |= holds_tensors[i];
        }
    }
    Ok(Sizes {
        own_bits,
        subtree_bits,
        counted,
        holds_tensors,
    })
}

/// The tie groups' members (sorted by name); only tensors are tied, and every group needs two.
fn tie_groups<N: LocalNames>(c: &Columns<N>, kind: &[NodeKind], names: &NameList) -> Result<Vec<Vec<NodeId>>> {
    let n = kind.len();
    let mut groups: Vec<Vec<NodeId>> = Vec::new();
    for (i, t) in c.tie.iter().enumerate() {
        if *t < 0 {
            continue;
        }
        // Parameters shared by several modules, or buffers of a module registered under several parents.
        if !kind[i].is_tensor() {
            return bad(format!("node {:?} is tied but is not a tensor", names.get(i)));
        }
        let t = *t as usize;
        if t > n {
            return bad(format!("tie group {t} of {:?} is out of range", names.get(i)));
        }
        if groups.len() <= t {
            groups.resize(t + 1, Vec::new());
        }
        groups[t].push(i as u32);
    }
    for (g, members) in groups.iter_mut().enumerate() {
        if members.len() < 2 {
            return bad(format!(
                "tie group {g} has {} member(s); a tie needs two names",
                members.len()
            ));
        }
        members.sort_by(|a, b| names.get(*a as usize).cmp(names.get(*b as usize)));
    }
    Ok(groups)
}

/// Full names are unique exactly when no parent has two children of one local name. Each parent's
/// children are checked on their own (a small sort each), the first parent with a repeat reported.
fn check_unique_names<N: LocalNames>(c: &Columns<N>, links: &Links) -> Result<()> {
    let mut siblings: Vec<&str> = Vec::new();
    for p in 0..links.parent.len() {
        let children = links.children(p);
        if children.len() < 2 {
            continue;
        }
        siblings.clear();
        siblings.extend(children.iter().map(|&i| c.names.local(i as usize)));
        siblings.sort_unstable();
        if let Some(pair) = siblings.windows(2).find(|w| w[0] == w[1]) {
            let local = pair[0];
            let full = if p == 0 {
                local.to_string()
            } else {
                format!("{}.{local}", links.names.get(p))
            };
            return bad(format!("the name {full:?} appears twice"));
        }
    }
    Ok(())
}

impl ModuleTree {
    /// Validate the columns and build the tree (full names, subtree ranges and sizes).
    pub fn from_columns<N: LocalNames>(c: Columns<N>) -> Result<ModuleTree> {
        check_lengths(&c)?;
        let kind = read_kinds(&c)?;
        let links = link_parents(&c, &kind)?;
        let sizes = sum_sizes(&c, &kind, &links)?;
        let tie_groups = tie_groups(&c, &kind, &links.names)?;
        check_unique_names(&c, &links)?;
        Ok(ModuleTree {
            names: links.names,
            parent: links.parent,
            kind,
            class: c.classes,
            class_names: c.class_names,
            own_bits: sizes.own_bits,
            duplicate: c.duplicate,
            end: links.end,
            child_start: links.child_start,
            child_list: links.child_list,
            subtree_bits: sizes.subtree_bits,
            counted: sizes.counted,
            holds_tensors: sizes.holds_tensors,
            tie_groups,
        })
    }

    /// Number of nodes (modules and tensors).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Never true for a built tree (it has a root); here for `len`'s sake.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The root module's id (always 0).
    pub fn root(&self) -> NodeId {
        0
    }

    /// Full dotted name ("" for the root).
    pub fn name(&self, id: NodeId) -> &str {
        self.names.get(id as usize)
    }

    /// What the node is.
    pub fn kind(&self, id: NodeId) -> NodeKind {
        self.kind[id as usize]
    }

    /// A parameter or buffer rather than a module.
    pub fn is_tensor(&self, id: NodeId) -> bool {
        self.kind[id as usize].is_tensor()
    }

    /// The node's class ("Linear", "Parameter", ...).
    pub fn class_name(&self, id: NodeId) -> &str {
        &self.class_names[self.class[id as usize] as usize]
    }

    /// The node's index into [`ModuleTree::class_names`] (cheap class comparisons).
    pub(crate) fn class_id(&self, id: NodeId) -> u32 {
        self.class[id as usize]
    }

    /// The distinct class names.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The parent module (`None` for the root).
    pub fn parent(&self, id: NodeId) -> Option<NodeId> {
        let p = self.parent[id as usize];
        (p != NO_PARENT).then_some(p)
    }

    /// End (exclusive) of the node's pre-order range: its subtree is `id..end(id)`.
    pub fn end(&self, id: NodeId) -> NodeId {
        self.end[id as usize]
    }

    /// Whether `id` lies strictly inside `ancestor`'s subtree.
    pub(crate) fn is_strict_descendant(&self, id: NodeId, ancestor: NodeId) -> bool {
        ancestor < id && id < self.end(ancestor)
    }

    /// All direct children (tensors first, then modules), in definition order.
    pub fn children(&self, id: NodeId) -> &[NodeId] {
        let id = id as usize;
        &self.child_list[self.child_start[id] as usize..self.child_start[id + 1] as usize]
    }

    /// Direct child modules, in definition order.
    pub(crate) fn child_modules(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.children(id).iter().copied().filter(|c| !self.is_tensor(*c))
    }

    /// Direct parameters as `named_parameters(recurse=False)` lists them (aliases left out).
    pub(crate) fn direct_parameters(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.children(id)
            .iter()
            .copied()
            .filter(|c| self.kind(*c) == NodeKind::Parameter)
    }

    /// Direct buffers, persistent or not.
    pub(crate) fn direct_buffers(&self, id: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.children(id).iter().copied().filter(|c| self.kind(*c).is_buffer())
    }

    /// Whether the module has any child module.
    pub(crate) fn has_child_modules(&self, id: NodeId) -> bool {
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
    pub(crate) fn holds_tensors(&self, id: NodeId) -> bool {
        self.holds_tensors[id as usize]
    }

    /// Whether the subtree holds a tensor counted here (accelerate's `module_sizes` has the key).
    pub(crate) fn is_counted(&self, id: NodeId) -> bool {
        self.counted[id as usize]
    }

    /// The tensor was counted under an earlier name.
    pub(crate) fn is_duplicate(&self, id: NodeId) -> bool {
        self.duplicate[id as usize]
    }

    /// Tied parameter groups (members sorted by name), in accelerate's order.
    pub fn tie_groups(&self) -> &[Vec<NodeId>] {
        &self.tie_groups
    }

    /// The columns of this tree as [`ModuleTree::from_columns`] takes them: local names, tie numbers as
    /// positions in [`ModuleTree::tie_groups`], a tensor counted under an earlier name at 0 bits.
    /// Building a tree from them gives this tree again (to store a tree as data, or compare two).
    pub fn to_columns(&self) -> TreeColumns {
        let n = self.len();
        let mut tie = vec![-1i64; n];
        for (group, members) in self.tie_groups.iter().enumerate() {
            for &member in members {
                tie[member as usize] = group as i64;
            }
        }
        let nodes = 0..n as NodeId;
        TreeColumns {
            names: nodes.clone().map(|i| self.local_name(i).to_string()).collect(),
            parents: nodes.map(|i| self.parent(i).map_or(-1, i64::from)).collect(),
            kinds: self.kind.iter().map(|&k| k as u8).collect(),
            classes: self.class.clone(),
            class_names: self.class_names.clone(),
            bits: self.own_bits.clone(),
            duplicate: self.duplicate.clone(),
            tie,
        }
    }

    /// The node with this full name, found by descending from the root one dotted part at a time
    /// (no name index to build or keep: a lookup costs the depth times the siblings compared).
    pub fn find(&self, name: &str) -> Option<NodeId> {
        if name.is_empty() {
            return Some(self.root());
        }
        name.split('.')
            .try_fold(self.root(), |node, part| self.child_named(node, part))
    }

    /// The child of `parent` whose local name is `local`.
    fn child_named(&self, parent: NodeId, local: &str) -> Option<NodeId> {
        let children = self.children(parent);
        // A ModuleList's k-th child is usually named "k": try it before comparing every sibling.
        if let Some(&guess) = local.parse::<usize>().ok().and_then(|k| children.get(k)) {
            if self.local_name(guess) == local {
                return Some(guess);
            }
        }
        children.iter().copied().find(|&c| self.local_name(c) == local)
    }

    /// The last dotted part of the node's name (its attribute name in its parent).
    fn local_name(&self, id: NodeId) -> &str {
        let full = self.name(id);
        match self.parent(id) {
            Some(p) if p != self.root() => &full[self.name(p).len() + 1..],
            _ => full,
        }
    }

    /// Ancestors of `id` from the root's child down to the parent (the root itself excluded).
    pub(crate) fn ancestors_top_down(&self, id: NodeId) -> Vec<NodeId> {
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
        let mut scored: Vec<(usize, &str)> = (0..self.names.len())
            .map(|i| self.names.get(i))
            .filter(|n| !n.is_empty())
            .map(|n| (edit_distance(n, name), n))
            .collect();
        scored.sort();
        let limit = (name.len() / 3).max(2);
        scored
            .into_iter()
            .filter(|(d, _)| *d <= limit)
            .take(3)
            .map(|(_, n)| n.to_string())
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

/// One row of [`TreeColumns`], as [`TreeBuilder`] adds it.
#[cfg(test)]
struct Row<'a> {
    name: &'a str,
    parent: i64,
    kind: NodeKind,
    class: &'a str,
    bits: u64,
    duplicate: bool,
    tie: i64,
}

#[cfg(test)]
impl<'a> Row<'a> {
    fn module(parent: i64, name: &'a str, class: &'a str) -> Row<'a> {
        Row {
            name,
            parent,
            kind: NodeKind::Module,
            class,
            bits: 0,
            duplicate: false,
            tie: -1,
        }
    }

    fn tensor(parent: NodeId, name: &'a str, kind: NodeKind, class: &'a str, bytes: u64) -> Row<'a> {
        Row {
            name,
            parent: parent as i64,
            kind,
            class,
            bits: bytes * 8,
            duplicate: false,
            tie: -1,
        }
    }
}

/// Build trees by hand in the crate's unit tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct TreeBuilder {
    columns: TreeColumns,
    classes: HashMap<String, u32>,
}

#[cfg(test)]
impl TreeBuilder {
    /// Start a tree whose root module has class `class`.
    pub(crate) fn new(class: &str) -> TreeBuilder {
        let mut b = TreeBuilder::default();
        b.push(Row::module(-1, "", class));
        b
    }

    fn push(&mut self, row: Row) -> NodeId {
        let next = self.classes.len() as u32;
        let class_id = *self.classes.entry(row.class.to_string()).or_insert_with(|| {
            self.columns.class_names.push(row.class.to_string());
            next
        });
        self.columns.names.push(row.name.to_string());
        self.columns.parents.push(row.parent);
        self.columns.kinds.push(row.kind as u8);
        self.columns.classes.push(class_id);
        self.columns.bits.push(row.bits);
        self.columns.duplicate.push(row.duplicate);
        self.columns.tie.push(row.tie);
        (self.columns.names.len() - 1) as NodeId
    }

    /// Add a child module (call in pre-order).
    pub(crate) fn module(&mut self, parent: NodeId, name: &str, class: &str) -> NodeId {
        self.push(Row::module(parent as i64, name, class))
    }

    /// Add a parameter of `bytes` bytes.
    pub(crate) fn param(&mut self, parent: NodeId, name: &str, bytes: u64) -> NodeId {
        self.push(Row::tensor(parent, name, NodeKind::Parameter, "Parameter", bytes))
    }

    /// Add a parameter that shares the storage of an earlier one (`tie` is the group number).
    pub(crate) fn tied_param(&mut self, parent: NodeId, name: &str, bytes: u64, tie: i64, duplicate: bool) -> NodeId {
        self.push(Row {
            duplicate,
            tie,
            ..Row::tensor(parent, name, NodeKind::Parameter, "Parameter", bytes)
        })
    }

    /// Add a persistent buffer of `bytes` bytes.
    pub(crate) fn buffer(&mut self, parent: NodeId, name: &str, bytes: u64) -> NodeId {
        self.push(Row::tensor(parent, name, NodeKind::Buffer, "Tensor", bytes))
    }

    /// Validate and build the tree.
    pub(crate) fn build(self) -> Result<ModuleTree> {
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
    fn columns_rebuild_the_same_tree() {
        let t = small();
        let columns = t.to_columns();
        assert_eq!(columns.names[..3], ["".to_string(), "emb".into(), "weight".into()]);
        assert_eq!(columns.tie.iter().filter(|&&g| g == 0).count(), 2);
        let again = ModuleTree::from_columns(columns.clone()).unwrap();
        let same = again.to_columns();
        assert_eq!(
            (same.names, same.parents, same.kinds, same.classes),
            (columns.names, columns.parents, columns.kinds, columns.classes)
        );
        assert_eq!((same.class_names, same.bits), (columns.class_names, columns.bits));
        assert_eq!((same.duplicate, same.tie), (columns.duplicate, columns.tie));
        assert_eq!(again.subtree_bits(0), t.subtree_bits(0));
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
    fn every_name_finds_its_node_and_nothing_else_matches() {
        let mut b = TreeBuilder::new("Net");
        // Numbered children out of order, a tensor named like a position, a dict-style child.
        let list = b.module(0, "layers", "ModuleList");
        for i in [2, 0, 1] {
            let l = b.module(list, &i.to_string(), "Block");
            b.param(l, "0", 1);
            b.module(l, "1", "Linear");
        }
        b.module(0, "head", "Linear");
        let t = b.build().unwrap();
        for id in 0..t.len() as NodeId {
            assert_eq!(t.find(t.name(id)), Some(id), "{:?}", t.name(id));
        }
        for missing in [
            "layers.3",
            "layers.0.2",
            "layers..0",
            "layers.0.",
            ".layers",
            "head.weight",
            "+1",
            "layers.+1",
        ] {
            assert_eq!(t.find(missing), None, "{missing:?}");
        }
    }

    #[test]
    fn suggests_close_names() {
        let t = small();
        assert_eq!(t.suggest("layer.0")[0], "layers.0");
    }
}

#[cfg(test)]
mod full_name_budget_tests {
    use super::*;

    /// A chain `a.a.a...` of `depth` one-letter components: full names take depth²/2 bytes.
    fn chain(depth: usize) -> std::result::Result<(), TooDeep> {
        let parents = (0..depth).map(|i| i.checked_sub(1));
        full_name_budget(parents, std::iter::repeat_n(1, depth))
    }

    #[test]
    fn real_depths_pass_and_quadratic_ones_are_refused_with_the_depth() {
        assert!(chain(1_000).is_ok());
        let deep = chain(80_000).unwrap_err();
        assert_eq!((deep.depth, deep.deepest), (80_000, 79_999));
        assert!(deep.bytes > deep.budget);
        assert!(deep.to_string().contains("80000 components deep"));
    }

    #[test]
    fn a_tree_whose_columns_nest_too_deep_is_an_invalid_tree() {
        let n = 40_000;
        let columns = TreeColumns {
            names: (0..n)
                .map(|i| if i == 0 { String::new() } else { "m".into() })
                .collect::<Vec<String>>(),
            parents: (0..n as i64).map(|i| i - 1).collect(),
            kinds: vec![NodeKind::Module as u8; n],
            classes: vec![0; n],
            class_names: vec!["Module".into()],
            bits: vec![0; n],
            duplicate: vec![false; n],
            tie: vec![-1; n],
        };
        let err = ModuleTree::from_columns(columns).unwrap_err();
        assert!(err.to_string().contains("names nest too deep"), "{err}");
    }
}
