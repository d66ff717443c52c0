"""The speed objective's program: the least predicted decode time of a chain of blocks over GPUs, CPU and disk.

**Modes.** A block is, in the exact program of this module, *resident on GPU i* (stored and run there), *stored
and run on the CPU*, or *stored on disk and run on the CPU* (only when ``max_memory`` has ``"disk"``).
Its cost in a mode is :func:`devicemap.cost.estimate.block_time` of its :class:`~devicemap.cost.estimate.BlockCost`
in that storage/execution pair (decode phase); where consecutive blocks execute on different devices,
:func:`devicemap.cost.estimate.activation_time` of one token batch's hidden states is added. That is exactly
the sum :func:`devicemap.cost.estimate.estimate` reports for the decode phase.

**Memory**, as the memory plan counts it: a GPU holds the weights and runtime memory (KV cache, logits)
of the blocks resident on it plus one activation buffer if it runs anything (``gpu0_reserve`` is taken
off GPU 0); the CPU holds the weights of CPU-stored blocks, the runtime memory of every block it runs and
one activation buffer if it runs anything; disk is unbounded. A block stored on disk is read into RAM to
run, so the CPU also keeps room for the largest disk-stored block (as the core reserves it).

**The program** runs in the Rust core (``rust/core/src/speed_program.rs``, called through
``devicemap._core.speed_program``; this module converts). GPUs are filled in order: the GPU-resident blocks
form contiguous runs in model order on GPUs of increasing index (CPU-run blocks may sit anywhere between
them), which is what the core places. Scanning blocks in model order, a *label* is a placement of the
prefix: its seconds, its bytes on the current GPU and its bytes on the CPU (read room included). Labels are
grouped by *key*: the current GPU, whether the CPU has run anything and whether it ran the last block, and
the read room (the largest disk-stored block so far, one level per distinct disk-eligible block size, so
the program runs once, not once per size). Each block moves a label to the current GPU, a later GPU
(opened with its activation buffer), the CPU or disk. Within a key a label is dropped when another one is
no slower and lies in a cell no larger: sizes are counted in units of ``u`` bytes on GPUs and ``u_cpu`` on
the CPU, and a cell is (GPU bytes // ``u``, CPU bytes // ``u_cpu``). The CPU is not tracked (one cell) when
it can hold every block at once plus the read room.

**Bound on the work.** A key keeps at most one label per cell, so one block keeps at most
``(1 + sum over GPUs of (C_i // u + 1)) x 3 x L x (C_cpu // u_cpu + 1)`` labels (``L`` read-room levels; the
last factor 1 when the CPU is not tracked): :class:`ProgramWork` reports that bound and the labels kept, and
the tests check one against the other. Each kept label costs ``O(G + 2)`` transitions; the candidates of a
key are reduced to one per cell through a table indexed by cell, then scanned in cell order.

**Branch and bound.** The program first runs with 64 cells per GPU and 16 on the CPU; that answer fits, so
its seconds bound the run asked for, which drops every label whose seconds plus a lower bound on the rest of
the chain exceed them. The lower bound (``rust/core/src/speed_bound.rs``) relaxes the rest into a knapsack:
switches left out, GPU bytes pooled and priced at a few rates per byte (Lagrangian relaxation) while CPU
bytes and the disk read room are counted in cells (sizes rounded down, room up), solved backwards once per
chain. A dropped label leads to nothing faster than the answer in hand, so the guarantee below holds for the
better of the two answers, which is returned. Where everything fits the GPUs a block keeps a handful of
labels instead of one per way of splitting the layers between GPUs.

**Guarantee.** Bytes are counted exactly, so every answer fits the capacities. Replacing a label by one in a
cell no larger loses less than one unit per block, so the answer is no slower than any placement that fits
GPU capacities reduced by ``n x u`` and the CPU reduced by ``(n + 1) x u_cpu`` (``n`` blocks; the extra unit:
the read room is rounded up to CPU units). With ``u = u_cpu = 1`` it is exact (the tests check both against
brute force, in Python and in Rust). ``plan_for_speed`` (:mod:`devicemap.planners.speed`) takes its units
from :func:`units_for`: ``u = ceil(largest GPU capacity / 2048)`` when the CPU is not tracked (one dimension),
else ``u = ceil(largest GPU capacity / 512)`` and ``u_cpu = ceil(C_cpu / 64)``: for 24 GiB GPUs and
16 GiB of CPU, cells of 48 MiB and 256 MiB against blocks of 40 MiB to 5 GiB in the bundled shapes.

**Planning time** (``benches/bench_speed.py --planning-time``): the CPU untracked, a few milliseconds; a tight
CPU with disk, where labels spread over both dimensions, up to about 0.4 s on the largest mixture-of-experts
shapes (the labels kept, not the cells, set the work: the bound on the work above is far from reached).

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .. import _core
from ..cost.estimate import ExecutionDevice
from ..errors import InvalidOptionError

Mode = int | Literal["cpu", "disk"]
"""Where a block lives in the program: GPU ``i`` (stored and run there), ``"cpu"`` (stored and run on the
CPU) or ``"disk"`` (stored on disk, run on the CPU)."""
UNITS = 2048
"""GPU units per GPU when the CPU is not tracked (:func:`units_for`: ``u = ceil(largest GPU capacity / UNITS)``)."""
TRACKED_UNITS = 512
"""GPU units per GPU when the CPU is tracked too (a tight CPU): the labels then spread over two dimensions."""
CPU_UNITS = 64
"""Units of CPU memory when the CPU is tracked (it cannot hold every block at once)."""


def execution_of(mode: Mode) -> ExecutionDevice:
    """The device that computes a block in ``mode``."""
    return mode if isinstance(mode, int) else "cpu"


@dataclass(frozen=True)
class ChainBlock:
    """One block of the chain: its bytes and its decode seconds in each mode it may take."""

    name: str
    weight: int
    """Bytes of weights (where it is stored)."""
    runtime: int
    """Bytes of runtime memory (KV cache, logits) on the device that runs it."""
    cost: Mapping[Mode, float]
    """Seconds in each allowed mode, activation moves aside."""


@dataclass(frozen=True)
class Chain:
    """A placement problem: blocks in model order and the memory of the devices."""

    blocks: tuple[ChainBlock, ...]
    gpu_capacity: tuple[int, ...]
    cpu_capacity: int | None
    """``None``: unbounded."""
    activation: int = 0
    """Bytes of activations once on every device that runs something."""
    switch: Callable[[ExecutionDevice, ExecutionDevice], float] = field(default=lambda a, b: 0.0)
    """Seconds of handing hidden states from a block run on one device to the next block run on another."""


def evaluate(chain: Chain, modes: Sequence[Mode]) -> float | None:
    """Decode seconds of ``modes`` (one per block), or ``None`` when it breaks a rule: a mode the block
    does not allow, GPU runs out of model order, or a device over capacity (the program's accounting)."""
    if len(modes) != len(chain.blocks):
        return None
    gpu_used = [0] * len(chain.gpu_capacity)
    cpu_used = 0
    cpu_runs = False
    highest = -1
    seconds = 0.0
    previous: ExecutionDevice | None = None
    for block, mode in zip(chain.blocks, modes, strict=True):
        if mode not in block.cost:
            return None
        if isinstance(mode, int):
            if mode < highest or not 0 <= mode < len(gpu_used):
                return None
            if mode != highest:
                gpu_used[mode] += chain.activation
            highest = mode
            gpu_used[mode] += block.weight + block.runtime
        else:
            if not cpu_runs:
                cpu_used += chain.activation
            cpu_runs = True
            cpu_used += block.runtime + (block.weight if mode == "cpu" else 0)
        device = execution_of(mode)
        seconds += block.cost[mode]
        if previous is not None and previous != device:
            seconds += chain.switch(previous, device)
        previous = device
    # A block stored on disk is read into RAM to run on the CPU: room for the largest of them.
    cpu_used += max((b.weight for b, m in zip(chain.blocks, modes, strict=True) if m == "disk"), default=0)
    if any(used > cap for used, cap in zip(gpu_used, chain.gpu_capacity, strict=True)):
        return None
    if chain.cpu_capacity is not None and cpu_used > chain.cpu_capacity:
        return None
    return seconds


def cpu_is_tracked(chain: Chain) -> bool:
    """Whether the CPU can run out: it cannot hold every block at once plus the largest disk-stored one."""
    if chain.cpu_capacity is None:
        return False
    room = max((b.weight for b in chain.blocks if "disk" in b.cost), default=0)
    return chain.activation + room + sum(b.weight + b.runtime for b in chain.blocks) > chain.cpu_capacity


def units_for(chain: Chain) -> tuple[int, int]:
    """``(u, u_cpu)`` for ``chain``: :data:`UNITS` per GPU when the CPU is not tracked, else
    :data:`TRACKED_UNITS` per GPU and :data:`CPU_UNITS` on the CPU (the guarantee: module docstring)."""
    largest = max(chain.gpu_capacity, default=1)
    if not cpu_is_tracked(chain):
        return max(1, -(-largest // UNITS)), 1
    cpu = chain.cpu_capacity or 1
    return max(1, -(-largest // TRACKED_UNITS)), max(1, -(-cpu // CPU_UNITS))


def solve_chain(chain: Chain, unit: int = 1, cpu_unit: int | None = None) -> tuple[float, list[Mode]] | None:
    """The least decode time over all placements :func:`evaluate` accepts, and one placement reaching it
    (``None``: nothing fits). Bytes are counted exactly; labels whose GPU bytes fall in the same ``unit``
    (CPU bytes in the same ``cpu_unit``, default ``unit``) are merged, keeping the fastest. Exact with
    ``unit=1``; with larger units see the module docstring (the guarantee).

    >>> blocks = tuple(ChainBlock(f"b{i}", 10, 0, {0: 1.0, "cpu": 5.0}) for i in range(3))
    >>> solve_chain(Chain(blocks, gpu_capacity=(25,), cpu_capacity=None))
    (7.0, [0, 0, 'cpu'])
    """
    return solve_chain_counted(chain, unit, cpu_unit)[0]


@dataclass(frozen=True)
class ProgramWork:
    """What the program did, to check against its bound without timing it (module docstring)."""

    labels: int
    """Labels kept, summed over the blocks."""
    largest: int
    """The most labels kept after one block."""
    bound: int
    """The most labels one block may keep: one per key and (GPU unit, CPU unit) cell."""


def solve_chain_counted(
    chain: Chain, unit: int = 1, cpu_unit: int | None = None
) -> tuple[tuple[float, list[Mode]] | None, ProgramWork]:
    """:func:`solve_chain`'s answer and the :class:`ProgramWork` it took."""
    cpu_unit = unit if cpu_unit is None else cpu_unit
    for value in (unit, cpu_unit):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOptionError(
                f"units must be positive numbers of bytes, got {unit!r} and {cpu_unit!r}"
            )
    gpus = len(chain.gpu_capacity)
    modes: list[Mode] = [*range(gpus), "cpu", "disk"]
    devices: list[ExecutionDevice] = [*range(gpus), "cpu"]
    found, (labels, largest, bound) = _core.speed_program(
        [b.weight for b in chain.blocks],
        [b.runtime for b in chain.blocks],
        [[_seconds(b.cost.get(m)) for m in modes] for b in chain.blocks],
        list(chain.gpu_capacity),
        chain.cpu_capacity,
        chain.activation,
        [[0.0 if a == b else float(chain.switch(a, b)) for b in devices] for a in devices],
        unit,
        cpu_unit,
    )
    work = ProgramWork(labels, largest, bound)
    if found is None:
        return None, work
    seconds, chosen = found
    return (seconds, [modes[i] for i in chosen]), work


def _seconds(value: float | None) -> float | None:
    return None if value is None else float(value)
