"""accelerate 1: ``load_checkpoint_and_dispatch(model, checkpoint, device_map="auto", ...)``.

accelerate turns the strategy string into a map inside ``load_checkpoint_and_dispatch`` itself
(``get_balanced_memory`` then ``infer_auto_device_map``, with ``max_memory``, ``no_split_module_classes``,
``dtype`` and ``offload_buffers``), then loads and dispatches. The replacement computes devicemap's map from
the same arguments and hands the original function that map, so loading and dispatch are accelerate's.

The budget is the one accelerate's planner uses: ``max_memory`` (or the machine's free memory) and an
unbounded disk it appends itself. accelerate writes disk weights to ``offload_folder`` and refuses a map with
disk entries when there is none, so without an ``offload_folder`` the hook plans without the disk, and a model
that needs it raises :class:`~devicemap.OffloadFolderError` before anything is read.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import DoesNotFitError, OffloadFolderError
from .common import Unrecognised, check_map_present, is_strategy, plan_for_loader
from .fallbacks import warn_once

LIBRARY = "accelerate's load_checkpoint_and_dispatch"


def _accelerate_map(arguments: Mapping[str, Any], strategy: str) -> Any:
    """The map ``load_checkpoint_and_dispatch`` computes for these arguments (its own planner, looked up where
    it looks it up)."""
    import accelerate.big_modeling as big_modeling

    model = arguments["model"]
    options = {
        "no_split_module_classes": arguments.get("no_split_module_classes"),
        "dtype": arguments.get("dtype"),
    }
    max_memory = copy.copy(arguments.get("max_memory"))
    if strategy != "sequential":
        max_memory = big_modeling.get_balanced_memory(
            model, max_memory=max_memory, low_zero=strategy == "balanced_low_0", **options
        )
    return big_modeling.infer_auto_device_map(
        model,
        max_memory=max_memory,
        offload_buffers=bool(arguments.get("offload_buffers", False)),
        **options,
    )


def make_load_and_dispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for ``accelerate.load_checkpoint_and_dispatch``."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint_and_dispatch(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let accelerate name the bad call
        arguments = bound.arguments
        strategy = arguments.get("device_map")
        if isinstance(strategy, Mapping):
            check_map_present(strategy, LIBRARY)
        if not is_strategy(strategy):
            return original(*args, **kwargs)
        model = arguments["model"]
        with_disk = arguments.get("offload_folder") is not None
        try:
            planned = plan_for_loader(
                model,
                arguments.get("max_memory"),
                strategy,
                no_split_module_classes=arguments.get("no_split_module_classes"),
                dtype=arguments.get("dtype"),
                tied_keys=getattr(model, "all_tied_weights_keys", None) or {},
                offload_buffers=bool(arguments.get("offload_buffers", False)),
                library=LIBRARY,
                library_map=lambda: _accelerate_map(arguments, strategy),
                disk=with_disk,
            )
        except Unrecognised as reason:
            warn_once(f"load_checkpoint_and_dispatch(device_map={strategy!r}): {reason}")
            return original(*args, **kwargs)
        except DoesNotFitError as err:
            if with_disk:
                raise
            raise OffloadFolderError(
                "the model needs the disk beyond max_memory, and load_checkpoint_and_dispatch offloads to disk "
                f"only into offload_folder=: pass one (a folder for the offloaded weights). Without the disk: {err}"
            ) from None
        arguments["device_map"] = dict(planned.device_map)
        return original(*bound.args, **bound.kwargs)

    return load_checkpoint_and_dispatch
