//! accelerate 1.x's `infer_auto_device_map`, reproduced decision for decision over a [`ModuleTree`].
//!
//! This is the compatibility contract (and the oracle the better strategies are measured against), so
//! it keeps accelerate's quirks on purpose: the largest-layer reserve on the main devices, tied groups
//! matched by substring (`name + "."` in `param + "."`), direct buffers of split modules left unmapped,
//! `>=` in the split test, and `fallback_allocation`'s search. What it does not keep is the cost: layer
//! maxima are precomputed per subtree and names are node ids, so a 60k-module tree takes milliseconds.

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
    /// accelerate's `fallback_allocation`: when a GPU would stay empty, look for a module that fits it.
    pub fallback_allocation: bool,
    /// accelerate's `clean_result`: merge children that share a device into their parent.
    pub clean_result: bool,
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
}

const UNKNOWN: u64 = u64::MAX;

impl<'t> Solver<'t> {
    fn new(tree: &'t ModuleTree, no_split_classes: &[String]) -> Solver<'t> {
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

    /// `get_module_size_with_ties`: size of `size` plus the modules (from `list`) holding `partners`.
    fn size_with_ties(&self, partners: &[NodeId], size: i128, list: &VecDeque<NodeId>) -> Result<(i128, Vec<NodeId>)> {
        let mut total = size;
        let mut holders = Vec::with_capacity(partners.len());
        for &p in partners {
            let holder = list
                .iter()
                .copied()
                .find(|&m| self.tree.is_strict_descendant(p, m))
                .ok_or_else(|| {
                    PlacementError::AccelerateFailure(format!(
                    "tied parameter {:?} is not inside any module still to be placed (accelerate raises IndexError \
                     in get_module_size_with_ties); use devicemap.plan() instead",
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

/// Run accelerate's placement. `max_memory` is in accelerate's normalized order (GPU indices sorted, then
/// mps, cpu, disk) with capacities in bits; disk is appended when missing and is always unbounded.
pub fn infer_auto_device_map(
    tree: &ModuleTree,
    max_memory: &[(Device, u64)],
    options: &CompatOptions,
) -> Result<CompatResult> {
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

    let s = Solver::new(tree, &options.no_split_module_classes);
    let root = tree.root();
    let mut list: VecDeque<NodeId> = tree
        .direct_parameters(root)
        .chain(tree.child_modules(root))
        .chain(tree.direct_buffers(root))
        .collect();
    let (mut max_layer, mut max_names) = s.max_layer(list.iter().copied());
    let mut max_first = s.first_max_layer(list.iter().copied(), max_layer);
    let mut offloaded_modules = Vec::new();
    let mut unassigned = Vec::new();
    let mut map = OrderedMap::default();
    let mut used = vec![0i128; devices.len()];
    let mut current = 0usize;

    while let Some(x) = list.pop_front() {
        // Layers inside the module just taken no longer count towards the largest remaining layer.
        let lo = max_names.partition_point(|&n| n < x);
        let hi = max_names.partition_point(|&n| n < tree.end(x));
        max_names.drain(lo..hi);
        if max_names.is_empty() {
            (max_layer, max_names) = s.max_layer_of_modules(&list);
            max_first = s.first_max_layer(modules_of(tree, &list), max_layer);
        }
        let size = s.size(x);
        let partners = s.partners(x);
        let (device, capacity) = devices[current];
        let mut limit = capacity;
        let mut reserved = 0i128;
        if main_devices.contains(&device) {
            limit = limit.map(|c| c - max_layer as i128);
            reserved = max_layer as i128;
        }
        let (with_ties, holders) = s.size_with_ties(&partners, size, &list)?;

        let Some(limit) = limit.filter(|l| used[current] + with_ties > *l) else {
            used[current] += with_ties;
            map.set(x, device);
            if !tree.is_tensor(x) && matches!(device, Device::Cpu | Device::Disk) {
                offloaded_modules.push((x, device));
            }
            for holder in holders {
                if let Some(i) = list.iter().position(|&m| m == holder) {
                    list.remove(i);
                }
                map.set(holder, device);
            }
            continue;
        };

        if !partners.is_empty() && used[current] + size <= limit {
            // The module fits alone: try splitting one of its tied partners instead of moving on.
            if let Some(holder) = holders.iter().copied().find(|&h| s.expands(h)) {
                let idx = list
                    .iter()
                    .position(|&m| m == holder)
                    .expect("holder comes from the list");
                let mut rebuilt: VecDeque<NodeId> = VecDeque::with_capacity(list.len() + 8);
                rebuilt.push_back(x);
                rebuilt.extend(list.range(..idx).copied());
                rebuilt.extend(s.split_children(holder));
                rebuilt.extend(list.range(idx + 1..).copied());
                list = rebuilt;
                (max_layer, max_names) = s.max_layer_of_modules(&list);
                max_first = s.first_max_layer(modules_of(tree, &list), max_layer);
                continue;
            }
        }

        if used[current] + size >= limit && s.expands(x) {
            for c in s.split_children(x).into_iter().rev() {
                list.push_front(c);
            }
            (max_layer, max_names) = s.max_layer_of_modules(&list);
            max_first = s.first_max_layer(modules_of(tree, &list), max_layer);
            continue;
        }

        if used[current] == 0 && options.fallback_allocation && device != Device::Disk {
            let cap = capacity.expect("only disk is unbounded");
            let fallback_limit = cap - (max_layer as i128).max(with_ties) - used[current];
            // accelerate converts the limit with convert_file_size_to_int, which rejects negatives.
            if fallback_limit >= 0 {
                if let Some((found, rest)) = s.fallback(&list, fallback_limit)? {
                    list = rest;
                    list.push_front(x);
                    list.push_front(found);
                    continue;
                }
            }
        }

        if used[current] == 0 {
            let mut parts = vec![x];
            parts.extend(&holders);
            parts.extend(&partners);
            parts.extend(max_first.filter(|_| reserved > 0));
            unassigned.push(Unassigned {
                device,
                bits: with_ties + reserved,
                parts,
            });
        }
        used[current] += reserved;
        current += 1;
        list.push_front(x);
    }

    let entries = if options.clean_result {
        clean_device_map(tree, &map.entries)
    } else {
        let mut e = map.entries;
        e.sort_by_key(|(n, _)| *n);
        e
    };
    let used_bits = devices
        .iter()
        .zip(used)
        .filter(|(_, u)| *u > 0)
        .map(|((d, _), u)| (*d, u))
        .collect();
    Ok(CompatResult {
        device_map: entries,
        used_bits,
        offloaded_modules,
        unassigned,
    })
}

/// The modules (not tensors) of a to-do list, in order: what `get_max_layer_size` is asked about.
fn modules_of<'a>(tree: &'a ModuleTree, list: &'a VecDeque<NodeId>) -> impl Iterator<Item = NodeId> + 'a {
    list.iter().copied().filter(|i| !tree.is_tensor(*i))
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
