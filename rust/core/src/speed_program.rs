//! The speed objective's program: the least predicted decode time of a chain of blocks over GPUs, CPU and
//! disk (`devicemap.planners.speed_program` is its Python front, which documents the model).
//!
//! **Modes.** A block is resident on GPU `i` (stored and run there), stored and run on the CPU, or stored
//! on disk and run on the CPU. Its cost in each mode it allows is given; where consecutive blocks run on
//! different devices, `switch[previous][next]` is added (devices: GPU `0..G`, then `G` for the CPU).
//!
//! **Memory.** GPU `i` holds the weights and runtime memory of its blocks plus one activation buffer if
//! it runs anything. The CPU holds the weights of CPU-stored blocks, the runtime memory of every block it
//! runs, one activation buffer if it runs anything, and room to read the largest disk-stored block.
//!
//! **Program.** GPUs are filled in order (the GPU-resident blocks form runs in model order on GPUs of
//! increasing index; CPU-run blocks may sit anywhere between them). Blocks are scanned in model order; a
//! *label* is one placement of the prefix: its seconds, its bytes on the current GPU and its bytes on the
//! CPU. Labels are grouped by *key*: the current GPU, whether the CPU has run anything and whether it ran
//! the last block, and the CPU's read room (the largest disk-stored block so far, a level). Within a key
//! a label is dropped when another is no slower and uses no more *units* of GPU and CPU memory (`unit`,
//! `cpu_unit` bytes; the read room is rounded up to CPU units), so a key keeps at most one label per
//! (GPU unit, CPU unit) cell: that is the bound [`ProgramStats::bound`] states and the tests check.
//!
//! **Guarantee.** Bytes are counted exactly, so every answer fits. Dropping a label for one in a cell no
//! larger loses less than one unit of each device per block, so the answer is at least as fast as every
//! placement that fits GPU capacities reduced by `n x unit` and the CPU capacity reduced by
//! `(n + 1) x cpu_unit` (`n` blocks). With `unit = cpu_unit = 1` cells are bytes and it is exact.
//! The CPU is not tracked at all when it can hold every block at once (plus the read room).
//!
//! **Bound.** [`solve_chain`] first runs the program with a few cells per device (64 per GPU, 16 on the
//! CPU): its answer fits, so its seconds bound the run asked for, which drops every label whose seconds
//! plus a lower bound on the rest ([`crate::speed_bound`]: a knapsack relaxation over the room left)
//! exceed them (branch and bound). A dropped label cannot lead to anything faster than the answer in
//! hand, so the guarantee above holds for the better of the two answers, which is returned; the bound
//! changes the work, not what is promised ([`solve_chain_with`] runs without it, and the tests compare).
//! Where everything fits the GPUs it leaves a handful of labels per block instead of thousands.

use crate::error::{PlacementError, Result};
use crate::speed_bound::{ReadRoom, RestBound};

/// One block of the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedBlock {
    /// Bytes of weights (where it is stored).
    pub weight: u64,
    /// Bytes of runtime memory (KV cache, logits) on the device that runs it.
    pub runtime: u64,
    /// Seconds per mode, `None` where the block may not take it: GPU `0..G`, then the CPU (`G`), then
    /// disk (`G + 1`). Longer lists are an error; shorter ones mean the modes left out are not allowed.
    pub cost: Vec<Option<f64>>,
}

/// A placement problem: blocks in model order and the memory of the devices.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedChain {
    /// The blocks in model order.
    pub blocks: Vec<SpeedBlock>,
    /// Bytes of each GPU.
    pub gpu_capacity: Vec<u64>,
    /// Bytes of the CPU; `None`: unbounded.
    pub cpu_capacity: Option<u64>,
    /// Bytes of activations once on every device that runs something.
    pub activation: u64,
    /// Seconds of handing hidden states between execution devices (`(G + 1) x (G + 1)`, the CPU last).
    pub switch: Vec<Vec<f64>>,
}

/// Where a block lives in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stored and run on this GPU.
    Gpu(u32),
    /// Stored and run on the CPU.
    Cpu,
    /// Stored on disk, run on the CPU.
    Disk,
}

