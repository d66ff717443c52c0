"""What every loader hook shares: planning a model as the loader sees it (ties named but not yet live,
weights kept in fp32, a quantizer), and the one place a quantizer's exact sizes plug in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeGuard

from ..errors import DoesNotFitError, InvalidOptionError, InvalidSizeError, UnknownDeviceError
from ..formatting import format_bytes
from ..inputs.memory import (
    DeviceKey,
    absent_devices,
    accelerator_count,
    available_memory,
    check_devices_present,
    normalize_max_memory,
    parse_size,
)
from ..inputs.options import STRATEGIES, Strategy
from ..planners.api import plan
from ..plans import Plan
from ..sizing.quantization import offload_rule
from .fallbacks import warn_once

if TYPE_CHECKING:
    import torch

    from ..inputs.dtypes import DtypeLike
    from ..inputs.memory import MaxMemory


class Unrecognised(Exception):
    """The hook does not handle this call; the message says why and the library's own planner runs."""


def is_strategy(device_map: object) -> TypeGuard[Strategy]:
    """Whether ``device_map`` is one of the strategy strings the loaders plan themselves."""
    return isinstance(device_map, str) and device_map in STRATEGIES


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
    layers (``Linear4bit`` holding unpacked meta weights...), while :mod:`devicemap.sizing.quantization` sizes the
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


LibraryMap = Callable[[], Any]
"""Runs the library's own planner on the same call and returns its device map (only asked when ``max_memory``
names a GPU this machine lacks, to learn whether the unchanged call would load)."""

ABSENT_GPU_HINT = (
    "give max_memory only the devices this machine has, or run where the GPUs are "
    "(devicemap.from_pretrained(path, max_memory=..., rehearse=True) runs a GPU plan on the CPU)"
)


def loader_budget(
    max_memory: MaxMemory | None, *, disk: bool = True, cpu_share: float = 1.0
) -> dict[DeviceKey, int | None]:
    """``max_memory`` as the libraries' planners read it, for :func:`devicemap.plan`.

    accelerate's ``infer_auto_device_map`` (behind transformers', diffusers' and PEFT's planners too) appends
    an unbounded ``"disk"`` when ``max_memory`` has none, so whatever the other devices cannot hold goes to
    disk and a model never fails to fit; the loader then needs an offload folder (or, in transformers 5, serves
    disk weights from the safetensors checkpoint itself). ``disk=False`` leaves the disk out (a loader given no
    offload folder cannot use it). ``None`` is the machine's free memory, the CPU's times ``cpu_share``
    (transformers keeps 10% of it free when nobody gave a budget). Bad sizes or keys raise devicemap's errors.
    """
    if max_memory is None:
        budget: dict[DeviceKey, int | None] = dict(available_memory())
        if "cpu" in budget and cpu_share != 1.0:
            budget["cpu"] = int((budget["cpu"] or 0) * cpu_share)
    elif isinstance(max_memory, Mapping) and not max_memory:
        budget = {}  # accelerate plans {} as "everything on disk"
    else:
        budget = normalize_max_memory(_sizes_as_read(max_memory))
    if disk:
        budget.setdefault("disk", None)
    else:
        budget.pop("disk", None)
    return budget


def _sizes_as_read(max_memory: MaxMemory) -> MaxMemory:
    """``max_memory`` with the size strings devicemap refuses but accelerate reads (``"20 GB"``, ``" 8GiB"``: it
    strips spaces around the number) given as the bytes accelerate reads; everything else as it was, for
    :func:`normalize_max_memory` to check with devicemap's messages."""
    if not isinstance(max_memory, Mapping):
        return max_memory
    read: dict[Any, Any] = {}
    for key, size in max_memory.items():
        read[key] = size
        if isinstance(size, str):
            try:
                parse_size(size)
            except InvalidSizeError:
                read[key] = _accelerate_size(size)
    return read


def _accelerate_size(size: str) -> int | str:
    """``size`` as accelerate's ``convert_file_size_to_int`` reads it, or unchanged where it refuses it too."""
    try:
        from accelerate.utils import convert_file_size_to_int

        value = convert_file_size_to_int(size)
    except (ImportError, ValueError, TypeError, AttributeError):
        return size
    return value if isinstance(value, int) and value >= 0 else size


def absent_gpus_unused(
    budget: dict[DeviceKey, int | None], library: str, library_map: LibraryMap | None
) -> dict[DeviceKey, int | None]:
    """``budget`` without the GPUs it names that this machine lacks, when the library's own planner puts no
    weight on them (the unchanged call loads on the devices present, so devicemap plans there too); raises
    :class:`UnknownDeviceError` when it would (the call fails in torch as it moves weights there) or when the
    library refuses the call itself."""
    absent = absent_devices(budget)
    if not absent:
        return budget
    names = ", ".join(f"GPU {d}" if isinstance(d, int) else repr(d) for d in absent)
    refused = f"max_memory names {names}, which this machine lacks (it has {accelerator_count()} GPU(s))"
    theirs: Any = None
    if library_map is not None:
        try:
            theirs = library_map()
        except Exception:  # the library refuses the call, or fails on the missing device: it does not load
            theirs = None
    if not isinstance(theirs, Mapping) or absent_devices(theirs.values()):
        raise UnknownDeviceError(
            f"{refused}, and {library} would place weights there, which fails as they load; {ABSENT_GPU_HINT}"
        )
    warn_once(
        f"{refused}; {library}'s own planner places nothing there, so devicemap plans on the devices present"
    )
    return {device: size for device, size in budget.items() if device not in absent}


