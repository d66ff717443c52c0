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
        match self {
            Agg::Empty => Agg::Uniform(d, 1),
            Agg::Uniform(u, n) if u == d => Agg::Uniform(u, n + 1),
            Agg::Uniform(_, n) | Agg::Mixed(n) => Agg::Mixed(n + 1),
        }
    }
}

/// `entries` maps distinct nodes to devices. Returns the collapsed map in model (pre-order) order.
pub fn clean_device_map(tree: &ModuleTree, entries: &[(NodeId, Device)]) -> Vec<(NodeId, Device)> {
    let n = tree.len();
    let mut own: Vec<Option<Device>> = vec![None; n];
    // Aggregate over keys strictly below each node.
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
    use crate::tree::TreeBuilder;

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
