"""Device keys and memory sizes: parsing ``max_memory`` and reading free memory from the machine."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, overload

from . import _core
from .errors import InvalidSizeError, UnknownDeviceError

DeviceKey = int | str
"""A device as accelerate names it: an ``int`` GPU index, ``"mps"``, ``"cpu"`` or ``"disk"``."""

Size = int | float | str

MaxMemory = Mapping[Any, Size]
"""``max_memory`` as callers give it. The key is ``Any`` because a Mapping is invariant in its key type: a
``dict[int, str]`` is not a ``Mapping[object, str]``. :func:`device_key` checks every key at run time."""

_ORDER = {"mps": 0, "cpu": 1, "disk": 2}

MAX_SIZE = (2**64 - 1) // 8
"""The largest size devicemap plans with, in bytes (2 EiB): the core counts bits in 64-bit integers."""


def parse_size(size: Size) -> int:
    """Return a memory size in bytes.

    Integers are bytes. Strings need a unit: ``KiB/MiB/GiB/TiB`` (powers of 1024), ``KB/MB/GB/TB``
    (powers of 1000) or ``B``; as in accelerate, a lowercase final ``b`` on a decimal unit (``"8Gb"``)
    means bits.

    >>> parse_size("20GiB")
    21474836480
    >>> parse_size(1024)
    1024
    """
    if isinstance(size, bool):
        raise InvalidSizeError(
            f"invalid memory size {size!r}: a bool is not a size; pass bytes or a string like '20GiB'"
        )
    if isinstance(size, int):
        if size < 0:
            raise InvalidSizeError(f"invalid memory size {size!r}: sizes cannot be negative")
        return _within_limit(size, size)
    if isinstance(size, float):
        if not math.isfinite(size) or size < 0:
            raise InvalidSizeError(
                f"invalid memory size {size!r}: use a finite, non-negative number of bytes"
            )
        return _within_limit(size, int(size))
    if isinstance(size, str):
        return _within_limit(size, _core.parse_size(size))
    raise InvalidSizeError(
        f"invalid memory size {size!r} of type {type(size).__name__}: pass bytes or a string like '20GiB'"
    )


def _within_limit(size: Size, value: int) -> int:
    if value > MAX_SIZE:
        raise InvalidSizeError(
            f"invalid memory size {size!r}: larger than {MAX_SIZE} bytes (2 EiB), the most devicemap can "
            "plan with; give the device's real size (for unbounded offloading use 'disk')"
        )
    return value


def device_key(key: object) -> DeviceKey:
    """Normalize a device key: ``0``, ``"0"``, ``"cuda:0"`` -> ``0``; ``"cpu"``, ``"disk"``, ``"mps"`` as is.

    >>> device_key("cuda:1")
    1
    """
    if isinstance(key, bool):
        raise UnknownDeviceError(
            f"unknown device {key!r}: use a GPU index (0, 1, ...), 'cpu', 'disk' or 'mps'"
        )
    if isinstance(key, int):
        if key < 0:
            raise UnknownDeviceError(f"unknown device {key!r}: GPU indices start at 0")
        return key
    try:
        import torch

        if isinstance(key, torch.device):
            key = str(key)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(key, str):
        text = key.strip()
        if text in _ORDER:
            return text
        for prefix in ("cuda:", "gpu:", ""):
            rest = text[len(prefix) :] if text.startswith(prefix) else None
            if rest is not None and rest.isdigit():
                return int(rest)
    raise UnknownDeviceError(
        f"unknown device {key!r}: use an integer GPU index (0, 1, ...), 'cuda:N', 'mps', 'cpu' or 'disk'"
    )


def sort_devices(keys: list[DeviceKey]) -> list[DeviceKey]:
    """GPUs by index, then mps, cpu, disk: the order placement fills them."""
    return sorted(keys, key=lambda k: (0, k, 0) if isinstance(k, int) else (1, 0, _ORDER[k]))


def accelerator_count() -> int:
    """How many GPUs accelerate sees (and so dispatches to): the first available accelerator backend
    (npu, mlu, sdaa, musa, xpu, hpu), else CUDA."""
    import torch

    for name in ("npu", "mlu", "sdaa", "musa", "xpu", "hpu"):
        backend = getattr(torch, name, None)
        if (
            backend is not None
            and callable(getattr(backend, "is_available", None))
            and backend.is_available()
        ):
            return int(backend.device_count())
    return int(torch.cuda.device_count())


def available_memory() -> dict[DeviceKey, int]:
    """Free memory of the machine's devices: every visible CUDA GPU and the CPU's available RAM.

    Disk is never included: pass ``"disk"`` in ``max_memory`` to allow offloading to disk.
    """
    import psutil
    import torch

    found: dict[DeviceKey, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            try:
                found[index] = int(torch.cuda.mem_get_info(index)[0])
            except RuntimeError:  # a GPU that cannot be initialised is simply not used
                continue
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found["mps"] = int(psutil.virtual_memory().available)
    found["cpu"] = int(psutil.virtual_memory().available)
    return found


def normalize_max_memory(max_memory: MaxMemory | None) -> dict[DeviceKey, int | None]:
    """Validate ``max_memory`` and return ``{device: bytes}`` in placement order (disk: ``None``,
    unbounded). ``None`` reads the machine's free memory.

    >>> normalize_max_memory({"cpu": "1GiB", 0: "2GiB", "disk": 0})
    {0: 2147483648, 'cpu': 1073741824, 'disk': None}
    """
    if max_memory is None:
        return dict(available_memory())
    if not isinstance(max_memory, Mapping):
        raise UnknownDeviceError(
            f"max_memory must be a dict like {{0: '20GiB', 'cpu': '64GiB'}}, got {type(max_memory).__name__}"
        )
    if not max_memory:
        raise UnknownDeviceError(
            "max_memory names no device: give at least one, e.g. {0: '20GiB', 'cpu': '64GiB'}"
        )
    result: dict[DeviceKey, int | None] = {}
    for raw_key, raw_size in max_memory.items():
        key = device_key(raw_key)
        if key in result:
            raise UnknownDeviceError(
                f"device {raw_key!r} appears twice in max_memory (as {key!r}); give it once"
            )
        if key == "disk":
            result[key] = None
            continue
        try:
            result[key] = parse_size(raw_size)
        except InvalidSizeError as err:
            raise InvalidSizeError(f"max_memory[{raw_key!r}]: {err}") from None
    return {k: result[k] for k in sort_devices(list(result))}


@overload
def bytes_to_bits(size: float) -> int: ...
@overload
def bytes_to_bits(size: None) -> None: ...
def bytes_to_bits(size: float | None) -> int | None:
    """Capacities are handed to the core in bits (floor: a fractional byte cannot be used)."""
    return None if size is None else int(math.floor(size * 8))