/// The fastest placement found.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedAnswer {
    /// Predicted decode seconds (the sum of the chosen costs and switches).
    pub seconds: f64,
    /// One mode per block.
    pub modes: Vec<Mode>,
}

/// How much work the program did, to check it against its bound without timing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgramStats {
    /// Labels kept, summed over the blocks.
    pub labels: u64,
    /// The most labels kept after one block.
    pub largest: u64,
    /// The most labels any block may keep: one per key and (GPU unit, CPU unit) cell.
    pub bound: u64,
    /// Candidates dropped because their seconds plus the least the rest costs exceed a placement found.
    pub pruned: u64,
    /// Labels kept by the first pass (coarse cells), which found that placement.
    pub first_pass_labels: u64,
}

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Label {
    seconds: f64,
    gpu_bytes: u64,
    cpu_bytes: u64,
    node: u32,
}

#[derive(Clone, Copy)]
struct Candidate {
    seconds: f64,
    gpu_bytes: u64,
    cpu_bytes: u64,
    gpu_cell: u64,
    cpu_cell: u64,
    parent: u32,
    mode: u32,
}

/// What stays fixed while the program runs.
struct Setup {
    gpus: usize,
    tracked: bool,
    cpu_capacity: u64,
    /// Read-room levels in bytes, ascending, the first 0.
    levels: Vec<u64>,
    unit: u64,
    cpu_unit: u64,
}

impl Setup {
    fn new(chain: &SpeedChain, unit: u64, cpu_unit: u64) -> Setup {
        let gpus = chain.gpu_capacity.len();
        let disk_weights: Vec<u64> = chain
            .blocks
            .iter()
            .filter(|b| b.cost.get(gpus + 1).copied().flatten().is_some())
            .map(|b| b.weight)
            .collect();
        let everything = chain
            .blocks
            .iter()
            .fold(chain.activation, |sum, b| {
                sum.saturating_add(b.weight).saturating_add(b.runtime)
            })
            .saturating_add(disk_weights.iter().copied().max().unwrap_or(0));
        let tracked = chain.cpu_capacity.is_some_and(|cap| everything > cap);
        let mut levels = vec![0u64];
        if tracked {
            levels.extend(disk_weights.iter().map(|&w| round_up(w, cpu_unit)));
            levels.sort_unstable();
            levels.dedup();
        }
        Setup {
            gpus,
            tracked,
            cpu_capacity: chain.cpu_capacity.unwrap_or(u64::MAX),
            levels,
            unit,
            cpu_unit,
        }
    }

    /// Key index of (current GPU or none, host flag 0/1/2, level).
    fn key(&self, gpu: Option<usize>, flag: usize, level: usize) -> usize {
        (gpu.map_or(0, |g| g + 1) * 3 + flag) * self.levels.len() + level
    }

    fn keys(&self) -> usize {
        (self.gpus + 1) * 3 * self.levels.len()
    }

    fn unkey(&self, key: usize) -> (Option<usize>, usize, usize) {
        let level = key % self.levels.len();
        let rest = key / self.levels.len();
        let gpu = rest / 3;
        (gpu.checked_sub(1), rest % 3, level)
    }

    fn level_of(&self, weight: u64) -> usize {
        let room = round_up(weight, self.cpu_unit);
        self.levels.partition_point(|&l| l < room)
    }
}

fn round_up(bytes: u64, unit: u64) -> u64 {
    bytes.div_ceil(unit).saturating_mul(unit)
}

fn invalid(what: &str, value: String, expected: &str) -> PlacementError {
    PlacementError::InvalidOption {
        what: what.to_string(),
        value,
        expected: vec![expected.to_string()],
    }
}

