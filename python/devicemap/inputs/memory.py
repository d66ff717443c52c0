"""Device keys and memory sizes: parsing ``max_memory`` and reading free memory from the machine."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, overload

from .. import _core
from ..errors import DuplicateDeviceError, InvalidSizeError, UnknownDeviceError

DeviceKey = int | str
"""A device as accelerate names it: an ``int`` GPU index, ``"mps"``, ``"cpu"`` or ``"disk"``."""

Size = int | float | str

MaxMemory = Mapping[Any, Size]
Budget = dict["DeviceKey", "int | None"]
"""``max_memory`` once checked (:func:`normalize_max_memory`): bytes per device in placement order, ``None``
for the unbounded disk. The planners take this, so the user's ``max_memory`` is read once, at the front door."""
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


ACCELERATORS: tuple[str, ...] = tuple(_core.ACCELERATORS)
"""Device types whose index is a GPU index in a plan (accelerate's convention: one accelerator type per
machine, its devices numbered 0, 1, ...); the core's list, which parses every device key."""


def device_key(key: object) -> DeviceKey:
    """Normalize a device key as accelerate does: an accelerator's device is its index, ``"cpu"``,
    ``"disk"`` and ``"mps"`` stay names. ``0``, ``"0"``, ``"cuda:0"``, ``"xpu:0"``, ``"npu:0"``,
    ``torch.device("xpu", 0)`` -> ``0``; ``"hpu"`` (no index) -> ``0``.

    >>> device_key("cuda:1"), device_key("xpu:2"), device_key("hpu")
    (1, 2, 0)
    """
    if isinstance(key, bool):
        raise UnknownDeviceError(
            f"unknown device {key!r}: use a GPU index (0, 1, ...), 'cpu', 'disk' or 'mps'"
        )
    if isinstance(key, int):
        if key < 0:
            raise UnknownDeviceError(f"unknown device {key!r}: GPU indices start at 0")
        return key
    # A torch.device exists only once torch is imported: no need to import it for an int or a str.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(key, torch.device):
        key = str(key)
    if isinstance(key, str):
        return _core.parse_device(key)  # type: ignore[return-value]  # an index or "mps"/"cpu"/"disk"
    raise UnknownDeviceError(
        f"unknown device {key!r}: use an integer GPU index (0, 1, ...), an accelerator device such as "
        "'cuda:N', 'xpu:N' or 'npu:N', or 'mps', 'cpu' or 'disk'"
    )


def sort_devices(keys: list[DeviceKey]) -> list[DeviceKey]:
    """GPUs by index, then mps, cpu, disk: the order placement fills them."""
    return sorted(keys, key=lambda k: (0, k, 0) if isinstance(k, int) else (1, 0, _ORDER[k]))


class _Accelerator(NamedTuple):
    """The machine's accelerator as torch exposes it: its device type, how many devices it has and,
    where torch can tell, how much of a device's memory is free (``(free, total)`` in bytes)."""

    type: str
    device_count: Callable[[], int]
    memory_info: Callable[[int], tuple[int, int]] | None


def _accelerator() -> _Accelerator | None:
    """The accelerator torch runs on here, or None. The one place that picks torch's API for it:
    ``torch.accelerator`` from torch 2.6, whose ``get_memory_info`` came later (before it, and on
    torch < 2.6, the backend module's ``mem_get_info``); on torch < 2.6 the first available backend
    accelerate would use, and Apple's ``mps`` (torch.backends.mps)."""
    import torch

    portable: Any = getattr(torch, "accelerator", None)
    if portable is not None and callable(getattr(portable, "is_available", None)):
        if not portable.is_available():
            return None
        current = portable.current_accelerator()
        kind = current.type if current is not None else "cuda"
        backend = getattr(torch, kind, None)
        memory_info = getattr(portable, "get_memory_info", None) or getattr(backend, "mem_get_info", None)
        return _Accelerator(kind, portable.device_count, memory_info)
    for name in ("npu", "mlu", "sdaa", "musa", "xpu", "hpu", "cuda"):  # torch < 2.6
        backend = getattr(torch, name, None)
        if (
            backend is not None
            and callable(getattr(backend, "is_available", None))
            and backend.is_available()
        ):
            return _Accelerator(name, backend.device_count, getattr(backend, "mem_get_info", None))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return _Accelerator("mps", lambda: 1, None)
    return None


