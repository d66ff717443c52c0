"""Drop-in replacements for accelerate's placement helpers, computed by the Rust core.

``devicemap.compat.infer_auto_device_map`` and ``devicemap.compat.get_balanced_memory`` take the
same arguments as ``accelerate.utils.infer_auto_device_map`` / ``get_balanced_memory`` and return what
the *installed* accelerate (1.0 and later) returns, much faster on large models::

    from devicemap.compat import get_balanced_memory, infer_auto_device_map

    max_memory = get_balanced_memory(model, max_memory={0: "20GiB", 1: "20GiB"},
                                     no_split_module_classes=["LlamaDecoderLayer"])
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=["LlamaDecoderLayer"])

accelerate's warnings and log lines (missing GPUs, untied weights, buffers of offloaded layers that fit
no GPU, devices left empty for lack of memory) are emitted alike, see :mod:`devicemap.compat.accelerate_warnings`.
What changed between accelerate releases (the placement loop of 1.0 - 1.1, how tied parameters are
looked up, ``no_split_module_classes`` normalisation, ``low_zero``, ...) follows the installed release,
see :mod:`devicemap.compat.versions`. ``fallback_allocation=True`` with an accelerate older than 1.2
(which has no such argument) raises ``TypeError`` as accelerate would; ``False`` is accepted.

Known differences, all where accelerate raises or the input is degenerate: a ``"disk"`` key in
``get_balanced_memory``'s ``max_memory`` is ignored rather than crashing ``torch.device("disk")``;
inputs on which accelerate's placement raises (``IndexError``, ``AttributeError`` on some tied-weight
layouts, ``KeyError`` for ``low_zero`` with GPUs it cannot find) raise :class:`devicemap.AccelerateCompatError`;
sizes beyond 2 EiB count as unbounded and a NaN size is refused. ``verbose`` prints nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import _core
from ..errors import AccelerateCompatError, InvalidOptionError, InvalidSizeError, UnknownDeviceError
from ..inputs.dtypes import DtypeLike
from ..inputs.memory import DeviceKey, _accelerator, available_memory
from ..sizing.tree import ModuleTree
from .accelerate_warnings import (
    log_single_gpu_share,
    log_unassigned_devices,
    warn_missing_gpus,
    warn_offloaded_buffers,
    warn_untied_weights,
)
from .versions import AccelerateRelease, installed_accelerate

if TYPE_CHECKING:
    import torch

__all__ = ["get_balanced_memory", "get_max_memory", "infer_auto_device_map"]


def _convert_size(size: int | float | str) -> int | float:
    """accelerate's size reading (lenient like it: ``"20 GB"`` is read as 20 GB)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size < 0:
            raise InvalidSizeError(f"invalid memory size {size!r}: sizes cannot be negative")
        return size
    message = f"invalid memory size {size!r}: use an int for bytes or a string with a unit such as '5GB'"
    if not isinstance(size, str):
        raise InvalidSizeError(message)
    upper = size.upper()
    try:
        for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10)):
            if upper.endswith(unit):
                value = int(float(size[:-3]) * factor)
                break
        else:
            for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
                if upper.endswith(unit):
                    value = int(float(size[:-2]) * factor)
                    value = value // 8 if size.endswith("b") else value
                    break
            else:
                raise InvalidSizeError(message)
    except (ValueError, OverflowError):
        raise InvalidSizeError(message) from None
    if value < 0:
        raise InvalidSizeError(message)
    return value


def get_max_memory(
    max_memory: Mapping[Any, object] | None = None,  # Any: Mapping is invariant in its key
) -> dict[DeviceKey, int | float]:
    """accelerate's ``get_max_memory``: sizes to bytes, devices sorted (GPU indices, mps, cpu, disk).

    >>> get_max_memory({"cpu": "1GiB", 1: 100, 0: "1KB"})
    {0: 1000, 1: 100, 'cpu': 1073741824}
    """
    if max_memory is None:
        return _machine_memory(installed_accelerate())
    if not isinstance(max_memory, Mapping):
        raise UnknownDeviceError(
            f"max_memory must be a dict like {{0: '20GiB', 'cpu': '64GiB'}}, got {type(max_memory).__name__}"
        )
    converted = {
        k: _convert_size(v) if isinstance(v, str) else _check_number(k, v) for k, v in max_memory.items()
    }
    gpus = sorted(k for k in converted if isinstance(k, int) and not isinstance(k, bool))
    warn_missing_gpus(gpus)
    ordered: list[DeviceKey] = [*gpus, *(k for k in ("mps", "cpu", "disk") if k in converted)]
    for k in converted:
        if k not in ordered:
            raise UnknownDeviceError(
                f"Device {k!r} is not recognized: use integers for GPUs, 'mps', 'cpu' and 'disk'"
            )
    return {k: converted[k] for k in ordered}


