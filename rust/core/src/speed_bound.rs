//! A lower bound on the seconds the rest of a chain still costs, given the GPU and CPU bytes left to it,
//! so the speed program can drop a label that cannot beat a placement already found (branch and bound).
//!
//! **The relaxation.** Switches are left out (they are >= 0), and so is the CPU's activation buffer. GPU
//! bytes are not counted but *priced*: at `μ` seconds per byte a block's GPU mode costs `μ x` its bytes
//! more and `μ x` the room is given back, which for every `μ >= 0` is at most what a placement within the
//! room costs (Lagrangian relaxation; the GPUs are pooled). CPU bytes are counted, in cells, sizes rounded
//! *down* and the room *up*, with the disk read room charged as the program charges it (a label's level
//! says how much is reserved already). Each step only lowers the cost.
//!
//! **The tables.** The rest's least cost is solved backwards over the chain by dynamic programming on (read
//! level, CPU cells), once per price: `O(n x levels x cells)` per chain and `O(prices)` per label. The
//! prices tried are the blocks' savings per GPU byte over their CPU and disk modes, at a few quantiles:
//! the best price is the saving of the block at the margin, often one that would otherwise go to disk.
//! Tables are kept at every `stride`-th position (at most [`POINTS`]); before a point, the blocks up to it
//! count at their cheapest mode, which keeps the bound valid (the later blocks cannot get more bytes than
//! the whole rest has).

use crate::speed_program::SpeedBlock;

/// At most this many positions keep tables.
const POINTS: usize = 128;
/// Cells of the CPU's bytes when they are limited.
const CPU_CELLS: u64 = 1024;
/// At most this many GPU prices are tried.
const PRICES: usize = 6;
/// Of which this many are kept (those whose bound on the whole chain is highest).
const KEPT_PRICES: usize = 2;
/// Read levels beyond this many are not charged (the bound stays valid, only weaker).
const LEVELS: usize = 8;

/// What the program's labels carry that the bound needs, and how the program charges the read room.
pub(crate) struct ReadRoom<'a> {
    /// Read-room levels in bytes, ascending, the first 0 (the program's).
    pub levels: &'a [u64],
    /// The level a disk-stored block of these weight bytes needs.
    pub level_of: &'a dyn Fn(u64) -> usize,
}

/// The tables of one GPU price.
struct Priced {
    price: f64,
    /// Per point, per level, `cells + 1` least costs (f32 rounded down: still a bound).
    tables: Vec<Vec<f32>>,
}

/// Lower bounds on the cost of the rest of a chain from every position (module docs).
pub(crate) struct RestBound {
    /// `floor[k]`: blocks `k..` at their cheapest modes.
    floor: Vec<f64>,
    stride: usize,
    /// `None`: the CPU holds everything (one cell, CPU-side sizes 0).
    cpu_cell: Option<u64>,
    cells: usize,
    levels: usize,
    /// The bytes each level reserves (`[0]` when not charged).
    read_levels: Vec<u64>,
    priced: Vec<Priced>,
}

impl RestBound {
    /// The bound for `blocks` over `gpus` GPUs and a CPU of `cpu_capacity` bytes (`None`: it holds
    /// everything, the program does not track it; then `read` is not used).
    pub(crate) fn new(
        blocks: &[SpeedBlock],
        gpu_capacity: &[u64],
        cpu_capacity: Option<u64>,
        read: &ReadRoom,
    ) -> RestBound {
        let gpus = gpu_capacity.len();
        let n = blocks.len();
        let mut floor = vec![0.0f64; n + 1];
        for (k, block) in blocks.iter().enumerate().rev() {
            let least = block.cost.iter().flatten().copied().reduce(f64::min);
            floor[k] = floor[k + 1] + least.unwrap_or(f64::INFINITY);
        }
        let stride = n.div_ceil(POINTS).max(1);
        let cpu_cell = cpu_capacity.map(|c| c.div_ceil(CPU_CELLS).max(1));
        let cells = cpu_capacity.zip(cpu_cell).map_or(0, |(c, cell)| (c / cell) as usize);
        let charged = cpu_capacity.is_some() && read.levels.len() <= LEVELS;
        let levels = if charged { read.levels.len() } else { 1 };
        let mut shape = Shape {
            gpus,
            stride,
            cpu_cell,
            cells,
            levels,
            read_bytes: vec![0; levels],
            level_of: &|_| 0,
        };
        if charged {
            shape.read_bytes = read.levels.to_vec();
            shape.level_of = read.level_of;
        }
        // Every label checks every kept price: keep the ones that bound the whole chain best.
        let whole_gpu = gpu_capacity.iter().fold(0u64, |sum, &c| sum.saturating_add(c));
        let mut priced: Vec<(f64, Priced)> = gpu_prices(blocks, gpus)
            .into_iter()
            .map(|price| {
                let tables = shape.tables(blocks, price);
                let start = f64::from(tables[0][cells]) - price * whole_gpu as f64;
                (start, Priced { price, tables })
            })
            .collect();
        priced.sort_by(|a, b| b.0.total_cmp(&a.0));
        let priced = priced.into_iter().take(KEPT_PRICES).map(|(_, p)| p).collect();
        RestBound {
            floor,
            stride,
            cpu_cell,
            cells,
            levels,
            read_levels: if charged { read.levels.to_vec() } else { vec![0] },
            priced,
        }
    }