def accelerator_type() -> str:
    """The device type GPU indices stand for on this machine (``"cuda"``, ``"xpu"``, ``"npu"``, ...);
    ``"cuda"`` when there is none (a plan made elsewhere names CUDA GPUs by default)."""
    found = _accelerator()
    return found.type if found is not None and found.type != "mps" else "cuda"


def accelerator_count() -> int:
    """How many GPUs accelerate sees (and so dispatches to) on this machine's accelerator."""
    found = _accelerator()
    if found is None or found.type == "mps":
        return 0
    return int(found.device_count())


def absent_devices(devices: Iterable[object]) -> list[DeviceKey]:
    """The devices among ``devices`` (keys in any form accelerate takes: ``0``, ``"cuda:1"``,
    ``torch.device("xpu", 2)``, ``"mps"``) that this machine lacks: a GPU index at or past
    :func:`accelerator_count`, or ``"mps"`` without MPS. Keys naming no device devicemap knows are left to
    whoever reads them. Each device once, in placement order.

    >>> absent_devices(["cpu", "disk"])
    []
    """
    missing: set[DeviceKey] = set()
    visible: int | None = None
    for raw in devices:
        try:
            key = device_key(raw)
        except UnknownDeviceError:
            continue
        if isinstance(key, int):
            visible = accelerator_count() if visible is None else visible
            if key >= visible:
                missing.add(key)
        elif key == "mps" and not _mps_available():
            missing.add(key)
    return sort_devices(list(missing))


def _mps_available() -> bool:
    import torch

    return bool(torch.backends.mps.is_available())


def check_devices_present(device_map: Mapping[str, object], hint: str) -> None:
    """Raise :class:`UnknownDeviceError` naming the first module ``device_map`` places on a device this machine
    lacks (see :func:`absent_devices`), and how many GPUs it has, followed by ``hint`` (what the caller can do
    instead). THE check every entry that moves weights makes before reading any, so torch's own error ("Found
    no NVIDIA driver", "Torch not compiled with CUDA enabled", "invalid device ordinal") never reaches a user.

    >>> check_devices_present({"": "cpu", "lm_head": "disk"}, hint="")
    """
    if not absent_devices(device_map.values()):  # one look at the machine for the whole map
        return
    for name, device in device_map.items():
        for key in absent_devices([device]):
            if key == "mps":
                raise UnknownDeviceError(
                    f"the device map puts {name!r} on 'mps', which this machine lacks; {hint}"
                )
            raise UnknownDeviceError(
                f"the device map puts {name!r} on GPU {key}, but this machine has {accelerator_count()} "
                f"GPU(s); {hint}"
            )


def available_memory() -> dict[DeviceKey, int]:
    """Free memory of the machine's devices: every visible accelerator (CUDA, XPU, NPU, ... through
    ``torch.accelerator``) and the CPU's available RAM; on Apple silicon ``"mps"`` shares the RAM.

    Disk is never included: pass ``"disk"`` in ``max_memory`` to allow offloading to disk.
    """
    import psutil

    found: dict[DeviceKey, int] = {}
    accelerator = _accelerator()
    if accelerator is not None and accelerator.type == "mps":
        found["mps"] = int(psutil.virtual_memory().available)
    elif accelerator is not None and accelerator.memory_info is not None:
        for index in range(accelerator_count()):
            try:
                found[index] = int(accelerator.memory_info(index)[0])
            except RuntimeError:  # a device that cannot be read is simply not used
                continue
    found["cpu"] = int(psutil.virtual_memory().available)
    return found


def normalize_max_memory(max_memory: MaxMemory | None) -> Budget:
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
            raise DuplicateDeviceError(
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