fn check(chain: &SpeedChain, unit: u64, cpu_unit: u64) -> Result<()> {
    if unit == 0 || cpu_unit == 0 {
        return Err(invalid(
            "speed program unit",
            format!("{unit} and {cpu_unit}"),
            "a positive number of bytes",
        ));
    }
    let devices = chain.gpu_capacity.len() + 1;
    if chain.gpu_capacity.len() >= u32::MAX as usize / 4 {
        return Err(invalid(
            "speed program GPU count",
            chain.gpu_capacity.len().to_string(),
            "fewer GPUs",
        ));
    }
    if chain.switch.len() != devices || chain.switch.iter().any(|row| row.len() != devices) {
        return Err(invalid(
            "speed program switch matrix",
            format!("{} rows", chain.switch.len()),
            "one row and one column per GPU and one for the CPU",
        ));
    }
    if chain.switch.iter().flatten().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(invalid(
            "speed program switch time",
            "a negative or non-finite value".into(),
            "finite seconds >= 0",
        ));
    }
    for (i, block) in chain.blocks.iter().enumerate() {
        if block.cost.len() > devices + 1 {
            return Err(invalid(
                "speed program block cost list",
                format!("block {i} with {} modes", block.cost.len()),
                "one per GPU, then CPU and disk",
            ));
        }
        if block.cost.iter().flatten().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(invalid(
                "speed program block cost",
                format!("block {i}: {:?}", block.cost),
                "finite seconds >= 0",
            ));
        }
    }
    if chain.blocks.len() >= NONE as usize {
        return Err(invalid(
            "speed program block count",
            chain.blocks.len().to_string(),
            "fewer blocks",
        ));
    }
    Ok(())
}

/// The fastest placement of `chain` (module docs: the program, its bound and its guarantee), or `None`
/// when nothing fits; with what the program did.
///
/// ```
/// use devicemap_core::speed_program::{solve_chain, Mode, SpeedBlock, SpeedChain};
/// let block = |gpu: f64, cpu: f64| SpeedBlock { weight: 10, runtime: 0, cost: vec![Some(gpu), Some(cpu)] };
/// let chain = SpeedChain {
///     blocks: vec![block(1.0, 5.0), block(1.0, 5.0), block(1.0, 9.0)],
///     gpu_capacity: vec![20],
///     cpu_capacity: None,
///     activation: 0,
///     switch: vec![vec![0.0; 2]; 2],
/// };
/// let (answer, _) = solve_chain(&chain, 1, 1).unwrap();
/// let answer = answer.unwrap();
/// assert_eq!(answer.seconds, 7.0); // the block slowest on the CPU stays on the GPU
/// assert_eq!(answer.modes, vec![Mode::Cpu, Mode::Gpu(0), Mode::Gpu(0)]);
/// ```
pub fn solve_chain(chain: &SpeedChain, unit: u64, cpu_unit: u64) -> Result<(Option<SpeedAnswer>, ProgramStats)> {
    solve_chain_with(chain, unit, cpu_unit, true)
}

