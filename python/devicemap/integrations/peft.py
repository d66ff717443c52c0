"""PEFT: the re-plan of ``PeftModel.from_pretrained`` / ``load_adapter`` for a base model with CPU/disk entries.

When the base model's ``hf_device_map`` holds ``"cpu"`` or ``"disk"``, PEFT removes its hooks, adds the
adapter, and plans the whole ``PeftModel`` again with the module globals ``peft.peft_model.get_balanced_memory``
(skipped for ``"sequential"``) and ``peft.peft_model.infer_auto_device_map``, using the ``device_map``
(default ``"auto"``) and ``max_memory`` (default: the whole machine) given to ``from_pretrained``.

The replacements plan with devicemap instead: adapter weights are part of the model, so they are budgeted;
without a ``max_memory`` the budget the base model was planned with through the transformers hook is kept. As in
accelerate's planner, an unbounded disk is added to the budget (PEFT offloads to ``offload_folder``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..inputs.options import Strategy
from .common import Unrecognised, plan_for_loader
from .fallbacks import warn_once
from .transformers import REQUEST_ATTRIBUTE

LIBRARY = "PEFT's re-plan in PeftModel.from_pretrained"


class BalancedRequest(dict):  # type: ignore[type-arg]
    """accelerate's balanced budget (what PEFT's own planner would use), carrying what was asked for."""

    def __init__(self, balanced: dict[Any, Any], requested: Any, low_zero: bool):
        super().__init__(balanced)
        self.requested = requested
        self.low_zero = low_zero


def make_get_balanced_memory(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for ``peft.peft_model.get_balanced_memory``: accelerate's result, tagged."""

    def get_balanced_memory(model: Any, max_memory: Any = None, *args: Any, **kwargs: Any) -> Any:
        balanced = original(model, max_memory, *args, **kwargs)
        if not isinstance(balanced, dict):
            return balanced
        return BalancedRequest(balanced, max_memory, bool(kwargs.get("low_zero", False)))

    get_balanced_memory.__wrapped__ = original  # type: ignore[attr-defined]
    return get_balanced_memory


def _remembered_budget(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    request = getattr(base, REQUEST_ATTRIBUTE, None)
    return request.get("max_memory") if isinstance(request, dict) else None


def _copied(max_memory: Any) -> Any:
    """A plain copy for accelerate's planner, which converts size strings in place."""
    return dict(max_memory) if isinstance(max_memory, Mapping) else max_memory


def make_infer_auto_device_map(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for ``peft.peft_model.infer_auto_device_map``."""

    def infer_auto_device_map(model: Any, max_memory: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args or set(kwargs) - {"no_split_module_classes"}:
            warn_once("PEFT re-planned with arguments devicemap does not know; PEFT's own planner runs")
            return original(model, max_memory, *args, **kwargs)
        strategy: Strategy
        if isinstance(max_memory, BalancedRequest):
            strategy = "balanced_low_0" if max_memory.low_zero else "auto"
            budget = max_memory.requested
        else:
            strategy, budget = "sequential", max_memory
        if budget is None:
            budget = _remembered_budget(model)
        try:
            planned = plan_for_loader(
                model,
                budget,
                strategy,
                no_split_module_classes=kwargs.get("no_split_module_classes"),
                library=LIBRARY,
                library_map=lambda: original(model, _copied(max_memory), **kwargs),
            )
        except Unrecognised as reason:
            warn_once(f"PEFT re-plan: {reason}")
            return original(model, max_memory, **kwargs)
        return dict(planned.device_map)

    infer_auto_device_map.__wrapped__ = original  # type: ignore[attr-defined]
    return infer_auto_device_map
