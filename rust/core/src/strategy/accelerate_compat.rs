//! accelerate 1.x's `infer_auto_device_map`, reproduced decision for decision over a [`ModuleTree`].
//!
//! This is the compatibility contract (and the oracle the better strategies are measured against), so
//! it keeps accelerate's quirks on purpose: the largest-layer reserve on the main devices, tied groups
//! matched by substring (`name + "."` in `param + "."`), each release's rule for the module holding a
//! tied parameter, direct buffers of split modules left unmapped, `>=` in the split test (`>` before
//! 1.2), and `fallback_allocation`'s search. What it does not keep is the cost: layer
//! maxima are precomputed per subtree and names are node ids, so a 60k-module tree takes milliseconds.
//!
//! The release to reproduce is [`CompatOptions::accelerate_version`]; what differs between releases is
//! decided in [`accelerate_version`](super::accelerate_version) alone. Both loops below share the
//! bookkeeping ([`Walk`]) and the size and tie rules ([`Solver`]).

use super::accelerate_version::{AccelerateVersion, PlacementLoop, TieHolder};
use crate::clean::clean_device_map;
use crate::device::Device;
use crate::error::{PlacementError, Result};
use crate::tree::{ModuleTree, NodeId};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};

/// Options of `infer_auto_device_map` that change the map.
#[derive(Debug, Clone, Default)]
pub struct CompatOptions {
    /// Module classes never split (`no_split_module_classes`).
    pub no_split_module_classes: Vec<String>,
    /// accelerate's `fallback_allocation`: when a GPU would stay empty, look for a module that fits it
    /// (accelerate 1.2 and later; asking an older release for it is an error, as accelerate's `TypeError`).
    pub fallback_allocation: bool,
    /// accelerate's `clean_result`: merge children that share a device into their parent.
    pub clean_result: bool,
    /// The accelerate release whose behaviour to reproduce (default: the newest known).
    pub accelerate_version: AccelerateVersion,
}

/// What `infer_auto_device_map` returns, plus what its warnings and logs need.
#[derive(Debug, Clone)]
pub struct CompatResult {
    /// Module/tensor name -> device, in model order.
    pub device_map: Vec<(NodeId, Device)>,
    /// Bits accelerate counts as used per device (including the reserve it kept), devices with 0 left out.
    pub used_bits: Vec<(Device, i128)>,
    /// Modules placed whole on the CPU or disk, in placement order: accelerate sums their buffers for its
    /// `offload_buffers` warning (tied modules placed alongside are not counted, as in accelerate).
    pub offloaded_modules: Vec<(NodeId, Device)>,
    /// Devices left with nothing on them, in order, for accelerate's "insufficient memory" log line.
    pub unassigned: Vec<Unassigned>,
}

/// A device accelerate moved past before placing anything on it.
#[derive(Debug, Clone)]
pub struct Unassigned {
    /// The device skipped.
    pub device: Device,
    /// What the first module needed there: its size with ties plus the largest-layer reserve, in bits.
    pub bits: i128,
    /// The nodes whose sizes add up to `bits` (accelerate prints the number as a float when one of them
    /// holds a bool tensor, so the caller needs them).
    pub parts: Vec<NodeId>,
}

struct Ties {
    /// Per group: (member, member name + ".").
    groups: Vec<Vec<(NodeId, String)>>,
}

impl Ties {
    fn new(tree: &ModuleTree) -> Ties {
        let groups = tree
            .tie_groups()
            .iter()
            .map(|g| g.iter().map(|&m| (m, format!("{}.", tree.name(m)))).collect())
            .collect();
        Ties { groups }
    }

    /// Parameters tied to something inside `name` but themselves outside it (accelerate's substring test).
    fn outside_partners(&self, name_dot: &str) -> Vec<NodeId> {
        let mut out = Vec::new();
        for group in &self.groups {
            let inside = group.iter().filter(|(_, k)| k.contains(name_dot)).count();
            if inside > 0 && inside < group.len() {
                out.extend(group.iter().filter(|(_, k)| !k.contains(name_dot)).map(|(m, _)| *m));
            }
        }
        out
    }
}