/// [`solve_chain`], with the first pass and the time bound (`bounded`) or without them (every label the
/// cells keep, as the guarantee is stated; the tests compare both).
pub fn solve_chain_with(
    chain: &SpeedChain,
    unit: u64,
    cpu_unit: u64,
    bounded: bool,
) -> Result<(Option<SpeedAnswer>, ProgramStats)> {
    check(chain, unit, cpu_unit)?;
    let setup = Setup::new(chain, unit, cpu_unit);
    if !bounded {
        return run(chain, &setup, None);
    }
    let level_of = |weight: u64| setup.level_of(weight);
    let read = ReadRoom {
        levels: &setup.levels,
        level_of: &level_of,
    };
    let rest = RestBound::new(
        &chain.blocks,
        &chain.gpu_capacity,
        setup.tracked.then_some(setup.cpu_capacity),
        &read,
    );
    // Passes with fewer cells per device find placements that fit (bytes are exact) cheaply; the best
    // one's seconds bound every later pass, which drops each label that cannot beat it.
    let largest = chain.gpu_capacity.iter().copied().max().unwrap_or(1);
    let mut best: Option<SpeedAnswer> = None;
    let mut first_labels = 0;
    let mut passes: Vec<(u64, u64)> = FIRST_PASSES
        .iter()
        .map(|&(gpu_cells, cpu_cells)| {
            let cpu = if setup.tracked {
                cpu_unit.max(setup.cpu_capacity.div_ceil(cpu_cells))
            } else {
                cpu_unit
            };
            (unit.max(largest.div_ceil(gpu_cells)), cpu)
        })
        .filter(|&units| units != (unit, cpu_unit))
        .collect();
    passes.dedup();
    passes.push((unit, cpu_unit));
    let last = passes.len() - 1;
    let mut stats = ProgramStats::default();
    for (pass, &(pass_unit, pass_cpu_unit)) in passes.iter().enumerate() {
        let limit = best.as_ref().map_or(f64::INFINITY, |a| a.seconds);
        let bound = limit.is_finite().then_some(TimeBound {
            rest: &rest,
            // Only labels surely slower are dropped: the floating sums of a path and of the bound differ
            // in their last bits.
            threshold: limit + 1e-9 * limit.abs().max(1e-12),
        });
        let pass_setup = Setup::new(chain, pass_unit, pass_cpu_unit);
        let (answer, pass_stats) = run(chain, &pass_setup, bound.as_ref())?;
        if pass == last {
            stats = pass_stats;
        } else {
            first_labels += pass_stats.labels;
        }
        // A later pass's guarantee covers the placements of its reduced capacities; an earlier pass's
        // answer may use bytes theirs leave out, and then it is the faster one.
        if let Some(answer) = answer {
            if best.as_ref().is_none_or(|b| answer.seconds <= b.seconds) {
                best = Some(answer);
            }
        }
    }
    stats.first_pass_labels = first_labels;
    Ok((best, stats))
}
/// (cells per GPU, CPU cells) of the passes before the one asked for (the largest GPU's bytes and the
/// CPU's over these many), each bounded by the best placement found before it.
const FIRST_PASSES: [(u64, u64); 1] = [(64, 16)];

/// Drops a label whose seconds plus the least its rest can cost exceed `threshold`.
struct TimeBound<'a> {
    rest: &'a RestBound,
    threshold: f64,
}

