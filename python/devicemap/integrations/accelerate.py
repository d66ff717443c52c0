"""accelerate 1: ``load_checkpoint_and_dispatch(model, checkpoint, device_map="auto", ...)``.

accelerate turns the strategy string into a map inside ``load_checkpoint_and_dispatch`` itself
(``get_balanced_memory`` then ``infer_auto_device_map``, with ``max_memory``, ``no_split_module_classes``,
``dtype`` and ``offload_buffers``), then loads and dispatches. The replacement computes devicemap's map from
the same arguments and hands the original function that map, so loading and dispatch are accelerate's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .common import Unrecognised, is_strategy, plan_for_loader


def make_load_and_dispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for ``accelerate.load_checkpoint_and_dispatch``."""
    from . import warn_once

    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint_and_dispatch(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let accelerate name the bad call
        arguments = bound.arguments
        strategy = arguments.get("device_map")
        if not is_strategy(strategy):
            return original(*args, **kwargs)
        model = arguments["model"]
        try:
            planned = plan_for_loader(
                model,
                arguments.get("max_memory"),
                strategy,
                no_split_module_classes=arguments.get("no_split_module_classes"),
                dtype=arguments.get("dtype"),
                tied_keys=getattr(model, "all_tied_weights_keys", None) or {},
                offload_buffers=bool(arguments.get("offload_buffers", False)),
            )
        except Unrecognised as reason:
            warn_once(f"load_checkpoint_and_dispatch(device_map={strategy!r}): {reason}")
            return original(*args, **kwargs)
        arguments["device_map"] = dict(planned.device_map)
        return original(*bound.args, **bound.kwargs)

    return load_checkpoint_and_dispatch