def _machine_memory(release: AccelerateRelease) -> dict[DeviceKey, int | float]:
    """accelerate's ``get_max_memory()`` without arguments: each accelerator's free memory, then the
    available RAM as ``"mps"`` on Apple silicon (and no ``"cpu"``), as ``"cpu"`` elsewhere, except (1.15
    and later) beside an integrated CUDA GPU, which shares it."""
    found: dict[DeviceKey, int | float] = dict(available_memory())
    if "mps" in found:
        return {"mps": found["mps"]}
    if release.integrated_cuda_shares_ram and _integrated_cuda(found):
        found.pop("cpu", None)
    return found


def _integrated_cuda(memory: Mapping[DeviceKey, object]) -> bool:
    import torch

    backend = _accelerator()
    if backend is None or backend.type != "cuda":
        return False
    indices = [k for k in memory if isinstance(k, int)]
    return any(getattr(torch.cuda.get_device_properties(i), "is_integrated", False) for i in indices)


def _check_number(key: object, size: object) -> int | float:
    """accelerate takes numbers as they are (negative ones hold nothing); anything else, or NaN, which
    it would compare as neither fitting nor too big, is refused."""
    if not isinstance(size, (int, float)) or (isinstance(size, float) and math.isnan(size)):
        raise InvalidSizeError(
            f"max_memory[{key!r}]: invalid memory size {size!r}: use a number of bytes or a string such as '5GB'"
        )
    return size


def _no_split(no_split_module_classes: object, release: AccelerateRelease) -> list[str]:
    """The class names accelerate will match. It compares a module's class name with ``in``: an entry
    that is not a string never matches, so only strings are kept. A value that is no collection of
    names at all (a number, bytes) is refused, whatever accelerate would do with it."""
    value = no_split_module_classes
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise InvalidOptionError(
            f"no_split_module_classes must be a list of class names such as ['LlamaDecoderLayer'], got {value!r}"
        )
    if release.no_split_takes_any_iterable:  # 1.14+: list(value)
        items: Iterable[object] = value
    else:  # a list or tuple is read as such, anything else is one entry (matching no class name)
        items = value if isinstance(value, (list, tuple)) else [value]
    return [c for c in items if isinstance(c, str)]


_UNBOUNDED_BITS = 2**64 - 1
"""What the core can count: a larger capacity (or infinity, which accelerate accepts) is unbounded."""


def _bits(size: int | float) -> int:
    # accelerate compares (possibly fractional) byte counts; whole bits, rounded down, give the same
    # answers for its `<=` tests. A negative capacity holds nothing, like 0.
    if size <= 0:
        return 0
    if size * 8 >= _UNBOUNDED_BITS:
        return _UNBOUNDED_BITS
    return math.floor(size * 8)


