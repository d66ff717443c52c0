"""The warnings and log lines accelerate's placement helpers emit, emitted by ``devicemap.compat`` under
the same conditions, with the same category, logger and text: code and tests that filter, capture or
silence them keep working after switching to the drop-ins.

accelerate (1.x) emits, from the logger ``accelerate.utils.modeling``:

- ``get_max_memory``: a warning per GPU index this machine does not have;
- ``get_balanced_memory``: an info line when it keeps 10% of the only GPU free (``max_memory`` not given);
- ``infer_auto_device_map``: a warning when a transformers model declares tied weights but none are tied,
  a ``UserWarning`` when the buffers of CPU/disk-offloaded modules fit on no GPU (``offload_buffers=False``),
  and an info line listing the devices that received nothing for lack of memory.

Byte counts are printed as accelerate computes them: a float as soon as a bool tensor (1/8 byte per
element) is part of the sum. What differs between accelerate releases follows the installed one (see
:mod:`devicemap.compat.versions`): before 1.7 the untied-weights check reads ``config`` itself rather than
its decoder text config, before 1.8 it warns through the deprecated ``logger.warn`` (a
``DeprecationWarning`` besides the log line), and before 1.2 no line lists the devices left empty.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING

from ..inputs.dtypes import DtypeLike, to_dtype
from ..inputs.memory import DeviceKey, accelerator_count
from .versions import AccelerateRelease

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("accelerate.utils.modeling")
"""accelerate's own logger, so levels and handlers set for ``accelerate`` apply to these lines too."""

Bytes = int | float


def warn_missing_gpus(gpus: Iterable[int]) -> None:
    """``get_max_memory``: GPU indices in ``max_memory`` that this machine lacks."""
    count = accelerator_count()
    for index in gpus:
        if index >= count or index < 0:
            logger.warning(f"Device {index} is not available, available devices are {list(range(count))}")


def log_single_gpu_share(key: int) -> None:
    """``get_balanced_memory`` with one GPU and no ``max_memory``: 90% of it is used."""
    logger.info(
        f"We will use 90% of the memory on device {key} for storing the model, and 10% for the buffer to avoid "
        "OOM. You can set `max_memory` in to a higher value to use more memory (at your own risk)."
    )


def warn_untied_weights(
    model: torch.nn.Module,
    tied_groups: list[list[str]],
    module_types: Iterable[type],
    release: AccelerateRelease,
) -> None:
    """``infer_auto_device_map`` on a transformers model that declares tied weights none of which are tied.
    ``module_types`` are the model's module classes (from the export walk, so no second walk is needed)."""
    if tied_groups or not _declares_tied_weights(model, module_types, release):
        return
    message = (
        "The model weights are not tied. Please use the `tie_weights` method before using the "
        "`infer_auto_device` function."
    )
    deprecated_warn = getattr(logger, "warn", None)
    if release.warns_with_deprecated_logger_warn and deprecated_warn is not None:
        deprecated_warn(message)  # what accelerate < 1.8 calls: the log line and a DeprecationWarning
    else:
        logger.warning(message)


def _declares_tied_weights(
    model: torch.nn.Module, module_types: Iterable[type], release: AccelerateRelease
) -> bool:
    if "PreTrainedModel" not in {cls.__name__ for cls in type(model).__mro__}:
        return False
    config = getattr(model, "config", None)
    if config is not None:
        decoder_config = release.reads_decoder_text_config and hasattr(config, "get_text_config")
        text = config.get_text_config(decoder=True) if decoder_config else config
        # The ignore is for torch's stubs: Module.__getattr__ returns Tensor | Module, so mypy cannot see
        # transformers' get_output_embeddings method.
        if text is not None and getattr(text, "tie_word_embeddings", False) and model.get_output_embeddings():  # type: ignore[operator]
            return True
        if getattr(config, "is_encoder_decoder", False) and getattr(config, "tie_encoder_decoder", False):
            return True
    # accelerate asks every module instance; asking each class once answers the same for methods (what
    # transformers defines) at a fraction of the cost: hasattr on a module instance goes through __getattr__.
    return any(hasattr(cls, "_tie_weights") for cls in module_types)