/// One run of the program over `setup`'s cells, dropping labels `bound` rules out.
fn run(chain: &SpeedChain, setup: &Setup, bound: Option<&TimeBound>) -> Result<(Option<SpeedAnswer>, ProgramStats)> {
    let gpus = setup.gpus;
    let tracked = setup.tracked;
    let cost = |block: &SpeedBlock, mode: usize| block.cost.get(mode).copied().flatten();
    let keys = setup.keys();
    let mut stats = ProgramStats {
        bound: state_bound(chain, setup),
        ..ProgramStats::default()
    };
    // GPU bytes from GPU g on (g = gpus: none), for the room the rest of the chain may still get.
    let mut later_capacity = vec![0u64; gpus + 1];
    for g in (0..gpus).rev() {
        later_capacity[g] = later_capacity[g + 1].saturating_add(chain.gpu_capacity[g]);
    }
    // Arena of kept labels: (parent, mode), so a path is a chain of indices.
    let mut arena: Vec<(u32, u32)> = Vec::new();
    let mut states: Vec<Vec<Label>> = vec![Vec::new(); keys];
    states[setup.key(None, 0, 0)].push(Label {
        seconds: 0.0,
        gpu_bytes: 0,
        cpu_bytes: 0,
        node: NONE,
    });
    let mut next: Vec<Vec<Candidate>> = vec![Vec::new(); keys];
    let mut scratch = Scratch::default();
    for (index, block) in chain.blocks.iter().enumerate() {
        let size = block.weight.saturating_add(block.runtime);
        for (key, labels) in states.iter().enumerate() {
            if labels.is_empty() {
                continue;
            }
            let (gpu, flag, level) = setup.unkey(key);
            let previous = if index == 0 {
                None
            } else if flag == 2 {
                Some(gpus)
            } else {
                gpu
            };
            let switch =
                |device: usize| previous.map_or(0.0, |p| if p == device { 0.0 } else { chain.switch[p][device] });
            for mode in gpu.unwrap_or(0)..gpus {
                let Some(seconds) = cost(block, mode) else { continue };
                let step = seconds + switch(mode);
                let target = setup.key(Some(mode), flag.min(1), level);
                let capacity = chain.gpu_capacity[mode];
                if gpu == Some(mode) {
                    for label in labels {
                        let used = label.gpu_bytes.saturating_add(size);
                        if used <= capacity {
                            offer(&mut next, setup, target, label, step, used, label.cpu_bytes, mode);
                        }
                    }
                } else {
                    // Opening a later GPU: every label lands on the same GPU bytes.
                    let used = chain.activation.saturating_add(size);
                    if used <= capacity {
                        for label in labels {
                            offer(&mut next, setup, target, label, step, used, label.cpu_bytes, mode);
                        }
                    }
                }
            }
            let host_step = |mode: usize| cost(block, mode).map(|s| s + switch(gpus));
            let first_run = if flag == 0 { chain.activation } else { 0 };
            if let Some(step) = host_step(gpus) {
                let target = setup.key(gpu, 2, level);
                let add = if tracked { first_run.saturating_add(size) } else { 0 };
                for label in labels {
                    let used = label.cpu_bytes.saturating_add(add);
                    if used <= setup.cpu_capacity {
                        offer(&mut next, setup, target, label, step, label.gpu_bytes, used, gpus);
                    }
                }
            }
            if let Some(step) = host_step(gpus + 1) {
                let new_level = if tracked {
                    level.max(setup.level_of(block.weight))
                } else {
                    0
                };
                let target = setup.key(gpu, 2, new_level);
                let add = if tracked {
                    first_run
                        .saturating_add(block.runtime)
                        .saturating_add(setup.levels[new_level] - setup.levels[level])
                } else {
                    0
                };
                for label in labels {
                    let used = label.cpu_bytes.saturating_add(add);
                    if used <= setup.cpu_capacity {
                        offer(&mut next, setup, target, label, step, label.gpu_bytes, used, gpus + 1);
                    }
                }
            }
        }
        let mut kept = 0u64;
        for (key, candidates) in next.iter_mut().enumerate() {
            states[key].clear();
            let (gpu, _, level) = setup.unkey(key);
            let cut = bound.map(|bound| Cut {
                bound,
                setup,
                position: index + 1,
                later_capacity: &later_capacity,
                gpu,
                reserved: setup.levels[level],
            });
            stats.pruned += prune(
                candidates,
                gpus as u32,
                cut.as_ref(),
                &mut states[key],
                &mut arena,
                &mut scratch,
            )?;
            kept += states[key].len() as u64;
            candidates.clear();
        }
        stats.labels += kept;
        stats.largest = stats.largest.max(kept);
        if kept == 0 {
            return Ok((None, stats));
        }
    }
    let best = states
        .iter()
        .flatten()
        .min_by(|a, b| {
            let rank = |l: &Label| {
                arena
                    .get(l.node as usize)
                    .map_or(0, |&(_, mode)| tie_rank(mode, gpus as u32))
            };
            a.seconds
                .total_cmp(&b.seconds)
                .then((a.gpu_bytes, a.cpu_bytes, rank(a)).cmp(&(b.gpu_bytes, b.cpu_bytes, rank(b))))
        })
        .copied();
    let Some(best) = best else {
        return Ok((None, stats));
    };
    let mut modes = Vec::with_capacity(chain.blocks.len());
    let mut node = best.node;
    while node != NONE {
        let (parent, mode) = arena[node as usize];
        modes.push(match mode as usize {
            m if m < gpus => Mode::Gpu(m as u32),
            m if m == gpus => Mode::Cpu,
            _ => Mode::Disk,
        });
        node = parent;
    }
    modes.reverse();
    Ok((
        Some(SpeedAnswer {
            seconds: best.seconds,
            modes,
        }),
        stats,
    ))
}

/// Adds the candidate a label and a step make for the next block to `key`'s.
#[allow(clippy::too_many_arguments)]
fn offer(
    next: &mut [Vec<Candidate>],
    setup: &Setup,
    key: usize,
    label: &Label,
    step: f64,
    gpu_bytes: u64,
    cpu_bytes: u64,
    mode: usize,
) {
    next[key].push(Candidate {
        seconds: label.seconds + step,
        gpu_bytes,
        cpu_bytes,
        gpu_cell: gpu_bytes / setup.unit,
        cpu_cell: if setup.tracked { cpu_bytes / setup.cpu_unit } else { 0 },
        parent: label.node,
        mode: mode as u32,
    });
}

