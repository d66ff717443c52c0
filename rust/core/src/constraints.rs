//! Constraints on blocks: tied parameters (blocks that must share a device) and pins (blocks the user
//! fixed to a device). The result is a set of *units*: a free unit is a leader block plus the blocks
//! tied to it; a pinned unit has its device decided.

use std::collections::HashMap;

use crate::blocks::{value_of, Block};
use crate::device::{Device, DeviceSpec};
use crate::error::{PlacementError, Result};
use crate::tree::{ModuleTree, NodeId};

/// The blocks of a unit (indices into the block list), leader first. Most units are one block, held
/// inline: a leaf-only plan of a large model has hundreds of thousands of units, one allocation each
/// otherwise. A boxed slice (not a `Vec`) keeps this 16 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// A unit of one block.
    One(usize),
    /// A tie group: several blocks.
    Many(Box<[usize]>),
}

impl std::ops::Deref for Members {
    type Target = [usize];

    fn deref(&self) -> &[usize] {
        match self {
            Members::One(block) => std::slice::from_ref(block),
            Members::Many(blocks) => blocks,
        }
    }
}

impl<'a> IntoIterator for &'a Members {
    type Item = &'a usize;
    type IntoIter = std::slice::Iter<'a, usize>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A group of blocks that must share one device; `blocks` are indices into the block list, leader first.
/// What only some trees have (staged sizes with ties, runtime memory, compute) is read from per-block
/// columns instead ([`Unit::staged_bits`], [`Unit::sum_of`]): a leaf-only solve of a large model holds
/// one record per block, and at 40 bytes 750k of them stay below glibc's mmap threshold (no fresh pages
/// faulted in on every solve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub blocks: Members,
    pub bits: u64,
    pub buffer_bits: u64,
    pub pinned: Option<Device>,
}

const _: () = assert!(std::mem::size_of::<Unit>() <= 40);

impl Unit {
    /// The unit's total of a per-block column made by [`attach_to_blocks`](crate::blocks::attach_to_blocks)
    /// (runtime memory, compute cost; 0 for an empty column).
    pub fn sum_of(&self, per_block: &[u64]) -> u64 {
        if per_block.is_empty() {
            return 0;
        }
        self.blocks.iter().map(|&b| value_of(per_block, b)).sum()
    }

    /// The most that is staged at once when the unit is offloaded: accelerate's hooks load one block at
    /// a time, each with the tied tensors it uses (wherever they are counted), never the whole unit.
    /// `staged` is the column of [`staged_bits`] (empty without ties: then each unit is one block).
    pub fn staged_bits(&self, staged: &[u64]) -> u64 {
        if staged.is_empty() {
            return self.bits;
        }
        self.blocks.iter().map(|&b| staged[b]).max().unwrap_or(0)
    }
}

/// Union-find root of block `x` (indices as `u32`: blocks are tree nodes, and a smaller table
/// touches less fresh memory on million-block trees).
fn find(parent: &mut [u32], x: usize) -> usize {
    let mut x = x as u32;
    while parent[x as usize] != x {
        parent[x as usize] = parent[parent[x as usize] as usize];
        x = parent[x as usize];
    }
    x as usize
}

/// The block containing `node` (blocks are sorted by node id and partition the tree below the root).
fn block_of(tree: &ModuleTree, blocks: &[Block], node: NodeId) -> Option<usize> {
    let i = blocks.partition_point(|b| b.node <= node).checked_sub(1)?;
    let b = blocks[i].node;
    (b == node || tree.is_strict_descendant(node, b)).then_some(i)
}

/// Per block: its bits plus the storage of every tied tensor it uses that is counted in another block
/// (what the execution device holds while the block runs offloaded).
/// Empty when the tree has no ties: every block then stages its own bits (see [`Unit::staged_bits`]).
pub fn staged_bits(tree: &ModuleTree, blocks: &[Block]) -> Vec<u64> {
    if tree.tie_groups().is_empty() {
        return Vec::new();
    }
    let mut staged: Vec<u64> = blocks.iter().map(|b| b.bits).collect();
    for group in tree.tie_groups() {
        let storage: u64 = group.iter().map(|&p| tree.own_bits(p)).sum();
        let home = group
            .iter()
            .find(|&&p| tree.own_bits(p) > 0)
            .and_then(|&p| block_of(tree, blocks, p));
        let mut users: Vec<usize> = group.iter().filter_map(|&p| block_of(tree, blocks, p)).collect();
        users.sort_unstable();
        users.dedup();
        for b in users.into_iter().filter(|b| Some(*b) != home) {
            staged[b] = staged[b].saturating_add(storage);
        }
    }
    staged
}

