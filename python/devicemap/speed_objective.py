"""``plan(..., objective="speed")``: place blocks to minimise the predicted time of one decoded token.

**Blocks.** The chain is the model's blocks as the core cuts them, except for mixture-of-experts models:
there each decoder layer is opened (its class leaves the no-split set) and its children, and the children
of the child holding the routed experts, become no-split instead, so a layer's attention, norms, router
and routed experts are separate blocks. Attention and dense parts can then stay on a GPU while the
experts are stored and run on the CPU (llama.cpp's ``-ot exps=CPU`` / ``--n-cpu-moe``).

**Modes.** A block is, in the exact program below, *resident on GPU i* (stored and run there), *stored
and run on the CPU*, or *stored on disk and run on the CPU* (only when ``max_memory`` has ``"disk"``).
Its cost in a mode is :func:`devicemap.estimate.block_time` of its :class:`~devicemap.estimate.BlockCost`
in that storage/execution pair (decode phase); where consecutive blocks execute on different devices,
:func:`devicemap.estimate.activation_time` of one token batch's hidden states is added. That is exactly
the sum :func:`devicemap.estimate.estimate` reports for the decode phase.

**Memory**, as the memory plan counts it: a GPU holds the weights and runtime memory (KV cache, logits)
of the blocks resident on it plus one activation buffer if it runs anything (``gpu0_reserve`` is taken
off GPU 0); the CPU holds the weights of CPU-stored blocks, the runtime memory of every block it runs and
one activation buffer if it runs anything; disk is unbounded.

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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from .errors import DoesNotFitError, InvalidOptionError
from .estimate import ExecutionDevice, activation_time, block_time, model_block_costs
from .formatting import format_bytes

if TYPE_CHECKING:
    import torch

    from .hardware import Hardware
    from .memory import DeviceKey
    from .options import PlacementOptions
    from .planning import Plan
    from .tree import ModuleTree
    from .workload import RuntimeMemory, Workload

Mode = int | Literal["cpu", "disk"]
"""Where a block lives in the program: GPU ``i`` (stored and run there), ``"cpu"`` (stored and run on the
CPU) or ``"disk"`` (stored on disk, run on the CPU)."""
UNITS = 2048
"""At most this many units per device in :func:`plan`'s program (``u = ceil(largest capacity / UNITS)``)."""


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
    if any(used > cap for used, cap in zip(gpu_used, chain.gpu_capacity, strict=True)):
        return None
    if chain.cpu_capacity is not None and cpu_used > chain.cpu_capacity:
        return None
    return seconds