def infer_auto_device_map(
    model: torch.nn.Module,
    max_memory: Mapping[Any, object] | None = None,  # Any: Mapping is invariant in its key
    no_split_module_classes: list[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> dict[str, DeviceKey]:
    """Same arguments and result as the installed ``accelerate.utils.infer_auto_device_map``.

    GPUs first (keeping room on the main devices for the largest layer), then CPU, then disk.
    ``fallback_allocation=True`` raises ``TypeError`` with accelerate 1.0 - 1.1, which lack it.

    >>> import torch
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])  # 288 bytes each
    >>> infer_auto_device_map(model, max_memory={0: 700, "cpu": 1000})
    {'0': 0, '1': 'cpu', '2': 'cpu'}
    """
    release = installed_accelerate()
    if fallback_allocation and not release.has_fallback_allocation:
        raise TypeError(
            "infer_auto_device_map() got an unexpected keyword argument 'fallback_allocation': the installed "
            f"accelerate {'.'.join(map(str, release.version))} has none (it came in 1.2)"
        )
    memory = get_max_memory(max_memory)
    no_split = _no_split(no_split_module_classes, release)
    tree = ModuleTree.from_module(
        model,
        dtype=dtype,
        special_dtypes=special_dtypes,
        accelerate_tie_order=True,
        element_bits=release.element_bits,
    )
    warn_untied_weights(model, tree.tied_groups, tree.module_types, release)
    entries, used_bits, offloaded_modules, unassigned = _core.infer_auto_device_map(
        tree.core,
        [(str(k), _bits(v)) for k, v in memory.items()],
        no_split,
        bool(fallback_allocation),
        bool(clean_result),
        release.core_version,
    )
    if not offload_buffers:
        warn_offloaded_buffers(
            model, memory, dict(used_bits), offloaded_modules, dtype, special_dtypes, release.element_bits
        )
    log_unassigned_devices(model, unassigned)
    return dict(entries)


def get_balanced_memory(
    model: torch.nn.Module,
    max_memory: Mapping[Any, object] | None = None,  # Any: Mapping is invariant in its key
    no_split_module_classes: list[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    low_zero: bool = False,
) -> dict[DeviceKey, int | float]:
    """Same arguments and result as the installed ``accelerate.utils.get_balanced_memory``: a
    ``max_memory`` that spreads the model over the GPUs (accelerate's heuristic budget).

    >>> import torch
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> get_balanced_memory(model, max_memory={0: 10_000, 1: 10_000, "cpu": 10_000})
    {0: 936, 1: 10000, 'cpu': 10000}
    """
    release = installed_accelerate()
    user_set = max_memory is not None
    memory = get_max_memory(max_memory)
    expected = _expected_device_type(release)
    num_devices = sum(1 for k, v in memory.items() if _counts_as_accelerator(k, expected, release) and v > 0)
    if num_devices == 0:
        return memory
    if num_devices == 1:
        low_zero = False
        if not user_set:
            for key in memory:
                if isinstance(key, int):
                    memory[key] *= 0.9
                    log_single_gpu_share(key)
                    break
    tree = ModuleTree.from_module(
        model,
        dtype=dtype,
        special_dtypes=special_dtypes,
        accelerate_tie_order=True,
        element_bits=release.element_bits,
    )
    return balanced_memory_of_tree(tree, memory, no_split_module_classes, low_zero, num_devices, release)


def balanced_memory_of_tree(
    tree: ModuleTree,
    memory: dict[DeviceKey, int | float],
    no_split_module_classes: object,
    low_zero: bool,
    num_devices: int,
    release: AccelerateRelease,
) -> dict[DeviceKey, int | float]:
    """The rest of :func:`get_balanced_memory` once ``memory`` is read (``get_max_memory``'s order) and its
    ``num_devices`` accelerators counted: the per-GPU budgets for ``tree`` (sized as accelerate sizes it)."""
    share = num_devices - 1 if low_zero else num_devices
    total_bits, per_gpu_bits = _core.balanced_budget(
        tree.core, _no_split(no_split_module_classes, release), share
    )
    total: int | float = total_bits // 8 if total_bits % 8 == 0 else total_bits / 8
    per_gpu = per_gpu_bits // 8
    gpus = sorted(k for k, v in memory.items() if isinstance(k, int) and v > 0)
    for index in gpus[:-1]:
        memory[index] = min(memory[0] if low_zero and index == 0 else per_gpu, memory[index])
    if low_zero:
        # The GPUs whose budgets GPU 0 leaves the rest to: before 1.16 accelerate reads GPUs 1 .. n-1,
        # whatever the keys are; from 1.16 the GPUs listed after the first. Either way it then reads GPU 0.
        others = gpus[1:] if release.low_zero_reads_listed_gpus else list(range(1, num_devices))
        missing = [i for i in [*others, 0] if i not in memory]
        if missing:
            raise AccelerateCompatError(
                f"low_zero=True with GPUs {gpus} in max_memory: accelerate's get_balanced_memory looks up "
                f"GPU {missing[0]} and raises KeyError; number the GPUs 0 .. {num_devices - 1}"
            )
        min_zero = max(0, total - sum(memory[i] for i in others))
        memory[0] = min(min_zero, memory[0])
    return memory


def _expected_device_type(release: AccelerateRelease) -> str | None:
    """The device type ``get_balanced_memory`` counts as an accelerator: torch's backend (1.16: none
    without one; before, ``"cuda"`` without one, and ``"mps"`` only from 1.6)."""
    backend = _accelerator()
    if release.backend_decides_device_type:
        return backend.type if backend is not None else None
    if backend is None or (backend.type == "mps" and not release.counts_mps):
        return "cuda"
    return backend.type


def _counts_as_accelerator(key: DeviceKey, expected: str | None, release: AccelerateRelease) -> bool:
    """Whether ``get_balanced_memory`` counts ``key`` among the accelerators (by ``torch.device(key)``'s
    type; integer keys directly from 1.15). ``"disk"``, on which accelerate crashes, counts as none."""
    if isinstance(key, int) and release.counts_integer_keys_directly:
        return True
    if key == "disk":
        return False
    import torch

    try:
        kind = torch.device(key).type
    except RuntimeError as err:  # torch builds without an accelerator refuse torch.device(<int>)
        raise AccelerateCompatError(
            f"accelerate {'.'.join(map(str, release.version))}'s get_balanced_memory cannot read device "
            f"{key!r} on this machine ({err}); accelerate 1.15 and later count GPU indices directly"
        ) from None
    return kind == expected