def check_map_present(device_map: Mapping[str, Any], library: str) -> None:
    """A device map given to a loader hook places nothing on a device this machine lacks (the library would
    fail in torch while moving weights there): :class:`UnknownDeviceError` up front instead."""
    check_devices_present(
        device_map,
        f"{library} would fail moving weights there; map those modules to devices this machine has "
        "('cpu', 'disk'), or run where the GPUs are",
    )


def plan_for_loader(
    model: torch.nn.Module,
    max_memory: MaxMemory | None,
    strategy: Strategy,
    *,
    library: str,
    no_split_module_classes: Iterable[str] | None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    tied_keys: Mapping[str, str] | None = None,
    offload_buffers: bool = False,
    quantizer: object = None,
    library_map: LibraryMap | None = None,
    disk: bool = True,
    cpu_share: float = 1.0,
) -> Plan:
    """Plan ``model`` the way ``library``'s loader will load it, on the budget its own planner would use
    (:func:`loader_budget`: an unbounded disk appended unless ``disk=False``; GPUs this machine lacks handled by
    :func:`absent_gpus_unused`); raises :class:`Unrecognised` for what it cannot size."""
    budget = absent_gpus_unused(
        loader_budget(max_memory, disk=disk, cpu_share=cpu_share), library, library_map
    )
    if set(budget) <= {"disk"}:  # every weight on disk, streamed through the CPU as accelerate does
        budget = {"cpu": 0, **budget}
    extra: dict[str, Any] = {}
    if quantizer is not None:
        # The twin's ties are live and the quantizer's sizing covers keep-in-fp32 weights.
        model, extra = quantized_plan_inputs(model, quantizer)
        tied_keys, special_dtypes, dtype = None, None, extra.pop("dtype")
    options: dict[str, Any] = dict(
        strategy=strategy,
        no_split_module_classes=list(no_split_module_classes)
        if no_split_module_classes is not None
        else None,
        dtype=dtype,
        special_dtypes=special_dtypes or None,
        offload_buffers=offload_buffers,
        **extra,
    )
    # Offloaded layers stream from the disk through the CPU only where the disk may hold them (a quantizer may
    # refuse it): only then is a CPU too small to stage them read as accelerate reads it.
    streams = "disk" in budget and offload_rule(extra.get("quantization_config")).disk
    with live_ties(model, tied_keys):
        beyond = 0  # bytes of CPU staging beyond max_memory["cpu"]
        for attempt in range(STAGING_ATTEMPTS):
            try:
                # "disk" is unbounded whatever its size: None (normalize_max_memory's word for it) is given as 0
                planned = plan(
                    model, {d: 0 if size is None else size for d, size in budget.items()}, **options
                )
            except InvalidOptionError as err:
                if not extra:
                    raise
                raise Unrecognised(f"devicemap cannot size this quantizer: {err}") from None
            except DoesNotFitError as err:
                if attempt + 1 == STAGING_ATTEMPTS or not streams or not _cpu_staging_short(err, budget):
                    raise
                missing = max(err.missing_bytes or 0, 1)
                budget = {**budget, "cpu": (budget.get("cpu") or 0) + missing}
                beyond += missing
                continue
            if beyond:
                _warn_staging_beyond_budget(beyond, library)
            _check_quantized_disk_runs(planned, extra.get("quantization_config"))
            return planned
    raise AssertionError("unreachable: the last attempt returns or raises")


def _check_quantized_disk_runs(planned: Plan, quantization_config: Any) -> None:
    """bitsandbytes with ``llm_int8_enable_fp32_cpu_offload`` leaves modules mapped to the CPU or disk
    unquantized only when the map has several entries: a model mapped whole to the disk (``{"": "disk"}``) is
    quantized, and accelerate streams int8/4-bit weights back from the disk only through GPU 0
    (``.to(0)``). Without a GPU that load fails on its first forward: say so up front."""
    if (
        quantization_config is None
        or dict(planned.device_map) != {"": "disk"}
        or offload_rule(quantization_config).offloaded_quantized
        or accelerator_count() > 0
    ):
        return
    raise DoesNotFitError(
        "the quantized model fits nowhere but on the disk (max_memory's CPU budget holds none of its layers), "
        "and bitsandbytes quantizes a model mapped whole to the disk, whose weights accelerate streams back "
        "only through a GPU, which this machine lacks: give the CPU room for at least the largest layer"
    )


STAGING_ATTEMPTS = 4
"""Plans tried when the CPU's budget leaves no room to stage offloaded layers (each adds what was missing)."""


def _cpu_staging_short(err: DoesNotFitError, budget: Mapping[DeviceKey, int | None]) -> bool:
    return (
        getattr(err, "shortfall", None) == "staging"
        and getattr(err, "device", None) == "cpu"
        and isinstance(getattr(err, "missing_bytes", None), int)
        and budget.get("cpu") is not None
    )


def _warn_staging_beyond_budget(beyond: int, library: str) -> None:
    """devicemap keeps room on the executing device for the largest offloaded block. accelerate's planner
    (behind every hooked loader) reserves it only when it fits, and otherwise streams the offloaded layers
    through the CPU beyond ``max_memory["cpu"]``: the unchanged call loads. The hooked one plans the CPU with
    the least extra room that makes devicemap's plan runnable, and says how much."""
    warn_once(
        f"max_memory['cpu'] leaves no room to stage the offloaded layers on the CPU that runs them; as {library} "
        f"uses the CPU beyond that budget to stream them, devicemap plans {format_bytes(beyond)} more CPU memory"
    )
