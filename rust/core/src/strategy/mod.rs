//! Strategies: turn a tree, a device spec and constraints into a [`Plan`].
//!
//! Every strategy shares one pipeline: cut the tree into blocks, group tied blocks and resolve pins into
//! units, decide how much of the chain of free units stays on the GPUs (reserving staging room only if
//! something is offloaded), lay that prefix over the GPUs (the strategy proper; tie groups may sit on any
//! GPU, see [`ties`]), then put the rest on the CPU and finally on disk.
//!
//! Memory on a GPU is weights + runtime memory (KV cache and logits attached to blocks, and one
//! activation buffer per computing device). An offloaded block's weights go to CPU/disk, but it runs on
//! its execution device (the GPU that stages it, GPU 0 unless it cannot, or the CPU: see [`execution`]),
//! so its runtime memory and the staging room land there.

pub mod accelerate_budget;
pub mod accelerate_compat;
pub mod accelerate_version;
mod balanced;
mod chain;
pub mod execution;
mod low_zero;
mod offload;
mod reasons;
mod sequential;
mod solver;
mod ties;

use crate::device::{Device, DeviceSpec};
use crate::error::{PlacementError, Result};
use crate::plan::Plan;
use crate::tree::{ModuleTree, NodeId};

/// How the GPUs share the layers (accelerate's `device_map` strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// One GPU: `sequential`; several: `balanced`; none: CPU then disk.
    #[default]
    Auto,
    /// Fill GPU 0, then GPU 1, ... in model order.
    Sequential,
    /// Minimise the largest GPU load (exact chains-to-chains optimum).
    Balanced,
    /// As balanced over GPUs 1.., keeping GPU 0 as empty as possible (room for generate's outputs).
    BalancedLow0,
}

impl Strategy {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [Strategy; 4] = [
        Strategy::Auto,
        Strategy::Balanced,
        Strategy::BalancedLow0,
        Strategy::Sequential,
    ];

    /// Read a strategy name ("auto", "balanced", "balanced_low_0", "sequential").
    pub fn parse(name: &str) -> Result<Strategy> {
        Strategy::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| invalid_option("strategy", name, Strategy::ALL.map(Strategy::name)))
    }

    /// The name users pass (the inverse of [`Strategy::parse`]).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::Sequential => "sequential",
            Strategy::Balanced => "balanced",
            Strategy::BalancedLow0 => "balanced_low_0",
        }
    }

    /// The strategy that runs on `gpus` GPUs (`Auto` picks one).
    fn resolve(self, gpus: usize) -> ResolvedStrategy {
        match self {
            Strategy::Auto if gpus > 1 => ResolvedStrategy::Balanced,
            Strategy::Auto | Strategy::Sequential => ResolvedStrategy::Sequential,
            Strategy::Balanced => ResolvedStrategy::Balanced,
            Strategy::BalancedLow0 => ResolvedStrategy::BalancedLow0,
        }
    }
}

/// A [`Strategy`] with `Auto` resolved, so every layout match covers exactly the strategies that run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResolvedStrategy {
    Sequential,
    Balanced,
    BalancedLow0,
}

impl ResolvedStrategy {
    fn name(self) -> &'static str {
        match self {
            ResolvedStrategy::Sequential => Strategy::Sequential.name(),
            ResolvedStrategy::Balanced => Strategy::Balanced.name(),
            ResolvedStrategy::BalancedLow0 => Strategy::BalancedLow0.name(),
        }
    }
}

/// What the balanced strategies equalise across GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Memory (weights + runtime memory) per GPU.
    #[default]
    Memory,
    /// Compute per GPU (the `compute` values of the options), within each GPU's memory.
    Compute,
}

impl Balance {
    /// Every balance mode.
    pub const ALL: [Balance; 2] = [Balance::Memory, Balance::Compute];

    /// Read a balance mode ("memory" or "compute").
    pub fn parse(name: &str) -> Result<Balance> {
        Balance::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| invalid_option("balance", name, Balance::ALL.map(Balance::name)))
    }

    /// The name users pass (the inverse of [`Balance::parse`]).
    pub fn name(self) -> &'static str {
        match self {
            Balance::Memory => "memory",
            Balance::Compute => "compute",
        }
    }
}

/// The error for an option value that is none of `expected`.
fn invalid_option<const N: usize>(what: &str, value: &str, expected: [&str; N]) -> PlacementError {
    PlacementError::InvalidOption {
        what: what.into(),
        value: value.into(),
        expected: expected.map(String::from).to_vec(),
    }
}

/// Everything a solve takes besides the tree and the devices.
#[derive(Debug, Clone, Default)]
pub struct SolveOptions {
    /// How the GPUs share the layers.
    pub strategy: Strategy,
    /// Module classes never split across devices (a model's `_no_split_modules`).
    pub no_split_module_classes: Vec<String>,
    /// Module or tensor name -> device fixed by the user.
    pub pins: Vec<(String, Device)>,
    /// Offload buffers with their blocks (otherwise they stay on the execution device).
    pub offload_buffers: bool,
    /// Runtime memory in bits attached to nodes (e.g. a decoder layer's KV cache, the head's logits).
    pub runtime_bits: Vec<(NodeId, u64)>,
    /// Working memory in bits every computing device needs once (activations).
    pub activation_bits: u64,
    /// Compute cost attached to nodes (e.g. FLOPs per token), used by `Balance::Compute`.
    pub compute: Vec<(NodeId, u64)>,
    /// What the balanced strategies equalise.
    pub balance: Balance,
    /// Bits kept free on GPU 0 on top of everything else (e.g. for generate's outputs).
    pub gpu0_reserve_bits: u64,
    /// Where offloaded blocks execute, if forced: a GPU of the spec (it stages them) or the CPU (every
    /// offloaded block computes on the CPU). `None`: the planner chooses (see [`execution`]).
    pub execution_device: Option<Device>,
}

/// Place `tree` on the devices of `spec`: the plan, or why the model does not fit.
pub fn solve(tree: &ModuleTree, spec: &DeviceSpec, options: &SolveOptions) -> Result<Plan> {
    solver::Solver::new(tree, spec, options)?.solve()
}

#[cfg(test)]
mod execution_tests;
#[cfg(test)]
mod tests;