/// The time bound applied to the candidates of one key after one block.
struct Cut<'a> {
    bound: &'a TimeBound<'a>,
    setup: &'a Setup,
    /// The position after the block being placed.
    position: usize,
    /// GPU bytes from GPU g on (g = gpus: none).
    later_capacity: &'a [u64],
    /// The key's GPU and the bytes its read level reserves.
    gpu: Option<usize>,
    reserved: u64,
}

impl Cut<'_> {
    /// Whether `candidate` cannot beat the placement found: its seconds plus the least the rest costs
    /// with the room left, counted from the start of its cells (so a candidate in a smaller cell never
    /// has less, and dominance and the bound agree), exceed the threshold.
    fn rules_out(&self, candidate: &Candidate) -> bool {
        let unit = self.setup.unit;
        let gpu_room = self.gpu.map_or(self.later_capacity[0], |g| {
            let free = (self.later_capacity[g] - self.later_capacity[g + 1]).saturating_sub(candidate.gpu_cell * unit);
            self.later_capacity[g + 1].saturating_add(free)
        });
        let cpu_room = self
            .setup
            .cpu_capacity
            .saturating_sub(candidate.cpu_cell * self.setup.cpu_unit);
        self.bound.rest.exceeds(
            self.position,
            gpu_room,
            cpu_room,
            self.reserved,
            self.bound.threshold - candidate.seconds,
        )
    }
}

/// Scratch space of [`prune`], kept across keys and blocks so it is allocated once.
#[derive(Default)]
struct Scratch {
    /// Per (GPU cell, CPU cell), the index of its best candidate (`NONE`: none yet).
    best: Vec<u32>,
    /// The cells `best` holds, then the order the kept candidates are scanned in.
    touched: Vec<u64>,
    order: Vec<u32>,
    /// A Fenwick tree over CPU cells of the least seconds kept at or below each.
    fastest: Vec<f64>,
    cpu_cells: Vec<u64>,
}

/// At most this many (GPU cell, CPU cell) pairs are indexed directly; beyond, candidates are sorted.
const DIRECT_CELLS: u64 = 1 << 22;

/// Whether candidate `a` is kept before `b` in the same cell: the fastest, then the fewest bytes, then
/// [`tie_rank`] and the parent (so answers do not depend on the order candidates came in).
fn better(a: &Candidate, b: &Candidate, gpus: u32) -> std::cmp::Ordering {
    a.seconds
        .total_cmp(&b.seconds)
        .then((a.gpu_bytes, a.cpu_bytes).cmp(&(b.gpu_bytes, b.cpu_bytes)))
        .then((tie_rank(a.mode, gpus), a.parent).cmp(&(tie_rank(b.mode, gpus), b.parent)))
}

