//! Collapse a fine device map into the coarsest equivalent one, with accelerate's `clean_device_map`
//! semantics: a module whose (two or more) mapped descendants all share one device is mapped whole.

use crate::device::Device;
use crate::tree::{ModuleTree, NodeId};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Agg {
    Empty,
    Uniform(Device, u32),
    Mixed(u32),
}

impl Agg {
    fn add(self, d: Device) -> Agg {
        self.merge(Agg::Uniform(d, 1))
    }

    fn count(self) -> u32 {
        match self {
            Agg::Empty => 0,
            Agg::Uniform(_, n) | Agg::Mixed(n) => n,
        }
    }

    /// The aggregate of two disjoint sets of keys.
    fn merge(self, other: Agg) -> Agg {
        match (self, other) {
            (Agg::Empty, x) | (x, Agg::Empty) => x,
            (Agg::Uniform(a, n), Agg::Uniform(b, m)) if a == b => Agg::Uniform(a, n + m),
            (x, y) => Agg::Mixed(x.count() + y.count()),
        }
    }
}

/// `entries` maps distinct nodes to devices. Returns the collapsed map in model (pre-order) order.
///
/// Nodes are numbered in pre-order (a subtree is `node..end`, children after their parent), so one
/// pass from the last node to the first folds every subtree's keys into its parent, and one pass from
/// the first emits the map, skipping each collapsed subtree: O(nodes), no walk up per key, no sort.
pub fn clean_device_map(tree: &ModuleTree, entries: &[(NodeId, Device)]) -> Vec<(NodeId, Device)> {
    // Few keys (layers kept whole): walking up from each key and down the keyed subtrees touches far
    // fewer nodes than a pass over every node.
    if entries.len().saturating_mul(SPARSE_KEYS_PER_NODE) < tree.len() {
        clean_by_walking(tree, entries)
    } else {
        clean_in_one_pass(tree, entries)
    }
}

/// Below one key per this many nodes, [`clean_by_walking`] is the faster of the two.
const SPARSE_KEYS_PER_NODE: usize = 32;

/// [`clean_device_map`] in one pass each way over every node: O(nodes), for maps with many keys.
fn clean_in_one_pass(tree: &ModuleTree, entries: &[(NodeId, Device)]) -> Vec<(NodeId, Device)> {
    // Read the keys in node order with a cursor instead of a per-node table (the solver's keys, its
    // blocks, come sorted already).
    let sorted: Vec<(NodeId, Device)>;
    let keys = if entries.is_sorted_by_key(|(node, _)| *node) {
        entries
    } else {
        sorted = {
            let mut keys = entries.to_vec();
            keys.sort_by_key(|(node, _)| *node);
            keys
        };
        &sorted
    };
    let n = tree.len();
    // Aggregate over keys strictly below each node.
    let mut below = vec![Agg::Empty; n];
    let mut next_key = keys.len();
    for node in (1..n).rev() {
        let mut whole = below[node];
        if next_key > 0 && keys[next_key - 1].0 as usize == node {
            next_key -= 1;
            whole = whole.add(keys[next_key].1);
        }
        if whole != Agg::Empty {
            if let Some(p) = tree.parent(node as NodeId) {
                below[p as usize] = below[p as usize].merge(whole);
            }
        }
    }
    let mut out = Vec::new();
    let mut key = keys.iter().peekable();
    let mut node = tree.root();
    while (node as usize) < n {
        if let Agg::Uniform(d, count) = below[node as usize] {
            if count > 1 {
                out.push((node, d));
                node = tree.end(node);
                // Keys inside the collapsed subtree are covered by it.
                while key.next_if(|(k, _)| *k < node).is_some() {}
                continue;
            }
        }
        if let Some(&(_, d)) = key.next_if(|(k, _)| *k == node) {
            out.push((node, d));
        }
        node += 1;
    }
    out
}

/// [`clean_device_map`] for few keys: every key added to each ancestor, then a walk down the keyed
/// subtrees only: O(keys x depth) besides two per-node tables.
fn clean_by_walking(tree: &ModuleTree, entries: &[(NodeId, Device)]) -> Vec<(NodeId, Device)> {
    let n = tree.len();
    let mut own: Vec<Option<Device>> = vec![None; n];
    let mut below = vec![Agg::Empty; n];
    for &(node, device) in entries {
        own[node as usize] = Some(device);
        let mut cur = tree.parent(node);
        while let Some(p) = cur {
            below[p as usize] = below[p as usize].add(device);
            cur = tree.parent(p);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![tree.root()];
    while let Some(m) = stack.pop() {
        match below[m as usize] {
            Agg::Uniform(d, count) if count > 1 => {
                out.push((m, d));
                continue;
            }
            _ => {}
        }
        if let Some(d) = own[m as usize] {
            out.push((m, d));
        }
        for &c in tree.children(m).iter().rev() {
            if own[c as usize].is_some() || below[c as usize] != Agg::Empty {
                stack.push(c);
            }
        }
    }
    out.sort_by_key(|(node, _)| *node);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::tests::random_tree;
    use crate::tree::TreeBuilder;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn one_pass_each_way_cleans_as_the_walk_does(
            ops in prop::collection::vec((0usize..64, 0u8..4, 0u64..5), 1..40),
            keys in prop::collection::vec((0usize..64, 0u32..3), 0..20),
        ) {
            let tree = random_tree(&ops);
            let mut entries: Vec<(NodeId, Device)> = keys
                .iter()
                .map(|&(i, d)| ((i % tree.len()) as NodeId, if d == 2 { Device::Cpu } else { Device::Gpu(d) }))
                .collect();
            entries.sort_by_key(|e| e.0);
            entries.dedup_by_key(|e| e.0);
            prop_assert_eq!(clean_in_one_pass(&tree, &entries), clean_by_walking(&tree, &entries));
            let reversed: Vec<(NodeId, Device)> = entries.iter().rev().copied().collect();
            prop_assert_eq!(clean_in_one_pass(&tree, &reversed), clean_by_walking(&tree, &entries));
            prop_assert_eq!(clean_by_walking(&tree, &reversed), clean_by_walking(&tree, &entries));
        }
    }

    #[test]
    fn collapses_uniform_subtrees_but_not_single_keys() {
        let mut b = TreeBuilder::new("Net");
        let m = b.module(0, "model", "M");
        let l0 = b.module(m, "l0", "L");
        let l1 = b.module(m, "l1", "L");
        let head = b.module(0, "head", "Linear");
        let t = b.build().unwrap();

        let all_zero = clean_device_map(
            &t,
            &[(l0, Device::Gpu(0)), (l1, Device::Gpu(0)), (head, Device::Gpu(0))],
        );
        assert_eq!(all_zero, vec![(0, Device::Gpu(0))]);

        let mixed = clean_device_map(&t, &[(l0, Device::Gpu(0)), (l1, Device::Gpu(0)), (head, Device::Cpu)]);
        assert_eq!(mixed, vec![(m, Device::Gpu(0)), (head, Device::Cpu)]);

        let single = clean_device_map(&t, &[(m, Device::Gpu(1))]);
        assert_eq!(single, vec![(m, Device::Gpu(1))]);
    }
}
