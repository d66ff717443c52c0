"""The memory planner: a sized tree and checked options in, a Plan out, through the core's solve.

:func:`plan_tree` is what the front door (:mod:`devicemap.planners.api`) calls: it applies a quantizer's
offload rule and plans again past blocks larger than every GPU. :func:`solve_once` is one call into the core
as it is, the building block the speed and quantized planners combine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .. import _core
from ..errors import DoesNotFitError, PlacementError, UnknownDeviceError
from ..formatting import format_bytes
from ..inputs.memory import Budget, DeviceKey, bytes_to_bits
from ..inputs.options import PlacementOptions
from ..plans import DeviceUsage, Offload, Plan
from ..sizing.quantization import OffloadRule
from ..sizing.tree import ModuleTree
from ..sizing.workload import RuntimeMemory, check_runtime_bits


def plan_tree(
    tree: ModuleTree,
    memory: Budget,
    options: PlacementOptions,
    runtime: RuntimeMemory | None = None,
    compute: list[tuple[str, int]] | None = None,
    offload: OffloadRule | None = None,
) -> Plan:
    """Place a sized tree with checked options: what :func:`plan` and :func:`devicemap.plan_checkpoint`
    share once each has sized its input. ``offload``: a quantizer's rule on CPU/disk placement."""
    runtime = runtime or RuntimeMemory()
    if set(memory) == {"disk"}:
        raise UnknownDeviceError(
            "max_memory names only 'disk': weights can be stored there, but layers "
            "run on a GPU or the CPU; add 'cpu' (e.g. {'cpu': '64GiB', 'disk': 0}) or a GPU"
        )
    usable = offload.usable(memory) if offload is not None else memory
    if not usable:
        raise DoesNotFitError(
            f"{offload.reason if offload else ''}, and max_memory names no GPU; give it one"
        )
    try:
        return _plan_past_oversized_blocks(tree, usable, options, runtime, compute or [])
    except DoesNotFitError as err:
        if offload is None or usable == memory:
            raise
        left_out = " and ".join(repr(k) for k in memory if k not in usable)
        if err.missing_bytes is not None and err.shortfall == "no_disk":
            refused = DoesNotFitError(
                f"the quantized model does not fit on the GPUs given: {format_bytes(err.missing_bytes)} of its "
                f"weights find no room there. {offload.reason}, so {left_out} in max_memory cannot be used; "
                "give the GPUs that much more memory or add a GPU"
            )
            refused.shortfall, refused.missing_bytes = err.shortfall, err.missing_bytes
            raise refused from None
        raise DoesNotFitError(
            f"{err}. Note: {offload.reason}, so {left_out} in max_memory could not be used; the quantized "
            "model must fit on the GPUs given"
        ) from None


def _plan_past_oversized_blocks(
    tree: ModuleTree,
    memory: Mapping[DeviceKey, int | None],
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
) -> Plan:
    """The plan, or a better one when some block is larger than every GPU.

    The GPUs hold a run of blocks from the start of the chain, so a block no GPU can hold (a
    big-vocabulary embedding, first in the model) would send every block after it off the GPUs too. Such
    a block can never be on a GPU anyway: planned again with it pinned to the CPU (or disk), the blocks after
    it may fill the GPUs. The second plan is kept only when it puts more bytes on the GPUs (or the first
    was refused).
    """
    refusal: DoesNotFitError | None = None
    first: Plan | None = None
    first_result: _core.SolveResult | None = None
    try:
        first_result = _core_result(tree, memory, options, runtime, compute)
        first = _plan_from_core(first_result, tree)
    except DoesNotFitError as err:
        refusal = err
    largest_gpu = max((cap or 0 for key, cap in memory.items() if isinstance(key, int)), default=None)
    home = "cpu" if "cpu" in memory else "disk" if "disk" in memory else None
    if largest_gpu is None or home is None:
        if first is None:
            raise refusal  # type: ignore[misc]
        return first
    pinned = {name for name, _ in options.pins}
    try:
        # the blocks as the core cuts them (from a plan with unbounded GPUs when the first was refused);
        # the core names the ones larger than every GPU, instead of a size lookup per block here
        cut = (
            first_result
            if first_result is not None
            else _core_result(
                tree,
                {k: (2**50 if isinstance(k, int) else v) for k, v in memory.items()},
                options,
                runtime,
                compute,
            )
        )
        oversized = [b for b in cut.blocks_over(largest_gpu) if not _touches(b, pinned)]
        if not oversized:
            raise LookupError
        moved = dataclasses.replace(options, pins=(*options.pins, *((b, home) for b in oversized)))
        second = solve_once(tree, memory, moved, runtime, compute)
    except (PlacementError, LookupError):
        if first is None:
            raise refusal from None  # type: ignore[misc]
        return first
    if first is not None and _gpu_bytes(second) <= _gpu_bytes(first):
        return first
    # Say why: the user pinned nothing there.
    why = {b: f"larger than every GPU ({format_bytes(tree.module_bytes(b))})" for b in oversized}
    second.offloaded = [
        dataclasses.replace(o, reason=o.reason.replace(f"pinned to {home}", why[o.name], 1))
        if o.name in why
        else o
        for o in second.offloaded
    ]
    return second


def _touches(block: str, pinned: set[str]) -> bool:
    """Whether a user's pin covers ``block``, lies inside it, or is it (those stay as the user said)."""
    return any(
        block == p or p == "" or block.startswith(p + ".") or block == "" or p.startswith(block + ".")
        for p in pinned
    )


def _gpu_bytes(plan: Plan) -> int:
    return sum(u.weights for u in plan.usage if isinstance(u.device, int))


def solve_once(
    tree: ModuleTree,
    memory: Mapping[DeviceKey, int | None],
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
) -> Plan:
    """One call into the core with checked options and canonical devices, as it is (no second attempt
    around blocks larger than every GPU, no quantizer rule): the building block of the planners."""
    return _plan_from_core(_core_result(tree, memory, options, runtime, compute), tree)


def _core_result(
    tree: ModuleTree,
    memory: Mapping[DeviceKey, int | None],
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
) -> _core.SolveResult:
    """The core's answer for :func:`solve_once`, before it becomes a :class:`Plan` (it makes Python
    objects only when asked)."""
    devices: list[tuple[str, int | None]] = [(str(k), bytes_to_bits(v)) for k, v in memory.items()]
    check_runtime_bits(runtime.per_module, runtime.activation_bits)
    return _core.solve(
        tree.core,
        devices,
        options.strategy,
        options.classes_for(tree.no_split_module_classes),
        list(options.pins),
        options.offload_buffers,
        list(runtime.per_module),
        runtime.activation_bits,
        compute,
        options.balance,
        options.gpu0_reserve_bits,
        options.execution_device,
    )


def _plan_from_core(result: _core.SolveResult, tree: ModuleTree) -> Plan:
    """The :class:`Plan` of a core result. The core hands back bytes (rounded once, in Rust) and devices
    as accelerate's keys; the three maps come as dicts sharing one string per block name."""
    device_map, assignments, execution_map = result.maps()
    return Plan(
        strategy=result.strategy,
        device_map=device_map,
        assignments=assignments,
        usage=[
            DeviceUsage(
                device=u.device,
                capacity=u.capacity,
                weights=u.weights,
                runtime=u.runtime,
                reserve=u.reserve,
                compute=u.compute,
                blocks=tuple(u.blocks),
            )
            for u in result.usage
        ],
        offloaded=[Offload(*row) for row in result.offload_rows()],
        tree=tree,
        execution_map=execution_map,
    )
