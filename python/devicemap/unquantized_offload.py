"""Plans for quantizers whose offloaded layers load unquantized.

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

from .errors import DoesNotFitError
from .memory import DeviceKey, MaxMemory, normalize_max_memory
from .options import PlacementOptions
from .planning import Plan, solve_tree
from .quantization import OffloadRule
from .tree import ModuleTree
from .workload import RuntimeMemory

_OFFLOAD_DEVICES = ("cpu", "disk")
_UNQUANTIZED_DO_NOT_FIT = (
    "the layers offloaded with llm_int8_enable_fp32_cpu_offload load unquantized and do not fit the CPU and "
    "disk given; give the CPU or the GPUs more memory, or add 'disk' to max_memory"
)
_ROUNDS = 16  # each round shrinks an overflowing device by at least its overflow; a few always suffice


def plan_with_unquantized_offload(
    quantized: ModuleTree,
    unquantized: ModuleTree,
    max_memory: MaxMemory | None,
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
    rule: OffloadRule,
) -> Plan:
    """A plan where blocks on accelerators count their quantized bytes and offloaded blocks their
    unquantized bytes (``unquantized``: the same model sized without the quantizer)."""
    limits = normalize_max_memory(max_memory)
    # disk is unbounded whatever size is given for it (normalize_max_memory reports it as None)
    capacities: dict[DeviceKey, int] = {k: 0 if v is None else v for k, v in limits.items()}
    for _ in range(_ROUNDS):
        try:
            plan = solve_tree(quantized, capacities, options, runtime, compute, offload=rule)
        except DoesNotFitError as err:
            if capacities == {k: 0 if v is None else v for k, v in limits.items()}:
                raise
            raise DoesNotFitError(f"{_UNQUANTIZED_DO_NOT_FIT} ({err})") from None
        extra = _extra_bytes(plan, quantized, unquantized)
        overflow = {
            device: used + extra[device] - limit
            for device, used, limit in _usage(plan, limits)
            if limit is not None and used + extra[device] > limit
        }
        if not overflow:
            return _with_real_sizes(plan, extra, limits, unquantized)
        for device, excess in overflow.items():
            capacities[device] = max(0, capacities[device] - excess)
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


def _with_real_sizes(
    plan: Plan, extra: dict[DeviceKey, int], limits: dict[DeviceKey, int | None], unquantized: ModuleTree
) -> Plan:
    """The plan as it will load: offloaded blocks at their unquantized bytes, capacities as the user gave."""
    if not extra:
        return plan
    plan.usage = [
        dataclasses.replace(u, weights=u.weights + extra.get(u.device, 0), capacity=limits.get(u.device))
        if u.device in _OFFLOAD_DEVICES
        else u
        for u in plan.usage
    ]
    plan.offloaded = [dataclasses.replace(o, bytes=unquantized.module_bytes(o.name)) for o in plan.offloaded]
    return plan