/// Group blocks into units: tied blocks join their earliest block; pins are resolved (the deepest pin
/// above a block wins; pins inside a block pin the whole block and must agree).
pub fn build_units(
    tree: &ModuleTree,
    blocks: &[Block],
    pins: &[(String, Device)],
    spec: &DeviceSpec,
) -> Result<Vec<Unit>> {
    let mut parent: Vec<u32> = (0..blocks.len() as u32).collect();
    for group in tree.tie_groups() {
        let mut members = group.iter().filter_map(|&p| block_of(tree, blocks, p));
        if let Some(first) = members.next() {
            for other in members {
                let (a, b) = (find(&mut parent, first), find(&mut parent, other));
                if a != b {
                    let (lo, hi) = (a.min(b), a.max(b));
                    parent[hi] = lo as u32;
                }
            }
        }
    }

    // Resolve pins per block: (depth of the pin node, pin lies inside the block, device, pin name).
    // Deeper pins win; two different pins inside one unsplittable block are a conflict.
    // Empty without pins (nothing to look up then).
    let mut block_pin: Vec<Option<(usize, bool, Device, String)>> = if pins.is_empty() {
        Vec::new()
    } else {
        vec![None; blocks.len()]
    };
    for (name, device) in pins {
        let node = tree.find(name).ok_or_else(|| {
            let close = tree.suggest(name);
            PlacementError::UnknownModule {
                name: name.clone(),
                context: "pins".into(),
                suggestions: close,
            }
        })?;
        if !spec.contains(*device) {
            return Err(PlacementError::UnknownDevice {
                key: device.to_string(),
                pin: Some(name.clone()),
            });
        }
        let depth = tree.ancestors_top_down(node).len() + usize::from(node != tree.root());
        let first = blocks.partition_point(|b| b.node < node);
        let mut covered: Vec<usize> = (first..blocks.len())
            .take_while(|&i| {
                blocks[i].node < tree.end(node)
                    && (blocks[i].node == node || tree.is_strict_descendant(blocks[i].node, node))
            })
            .collect();
        let inside_block = covered.is_empty();
        if inside_block {
            covered.extend(block_of(tree, blocks, node));
        }
        for i in covered {
            match &block_pin[i] {
                Some((_, true, dev, other)) if inside_block && *dev != *device => {
                    return Err(PlacementError::PinConflict {
                        pin: name.clone(),
                        device: *device,
                        other_pin: other.clone(),
                        other_device: *dev,
                        block: tree.name(blocks[i].node).to_string(),
                    });
                }
                Some((d, _, _, _)) if *d > depth => {}
                _ => block_pin[i] = Some((depth, inside_block, *device, name.clone())),
            }
        }
    }

    let mut units: Vec<Unit> = Vec::with_capacity(blocks.len());
    let mut unit_of_root: Vec<u32> = vec![u32::MAX; blocks.len()];
    // The blocks of each unit that has several (tie groups only), by unit index, gathered here and
    // boxed once at the end.
    let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..blocks.len() {
        let root = find(&mut parent, i);
        let index = if unit_of_root[root] == u32::MAX {
            unit_of_root[root] = units.len() as u32;
            units.push(Unit {
                blocks: Members::One(i),
                bits: 0,
                buffer_bits: 0,
                pinned: None,
            });
            units.len() - 1
        } else {
            let index = unit_of_root[root] as usize;
            let leader = units[index].blocks[0];
            groups.entry(index).or_insert_with(|| vec![leader]).push(i);
            index
        };
        let unit = &mut units[index];
        unit.bits += blocks[i].bits;
        unit.buffer_bits += blocks[i].buffer_bits;
        if let Some((_, _, device, pin_name)) = block_pin.get(i).and_then(Option::as_ref) {
            match unit.pinned {
                Some(existing) if existing != *device => {
                    let members = groups.get(&index).map_or(&unit.blocks[..], Vec::as_slice);
                    let names = tree
                        .tie_groups()
                        .iter()
                        .flatten()
                        .filter(|&&p| block_of(tree, blocks, p).is_some_and(|b| members.contains(&b)))
                        .map(|&p| tree.name(p).to_string())
                        .collect();
                    return Err(PlacementError::TiedPinConflict {
                        names,
                        first: existing,
                        second: *device,
                        pin: pin_name.clone(),
                    });
                }
                _ => unit.pinned = Some(*device),
            }
        }
    }
    for (index, members) in groups {
        units[index].blocks = Members::Many(members.into_boxed_slice());
    }
    Ok(units)
}
