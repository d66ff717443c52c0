"""transformers 5: ``from_pretrained(device_map="auto" | "balanced" | "balanced_low_0" | "sequential")``.

``PreTrainedModel.from_pretrained`` builds the model on the meta device (already in the load dtype, quantized
modules already swapped in by ``hf_quantizer.preprocess_model``), then calls the module global
``transformers.modeling_utils._get_device_map(model, device_map, max_memory, hf_quantizer)`` and loads and
dispatches with the dict it returns. The replacement plans with devicemap instead, for strategy strings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from ..inputs.options import Strategy
from ..sizing.tree import declared_no_split_classes
from .common import (
    Unrecognised,
    check_map_present,
    is_strategy,
    keep_in_fp32_dtypes,
    plan_for_loader,
)
from .fallbacks import warn_once

REQUEST_ATTRIBUTE = "_devicemap_request"
"""Set on a model planned through a hook: ``{"strategy": ..., "max_memory": ...}``, so a later re-plan
(PEFT's) keeps the same budget."""


LIBRARY = "transformers' from_pretrained"

CPU_SHARE_UNSET = 0.9
"""The share of the CPU's free memory transformers' planner uses when no ``max_memory`` is given (it keeps the
rest for memory spikes while converting weights): the hook plans on the same budget."""


def plan_pretrained(
    model: Any,
    strategy: Strategy,
    max_memory: Any,
    hf_quantizer: Any,
    library_map: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """devicemap's map for a transformers model as ``from_pretrained`` holds it before loading, on the budget
    transformers' own planner uses: ``max_memory`` (or the machine's free memory, 90% of the CPU's) with an
    unbounded disk, which transformers serves from the safetensors checkpoint itself (or writes to
    ``offload_folder`` for weights it converts while loading)."""
    if getattr(model, "_no_placement_params", None):
        raise Unrecognised(
            "models with _no_placement_params (parameters left out of the map) are not handled"
        )
    dtype = getattr(model, "dtype", None)
    dtype_plan = getattr(model, "_get_dtype_plan", None)
    fp32_patterns = list(dtype_plan(dtype)) if dtype_plan is not None and dtype is not None else []
    result = plan_for_loader(
        model,
        max_memory,
        strategy,
        no_split_module_classes=declared_no_split_classes(model),
        special_dtypes=keep_in_fp32_dtypes(model, fp32_patterns, match="transformers"),
        tied_keys=getattr(model, "all_tied_weights_keys", None) or {},
        quantizer=hf_quantizer,
        library=LIBRARY,
        library_map=library_map,
        cpu_share=CPU_SHARE_UNSET if max_memory is None else 1.0,
    )
    device_map = dict(result.device_map)
    if hf_quantizer is not None:
        hf_quantizer.validate_environment(device_map=device_map)
    setattr(model, REQUEST_ATTRIBUTE, {"strategy": strategy, "max_memory": max_memory})
    return device_map


def make_get_device_map(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for ``transformers.modeling_utils._get_device_map``."""

    def _get_device_map(model: Any, device_map: Any, max_memory: Any, hf_quantizer: Any) -> Any:
        if not is_strategy(device_map):
            if isinstance(device_map, Mapping):
                check_map_present(device_map, LIBRARY)
            return original(model, device_map, max_memory, hf_quantizer)

        def library_map() -> Any:
            return original(model, device_map, copy.copy(max_memory), hf_quantizer)

        try:
            return plan_pretrained(model, device_map, max_memory, hf_quantizer, library_map)
        except Unrecognised as reason:
            warn_once(f"from_pretrained(device_map={device_map!r}): {reason}")
            return original(model, device_map, max_memory, hf_quantizer)

    _get_device_map.__doc__ = (
        f"devicemap's planner in place of transformers' own.\n\n{original.__doc__ or ''}"
    )
    _get_device_map.__wrapped__ = original  # type: ignore[attr-defined]
    return _get_device_map
