//! Where offloaded blocks execute: the staging rule.
//!
//! Every block has a storage device and an execution device. A block on a GPU executes there. A block
//! stored on the CPU or on disk (offloaded) is staged on a GPU for each forward pass, or executes on the
//! CPU. The planner chooses, in this order, and keeps the first rule that gives a runnable plan:
//!
//! 1. **GPU 0 stages every offloaded block** (as accelerate does): room for the largest of them, their
//!    runtime memory and kept buffers is reserved on GPU 0. When this works the plan is exactly the one
//!    devicemap always made.
//! 2. **Another GPU stages them all**: each other GPU is tried with the reserve taken there and only
//!    there; the one keeping the longest prefix of the model on the GPUs wins, the lowest index among
//!    equals (e.g. a small GPU 0 next to a roomy GPU 1).
//! 3. **The blocks too large to stage run on the CPU** (only if the spec has a CPU): for a staging limit
//!    `t` among the offloaded units' staged sizes, the units staged at most `t` stage on a GPU and the
//!    larger ones execute on the CPU, which then holds their runtime memory (KV cache), their kept
//!    buffers, an activation buffer and, for disk-stored ones, room to load them. Every GPU and every
//!    limit are tried (and "no GPU stages anything"); the plan keeping the longest prefix on the GPUs
//!    wins, then the one executing the fewest bytes on the CPU, then the lowest GPU index. This is what
//!    gets a big-vocabulary embedding larger than any GPU a plan.
//!
//! A tie group (blocks sharing a tensor) is one unit here like any other: staging either of its blocks
//! loads the shared tensor on the device that runs it, which is what its staged size counts, and the
//! whole group runs on one device.
//!
//! When none of these is runnable and the spec has no disk, the solver tries them all once more letting
//! the units left over after the CPU take room the GPUs' runs left unused (see `Solver::tail_to_gpus`);
//! only then is a model refused. The error is the one of rule 1 (what the user knows from accelerate),
//! naming the block that no GPU can stage and why the CPU cannot run it.
//! `SolveOptions::execution_device` forces the device: a GPU (rule 1 on that GPU, then rule 3 on it
//! alone) or the CPU (every offloaded block executes on the CPU). Without GPUs the CPU executes
//! everything, as always.

use crate::device::Device;
use crate::error::{PlacementError, Result, Shortfall};

/// Which offloaded units a GPU stages; the others execute on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staging {
    /// Index (among the spec's GPUs) of the GPU that stages; `None`: every offloaded unit runs on the CPU.
    pub gpu: Option<usize>,
    /// Units whose staged size is at most this are staged (`None`: all of them).
    pub limit: Option<u64>,
}

impl Staging {
    /// The default: GPU 0 (the first GPU) stages everything.
    pub const FIRST_GPU: Staging = Staging {
        gpu: Some(0),
        limit: None,
    };

    /// Every offloaded unit executes on the CPU.
    pub const CPU: Staging = Staging { gpu: None, limit: None };

    /// A GPU stages every offloaded unit.
    pub fn all_on(gpu: usize) -> Staging {
        Staging {
            gpu: Some(gpu),
            limit: None,
        }
    }

    /// Whether a unit of `staged` bits is staged on the GPU (else it executes on the CPU).
    pub fn stages(&self, staged: u64) -> bool {
        self.gpu.is_some() && self.limit.is_none_or(|t| staged <= t)
    }
}

/// A user's choice of execution device, as an index among the GPUs or the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// This GPU (index among the spec's GPUs) stages.
    Gpu(usize),
    /// Every offloaded block executes on the CPU.
    Cpu,
}