def _units(size: int, unit: int) -> int:
    return -(-size // unit)


def solve_chain(chain: Chain, unit: int = 1) -> tuple[float, list[Mode]] | None:
    """The least decode time over all placements :func:`evaluate` accepts, and one placement reaching it
    (``None``: nothing fits). Exact with ``unit=1``; with larger units see the module docstring."""
    if unit < 1:
        raise InvalidOptionError(f"unit must be a positive number of bytes, got {unit!r}")
    caps = [cap // unit for cap in chain.gpu_capacity]
    act = _units(chain.activation, unit)
    total_cpu = chain.activation + sum(b.weight + b.runtime for b in chain.blocks)
    track_cpu = chain.cpu_capacity is not None and total_cpu > chain.cpu_capacity
    cpu_cap = chain.cpu_capacity // unit if chain.cpu_capacity is not None else 0
    # key: (gpu, gpu units, cpu units, last ran on cpu, cpu runs) -> (seconds, path as a linked list)
    Key = tuple[int, int, int, bool, bool]
    Path = tuple[Mode, Any] | None
    states: dict[Key, tuple[float, Path]] = {(-1, 0, 0, False, False): (0.0, None)}
    first = True
    for block in chain.blocks:
        size = _units(block.weight + block.runtime, unit)
        runtime = _units(block.runtime, unit)
        following: dict[Key, tuple[float, Path]] = {}

        for (gpu, used, cpu, last_cpu, cpu_runs), (seconds, path) in states.items():
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
                    _offer(following, (mode, new_used, cpu, False, cpu_runs), seconds + step, (mode, path))
                else:
                    new_cpu = cpu
                    if track_cpu:
                        new_cpu += (0 if cpu_runs else act) + (size if mode == "cpu" else runtime)
                        if new_cpu > cpu_cap:
                            continue
                    _offer(following, (gpu, used, new_cpu, True, True), seconds + step, (mode, path))
        states = _prune(following)
        first = False
        if not states:
            return None
    seconds, path = min(states.values(), key=lambda state: state[0])
    modes: list[Mode] = []
    while path is not None:
        modes.append(path[0])
        path = path[1]
    modes.reverse()
    return seconds, modes


def _offer(states: dict[Any, tuple[float, Any]], key: Any, seconds: float, path: Any) -> None:
    """Keep the faster of a state already reached and a new way to reach it."""
    held = states.get(key)
    if held is None or seconds < held[0]:
        states[key] = (seconds, path)


def _prune(states: dict[Any, tuple[float, Any]]) -> dict[Any, tuple[float, Any]]:
    """Drop states another state of the same key (GPU units aside) beats with no more units and no more time."""
    groups: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
    for key in states:
        gpu, used, cpu, last_cpu, cpu_runs = key
        groups.setdefault((gpu, cpu, last_cpu, cpu_runs), []).append((used, key))
    kept: dict[Any, tuple[float, Any]] = {}
    for members in groups.values():
        best = math.inf
        for _, key in sorted(members):
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

    from .compute import _expert_share, _is_routed_experts
    from .workload import decoder_layers

    config = getattr(model, "config", None)
    count, _ = _expert_share(config)
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
                _is_routed_experts(sub.rsplit(".", 1)[-1] if sub else child_name, module, count)
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
                if isinstance(part, torch.nn.ModuleList) and _is_routed_experts(part_name, part, count):
                    keep = part[0]  # a list of experts: each expert is a block
                name = type(keep).__name__
                if name not in _CONTAINERS and name not in result and name not in added:
                    added.append(name)
    return [c for c in result if c not in added] + added


def _runtime_per_block(blocks: Sequence[str], runtime: RuntimeMemory) -> dict[str, int]:
    """Runtime bytes of each block: a value on a module inside a block goes to it, one on a split module
    to the first block under it (as the core attaches them)."""
    from .estimate import _covering

    per_block = dict.fromkeys(blocks, 0)
    index = dict.fromkeys(blocks, True)
    for name, bits in runtime.per_module:
        block = _covering(name, index)
        if block is None:
            block = next((b for b in blocks if b.startswith(name + ".")), None)
        if block is not None:
            per_block[block] += -(-bits // 8)
    return per_block


def plan_for_speed(
    model: torch.nn.Module,
    tree: ModuleTree,
    max_memory: Any,
    options: PlacementOptions,
    runtime: RuntimeMemory,
    workload: Workload,
    hardware: Hardware | None,
    dtype: Any,
    unit: int | None = None,
) -> Plan:
    """The plan with the least predicted decode time (module docstring); ``unit``: bytes per unit
    (default: the largest capacity / :data:`UNITS`)."""
    from .hardware import Hardware as HardwareType
    from .memory import normalize_max_memory
    from .planning import _solve

    if not isinstance(hardware, HardwareType):
        raise InvalidOptionError(
            "objective='speed' needs hardware=devicemap.Hardware (e.g. Hardware.preset('rtx-4090', "
            f"host='desktop-ddr5')) to predict decode time, got {hardware!r}"
        )
    if options.pins:
        raise InvalidOptionError("objective='speed' chooses every block's device; it does not take pins yet")
    memory = normalize_max_memory(max_memory)
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
    probe = _solve(tree, {"cpu": 1 << 56}, replace(speed_options, execution_device=None), runtime, [])
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
        finite = [*gpu_caps, *([int(cpu_cap)] if cpu_cap is not None else [])]
        unit = max(1, -(-max(finite, default=1) // UNITS))
    found = solve_chain(chain, unit)
    candidates: list[Plan] = []
    if found is not None:
        _, chosen = found
        pins: dict[str, DeviceKey] = {name: mode for name, mode in zip(names, chosen, strict=True)}
        offloaded = any(not isinstance(m, int) for m in chosen)
        realised = replace(
            speed_options,
            pins=tuple((name, str(device)) for name, device in pins.items()),
            execution_device="cpu" if offloaded and gpus else None,
        )
        candidates.append(_solve(tree, memory, realised, runtime, []))
    # Staged plans are outside the program: the core's memory plans with each GPU staging, and its own choice.
    for stager in [None, *gpus]:
        try:
            candidates.append(
                _solve(
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