struct Solver<'t> {
    tree: &'t ModuleTree,
    no_split: Vec<bool>,
    /// Largest layer in each subtree, computed on first use (most subtrees are never asked about).
    layer_max: Vec<Cell<u64>>,
    ties: Ties,
    /// How the release reproduced finds the module holding a tied parameter.
    holder: TieHolder,
}

const UNKNOWN: u64 = u64::MAX;

impl<'t> Solver<'t> {
    fn new(tree: &'t ModuleTree, no_split_classes: &[String], holder: TieHolder) -> Solver<'t> {
        let no_split = tree
            .class_names()
            .iter()
            .map(|c| no_split_classes.iter().any(|n| n == c))
            .collect();
        Solver {
            tree,
            no_split,
            layer_max: vec![Cell::new(UNKNOWN); tree.len()],
            ties: Ties::new(tree),
            holder,
        }
    }

    fn layer_max(&self, id: NodeId) -> u64 {
        let known = self.layer_max[id as usize].get();
        if known != UNKNOWN {
            return known;
        }
        let value = if self.expands(id) {
            self.tree
                .child_modules(id)
                .map(|c| self.layer_max(c))
                .max()
                .unwrap_or(0)
        } else {
            self.tree.subtree_bits(id)
        };
        self.layer_max[id as usize].set(value);
        value
    }

    fn size(&self, id: NodeId) -> i128 {
        self.tree.subtree_bits(id) as i128
    }

    /// A module with child modules whose class may be split: accelerate replaces it by its children.
    fn expands(&self, id: NodeId) -> bool {
        !self.tree.is_tensor(id) && !self.no_split[self.tree.class_id(id) as usize] && self.tree.has_child_modules(id)
    }

    /// What a split puts in a module's place: its direct parameters, then its child modules.
    fn split_children(&self, id: NodeId) -> Vec<NodeId> {
        self.tree
            .direct_parameters(id)
            .chain(self.tree.child_modules(id))
            .collect()
    }

    /// `get_max_layer_size`: the largest layer under `items` and every layer of that size (sorted ids).
    fn max_layer(&self, items: impl Iterator<Item = NodeId> + Clone) -> (u64, Vec<NodeId>) {
        let max = items.clone().map(|i| self.layer_max(i)).max().unwrap_or(0);
        let mut names = Vec::new();
        let mut stack: Vec<NodeId> = Vec::new();
        for item in items {
            stack.push(item);
            while let Some(x) = stack.pop() {
                if self.layer_max(x) != max {
                    continue;
                }
                if self.expands(x) {
                    stack.extend(self.tree.child_modules(x));
                } else {
                    names.push(x);
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        (max, names)
    }

    fn max_layer_of_modules(&self, list: &VecDeque<NodeId>) -> (u64, Vec<NodeId>) {
        self.max_layer(list.iter().copied().filter(|i| !self.tree.is_tensor(*i)))
    }

    /// The first layer of size `max` in `get_max_layer_size`'s pre-order walk of `items`: the one whose
    /// number accelerate keeps (`None` for 0, which stays accelerate's initial integer 0).
    fn first_max_layer(&self, items: impl Iterator<Item = NodeId>, max: u64) -> Option<NodeId> {
        if max == 0 {
            return None;
        }
        let mut node = items.into_iter().find(|&i| self.layer_max(i) == max)?;
        while self.expands(node) {
            node = self.tree.child_modules(node).find(|&c| self.layer_max(c) == max)?;
        }
        Some(node)
    }

    /// Whether the to-do list entry `entry` counts as holding the tied parameter `param`.
    fn holds(&self, entry: NodeId, param: NodeId) -> bool {
        match self.holder {
            TieHolder::Substring => self.tree.name(param).contains(self.tree.name(entry)),
            TieHolder::Prefix => self.tree.is_strict_descendant(param, entry),
            TieHolder::PrefixOrSelf => entry == param || self.tree.is_strict_descendant(param, entry),
        }
    }

    /// `get_module_size_with_ties`: size of `size` plus the modules (from `list`) holding `partners`.
    fn size_with_ties(&self, partners: &[NodeId], size: i128, list: &VecDeque<NodeId>) -> Result<(i128, Vec<NodeId>)> {
        let mut total = size;
        let mut holders = Vec::with_capacity(partners.len());
        for &p in partners {
            let holder = list.iter().copied().find(|&m| self.holds(m, p)).ok_or_else(|| {
                PlacementError::AccelerateFailure(format!(
                    "no module still to be placed holds the tied parameter {:?} (accelerate raises IndexError \
                     looking it up); use devicemap.plan() instead",
                    self.tree.name(p)
                ))
            })?;
            total += self.size(holder) - self.tree.own_bits(p) as i128;
            holders.push(holder);
        }
        Ok((total, holders))
    }

    fn partners(&self, id: NodeId) -> Vec<NodeId> {
        if self.ties.groups.is_empty() {
            return Vec::new();
        }
        self.ties.outside_partners(&format!("{}.", self.tree.name(id)))
    }

    /// `fallback_allocate`: the first module (breadth of the list, depth by splitting) that fits `limit`,
    /// and the list with that module's ancestors expanded and the module removed.
    fn fallback(&self, list: &VecDeque<NodeId>, limit: i128) -> Result<Option<(NodeId, VecDeque<NodeId>)>> {
        let mut search = list.clone();
        let mut found = None;
        while let Some(y) = search.pop_front() {
            let (with_ties, _) = self.size_with_ties(&self.partners(y), self.size(y), &search)?;
            if with_ties <= limit {
                found = Some(y);
                break;
            }
            if self.expands(y) {
                for c in self.split_children(y).into_iter().rev() {
                    search.push_front(c);
                }
            }
        }
        let Some(y) = found else { return Ok(None) };
        let mut rest: Vec<NodeId> = list.iter().copied().collect();
        for ancestor in self.tree.ancestors_top_down(y) {
            if let Some(i) = rest.iter().position(|&m| m == ancestor) {
                rest.splice(i..=i, self.split_children(ancestor));
            }
        }
        let Some(t) = rest.iter().position(|&m| m == y) else {
            return Err(PlacementError::AccelerateFailure(format!(
                "fallback module {:?} is not reachable by splitting (accelerate raises ValueError)",
                self.tree.name(y)
            )));
        };
        rest.remove(t);
        Ok(Some((y, rest.into())))
    }
}

/// Ordered device map with accelerate's dict semantics (re-assigning keeps the first position).
#[derive(Default)]
struct OrderedMap {
    entries: Vec<(NodeId, Device)>,
    position: HashMap<NodeId, usize>,
}

impl OrderedMap {
    fn set(&mut self, node: NodeId, device: Device) {
        match self.position.get(&node) {
            Some(&i) => self.entries[i].1 = device,
            None => {
                self.position.insert(node, self.entries.len());
                self.entries.push((node, device));
            }
        }
    }
}

/// What the current device offers the module at the front of the list.
struct Budget {
    device: Device,
    /// The device's capacity (`None`: disk, unbounded).
    capacity: Option<i128>,
    /// The capacity less the reserve.
    limit: Option<i128>,
    /// The largest-layer reserve kept on a main device (0 elsewhere).
    reserved: i128,
}

/// One run's state, shared by both loops: the to-do list (accelerate's `modules_to_treat`), the largest
/// layer still in it, and what has been placed where.
struct Walk<'s, 't> {
    s: &'s Solver<'t>,
    devices: Vec<(Device, Option<i128>)>,
    main_devices: Vec<Device>,
    list: VecDeque<NodeId>,
    max_layer: u64,
    /// Every layer of size `max_layer` still in the list (sorted ids).
    max_names: Vec<NodeId>,
    /// The first of them in accelerate's walk (the one its unassigned-device line adds up).
    max_first: Option<NodeId>,
    map: OrderedMap,
    used: Vec<i128>,
    current: usize,
    offloaded_modules: Vec<(NodeId, Device)>,
    unassigned: Vec<Unassigned>,
}

impl<'s, 't> Walk<'s, 't> {
    fn new(s: &'s Solver<'t>, max_memory: &[(Device, u64)]) -> Walk<'s, 't> {
        let mut devices: Vec<(Device, Option<i128>)> = max_memory
            .iter()
            .map(|(d, c)| (*d, if *d == Device::Disk { None } else { Some(*c as i128) }))
            .collect();
        if !devices.iter().any(|(d, _)| *d == Device::Disk) {
            devices.push((Device::Disk, None));
        }
        let gpus: Vec<Device> = devices.iter().map(|(d, _)| *d).filter(|d| d.is_gpu_like()).collect();
        let main_devices: Vec<Device> = if gpus.contains(&Device::Mps) {
            vec![Device::Mps]
        } else if let Some(first) = gpus.first() {
            vec![*first, Device::Cpu]
        } else {
            vec![Device::Cpu]
        };
        let tree = s.tree;
        let root = tree.root();
        let list: VecDeque<NodeId> = tree
            .direct_parameters(root)
            .chain(tree.child_modules(root))
            .chain(tree.direct_buffers(root))
            .collect();
        let (max_layer, max_names) = s.max_layer(list.iter().copied());
        let max_first = s.first_max_layer(list.iter().copied(), max_layer);
        let used = vec![0i128; devices.len()];
        Walk {
            s,
            devices,
            main_devices,
            list,
            max_layer,
            max_names,
            max_first,
            map: OrderedMap::default(),
            used,
            current: 0,
            offloaded_modules: Vec::new(),
            unassigned: Vec::new(),
        }
    }

    /// Take the next entry off the list: the layers inside it no longer count towards the largest one.
    fn next(&mut self) -> Option<NodeId> {
        let x = self.list.pop_front()?;
        let lo = self.max_names.partition_point(|&n| n < x);
        let hi = self.max_names.partition_point(|&n| n < self.s.tree.end(x));
        self.max_names.drain(lo..hi);
        if self.max_names.is_empty() {
            self.refresh_max_layer();
        }
        Some(x)
    }

    /// `get_max_layer_size` over the modules (not tensors) of the list.
    fn refresh_max_layer(&mut self) {
        let tree = self.s.tree;
        (self.max_layer, self.max_names) = self.s.max_layer_of_modules(&self.list);
        let modules = self.list.iter().copied().filter(|i| !tree.is_tensor(*i));
        self.max_first = self.s.first_max_layer(modules, self.max_layer);
    }

    fn budget(&self) -> Budget {
        let (device, capacity) = self.devices[self.current];
        let reserved = if self.main_devices.contains(&device) {
            self.max_layer as i128
        } else {
            0
        };
        Budget {
            device,
            capacity,
            limit: capacity.map(|c| c - reserved),
            reserved,
        }
    }

    /// What the current device holds so far.
    fn used(&self) -> i128 {
        self.used[self.current]
    }

    /// Put `x` and the list entries holding its tied partners on the current device.
    fn place(&mut self, x: NodeId, device: Device, bits: i128, holders: &[NodeId]) {
        self.used[self.current] += bits;
        self.map.set(x, device);
        if !self.s.tree.is_tensor(x) && matches!(device, Device::Cpu | Device::Disk) {
            self.offloaded_modules.push((x, device));
        }
        for &holder in holders {
            if let Some(i) = self.list.iter().position(|&m| m == holder) {
                self.list.remove(i);
            }
            self.map.set(holder, device);
        }
    }

    /// Replace `x` by its direct parameters and child modules, at the front of the list.
    fn split(&mut self, x: NodeId) {
        for c in self.s.split_children(x).into_iter().rev() {
            self.list.push_front(c);
        }
        self.refresh_max_layer();
    }

    /// `x` fits alone but not with its tied partners: split the first holder that can be split, in the
    /// holders' order, and put `x` back in front. `false` when none can. A holder that is a tensor (the
    /// substring and self rules find those) ends the search the way accelerate's does: with an error.
    fn split_tied_holder(&mut self, x: NodeId, holders: &[NodeId]) -> Result<bool> {
        let tree = self.s.tree;
        for &holder in holders {
            if tree.is_tensor(holder) {
                return Err(PlacementError::AccelerateFailure(format!(
                    "the tied parameter's holder {:?} is a tensor, which cannot be split (accelerate raises \
                     AttributeError: no attribute 'named_children'); use devicemap.plan() instead",
                    tree.name(holder)
                )));
            }
            if !self.s.expands(holder) {
                continue;
            }
            let idx = self
                .list
                .iter()
                .position(|&m| m == holder)
                .expect("holder comes from the list");
            let mut rebuilt: VecDeque<NodeId> = VecDeque::with_capacity(self.list.len() + 8);
            rebuilt.push_back(x);
            rebuilt.extend(self.list.range(..idx).copied());
            rebuilt.extend(self.s.split_children(holder));
            rebuilt.extend(self.list.range(idx + 1..).copied());
            self.list = rebuilt;
            self.refresh_max_layer();
            return Ok(true);
        }
        Ok(false)
    }

    /// Give the current device up (its reserve stays counted) and put `x` back in front.
    fn move_on(&mut self, x: NodeId, reserved: i128) {
        self.used[self.current] += reserved;
        self.current += 1;
        self.list.push_front(x);
    }

    fn finish(self, clean_result: bool) -> CompatResult {
        let tree = self.s.tree;
        let entries = if clean_result {
            clean_device_map(tree, &self.map.entries)
        } else {
            let mut e = self.map.entries;
            e.sort_by_key(|(n, _)| *n);
            e
        };
        let used_bits = self
            .devices
            .iter()
            .zip(self.used)
            .filter(|(_, u)| *u > 0)
            .map(|((d, _), u)| (*d, u))
            .collect();
        CompatResult {
            device_map: entries,
            used_bits,
            offloaded_modules: self.offloaded_modules,
            unassigned: self.unassigned,
        }
    }
}

/// Run accelerate's placement. `max_memory` is in accelerate's normalized order (GPU indices sorted, then
/// mps, cpu, disk) with capacities in bits; disk is appended when missing and is always unbounded.
pub fn infer_auto_device_map(
    tree: &ModuleTree,
    max_memory: &[(Device, u64)],
    options: &CompatOptions,
) -> Result<CompatResult> {
    let version = options.accelerate_version;
    if options.fallback_allocation && !version.has_fallback_allocation() {
        return Err(PlacementError::AccelerateFailure(format!(
            "accelerate {version} has no fallback_allocation argument (it raises TypeError); leave it out \
             or upgrade accelerate to 1.2 or later"
        )));
    }
    let s = Solver::new(tree, &options.no_split_module_classes, version.tie_holder());
    let mut walk = Walk::new(&s, max_memory);
    match version.placement_loop() {
        PlacementLoop::Legacy => legacy_loop(&mut walk)?,
        PlacementLoop::Fallback => fallback_loop(&mut walk, options.fallback_allocation)?,
    }
    Ok(walk.finish(options.clean_result))
}

/// accelerate 1.2 and later: the size with ties decides first, then a tied partner's module or the
/// module itself is split, then `fallback_allocation` may pull a smaller module forward; failing all
/// that, the device is given up (and, if it got nothing, recorded for the log line).
fn fallback_loop(walk: &mut Walk, fallback_allocation: bool) -> Result<()> {
    let s = walk.s;
    while let Some(x) = walk.next() {
        let size = s.size(x);
        let partners = s.partners(x);
        let Budget {
            device,
            capacity,
            limit,
            reserved,
        } = walk.budget();
        let used = walk.used();
        let (with_ties, holders) = s.size_with_ties(&partners, size, &walk.list)?;

        let Some(limit) = limit.filter(|l| used + with_ties > *l) else {
            walk.place(x, device, with_ties, &holders);
            continue;
        };
        // The module fits alone: try splitting one of its tied partners instead of moving on.
        if !partners.is_empty() && used + size <= limit && walk.split_tied_holder(x, &holders)? {
            continue;
        }
        if used + size >= limit && s.expands(x) {
            walk.split(x);
            continue;
        }
        if used == 0 && fallback_allocation && device != Device::Disk {
            let cap = capacity.expect("only disk is unbounded");
            let fallback_limit = cap - (walk.max_layer as i128).max(with_ties) - used;
            // accelerate converts the limit with convert_file_size_to_int, which rejects negatives.
            if fallback_limit >= 0 {
                if let Some((found, rest)) = s.fallback(&walk.list, fallback_limit)? {
                    walk.list = rest;
                    walk.list.push_front(x);
                    walk.list.push_front(found);
                    continue;
                }
            }
        }
        if used == 0 {
            let mut parts = vec![x];
            parts.extend(&holders);
            parts.extend(&partners);
            parts.extend(walk.max_first.filter(|_| reserved > 0));
            walk.unassigned.push(Unassigned {
                device,
                bits: with_ties + reserved,
                parts,
            });
        }
        walk.move_on(x, reserved);
    }
    Ok(())
}

/// accelerate 1.0 - 1.1: a module too big for what is left (`>`) is split, or the device is given up,
/// before ties are looked at; a module that fits alone then needs room for its tied partners' modules too,
/// else one of those is split, else the device is given up.
fn legacy_loop(walk: &mut Walk) -> Result<()> {
    let s = walk.s;
    while let Some(x) = walk.next() {
        let size = s.size(x);
        let Budget {
            device,
            limit,
            reserved,
            ..
        } = walk.budget();
        let used = walk.used();
        if limit.is_some_and(|l| used + size > l) {
            if s.expands(x) {
                walk.split(x);
            } else {
                walk.move_on(x, reserved);
            }
            continue;
        }
        let (with_ties, holders) = s.size_with_ties(&s.partners(x), size, &walk.list)?;
        if limit.is_none_or(|l| used + with_ties <= l) {
            walk.place(x, device, with_ties, &holders);
        } else if !walk.split_tied_holder(x, &holders)? {
            walk.move_on(x, reserved);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeBuilder;

    fn names(tree: &ModuleTree, r: &CompatResult) -> Vec<(String, String)> {
        r.device_map
            .iter()
            .map(|(n, d)| (tree.name(*n).to_string(), d.to_string()))
            .collect()
    }

    fn run(tree: &ModuleTree, version: (u32, u32, u32), gpu1: u64) -> Result<Vec<(String, String)>> {
        // GPU 0 holds nothing, so every run starts on GPU 1 (no reserve there), then the CPU.
        let mm = [(Device::Gpu(0), 0), (Device::Gpu(1), gpu1 * 8), (Device::Cpu, 1000 * 8)];
        let options = CompatOptions {
            accelerate_version: AccelerateVersion::new(version.0, version.1, version.2),
            ..Default::default()
        };
        infer_auto_device_map(tree, &mm, &options).map(|r| names(tree, &r))
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(n, d)| (n.to_string(), d.to_string())).collect()
    }

    fn is_accelerate_failure(r: &Result<Vec<(String, String)>>, what: &str) -> bool {
        matches!(r, Err(PlacementError::AccelerateFailure(m)) if m.contains(what))
    }

    /// z (10), a = {w: 60 tied, inner: 40}, b = {w tied to a.w, u: 30} on a GPU of 110 bytes after z:
    /// a fits alone exactly (110 of 110) but not with b. accelerate 1.2+ splits a (`>=`) and fits a.w with
    /// b; 1.0 - 1.1 (`>`) find a fits alone, cannot split b and give the GPU up.
    #[test]
    fn the_legacy_loop_gives_up_where_the_new_one_splits() {
        let mut b = TreeBuilder::new("Net");
        let z = b.module(0, "z", "Leaf");
        b.param(z, "p", 10);
        let a = b.module(0, "a", "Block");
        b.tied_param(a, "w", 60, 0, false);
        let inner = b.module(a, "inner", "Inner");
        b.param(inner, "v", 40);
        let m = b.module(0, "b", "Leaf");
        b.tied_param(m, "w", 60, 0, true);
        b.param(m, "u", 30);
        let t = b.build().unwrap();
        // checked against accelerate 1.1.1 and 1.2.1 / 1.3.0 / 1.15.0 / 1.16.0
        let legacy = pairs(&[("z", "1"), ("a", "cpu"), ("b", "cpu")]);
        let current = pairs(&[("z", "1"), ("a.w", "1"), ("a.inner", "cpu"), ("b", "1")]);
        for (version, expected) in [
            ((1, 0, 0), &legacy),
            ((1, 1, 1), &legacy),
            ((1, 2, 0), &current),
            ((1, 16, 0), &current),
        ] {
            assert_eq!(&run(&t, version, 110).unwrap(), expected, "accelerate {version:?}");
        }
    }

    /// x = {p: 20}, aye = {a: 10}, layer1 = {w tied to x.p}: before 1.3 the tied parameter "layer1.w" is
    /// looked up by substring and "aye" (first in the list) is taken as its holder, so x goes to the CPU
    /// with aye and layer1 later finds no holder for x.p (IndexError); from 1.3 layer1 holds it.
    #[test]
    fn tied_parameters_are_looked_up_by_substring_before_1_3() {
        let mut b = TreeBuilder::new("Net");
        let x = b.module(0, "x", "Leaf");
        b.tied_param(x, "p", 20, 0, false);
        let aye = b.module(0, "aye", "Leaf");
        b.param(aye, "a", 10);
        let layer1 = b.module(0, "layer1", "Leaf");
        b.tied_param(layer1, "w", 20, 0, true);
        let t = b.build().unwrap();
        for version in [(1, 1, 1), (1, 2, 1)] {
            assert!(
                is_accelerate_failure(&run(&t, version, 25), "IndexError"),
                "{version:?}"
            );
        }
        let expected = pairs(&[("x", "1"), ("aye", "cpu"), ("layer1", "1")]);
        for version in [(1, 3, 0), (1, 15, 0), (1, 16, 0)] {
            assert_eq!(run(&t, version, 25).unwrap(), expected, "{version:?}");
        }
    }

    /// b = {w: 30, u: 5}, a = {w tied to b.w, inner: 40}: b does not fit with a, so a is split and a.w
    /// becomes an entry of the list itself. 1.3 - 1.15 look for a module *containing* a.w and raise
    /// IndexError; 1.16 takes a.w as its own holder, as the substring test of 1.0 - 1.2 did.
    #[test]
    fn a_split_partner_holds_itself_from_1_16() {
        let mut b = TreeBuilder::new("Net");
        let m = b.module(0, "b", "Leaf");
        b.tied_param(m, "w", 30, 0, false);
        b.param(m, "u", 5);
        let a = b.module(0, "a", "Block");
        b.tied_param(a, "w", 30, 0, true);
        let inner = b.module(a, "inner", "Leaf");
        b.param(inner, "v", 40);
        let t = b.build().unwrap();
        let expected = pairs(&[("b", "1"), ("a.w", "1"), ("a.inner", "cpu")]);
        for version in [(1, 1, 1), (1, 2, 1), (1, 16, 0)] {
            assert_eq!(run(&t, version, 50).unwrap(), expected, "{version:?}");
        }
        for version in [(1, 3, 0), (1, 15, 0)] {
            assert!(
                is_accelerate_failure(&run(&t, version, 50), "IndexError"),
                "{version:?}"
            );
        }
    }

    /// x = {p, q: 10 each}, h = {w tied to p, s: 30}, k = {w tied to q, u: 30}: x fits alone, not with
    /// h and k, so h is split; then h.w is an entry and x's holders are [h.w, k]. Where a release takes
    /// h.w as its own holder (1.0 - 1.2, 1.16) it tries to split that tensor: AttributeError.
    #[test]
    fn a_tensor_holder_cannot_be_split() {
        let mut b = TreeBuilder::new("Net");
        let x = b.module(0, "x", "Leaf");
        b.tied_param(x, "p", 10, 0, false);
        b.tied_param(x, "q", 10, 1, false);
        let h = b.module(0, "h", "Block");
        b.tied_param(h, "w", 10, 0, true);
        let s = b.module(h, "s", "Leaf");
        b.param(s, "v", 30);
        let k = b.module(0, "k", "Leaf");
        b.tied_param(k, "w", 10, 1, true);
        b.param(k, "u", 30);
        let t = b.build().unwrap();
        for version in [(1, 1, 1), (1, 2, 1), (1, 16, 0)] {
            assert!(
                is_accelerate_failure(&run(&t, version, 45), "AttributeError"),
                "{version:?}"
            );
        }
        for version in [(1, 3, 0), (1, 15, 0)] {
            assert!(
                is_accelerate_failure(&run(&t, version, 45), "IndexError"),
                "{version:?}"
            );
        }
    }

    /// 1.0 - 1.1 have no fallback_allocation (asking for it is refused) and report no empty device.
    #[test]
    fn the_legacy_loop_has_no_fallback_and_no_empty_device_report() {
        let mut b = TreeBuilder::new("Net");
        let l = b.module(0, "l", "Leaf");
        b.param(l, "w", 100);
        let t = b.build().unwrap();
        let mm = [(Device::Gpu(0), 50 * 8), (Device::Cpu, 1000 * 8)];
        let at = |version: AccelerateVersion, fallback_allocation| CompatOptions {
            accelerate_version: version,
            fallback_allocation,
            ..Default::default()
        };
        let old = AccelerateVersion::new(1, 1, 1);
        let new = AccelerateVersion::new(1, 2, 0);
        assert!(matches!(
            infer_auto_device_map(&t, &mm, &at(old, true)),
            Err(PlacementError::AccelerateFailure(m)) if m.contains("fallback_allocation")
        ));
        assert!(infer_auto_device_map(&t, &mm, &at(old, false))
            .unwrap()
            .unassigned
            .is_empty());
        let report = infer_auto_device_map(&t, &mm, &at(new, false)).unwrap().unassigned;
        assert_eq!(report.len(), 1);
        // the reserve is 0: the only layer is the one being placed
        assert_eq!((report[0].device, report[0].bits), (Device::Gpu(0), 100 * 8));
    }

    /// Three 100-byte blocks and a 60-byte head on GPUs of 250 bytes: GPU 0 keeps a 100-byte reserve.
    #[test]
    fn reserves_the_largest_layer_on_gpu0() {
        let mut b = TreeBuilder::new("Net");
        for i in 0..3 {
            let l = b.module(0, &format!("l{i}"), "Block");
            b.param(l, "w", 100);
        }
        let h = b.module(0, "head", "Linear");
        b.param(h, "w", 60);
        let t = b.build().unwrap();
        let mm = [
            (Device::Gpu(0), 250 * 8),
            (Device::Gpu(1), 250 * 8),
            (Device::Cpu, 1000 * 8),
        ];
        let r = infer_auto_device_map(
            &t,
            &mm,
            &CompatOptions {
                clean_result: true,
                ..Default::default()
            },
        )
        .unwrap();
        let got = names(&t, &r);
        assert_eq!(
            got,
            vec![
                ("l0".to_string(), "0".to_string()),
                ("l1".to_string(), "1".to_string()),
                ("l2".to_string(), "1".to_string()),
                ("head".to_string(), "cpu".to_string()),
            ]
        );
    }
}