/// Keep the candidates of one key that no other beats: one per (GPU cell, CPU cell), the fastest (then
/// the fewest bytes), and of those only the ones faster than every kept one in a cell no larger in both.
fn prune(
    candidates: &[Candidate],
    gpus: u32,
    cut: Option<&Cut>,
    kept: &mut Vec<Label>,
    arena: &mut Vec<(u32, u32)>,
    scratch: &mut Scratch,
) -> Result<u64> {
    let mut dropped = 0;
    if candidates.is_empty() {
        return Ok(dropped);
    }
    let width = candidates.iter().map(|c| c.cpu_cell).max().unwrap_or(0) + 1;
    let height = candidates.iter().map(|c| c.gpu_cell).max().unwrap_or(0) + 1;
    let direct = height.checked_mul(width).filter(|&cells| cells <= DIRECT_CELLS);
    scratch.order.clear();
    if let Some(cells) = direct {
        // The best candidate of each cell, then the cells in (GPU cell, CPU cell) order.
        if scratch.best.len() < cells as usize {
            scratch.best.resize(cells as usize, NONE);
        }
        scratch.touched.clear();
        for (i, c) in candidates.iter().enumerate() {
            let cell = c.gpu_cell * width + c.cpu_cell;
            let slot = &mut scratch.best[cell as usize];
            if *slot == NONE {
                *slot = i as u32;
                scratch.touched.push(cell);
            } else if better(c, &candidates[*slot as usize], gpus).is_lt() {
                *slot = i as u32;
            }
        }
        scratch.touched.sort_unstable();
        for &cell in &scratch.touched {
            scratch
                .order
                .push(std::mem::replace(&mut scratch.best[cell as usize], NONE));
        }
    } else {
        scratch.order.extend(0..candidates.len() as u32);
        scratch.order.sort_unstable_by(|&a, &b| {
            let (a, b) = (&candidates[a as usize], &candidates[b as usize]);
            (a.gpu_cell, a.cpu_cell)
                .cmp(&(b.gpu_cell, b.cpu_cell))
                .then(better(a, b, gpus))
        });
        // The first of a cell is its best.
        scratch
            .order
            .dedup_by_key(|&mut i| (candidates[i as usize].gpu_cell, candidates[i as usize].cpu_cell));
    }
    // CPU cells, compressed, index the Fenwick tree.
    scratch.cpu_cells.clear();
    scratch
        .cpu_cells
        .extend(scratch.order.iter().map(|&i| candidates[i as usize].cpu_cell));
    scratch.cpu_cells.sort_unstable();
    scratch.cpu_cells.dedup();
    scratch.fastest.clear();
    scratch.fastest.resize(scratch.cpu_cells.len() + 1, f64::INFINITY);
    for &index in &scratch.order {
        let candidate = &candidates[index as usize];
        let slot = scratch.cpu_cells.partition_point(|&c| c < candidate.cpu_cell) + 1;
        let mut best = f64::INFINITY;
        let mut i = slot;
        while i > 0 {
            best = best.min(scratch.fastest[i]);
            i &= i - 1;
        }
        if best <= candidate.seconds {
            continue; // a label in a cell no larger (GPU cell no larger, scanned first) is no slower
        }
        // Cut after dominance: what a cut candidate dominates (slower, in a cell no smaller) is cut too.
        if cut.is_some_and(|cut| cut.rules_out(candidate)) {
            dropped += 1;
            continue;
        }
        let mut i = slot;
        while i < scratch.fastest.len() {
            scratch.fastest[i] = scratch.fastest[i].min(candidate.seconds);
            i += i & i.wrapping_neg();
        }
        let node = u32::try_from(arena.len())
            .map_err(|_| invalid("speed program size", arena.len().to_string(), "a smaller unit"))?;
        arena.push((candidate.parent, candidate.mode));
        kept.push(Label {
            seconds: candidate.seconds,
            gpu_bytes: candidate.gpu_bytes,
            cpu_bytes: candidate.cpu_bytes,
            node,
        });
    }
    Ok(dropped)
}

/// Among equally fast labels with equal bytes, the one whose last block went to the CPU, then disk, then
/// the lowest GPU: ties keep the front of the model on the GPUs, as the core's sequential fill does.
fn tie_rank(mode: u32, gpus: u32) -> u32 {
    match mode {
        m if m == gpus => 0,
        m if m == gpus + 1 => 1,
        m => 2 + m,
    }
}

/// The most labels one block may keep: per key, one per (GPU cell, CPU cell) that fits.
fn state_bound(chain: &SpeedChain, setup: &Setup) -> u64 {
    let cpu_cells = if setup.tracked {
        setup.cpu_capacity / setup.cpu_unit + 1
    } else {
        1
    };
    let gpu_cells: u64 = chain
        .gpu_capacity
        .iter()
        .map(|cap| cap / setup.unit + 1)
        .fold(1, |sum, cells| sum.saturating_add(cells)); // the 1: no GPU opened yet
    gpu_cells
        .saturating_mul(3)
        .saturating_mul(setup.levels.len() as u64)
        .saturating_mul(cpu_cells)
}

#[cfg(test)]
#[path = "speed_program_tests.rs"]
mod tests;
