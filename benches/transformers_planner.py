"""transformers 5's own device-map planner, called as ``from_pretrained`` calls it.

transformers 5 no longer asks accelerate for ``device_map="auto" | "balanced" | "balanced_low_0" |
"sequential"``: ``PreTrainedModel.from_pretrained`` builds the model on the meta device under the load
dtype (``cls.get_init_context``: default dtype = the load dtype, meta device, ties *not* applied), then
calls ``transformers.integrations.accelerate._get_device_map(model, device_map, max_memory,
hf_quantizer)``, which is transformers' own re-implementation of accelerate's two steps:

- ``get_balanced_memory`` (all strategies but ``"sequential"``; ``"auto"`` is ``"balanced"``), whose
  per-GPU budget adds 1.25 x the larger of the biggest no-split block and the biggest *leaf module*
  (usually the embedding), where accelerate adds 1.25 x the larger of the first block of each no-split
  class and the *mean* leaf (transformers 5.0-5.17 add accelerate's amount too);
- ``infer_auto_device_map``, sizing every tensor at its real element size (no ``dtype`` argument: the
  model already is in the load dtype; fp32 buffers such as ``inv_freq`` stay 4 bytes) and taking ties
  from ``model.all_tied_weights_keys`` (the tied copies count 0 bytes) instead of object identity.

``transformers_device_map`` returns that map for (model, max_memory, strategy, dtype); everything else
(the sizes, the balancing, the placement loop) is transformers' code. ``build_like_from_pretrained``
builds the meta model exactly as ``from_pretrained`` does before it plans.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class TransformersPlannerUnavailable(RuntimeError):
    """transformers is missing or older than 5 (whose ``from_pretrained`` plans with accelerate)."""


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def unavailable_reason() -> str | None:
    """Why transformers 5's planner cannot be called here, or None when it can."""
    version = transformers_version()
    if version is None:
        return "transformers is not installed: no transformers-5 column (pip install 'transformers>=5')"
    if int(version.split(".")[0]) < 5:
        return (
            f"transformers {version} plans device_map='auto' with accelerate's infer_auto_device_map "
            "(the accelerate column already covers it); transformers >= 5 has its own planner"
        )
    try:
        from transformers.integrations.accelerate import _get_device_map  # noqa: F401
    except ImportError as err:
        return f"transformers {version} has no integrations.accelerate._get_device_map ({err})"
    return None


def require_transformers_5() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise TransformersPlannerUnavailable(reason)


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; pass a torch.dtype or a name such as 'bfloat16'")
    return value


def build_like_from_pretrained(model_or_class: Any, dtype: Any, config: Any = None) -> torch.nn.Module:
    """The meta model ``from_pretrained(..., dtype=dtype)`` plans on: ``cls(config)`` inside
    ``cls.get_init_context(dtype, ...)`` (default dtype = ``dtype``, meta device, weights not tied).

    ``model_or_class`` is a ``PreTrainedModel`` (its class and config are reused) or its class."""
    require_transformers_5()
    from transformers.utils.generic import ContextManagers

    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    config = config if config is not None else model_or_class.config
    contexts = cls.get_init_context(**_init_context_arguments(cls, _as_dtype(dtype), config))
    with ContextManagers(contexts):
        return cls(config)


def _init_context_arguments(cls: type, dtype: torch.dtype, config: Any) -> dict[str, Any]:
    """What ``from_pretrained`` passes to ``cls.get_init_context`` for an unquantized load without
    DeepSpeed, limited to the parameters this transformers takes: 5.0 takes ``(dtype, is_quantized,
    _is_ds_init_called)``, later 5.x add ``allow_all_kernels`` and ``config``."""
    passed = {
        "dtype": dtype,
        "is_quantized": False,
        "_is_ds_init_called": False,
        "allow_all_kernels": None,
        "config": config,
    }
    taken = inspect.signature(cls.get_init_context).parameters
    unknown = [name for name, p in taken.items() if p.default is p.empty and name not in passed]
    if unknown:
        raise TransformersPlannerUnavailable(
            f"{cls.__name__}.get_init_context needs {', '.join(unknown)}, which this helper does not "
            "know how from_pretrained fills"
        )
    return {name: value for name, value in passed.items() if name in taken}


def built_in(model: torch.nn.Module, dtype: Any) -> bool:
    """Every floating-point parameter is in ``dtype`` (as in a model built by from_pretrained)."""
    want = _as_dtype(dtype)
    return all(p.dtype == want for p in model.parameters() if p.is_floating_point())


@contextlib.contextmanager
def _overrides(model: torch.nn.Module, attrs: Mapping[str, Any]) -> Iterator[None]:
    """Set instance attributes for the call and restore the previous state afterwards."""
    missing = object()
    saved = {name: model.__dict__.get(name, missing) for name in attrs}
    for name, value in attrs.items():
        object.__setattr__(model, name, value)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is missing:
                object.__delattr__(model, name)
            else:
                object.__setattr__(model, name, old)


def transformers_device_map(
    model: torch.nn.Module,
    max_memory: Mapping[Any, Any],
    strategy: str = "auto",
    dtype: Any = None,
    *,
    hf_quantizer: Any = None,
    no_split_module_classes: list[str] | None = None,
    tied_weights_keys: Mapping[str, str] | None = None,
) -> dict:
    """The device map transformers 5's ``from_pretrained(device_map=strategy, max_memory=max_memory,
    dtype=dtype)`` computes for ``model``: ``transformers.integrations.accelerate._get_device_map``.

    ``model`` should be built as from_pretrained builds it (``build_like_from_pretrained``); if ``dtype``
    is given and some floating parameter is not in it, the model is rebuilt that way first (a
    ``PreTrainedModel`` only). For a plain ``nn.Module`` pass ``no_split_module_classes`` and
    ``tied_weights_keys`` (``{tied name: source name}``), which stand in for the ``_no_split_modules``
    and ``all_tied_weights_keys`` a ``PreTrainedModel`` carries; they also override those of a
    ``PreTrainedModel`` for this call. Raises ``TransformersPlannerUnavailable`` on transformers < 5.
    """
    require_transformers_5()
    from transformers.integrations.accelerate import _get_device_map

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if dtype is not None and not built_in(model, dtype):
        if not hasattr(model, "get_init_context"):
            raise ValueError(
                f"{type(model).__name__} is not a transformers PreTrainedModel: build it in {dtype} "
                "yourself (transformers sizes tensors at their own dtype)"
            )
        model = build_like_from_pretrained(model, dtype)
    attrs: dict[str, Any] = {}
    if no_split_module_classes is not None or not hasattr(model, "_no_split_modules"):
        classes = set(no_split_module_classes or [])
        attrs["_no_split_modules"] = classes
        # transformers 5.0 asks _get_no_split_modules(device_map) (5.5 reads _no_split_modules), which
        # adds the classes of every PreTrainedModel inside (LlamaModel in LlamaForCausalLM): override it too
        attrs["_get_no_split_modules"] = lambda device_map: sorted(classes)
    if tied_weights_keys is not None or not hasattr(model, "all_tied_weights_keys"):
        attrs["all_tied_weights_keys"] = dict(tied_weights_keys or {})
    # A copy: accelerate's get_max_memory, under transformers', converts the caller's dict in place.
    with _overrides(model, attrs):
        return dict(_get_device_map(model, strategy, dict(max_memory), hf_quantizer))
