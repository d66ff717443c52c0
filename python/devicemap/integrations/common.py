"""What every loader hook shares: planning a model as the loader sees it (ties named but not yet live,
weights kept in fp32, a quantizer), and the one place a quantizer's exact sizes plug in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, get_args

from ..errors import InvalidOptionError
from ..planning import Plan, plan

if TYPE_CHECKING:
    import torch

    from ..memory import MaxMemory
    from ..tree import DtypeLike


class Unrecognised(Exception):
    """The hook does not handle this call; the message says why and the library's own planner runs."""


StrategyName = Literal["auto", "balanced", "balanced_low_0", "sequential"]
"""The strategy strings every hooked loader accepts (the same four as :func:`devicemap.plan`)."""
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)


def is_strategy(device_map: object) -> TypeGuard[StrategyName]:
    """Whether ``device_map`` is one of the strategy strings the loaders plan themselves."""
    return isinstance(device_map, str) and device_map in STRATEGY_NAMES


@contextmanager
def live_ties(model: torch.nn.Module, tied_keys: Mapping[str, str] | None) -> Iterator[None]:
    """Make the ties named by ``tied_keys`` (``{target parameter: source parameter}``, transformers'
    ``all_tied_weights_keys``) live for the ``with`` block: each target name holds the source's parameter,
    so the size tree counts it once and keeps its users together. The model is restored afterwards.

    transformers 5 builds the model on the meta device with separate tensors and ties them only after
    loading, so object identity does not show the ties when the map is computed.
    """

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for target, source in (tied_keys or {}).items():
            try:
                source_param = model.get_parameter(source)
                holder_name, _, local = target.rpartition(".")
                holder = model.get_submodule(holder_name)
            except AttributeError as err:
                raise Unrecognised(
                    f"the tie {target!r} -> {source!r} names no parameter of the model ({err})"
                ) from None
            current = holder._parameters.get(local)
            if current is None:
                raise Unrecognised(f"the tied name {target!r} is not a parameter of the model")
            if current is source_param:
                continue
            if current.shape != source_param.shape:
                raise Unrecognised(
                    f"tied {target!r} {tuple(current.shape)} and {source!r} {tuple(source_param.shape)} differ in shape"
                )
            swapped.append((holder, local, current))
            holder._parameters[local] = source_param
        yield
    finally:
        for holder, local, current in reversed(swapped):
            holder._parameters[local] = current


def quantized_plan_inputs(
    model: torch.nn.Module, hf_quantizer: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """THE place a quantizer's sizing plugs in: the model to size and the extra :func:`devicemap.plan`
    arguments that size it as ``hf_quantizer`` will store it.

    By the time the loader plans, ``hf_quantizer.preprocess_model`` has already swapped in its quantized
    layers (``Linear4bit`` holding unpacked meta weights...), while :mod:`devicemap.quantization` sizes the
    model as built *before* that swap. So a twin of the same class is built from the model's config on the
    meta device (nothing allocated; module names are the same, so the map applies to the loaded model) and
    planned with the quantizer's config. Pre-quantized checkpoints (sized exactly from their headers by
    :func:`devicemap.plan_checkpoint`) and anything else raise :class:`Unrecognised`.
    """
    import copy

    import torch

    config = getattr(hf_quantizer, "quantization_config", None)
    method = getattr(config, "quant_method", None)
    label = getattr(method, "value", method) or type(hf_quantizer).__name__
    if config is None or getattr(hf_quantizer, "pre_quantized", False):
        raise Unrecognised(f"pre-quantized {label} checkpoints are not planned through the loader yet")
    build = getattr(type(model), "_from_config", None)
    model_config = getattr(model, "config", None)
    if build is None or model_config is None:
        raise Unrecognised(f"cannot rebuild {type(model).__name__} unquantized to size it for {label}")
    dtype = getattr(model, "dtype", None)
    with torch.device("meta"):
        twin = build(copy.deepcopy(model_config), dtype=dtype)
    return twin, {"quantization_config": config, "dtype": dtype}


def keep_in_fp32_dtypes(
    model: torch.nn.Module, patterns: Iterable[str], match: str = "substring"
) -> dict[str, Any]:
    """``{parameter name: torch.float32}`` for parameters the loader keeps in fp32 whatever the dtype.

    ``match="substring"``: a pattern anywhere in the name (diffusers' rule); ``"transformers"``: the
    glob-alternation rule transformers 5 applies to its ``dtype_plan``.
    """
    import torch

    found = [p for p in patterns if p]
    if not found:
        return {}
    names = [name for name, _ in model.named_parameters()]
    if match == "transformers":
        from transformers.core_model_loading import build_glob_alternation

        pattern = build_glob_alternation(list(found))[0]
        return {name: torch.float32 for name in names if pattern.search(name)}
    return {name: torch.float32 for name in names if any(p in name for p in found)}


def plan_for_loader(
    model: torch.nn.Module,
    max_memory: MaxMemory | None,
    strategy: StrategyName,
    *,
    no_split_module_classes: Iterable[str] | None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    tied_keys: Mapping[str, str] | None = None,
    offload_buffers: bool = False,
    quantizer: object = None,
) -> Plan:
    """Plan ``model`` the way a loader will load it; raises :class:`Unrecognised` for what it cannot size."""
    extra: dict[str, Any] = {}
    if quantizer is not None:
        # The twin's ties are live and the quantizer's sizing covers keep-in-fp32 weights.
        model, extra = quantized_plan_inputs(model, quantizer)
        tied_keys, special_dtypes, dtype = None, None, extra.pop("dtype")
    with live_ties(model, tied_keys):
        try:
            planned = plan(
                model,
                max_memory,
                strategy=strategy,
                no_split_module_classes=list(no_split_module_classes)
                if no_split_module_classes is not None
                else None,
                dtype=dtype,
                special_dtypes=special_dtypes or None,
                offload_buffers=offload_buffers,
                **extra,
            )
        except InvalidOptionError as err:
            if not extra:
                raise
            raise Unrecognised(f"devicemap cannot size this quantizer: {err}") from None
    return planned
