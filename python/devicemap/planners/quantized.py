"""Plans for a model that loads through a quantizer (``plan(..., quantization_config=...)``).

Three things differ from an ordinary plan. Every weight is sized as the quantizer stores it (the tree
was exported with :mod:`devicemap.sizing.quantization`'s sizes). The quantizer's offload rule decides which of
CPU and disk may be used (:class:`~devicemap.sizing.quantization.OffloadRule`). And loading needs headroom:
transformers materialises each weight at the load dtype on its device and quantizes it there, so every
GPU keeps room for the largest such weight on top of the plan (shown as reserve). This replaces
transformers' flat rule of keeping 10% of every GPU free for quantized models.

bitsandbytes with ``llm_int8_enable_fp32_cpu_offload=True`` quantizes only what sits on accelerators: a
layer mapped to the CPU or disk loads as a plain layer in the model's dtype, several times its quantized
size. One tree cannot size a block two ways, so the plan is made with quantized sizes, then every block
it offloads is re-measured unquantized; where that overflows the CPU (or a bounded disk) the capacity
given to the solver shrinks by the overflow and the plan is made again, until the offloaded blocks fit
at their real size.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import DoesNotFitError
from ..inputs.dtypes import DtypeLike, target_bits
from ..inputs.memory import Budget, DeviceKey
from ..inputs.options import PlacementOptions
from ..plans import Plan
from ..sizing.gguf import GGUF
from ..sizing.quantization import offload_rule, quantized_sizer
from ..sizing.tree import ModuleTree
from ..sizing.workload import RuntimeMemory
from .solve import plan_tree

if TYPE_CHECKING:
    import torch

_OFFLOAD_DEVICES = ("cpu", "disk")
_UNQUANTIZED_DO_NOT_FIT = (
    "the layers offloaded with llm_int8_enable_fp32_cpu_offload load unquantized and do not fit the CPU and "
    "disk given; give the CPU or the GPUs more memory, or add 'disk' to max_memory"
)
_ROUNDS = 16  # each round shrinks an overflowing device by at least its overflow; a few always suffice
Planner = Callable[[ModuleTree, Budget], Plan]
"""Places a size tree within per-device capacities."""


def plan_quantized(
    model: torch.nn.Module,
    tree: ModuleTree,
    limits: Budget,
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
    quantization_config: Any,
    dtype: DtypeLike | None,
    unquantized_tree: Callable[[], ModuleTree],
    planner: Planner | None = None,
) -> Plan:
    """Plan ``tree`` (sized with the quantizer) for loading through ``quantization_config``.
    ``unquantized_tree`` builds the same model's tree without the quantizer, for offloaded layers that
    load unquantized. ``planner`` places a tree within capacities the quantizer allows (default: the
    memory planner with ``options``; the speed objective passes its own)."""
    rule = offload_rule(quantization_config)
    headroom = load_headroom(model, quantization_config, dtype)
    capacities: Budget = {
        k: max(0, v - headroom) if isinstance(k, int) and v is not None else v for k, v in limits.items()
    }

    def memory_plan(sized: ModuleTree, room: Budget) -> Plan:
        return plan_tree(sized, room, options, runtime, compute, offload=rule)

    place = memory_plan if planner is None else lambda sized, room: planner(sized, rule.usable(room))
    if rule.offloaded_quantized:
        plan = place(tree, capacities)
    else:
        plan = _fit_unquantized_offload(tree, unquantized_tree(), capacities, limits, place)
    return _as_loaded(plan, limits, headroom)


def load_headroom(model: torch.nn.Module, quantization_config: Any, dtype: DtypeLike | None) -> int:
    """Bytes a GPU needs while the quantizer converts a weight: the largest weight it quantizes, at the
    dtype it is read in (``dtype``, else the weight's own)."""
    if isinstance(quantization_config, GGUF):
        return 0  # llama.cpp reads stored tensors as they are: nothing is converted on the GPU
    names = quantized_sizer(model, quantization_config, dtype).quantized_names
    load_bits = target_bits(dtype) if dtype is not None else None
    largest = 0
    for name, param in model.named_parameters():
        if name in names:
            bits = (
                load_bits if load_bits is not None and param.is_floating_point() else param.element_size() * 8
            )
            largest = max(largest, param.numel() * bits // 8)
    return largest


def _fit_unquantized_offload(
    quantized: ModuleTree, unquantized: ModuleTree, capacities: Budget, limits: Budget, place: Planner
) -> Plan:
    """A plan where blocks on accelerators count their quantized bytes and offloaded blocks their
    unquantized bytes: the CPU/disk budget shrinks by what overflows until the offloaded blocks fit."""
    first = dict(capacities)
    for _ in range(_ROUNDS):
        try:
            plan = place(quantized, capacities)
        except DoesNotFitError as err:
            if capacities == first:
                raise
            raise DoesNotFitError(f"{_UNQUANTIZED_DO_NOT_FIT} ({err})") from None
        extra = _extra_bytes(plan, quantized, unquantized)
        overflow = {
            device: used + extra[device] - limit
            for device, used, limit in _usage(plan, limits)
            if limit is not None and used + extra[device] > limit
        }
        if not overflow:
            return _with_real_sizes(plan, extra, unquantized)
        for device, excess in overflow.items():
            capacity = capacities[device]
            assert capacity is not None, "overflow is only counted on bounded devices"
            capacities[device] = max(0, capacity - excess)
    raise DoesNotFitError(_UNQUANTIZED_DO_NOT_FIT)


def _extra_bytes(plan: Plan, quantized: ModuleTree, unquantized: ModuleTree) -> defaultdict[DeviceKey, int]:
    extra: defaultdict[DeviceKey, int] = defaultdict(int)
    if len(plan.device_map) == 1:
        return extra  # {"": "cpu"}: the whole model on the CPU, which bitsandbytes quantizes there
    for block, device in plan.assignments.items():
        if device in _OFFLOAD_DEVICES:
            extra[device] += unquantized.module_bytes(block) - quantized.module_bytes(block)
    return extra


def _usage(plan: Plan, limits: dict[DeviceKey, int | None]) -> list[tuple[DeviceKey, int, int | None]]:
    return [(u.device, u.used, limits.get(u.device)) for u in plan.usage if u.device in _OFFLOAD_DEVICES]


def _with_real_sizes(plan: Plan, extra: dict[DeviceKey, int], unquantized: ModuleTree) -> Plan:
    """Offloaded blocks at the unquantized bytes they load with."""
    if not extra:
        return plan
    plan.usage = [dataclasses.replace(u, weights=u.weights + extra.get(u.device, 0)) for u in plan.usage]
    plan.offloaded = [dataclasses.replace(o, bytes=unquantized.module_bytes(o.name)) for o in plan.offloaded]
    return plan


def _as_loaded(plan: Plan, limits: dict[DeviceKey, int | None], headroom: int) -> Plan:
    """Capacities as the user gave them; each GPU's load headroom shown as reserve."""
    plan.usage = [
        dataclasses.replace(
            u,
            capacity=limits.get(u.device),
            reserve=u.reserve + (headroom if isinstance(u.device, int) else 0),
        )
        if u.device in limits
        else u
        for u in plan.usage
    ]
    return plan
