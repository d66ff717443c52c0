"""accelerate's side of ``devicemap compare`` and ``demo``: the map transformers' ``device_map="balanced"``
(accelerate's ``get_balanced_memory`` + ``infer_auto_device_map``) gives a model.

For a bundled model as data (:class:`~devicemap.catalog.trees.CatalogShape`), :mod:`devicemap.compat`'s port
of the installed accelerate computes that map on the shape's tree, sized as accelerate sizes it, without
torch; otherwise (a model, an older accelerate, devices other than GPU indices and the CPU) accelerate itself
runs on the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _core, catalog
from ..catalog.trees import CatalogShape
from ..compat import _bits, _no_split, balanced_memory_of_tree
from ..compat.accelerate_warnings import warn_if_buffers_fit_no_gpu
from ..compat.versions import AccelerateRelease, installed_accelerate
from ..inputs.dtypes import DtypeLike
from ..inputs.memory import DeviceKey


def accelerate_device_map(model: Any, max_memory: Mapping, strategy: str, no_split: list[str], dtype) -> dict:
    """What transformers does for ``device_map=strategy``: get_balanced_memory (unless sequential), then
    infer_auto_device_map, for a model or a :class:`CatalogShape`."""
    if isinstance(model, CatalogShape):
        return _port_device_map(model, max_memory, strategy, no_split, dtype)
    return _accelerate_on_model(model, max_memory, strategy, no_split, dtype)


def _accelerate_on_model(model: Any, max_memory: Mapping, strategy: str, no_split: list[str], dtype) -> dict:
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    memory = dict(max_memory)
    kwargs = dict(no_split_module_classes=no_split, dtype=dtype)
    if strategy != "sequential":
        memory = get_balanced_memory(
            model, max_memory=memory, low_zero=strategy == "balanced_low_0", **kwargs
        )
    return dict(infer_auto_device_map(model, max_memory=memory, **kwargs))


def _port_device_map(
    shape: CatalogShape,
    max_memory: Mapping[DeviceKey, int],
    strategy: str,
    no_split: list[str],
    dtype: DtypeLike | None,
) -> dict[str, DeviceKey]:
    """What :func:`accelerate_device_map` returns for the model ``shape`` describes: ``get_balanced_memory``
    (unless ``strategy`` is ``"sequential"``) then ``infer_auto_device_map``, as the installed accelerate
    computes them, by devicemap.compat's port on the shape's tree sized as accelerate sizes it. accelerate's
    "Current model requires ... bytes of buffer" warning is given alike; its log lines (GPUs this machine
    lacks, devices left empty) are not: the command silences them anyway.

    The port counts GPUs by their integer keys, as accelerate 1.15 and later do: with an older accelerate,
    or a device other than GPU indices and ``"cpu"``, the model is built and accelerate itself asked.
    """
    release = installed_accelerate()
    if not port_applies(max_memory) or "disk" in max_memory:
        return _accelerate_on_model(
            catalog.build_meta_model(shape.name), max_memory, strategy, no_split, dtype
        )
    # get_max_memory's order: GPUs by index, then the CPU
    order: list[DeviceKey] = [*sorted(k for k in max_memory if isinstance(k, int)), "cpu"]
    memory: dict[DeviceKey, int | float] = {key: max_memory[key] for key in order if key in max_memory}
    tree = shape.accelerate_tree(dtype, release)
    if strategy != "sequential":
        low_zero = strategy == "balanced_low_0"
        gpus = sum(1 for key, size in memory.items() if isinstance(key, int) and size > 0)
        if gpus:
            memory = balanced_memory_of_tree(tree, memory, no_split, low_zero and gpus > 1, gpus, release)
    entries, used_bits, offloaded_modules, _ = _core.infer_auto_device_map(
        tree.core,
        [(str(k), _bits(v)) for k, v in memory.items()],
        _no_split(no_split, release),
        False,
        True,
        release.core_version,
    )
    offloaded = [name for name, _ in offloaded_modules]
    _warn_offloaded_buffers(shape, dtype, release, memory, dict(used_bits), offloaded)
    return dict(entries)


def port_applies(max_memory: Mapping[DeviceKey, object]) -> bool:
    """Whether :func:`accelerate_device_map` computes accelerate's map with devicemap's port (without torch)
    for this device spec: GPU indices and ``"cpu"`` (``"disk"``, which accelerate's side leaves out, aside),
    and an installed accelerate (1.15 or later) that counts GPUs by their keys, not through torch."""
    keys_ok = all(isinstance(key, int) or key in ("cpu", "disk") for key in max_memory)
    return keys_ok and installed_accelerate().counts_integer_keys_directly


def port_note() -> str:
    """What the command says when accelerate's map was computed by the port."""
    version = ".".join(map(str, installed_accelerate().version))
    return (
        f"accelerate's map by devicemap.compat's port of accelerate {version} on the catalog's data: "
        "the map accelerate returns, without running accelerate"
    )


def _warn_offloaded_buffers(
    shape: CatalogShape,
    dtype: DtypeLike | None,
    release: AccelerateRelease,
    memory: Mapping[DeviceKey, int | float],
    used_bits: Mapping[str, int],
    offloaded: list[str],
) -> None:
    """accelerate's warning (:mod:`devicemap.compat.accelerate_warnings`) from the shape: the buffers of the
    modules placed whole on CPU/disk (which stay on a GPU at run time) fit on no GPU."""
    if not offloaded:
        return
    total = shape.accelerate_buffer_bytes(offloaded, dtype, release)
    warn_if_buffers_fit_no_gpu(total, memory, used_bits, stacklevel=3)
