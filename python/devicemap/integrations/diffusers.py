"""diffusers: ``ModelMixin.from_pretrained`` / ``from_single_file`` with a strategy-string ``device_map``.

Both call the module global ``_determine_device_map(model, device_map, max_memory, torch_dtype,
keep_in_fp32_modules, hf_quantizer)`` (imported into ``diffusers.models.modeling_utils`` and
``diffusers.loaders.single_file_model``) on the meta model, then load with the dict it returns. The
replacement plans with devicemap: weights sized at ``torch_dtype``, ``keep_in_fp32_modules`` (matched as
substrings of parameter names, as diffusers does) at fp32, no-split classes from the model.

Pipeline-level ``DiffusionPipeline.from_pretrained(path, device_map="balanced", max_memory=...)``: diffusers'
``_get_final_device_map`` builds every component on the meta device, sizes each with accelerate's
``compute_module_sizes`` at the component's dtype, keeps the GPU budgets (``max_memory`` without ``"cpu"``) and
calls the module global ``_assign_components_to_devices(module_sizes, device_memory, strategy)``, which deals
the components, largest first, to GPUs 0..n-1..0 and sends to the CPU any component the GPU whose turn it is
cannot hold. The replacement keeps diffusers' sizes and budgets and places the whole components with
:func:`devicemap.planners.components.place_components`: the fewest bytes on the CPU, then the smallest largest
GPU load, exactly. As in diffusers the CPU takes what the GPUs cannot, whatever its budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UnknownDeviceError
from ..inputs.memory import absent_devices, accelerator_count
from ..planners.components import CPU, place_components
from .common import (
    ABSENT_GPU_HINT,
    Unrecognised,
    check_map_present,
    is_strategy,
    keep_in_fp32_dtypes,
    plan_for_loader,
)
from .fallbacks import warn_once

MODEL_LIBRARY = "diffusers' from_pretrained"
PIPELINE_LIBRARY = "diffusers' pipeline device_map='balanced'"


def make_determine(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for diffusers' ``_determine_device_map``."""

    def _determine_device_map(
        model: Any,
        device_map: Any,
        max_memory: Any,
        torch_dtype: Any,
        keep_in_fp32_modules: Any = None,
        hf_quantizer: Any = None,
    ) -> Any:
        fp32 = list(keep_in_fp32_modules or [])
        if not is_strategy(device_map):
            if isinstance(device_map, Mapping):
                check_map_present(device_map, MODEL_LIBRARY)
            return original(model, device_map, max_memory, torch_dtype, fp32, hf_quantizer)

        def library_map() -> Any:
            return original(model, device_map, copy.copy(max_memory), torch_dtype, fp32, hf_quantizer)

        try:
            planned = plan_for_loader(
                model,
                max_memory,
                device_map,
                no_split_module_classes=model._get_no_split_modules(device_map),
                dtype=torch_dtype,
                special_dtypes=keep_in_fp32_dtypes(model, fp32),
                quantizer=hf_quantizer,
                library=MODEL_LIBRARY,
                library_map=library_map,
            )
        except Unrecognised as reason:
            warn_once(f"diffusers from_pretrained(device_map={device_map!r}): {reason}")
            return original(model, device_map, max_memory, torch_dtype, fp32, hf_quantizer)
        return dict(planned.device_map)

    _determine_device_map.__wrapped__ = original  # type: ignore[attr-defined]
    return _determine_device_map


def _component_inputs(
    module_sizes: Any, device_memory: Any, strategy: Any
) -> tuple[dict[str, int], dict[Any, int]]:
    """diffusers' sizes and GPU budgets as :func:`place_components` takes them; :class:`Unrecognised` otherwise."""
    if strategy != "balanced":
        raise Unrecognised(f"pipeline device_map={strategy!r} is not a strategy devicemap places")
    if not isinstance(module_sizes, dict) or not isinstance(device_memory, dict):
        raise Unrecognised("the component sizes or device budgets are not dicts")
    sizes: dict[str, int] = {}
    for name, size in module_sizes.items():
        if (
            not isinstance(name, str)
            or isinstance(size, bool)
            or not isinstance(size, (int, float))
            or size < 0
        ):
            raise Unrecognised(f"component {name!r} has a size devicemap does not know ({size!r})")
        sizes[name] = math.ceil(size)
    budgets: dict[Any, int] = {}
    for device, budget in device_memory.items():
        if device in (CPU, "disk") or isinstance(device, bool) or not isinstance(device, (int, str)):
            raise Unrecognised(f"device {device!r} among the GPU budgets")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
            raise Unrecognised(f"device {device!r} has a budget devicemap does not know ({budget!r})")
        budgets[device] = math.floor(budget)
    return sizes, budgets


def _without_absent_gpus(budgets: dict[Any, int], absent: list[Any], theirs: Any) -> dict[Any, int]:
    """The GPU budgets without those this machine lacks, when diffusers' own assignment (``theirs``) would load
    here: no component on a missing GPU, and none on the CPU without a GPU 0 (diffusers runs CPU components
    from GPU 0: ``dispatch_model(..., main_device=0)``). Otherwise the unchanged call fails in torch as it
    moves weights, and :class:`UnknownDeviceError` says so up front."""
    names = ", ".join(f"GPU {d}" if isinstance(d, int) else repr(d) for d in absent)
    refused = f"max_memory names {names}, which this machine lacks (it has {accelerator_count()} GPU(s))"
    used = set(theirs) if isinstance(theirs, Mapping) else set(absent)
    present = {device for device in budgets if device not in absent}
    if not used <= present | {CPU} or (CPU in used and absent_devices([0])):
        raise UnknownDeviceError(
            f"{refused}, and {PIPELINE_LIBRARY} would place components there (or run CPU components from GPU 0), "
            f"which fails as they load; {ABSENT_GPU_HINT}"
        )
    warn_once(
        f"{refused}; {PIPELINE_LIBRARY} places nothing there, so devicemap places components on the GPUs present"
    )
    return {device: budget for device, budget in budgets.items() if device not in absent}


def make_assign_components(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for diffusers' ``_assign_components_to_devices`` (pipeline ``device_map="balanced"``).

    Returns diffusers' shape, ``{device: [component, ...]}`` (GPUs in the budgets' order, then ``"cpu"``),
    every CPU component included (diffusers keeps only the last one under ``"cpu"``; the others load on the
    CPU anyway since they have no entry).
    """

    def _assign_components_to_devices(
        module_sizes: Any, device_memory: Any, device_mapping_strategy: str = "balanced"
    ) -> Any:
        try:
            sizes, budgets = _component_inputs(module_sizes, device_memory, device_mapping_strategy)
        except Unrecognised as reason:
            warn_once(f"diffusers pipeline device_map: {reason}")
            return original(module_sizes, device_memory, device_mapping_strategy=device_mapping_strategy)
        absent = absent_devices(budgets)
        if absent:
            try:
                theirs = original(
                    module_sizes, dict(device_memory), device_mapping_strategy=device_mapping_strategy
                )
            except Exception:  # diffusers refuses the call: it does not load
                theirs = None
            budgets = _without_absent_gpus(budgets, absent, theirs)
        placed = place_components(sizes, {**budgets, CPU: None})
        mapping: dict[Any, list[str]] = {}
        for name, device in placed.assignment.items():
            mapping.setdefault(device, []).append(name)
        return {device: mapping[device] for device in [*budgets, CPU] if device in mapping}

    _assign_components_to_devices.__wrapped__ = original  # type: ignore[attr-defined]
    return _assign_components_to_devices
