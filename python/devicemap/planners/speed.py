"""``plan(..., objective="speed")``: place blocks to minimise the predicted time of one decoded token.

**Blocks.** The chain is the model's blocks as the core cuts them, except for mixture-of-experts models:
there each decoder layer is opened (its class leaves the no-split set) and its children, and the children
of the child holding the routed experts, become no-split instead, so a layer's attention, norms, router
and routed experts are separate blocks. Attention and dense parts can then stay on a GPU while the
experts are stored and run on the CPU (llama.cpp's ``-ot exps=CPU`` / ``--n-cpu-moe``).

The blocks, each with its decode seconds in every mode, go to the program of
:mod:`devicemap.planners.speed_program` (modes, memory, the exact dynamic program and its units).

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
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..cost.estimate import activation_time, block_time, model_block_costs
from ..cost.hardware import Hardware
from ..errors import DoesNotFitError, InvalidOptionError, TiedPinConflictError, UnknownDeviceError
from ..formatting import format_bytes
from ..inputs.memory import Budget
from ..inputs.module_names import closest_key
from ..sizing.compute import expert_share, is_routed_experts
from ..sizing.workload import decoder_layers
from .prefill import prefill_rooms, with_capacities, with_prefill_streams
from .solve import solve_once
from .speed_program import Chain, ChainBlock, Mode, execution_of, solve_chain, units_for
from .speed_reasons import explain_offloads

if TYPE_CHECKING:
    import torch

    from ..inputs.memory import DeviceKey
    from ..inputs.options import PlacementOptions
    from ..plans import Plan
    from ..sizing.tree import ModuleTree
    from ..sizing.workload import RuntimeMemory, Workload


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


def speed_block_patterns(model: torch.nn.Module) -> list[str]:
    """Module name globs (``*`` for a layer index) of the speed objective's blocks of ``model``: what cuts a
    checkpoint's headers into the same blocks (:func:`devicemap.plan_checkpoint`)."""
    declared = getattr(model, "_no_split_modules", None) or []
    classes = set(speed_no_split(model, sorted(declared)))
    names: list[str] = []
    for name, module in model.named_modules():
        # named_modules lists a module before its children: an outer block hides the inner ones
        if name and type(module).__name__ in classes and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return sorted({".".join("*" if part.isdigit() else part for part in n.split(".")) for n in names})


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


def _pinned_modes(
    tree: ModuleTree, blocks: Sequence[str], pins: Sequence[tuple[str, str]], modes: Sequence[Mode]
) -> dict[str, Mode]:
    """The mode each pinned block must take: a pin on a block or on a module holding blocks applies to
    every block under it (the innermost pin wins). A pin inside a block would split what the speed
    objective keeps whole, so it is refused with the block to pin instead."""
    index = dict.fromkeys(blocks, True)
    chosen: dict[str, tuple[int, Mode]] = {}
    for pin, device in pins:
        tree.module_bytes(pin)  # an unknown module is named, with the closest names
        mode: Mode = int(device) if device.isdigit() else device  # type: ignore[assignment]
        if mode not in modes:
            raise UnknownDeviceError(
                f"pin {pin!r} -> {device!r}: max_memory has no device {device!r}; add it to max_memory "
                "or pin to one of " + ", ".join(repr(str(m)) for m in modes)
            )
        holder = closest_key(pin, index)
        if holder is not None and holder != pin:
            raise InvalidOptionError(
                f"pin {pin!r} names a part of block {holder!r}; objective='speed' places whole blocks, so "
                f"pin {holder!r} instead"
            )
        depth = pin.count(".") + 1 if pin else 0
        for block in blocks:
            covered = not pin or block == pin or block.startswith(pin + ".")
            if covered and (block not in chosen or chosen[block][0] <= depth):
                chosen[block] = (depth, mode)
    return {block: mode for block, (_, mode) in chosen.items()}


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
    """The plan with the least predicted decode time, or with ``workload.new_tokens`` the least time of a
    request (module docstring); ``unit``: bytes per GPU unit (default:
    :func:`~devicemap.planners.speed_program.units_for`)."""
    best = _decode_plan(model, tree, memory, options, runtime, workload, hardware, dtype, unit)
    assert isinstance(hardware, Hardware)  # _decode_plan refused anything else

    def finished(plan: Plan, capacities: Budget) -> Plan:
        # Reasons first, within the capacities the plan was made for: room kept for prefill is not free.
        explain_offloads(plan, options.pins, workload, hardware, model, dtype)
        return with_prefill_streams(with_capacities(plan, capacities), workload, hardware, model, dtype)

    best = finished(best, memory)
    new_tokens = workload.new_tokens
    if new_tokens is None:
        return best

    def request_seconds(plan: Plan) -> float:
        predicted = plan.estimate(workload, hardware, model, dtype=dtype)
        return predicted.prefill.seconds + new_tokens * predicted.decode.seconds

    # Room on a GPU for the prefill to stream CPU-run blocks through costs decode speed: tried per GPU.
    fastest = request_seconds(best)
    for gpu, room in prefill_rooms(best, memory, workload, hardware, model, dtype).items():
        narrower = {**memory, gpu: room}
        try:
            candidate = _decode_plan(model, tree, narrower, options, runtime, workload, hardware, dtype, unit)
        except DoesNotFitError:
            continue
        candidate = finished(candidate, memory)
        seconds = request_seconds(candidate)
        if seconds < fastest:
            best, fastest = candidate, seconds
    return best


def _decode_plan(
    model: torch.nn.Module,
    tree: ModuleTree,
    memory: Budget,
    options: PlacementOptions,
    runtime: RuntimeMemory,
    workload: Workload,
    hardware: Hardware | None,
    dtype: Any,
    unit: int | None,
) -> Plan:
    """The plan with the least predicted decode time (module docstring)."""
    if not isinstance(hardware, Hardware):
        raise InvalidOptionError(
            "objective='speed' needs hardware=devicemap.Hardware (e.g. Hardware.preset('rtx-4090', "
            f"host='desktop-ddr5')) to predict decode time, got {hardware!r}"
        )
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
    probe = solve_once(
        tree, {"cpu": 1 << 56}, replace(speed_options, execution_device=None, pins=()), runtime, []
    )
    names = list(probe.assignments)
    costs, hidden_bytes, bits = model_block_costs(probe, workload, model, dtype=dtype)
    runtime_bytes = _runtime_per_block(names, runtime)
    modes: list[Mode] = [*range(len(gpus)), "cpu"]
    if "disk" in memory:
        modes.append("disk")
    pinned = _pinned_modes(tree, names, options.pins, modes)
    blocks = []
    for name, cost in zip(names, costs, strict=True):
        seconds: dict[Mode, float] = {}
        for mode in [pinned[name]] if name in pinned else modes:
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
    default_unit, cpu_unit = units_for(chain)
    found = solve_chain(chain, unit or default_unit, cpu_unit)
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