/// Check a forced execution device against the spec's devices (GPUs in order, then whether there is a
/// CPU): the GPU's index, or the CPU.
pub fn forced(device: Device, gpus: &[Device], has_cpu: bool) -> Result<Forced> {
    if let Some(i) = gpus.iter().position(|g| *g == device) {
        return Ok(Forced::Gpu(i));
    }
    if device == Device::Cpu && has_cpu {
        return Ok(Forced::Cpu);
    }
    let mut available: Vec<Device> = gpus.to_vec();
    if has_cpu {
        available.push(Device::Cpu);
    }
    Err(PlacementError::InvalidExecutionDevice { device, available })
}

/// What the chooser compares between attempts.
pub trait Outcome {
    /// Free units kept on the GPUs (the GPU-resident prefix).
    fn on_gpus(&self) -> usize;
    /// Bits of weights executed on the CPU.
    fn cpu_executed_bits(&self) -> u64;
}

/// Pick the staging by the rule of this module. `gpus`: how many GPUs; `has_cpu`: whether the spec has
/// a CPU; `limits`: the staged sizes of the units that may be offloaded; `attempt` runs one staging.
pub fn choose<O: Outcome>(
    gpus: usize,
    has_cpu: bool,
    forced: Option<Forced>,
    limits: &[u64],
    mut attempt: impl FnMut(Staging) -> Result<O>,
) -> Result<(Staging, O)> {
    let candidates: Vec<usize> = match forced {
        Some(Forced::Cpu) => return attempt(Staging::CPU).map(|o| (Staging::CPU, o)),
        Some(Forced::Gpu(i)) => vec![i],
        None => (0..gpus).collect(),
    };
    // Rules 1 and 2: one GPU stages everything.
    let first_error = match attempt(Staging::all_on(candidates[0])) {
        Ok(o) => return Ok((Staging::all_on(candidates[0]), o)),
        Err(e) => e,
    };
    let mut best: Option<(Staging, O)> = None;
    for &g in &candidates[1..] {
        if let Ok(o) = attempt(Staging::all_on(g)) {
            if best.as_ref().is_none_or(|(_, b)| o.on_gpus() > b.on_gpus()) {
                best = Some((Staging::all_on(g), o));
            }
        }
    }
    if let Some(found) = best {
        return Ok(found);
    }
    // Rule 3: the largest units execute on the CPU.
    if !has_cpu {
        return Err(with_cpu_reason(
            first_error,
            "max_memory has no \"cpu\" to run it".into(),
        ));
    }
    let mut limits = limits.to_vec();
    limits.sort_unstable();
    limits.dedup();
    let mut cpu_error = None;
    let stagings = candidates
        .iter()
        .flat_map(|&g| {
            limits.iter().map(move |&t| Staging {
                gpu: Some(g),
                limit: Some(t),
            })
        })
        .chain(std::iter::once(Staging::CPU));
    for staging in stagings {
        match attempt(staging) {
            Ok(o) => {
                let better = best.as_ref().is_none_or(|(_, b)| {
                    (o.on_gpus(), std::cmp::Reverse(o.cpu_executed_bits()))
                        > (b.on_gpus(), std::cmp::Reverse(b.cpu_executed_bits()))
                });
                if better {
                    best = Some((staging, o));
                }
            }
            Err(e) if staging == Staging::CPU => cpu_error = Some(e),
            Err(_) => {}
        }
    }
    match best {
        Some(found) => Ok(found),
        None => {
            let why = match cpu_error {
                Some(PlacementError::DoesNotFit(s)) => s.to_string(),
                Some(other) => other.to_string(),
                None => "no plan runs it there".into(),
            };
            Err(with_cpu_reason(first_error, why))
        }
    }
}

/// Rule 1's staging error, completed with why the CPU cannot run the block either.
fn with_cpu_reason(error: PlacementError, why: String) -> PlacementError {
    match error {
        PlacementError::DoesNotFit(Shortfall::Staging {
            device,
            block,
            reserve,
            base,
            capacity,
            total,
            ..
        }) => PlacementError::DoesNotFit(Shortfall::Staging {
            device,
            block,
            reserve,
            base,
            capacity,
            total,
            elsewhere: Some(why),
        }),
        other => other,
    }
}
