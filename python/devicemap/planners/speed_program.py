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
one activation buffer if it runs anything; disk is unbounded.

A block stored on disk is read into RAM to run, so the CPU also keeps room for the largest disk-stored
block (as the core reserves it); that term is a maximum, so the program runs once per bound ``R`` on it
(each distinct block size, and no disk) with disk allowed only for blocks up to ``R`` and ``R`` taken off
the CPU, and the best run wins.

**Exact dynamic program.** GPUs are filled in order: the GPU-resident blocks form contiguous runs in model
order on GPUs of increasing index (CPU-run blocks may sit anywhere between them), which is what the core
places. Scanning blocks in model order, a state is ``(current GPU, units used on it, units used on the
CPU, whether the last block ran on the CPU, whether the CPU runs anything)`` and its value the least
decode time of the prefix; each block moves a state to: the current GPU, a later GPU (opened with its
activation buffer), the CPU, or disk. The CPU dimension is dropped (kept at 0) when the CPU can hold
every block at once, so it never binds. States of the same key except GPU units are pruned to those not
dominated (more units and no less time). Sizes are counted in units of ``u`` bytes, block sizes rounded
up and capacities down, so every answer fits; it is optimal among placements that fit the capacities
reduced by ``n x u`` (``n`` blocks), and exact with ``u = 1`` (the tests). ``plan_for_speed`` (:mod:`devicemap.planners.speed`) picks ``u`` so no
device has more than :data:`UNITS` units. Time and space: ``O(n x G x (C/u) x modes)`` states per block
with ``G`` GPUs, ``C`` the largest capacity (times ``C_cpu/u`` only when the CPU binds).

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..cost.estimate import ExecutionDevice
from ..errors import InvalidOptionError

Mode = int | Literal["cpu", "disk"]
"""Where a block lives in the program: GPU ``i`` (stored and run there), ``"cpu"`` (stored and run on the
CPU) or ``"disk"`` (stored on disk, run on the CPU)."""
UNITS = 2048
"""At most this many units per GPU in :func:`plan`'s program (``u = ceil(largest GPU capacity / UNITS)``)."""
CPU_UNITS = 256
"""At most this many units of CPU memory (only tracked when the CPU cannot hold every block)."""


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


def _units(size: int, unit: int) -> int:
    return -(-size // unit)


def solve_chain(chain: Chain, unit: int = 1, cpu_unit: int | None = None) -> tuple[float, list[Mode]] | None:
    """The least decode time over all placements :func:`evaluate` accepts, and one placement reaching it
    (``None``: nothing fits). Bytes are counted exactly; states whose GPU bytes fall in the same ``unit``
    (CPU bytes in the same ``cpu_unit``, default ``unit``) are merged, keeping the fastest. Exact with
    ``unit=1``; with larger units see the module docstring."""
    cpu_unit = unit if cpu_unit is None else cpu_unit
    if unit < 1 or cpu_unit < 1:
        raise InvalidOptionError(f"units must be positive numbers of bytes, got {unit!r} and {cpu_unit!r}")
    if chain.cpu_capacity is None or not any("disk" in b.cost for b in chain.blocks):
        return _program(chain, unit, cpu_unit)
    # The CPU keeps room to read the largest disk-stored block (a max, not a sum): try each bound on it.
    best: tuple[float, list[Mode]] | None = None
    for bound in sorted({0, *(b.weight for b in chain.blocks if "disk" in b.cost)}):
        blocks = tuple(
            b
            if "disk" not in b.cost or (bound and b.weight <= bound)
            else replace(b, cost={m: c for m, c in b.cost.items() if m != "disk"})
            for b in chain.blocks
        )
        if chain.cpu_capacity < bound or any(not b.cost for b in blocks):
            continue
        found = _program(
            replace(chain, blocks=blocks, cpu_capacity=chain.cpu_capacity - bound), unit, cpu_unit
        )
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    return best


def _program(chain: Chain, unit: int, cpu_unit: int) -> tuple[float, list[Mode]] | None:
    """The dynamic program of :func:`solve_chain` with disk blocks needing no CPU room to be read."""
    caps = chain.gpu_capacity
    act = chain.activation
    total_cpu = chain.activation + sum(b.weight + b.runtime for b in chain.blocks)
    track_cpu = chain.cpu_capacity is not None and total_cpu > chain.cpu_capacity
    cpu_cap = chain.cpu_capacity if chain.cpu_capacity is not None else 0
    # key: (gpu, GPU bytes // unit, CPU bytes // cpu_unit, last ran on cpu, cpu runs)
    # value: (seconds, GPU bytes, CPU bytes, path as a linked list)
    states: dict[Any, tuple[float, int, int, Any]] = {(-1, 0, 0, False, False): (0.0, 0, 0, None)}
    first = True
    for block in chain.blocks:
        size = block.weight + block.runtime
        following: dict[Any, tuple[float, int, int, Any]] = {}
        for (gpu, _, _, last_cpu, cpu_runs), (seconds, used, cpu, path) in states.items():
            last: ExecutionDevice | None = None if first else ("cpu" if last_cpu else gpu)
            for mode, cost in block.cost.items():
                device = execution_of(mode)
                step = cost + (chain.switch(last, device) if last is not None and last != device else 0.0)
                if isinstance(mode, int):
                    if mode < gpu or mode >= len(caps):
                        continue
                    new_used = used + size if mode == gpu else act + size
                    if new_used > caps[mode]:
                        continue
                    key = (mode, new_used // unit, cpu // cpu_unit, False, cpu_runs)
                    _offer(following, key, (seconds + step, new_used, cpu, (mode, path)))
                else:
                    new_cpu = cpu
                    if track_cpu:
                        new_cpu += (0 if cpu_runs else act) + (size if mode == "cpu" else block.runtime)
                        if new_cpu > cpu_cap:
                            continue
                    key = (gpu, used // unit, new_cpu // cpu_unit, True, True)
                    _offer(following, key, (seconds + step, used, new_cpu, (mode, path)))
        states = _prune(following)
        first = False
        if not states:
            return None
    seconds, _, _, path = min(states.values(), key=lambda state: state[:3])
    modes: list[Mode] = []
    while path is not None:
        modes.append(path[0])
        path = path[1]
    modes.reverse()
    return seconds, modes


def _offer(
    states: dict[Any, tuple[float, int, int, Any]], key: Any, value: tuple[float, int, int, Any]
) -> None:
    """Keep the better of a state already reached and a new one: faster, then fewer GPU and CPU bytes."""
    held = states.get(key)
    if held is None or value[:3] < held[:3]:
        states[key] = value


def _prune(states: dict[Any, tuple[float, int, int, Any]]) -> dict[Any, tuple[float, int, int, Any]]:
    """Drop states another state of the same key (GPU bytes aside) beats with no more GPU bytes and no more
    time (CPU bytes are equal within a key when ``cpu_unit`` is 1, else within one unit)."""
    groups: dict[tuple[Any, ...], list[tuple[int, int, Any]]] = {}
    for key, (_, used, cpu, _) in states.items():
        gpu, _, cpu_bucket, last_cpu, cpu_runs = key
        groups.setdefault((gpu, cpu_bucket, last_cpu, cpu_runs), []).append((used, cpu, key))
    kept: dict[Any, tuple[float, int, int, Any]] = {}
    for members in groups.values():
        best = float("inf")
        for _, _, key in sorted(members):  # fewer GPU bytes first: keep only strictly faster ones after
            seconds = states[key][0]
            if seconds < best:
                best = seconds
                kept[key] = states[key]
    return kept