def warn_offloaded_buffers(
    model: torch.nn.Module,
    memory: Mapping[DeviceKey, Bytes],
    used_bits: Mapping[str, int],
    offloaded_modules: list[tuple[str, str]],
    dtype: DtypeLike | None,
    special_dtypes: Mapping[str, DtypeLike] | None,
    element_bits: Callable[[torch.dtype], int],
) -> None:
    """``infer_auto_device_map(offload_buffers=False)``: buffers of the modules placed whole on CPU/disk
    stay on a GPU at run time; warn when they fit on none of them. ``element_bits`` sizes a dtype as the
    installed accelerate does."""
    total: Bytes = 0
    for name, _ in offloaded_modules:
        total += _buffer_bytes(model.get_submodule(name), dtype, special_dtypes, element_bits)
    warn_if_buffers_fit_no_gpu(total, memory, used_bits, stacklevel=3)


def warn_if_buffers_fit_no_gpu(
    total: Bytes, memory: Mapping[DeviceKey, Bytes], used_bits: Mapping[str, int], stacklevel: int
) -> None:
    """accelerate's warning when ``total`` bytes of offloaded modules' buffers (which stay on a GPU at run
    time) fit beside no GPU's placed weights (``used_bits`` per device key); ``stacklevel`` as the caller's."""
    if not total > 0:
        return
    gpus = [key for key in memory if key not in ("cpu", "disk")]
    room = any(memory[key] >= total + Fraction(used_bits.get(str(key), 0), 8) for key in gpus)
    if gpus and not room:
        warnings.warn(
            f"Current model requires {total} bytes of buffer for offloaded layers, which seems does not fit any "
            "GPU's remaining memory. If you are experiencing a OOM later, please consider using offload_buffers=True.",
            stacklevel=stacklevel + 1,
        )


def _buffer_bytes(
    module: torch.nn.Module,
    dtype: DtypeLike | None,
    special_dtypes: Mapping[str, DtypeLike] | None,
    element_bits: Callable[[torch.dtype], int],
) -> Bytes:
    """A module's buffers in bytes, sized by accelerate's rules (names relative to the module, as
    accelerate looks special dtypes up for this sum)."""
    target = element_bits(to_dtype(dtype)) if dtype is not None else None
    special = {name: element_bits(to_dtype(d)) for name, d in (special_dtypes or {}).items()}
    total: Bytes = 0
    for name, buffer in module.named_buffers():
        own = element_bits(buffer.dtype)
        if name in special:
            bits = special[name]
        elif target is None or str(buffer.dtype).startswith(("torch.uint", "torch.int", "torch.bool")):
            bits = own
        else:
            bits = min(target, own)
        total += buffer.numel() * (bits // 8 if bits % 8 == 0 else bits / 8)
    return total


def log_unassigned_devices(model: torch.nn.Module, unassigned: list[tuple[str, int, list[str]]]) -> None:
    """``infer_auto_device_map``: devices that received nothing, with what the first module needed."""
    if not unassigned:
        return
    lines = "\n".join(
        f"  - {device}: {_accelerate_number(model, bits, parts)} bytes required"
        for device, bits, parts in unassigned
    )
    logger.info(
        "Based on the current allocation process, no modules could be assigned to the following devices due to "
        f"insufficient memory:\n{lines}\nThese minimum requirements are specific to this allocation attempt and "
        "may vary. Consider increasing the available memory for these devices to at least the specified minimum, "
        "or adjusting the model config."
    )


def _accelerate_number(model: torch.nn.Module, bits: int, parts: list[str]) -> Bytes:
    """``bits`` in bytes as accelerate holds the sum of ``parts``: a float if one of them has a bool tensor."""
    fractional = any(_has_bool_tensor(model, name) for name in parts)
    return bits / 8 if fractional else bits // 8


def _has_bool_tensor(model: torch.nn.Module, name: str) -> bool:
    import torch

    try:
        module = model.get_submodule(name)
    except AttributeError:
        owner, _, local = name.rpartition(".")
        tensor = getattr(model.get_submodule(owner), local)
        return tensor.dtype == torch.bool
    tensors = [*module.parameters(), *module.buffers()]
    return any(t.dtype == torch.bool for t in tensors)