    /// Whether blocks `position..` surely cost more than `budget` seconds when they get at most `gpu_room`
    /// GPU bytes in all and `cpu_room` CPU bytes with `reserved` bytes of disk read room reserved already.
    pub(crate) fn exceeds(&self, position: usize, gpu_room: u64, cpu_room: u64, reserved: u64, budget: f64) -> bool {
        let point = position.div_ceil(self.stride);
        let reached = (point * self.stride).min(self.floor.len() - 1);
        // The blocks before the point at their cheapest; the difference of two floors, never below 0.
        let before = (self.floor[position] - self.floor[reached]).max(0.0);
        if self.floor[position] > budget {
            return true;
        }
        let cell = self
            .cpu_cell
            .map_or(0, |c| (cpu_room.div_ceil(c) as usize).min(self.cells));
        // The tables' level that reserves at least as much (then later raises are charged less): a bound.
        let level = self
            .read_levels
            .partition_point(|&bytes| bytes < reserved)
            .min(self.levels - 1);
        let index = level * (self.cells + 1) + cell;
        self.priced
            .iter()
            .any(|p| before + f64::from(p.tables[point][index]) - p.price * gpu_room as f64 > budget)
    }
}

/// What the tables are laid out over.
struct Shape<'a> {
    gpus: usize,
    stride: usize,
    cpu_cell: Option<u64>,
    cells: usize,
    levels: usize,
    /// Per level, its reserved bytes.
    read_bytes: Vec<u64>,
    level_of: &'a dyn Fn(u64) -> usize,
}

impl Shape<'_> {
    /// The tables of one GPU price, kept at every `stride`-th position: per level `l` and CPU cells `c`, the
    /// least cost of the rest with `c` cells of room and level `l` reserved.
    fn tables(&self, blocks: &[SpeedBlock], price: f64) -> Vec<Vec<f32>> {
        let n = blocks.len();
        let width = self.cells + 1;
        let mut tables = vec![Vec::new(); n.div_ceil(self.stride) + 1];
        let mut table = vec![0.0f32; self.levels * width];
        let mut next = table.clone();
        let in_cells = |bytes: u64| self.cpu_cell.map_or(0, |c| (bytes / c) as usize);
        for k in (0..=n).rev() {
            if k < n {
                let block = &blocks[k];
                let size = block.weight.saturating_add(block.runtime);
                let gpu = block.cost.iter().take(self.gpus).flatten().copied().reduce(f64::min);
                let gpu = gpu.map(|s| s + price * size as f64);
                let cpu = block.cost.get(self.gpus).copied().flatten();
                let disk = block.cost.get(self.gpus + 1).copied().flatten();
                let (on_cpu, on_disk) = (in_cells(size), in_cells(block.runtime));
                let needs = if self.levels > 1 {
                    (self.level_of)(block.weight)
                } else {
                    0
                };
                for level in 0..self.levels {
                    let here = &table[level * width..(level + 1) * width];
                    // A disk-stored block raises the level to what it needs and reserves the difference.
                    let raised = level.max(needs);
                    let there = &table[raised * width..(raised + 1) * width];
                    // Each raise rounded down on its own: their sum stays below the bytes reserved.
                    let grow = in_cells(self.read_bytes[raised] - self.read_bytes[level]);
                    for c in 0..=self.cells {
                        let mut best = gpu.map_or(f64::INFINITY, |s| s + f64::from(here[c]));
                        if let Some(s) = cpu.filter(|_| c >= on_cpu) {
                            best = best.min(s + f64::from(here[c - on_cpu]));
                        }
                        if let Some(s) = disk.filter(|_| c >= on_disk + grow) {
                            best = best.min(s + f64::from(there[c - on_disk - grow]));
                        }
                        next[level * width + c] = round_down(best);
                    }
                }
                std::mem::swap(&mut table, &mut next);
            }
            if k % self.stride == 0 || k == n {
                tables[k.div_ceil(self.stride)] = table.clone();
            }
        }
        tables
    }
}

/// GPU prices worth trying: what a byte of GPU room saves a block over its CPU or its disk mode, at a few
/// quantiles.
fn gpu_prices(blocks: &[SpeedBlock], gpus: usize) -> Vec<f64> {
    let mut savings: Vec<f64> = Vec::new();
    for b in blocks {
        let Some(gpu) = b.cost.iter().take(gpus).flatten().copied().reduce(f64::min) else {
            continue;
        };
        let size = b.weight.saturating_add(b.runtime);
        for host in b.cost.iter().skip(gpus).flatten() {
            if *host > gpu && size > 0 {
                savings.push((host - gpu) / size as f64);
            }
        }
    }
    savings.sort_by(f64::total_cmp);
    savings.dedup();
    if savings.len() <= PRICES {
        return savings;
    }
    (1..=PRICES)
        .map(|q| savings[(q * savings.len()).div_ceil(PRICES) - 1])
        .collect()
}

/// The largest f32 no greater than `x` (so a table of f32 stays a lower bound).
fn round_down(x: f64) -> f32 {
    let y = x as f32;
    if f64::from(y) > x {
        f32::from_bits(if y > 0.0 { y.to_bits() - 1 } else { y.to_bits() + 1 })
    } else {
        y
    }
}
