//! devicemap-core: decide where each layer of a large model lives (GPU 0..n, CPU, disk).
//!
//! The crate is pure Rust (no Python) so that it can be tested with `cargo test` alone and reused from
//! other front ends. Sizes are counted in **bits** internally: accelerate counts a `bool` element as
//! 1/8 byte, and integer bits keep every comparison exact. Convert with [`device::bits_to_bytes`].

#![warn(missing_docs)]

mod blocks;
#[cfg(test)]
mod checkpoint_reference;
pub mod checkpoint_tree;
mod clean;
mod constraints;
pub mod device;
pub mod error;
mod header_json;
mod natural_order;
pub mod plan;
pub mod safetensors;
mod speed_bound;
pub mod speed_program;
pub mod strategy;
pub mod tree;

pub use device::{parse_size, Device, DeviceSpec};
pub use error::{PlacementError, Result};
pub use plan::Plan;
pub use strategy::{solve, SolveOptions, Strategy};
pub use tree::{Columns, LocalNames, ModuleTree, NameList, NodeKind, TreeColumns};
