"""``plan(..., objective="speed")``: place blocks to minimise the predicted time of one decoded token.

**Blocks.** The chain is the model's blocks as the core cuts them, except for mixture-of-experts models:
there each decoder layer is opened (its class leaves the no-split set) and its children, and the children
of the child holding the routed experts, become no-split instead, so a layer's attention, norms, router
and routed experts are separate blocks. Attention and dense parts can then stay on a GPU while the
experts are stored and run on the CPU (llama.cpp's ``-ot exps=CPU`` / ``--n-cpu-moe``).

**Modes.** A block is, in the exact program below, *resident on GPU i* (stored and run there), *stored
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
reduced by ``n x u`` (``n`` blocks), and exact with ``u = 1`` (the tests). ``plan()`` picks ``u`` so no
device has more than :data:`UNITS` units. Time and space: ``O(n x G x (C/u) x modes)`` states per block
with ``G`` GPUs, ``C`` the largest capacity (times ``C_cpu/u`` only when the CPU binds).

**Staging** (stored on CPU/disk, run on a GPU that copies the weights over PCIe for every pass) is not
in the program: the core supports one global executor of offloaded blocks, and a staging GPU's reserve
(the largest staged block plus the runtime memory of all of them) couples all GPUs. Instead ``plan()``
also asks the core for its memory plans with each GPU as the stager, estimates them, and returns the
fastest of those and the program's answer. For decode at small batch, CPU execution reads only the
weights a token touches at host bandwidth, while staging moves all of them over PCIe and then reads
them again, so staging wins only where the host is slower than the link or compute-bound (large batch).

**Realisation.** The chosen devices are handed to the core as pins, with ``execution_device="cpu"`` when
anything is offloaded, so the result is a normal :class:`~devicemap.Plan` (``device_map``,
``execution_map``, usage) that accelerate's hooks run; the core checks the memory again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ..cost.estimate import ExecutionDevice, activation_time, block_time, model_block_costs
from ..cost.hardware import Hardware
from ..errors import DoesNotFitError, InvalidOptionError, TiedPinConflictError
from ..formatting import format_bytes
from ..inputs.memory import Budget
from ..inputs.module_names import closest_key
from ..sizing.compute import expert_share, is_routed_experts
from ..sizing.workload import decoder_layers
from .solve import solve_once

if TYPE_CHECKING:
    import torch

    from ..inputs.memory import DeviceKey
    from ..inputs.options import PlacementOptions
    from ..plans import Plan
    from ..sizing.tree import ModuleTree
    from ..sizing.workload import RuntimeMemory, Workload

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


# ---------------------------------------------------------------------------------------------------------
# From a model


_CONTAINERS = {"ModuleList", "ModuleDict", "Sequential"}


def speed_no_split(model: torch.nn.Module, classes: Sequence[str]) -> list[str]:
    """The no-split classes for the speed objective: ``classes``, except that for a mixture-of-experts
    model each decoder layer is opened so its routed experts are a block of their own (module docstring)."""
    import torch

    config = getattr(model, "config", None)
    count, _ = expert_share(config)
    if not count or config is None:
        return list(classes)
    modules = dict(model.named_modules())
    result = list(classes)
    added: list[str] = []
    for layer_name in decoder_layers(model, config):
        layer = modules.get(layer_name)
        if layer is None:
            continue
        holder = None
        for child_name, child in layer.named_children():
            if any(
                is_routed_experts(sub.rsplit(".", 1)[-1] if sub else child_name, module, count)
                for sub, module in child.named_modules()
            ):
                holder = child_name
        if holder is None:
            continue
        if type(layer).__name__ in result:
            result.remove(type(layer).__name__)
        for child_name, child in layer.named_children():
            parts = list(child.named_children()) if child_name == holder else [(child_name, child)]
            for part_name, part in parts:
                keep = part
                if isinstance(part, torch.nn.ModuleList) and is_routed_experts(part_name, part, count):
                    keep = part[0]  # a list of experts: each expert is a block
                name = type(keep).__name__
                if name not in _CONTAINERS and name not in result and name not in added:
                    added.append(name)
    return [c for c in result if c not in added] + added


def _tied_followers(tree: ModuleTree, blocks: Sequence[str]) -> set[str]:
    """Blocks sharing a tied tensor with an earlier block (not pinned: the core places them with it)."""
    index = dict.fromkeys(blocks, True)
    followers: set[str] = set()
    for group in tree.tied_groups:
        users = sorted(
            {b for b in (closest_key(name, index) for name in group) if b is not None}, key=blocks.index
        )
        followers.update(users[1:])
    return followers


def _runtime_per_block(blocks: Sequence[str], runtime: RuntimeMemory) -> dict[str, int]:
    """Runtime bytes of each block: a value on a module inside a block goes to it, one on a split module
    to the first block under it (as the core attaches them)."""
    per_block = dict.fromkeys(blocks, 0)
    index = dict.fromkeys(blocks, True)
    for name, bits in runtime.per_module:
        block = closest_key(name, index)
        if block is None:
            block = next((b for b in blocks if b.startswith(name + ".")), None)
        if block is not None:
            per_block[block] += -(-bits // 8)
    return per_block


def plan_for_speed(
    model: torch.nn.Module,
    tree: ModuleTree,
    memory: Budget,
    options: PlacementOptions,
    runtime: RuntimeMemory,
    workload: Workload,
    hardware: Hardware | None,
    dtype: Any,
    unit: int | None = None,
) -> Plan:
    """The plan with the least predicted decode time (module docstring); ``unit``: bytes per unit
    (default: the largest capacity / :data:`UNITS`)."""
    if not isinstance(hardware, Hardware):
        raise InvalidOptionError(
            "objective='speed' needs hardware=devicemap.Hardware (e.g. Hardware.preset('rtx-4090', "
            f"host='desktop-ddr5')) to predict decode time, got {hardware!r}"
        )
    if options.pins:
        raise InvalidOptionError("objective='speed' chooses every block's device; it does not take pins yet")
    gpus = [k for k in memory if k not in ("cpu", "disk")]
    if any(not isinstance(k, int) or k != i for i, k in enumerate(gpus)):
        raise InvalidOptionError(
            f"objective='speed' plans GPUs 0..{len(gpus) - 1} in order; max_memory names {gpus!r}"
        )
    if len(gpus) > len(hardware.gpus):
        hardware.gpu(len(gpus) - 1)  # names the missing GPU
    speed_options = replace(
        options,
        no_split_module_classes=tuple(
            speed_no_split(model, options.classes_for(tree.no_split_module_classes))
        ),
        strategy="sequential",
    )
    # The blocks as the core cuts them: any plan lists them all; one with everything on the CPU is cheap.
    probe = solve_once(tree, {"cpu": 1 << 56}, replace(speed_options, execution_device=None), runtime, [])
    names = list(probe.assignments)
    costs, hidden_bytes, bits = model_block_costs(probe, workload, model, dtype=dtype)
    runtime_bytes = _runtime_per_block(names, runtime)
    modes: list[Mode] = [*range(len(gpus)), "cpu"]
    if "disk" in memory:
        modes.append("disk")
    blocks = []
    for name, cost in zip(names, costs, strict=True):
        seconds: dict[Mode, float] = {}
        for mode in modes:
            if mode == "cpu" and "cpu" not in memory:
                continue
            storage: int | str = mode
            placed = replace(cost, storage=storage, execution=execution_of(mode))
            seconds[mode] = block_time(placed, workload, hardware, phase="decode", dtype_bits=bits)
        blocks.append(ChainBlock(name, probe.block_bytes(name), runtime_bytes[name], seconds))
    gpu_caps = [int(memory[g] or 0) for g in gpus]
    if gpu_caps and options.gpu0_reserve_bits:
        gpu_caps[0] = max(0, gpu_caps[0] - -(-options.gpu0_reserve_bits // 8))
    cpu_cap = memory.get("cpu")
    tokens = workload.batch_size
    chain = Chain(
        blocks=tuple(blocks),
        gpu_capacity=tuple(gpu_caps),
        cpu_capacity=None if cpu_cap is None else int(cpu_cap),
        activation=-(-runtime.activation_bits // 8),
        switch=lambda a, b: activation_time(hardware, a, b, tokens * hidden_bytes),
    )
    if unit is None:
        unit = max(1, -(-max(gpu_caps, default=1) // UNITS))
    cpu_unit = max(1, -(-int(cpu_cap or 1) // CPU_UNITS))
    found = solve_chain(chain, unit, cpu_unit)
    candidates: list[Plan] = []
    if found is not None:
        _, chosen = found
        pins: dict[str, DeviceKey] = {name: mode for name, mode in zip(names, chosen, strict=True)}
        for later in _tied_followers(tree, names):
            pins.pop(later, None)  # the core keeps tied blocks with the first one pinned
        offloaded = any(not isinstance(m, int) for m in chosen)
        realised = replace(
            speed_options,
            pins=tuple((name, str(device)) for name, device in pins.items()),
            execution_device="cpu" if offloaded and gpus else None,
        )
        # If the core counts memory the program does not (e.g. a tied tensor), the plans below remain.
        with contextlib.suppress(DoesNotFitError, TiedPinConflictError):
            candidates.append(solve_once(tree, memory, realised, runtime, []))
    # Staged plans are outside the program: the core's memory plans with each GPU staging, and its own choice.
    for stager in [None, *gpus]:
        try:
            candidates.append(
                solve_once(
                    tree,
                    memory,
                    replace(options, execution_device=None if stager is None else str(stager)),
                    runtime,
                    [],
                )
            )
        except DoesNotFitError:
            continue
    if not candidates:
        total = sum(b.weight for b in blocks)
        raise DoesNotFitError(
            f"no placement of the model's {len(blocks)} blocks ({format_bytes(total)}) fits max_memory "
            f"{dict(memory)!r}"
        )
    best = min(candidates, key=lambda p: p.estimate(workload, hardware, model, dtype=dtype).decode.seconds)
    best.strategy = "speed"
    return best
