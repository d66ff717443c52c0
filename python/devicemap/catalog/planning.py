"""Plans of bundled models from their data (:mod:`devicemap.catalog.trees`), without torch.

:func:`plan_shape` gives the :class:`~devicemap.Plan` that :func:`devicemap.plan` gives for the model
``build_meta_model(name)`` builds, and :func:`accelerate_device_map` the map transformers' ``device_map=
"balanced"`` (accelerate's ``get_balanced_memory`` + ``infer_auto_device_map``) gives for it, computed by
:mod:`devicemap.compat`'s port of the installed accelerate. The command uses them for catalog names, so
``devicemap plan llama-3-70b ...`` never imports torch or transformers; what needs the model's modules
(``--quant``, ``--objective speed``, ``--hardware``) builds it as before.

    >>> from devicemap.catalog import trees
    >>> plan = plan_shape(trees.shape("llama-3-8b"), {0: "8GiB", 1: "8GiB"}, dtype="bfloat16")
    >>> plan.device_map["model.layers.16"]
    1
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .. import _core
from ..errors import InvalidOptionError
from ..memory import DeviceKey, MaxMemory, Size
from ..options import Balance, PlacementOptions, Strategy
from ..planning import Plan, solve_tree
from ..tree import DtypeLike
from ..workload import RuntimeMemory, Workload
from .trees import CatalogShape

if TYPE_CHECKING:
    from ..compat_versions import AccelerateRelease

__all__ = ["accelerate_device_map", "plan_shape"]


def plan_shape(
    shape: CatalogShape,
    max_memory: MaxMemory | None = None,
    *,
    strategy: Strategy = "auto",
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    pins: Mapping[str, object] | None = None,
    offload_buffers: bool = False,
    workload: Workload | None = None,
    balance: Balance = "memory",
    gpu0_reserve: Size | None = None,
    execution_device: DeviceKey | None = None,
) -> Plan:
    """``devicemap.plan(build_meta_model(shape.name), ...)`` with the memory objective: the same checks in
    the same order, the same tree, runtime memory and FLOPs, the same solve."""
    options = PlacementOptions.parse(
        strategy=strategy,
        no_split_module_classes=no_split_module_classes,
        pins=pins,
        offload_buffers=offload_buffers,
        balance=balance,
        gpu0_reserve=gpu0_reserve,
        execution_device=execution_device,
    )
    if workload is not None and not isinstance(workload, Workload):
        raise InvalidOptionError(
            f"workload must be a devicemap.Workload such as Workload(batch_size=1, seq_len=4096), got {workload!r}"
        )
    tree = shape.tree(dtype)
    runtime = shape.runtime(workload, tree, dtype) if workload is not None else RuntimeMemory()
    compute = list(shape.flops) if options.balance == "compute" else []
    return solve_tree(tree, max_memory, options, runtime, compute)


def accelerate_device_map(
    shape: CatalogShape,
    max_memory: Mapping[DeviceKey, int],
    strategy: str,
    no_split: list[str],
    dtype: DtypeLike | None,
) -> dict[str, DeviceKey]:
    """What :func:`devicemap.compare.accelerate_device_map` returns for the model: ``get_balanced_memory``
    (unless ``strategy`` is ``"sequential"``) then ``infer_auto_device_map``, as the installed accelerate
    computes them, by devicemap.compat's port on the shape's tree sized as accelerate sizes it. accelerate's
    "Current model requires ... bytes of buffer" warning is given alike; its log lines (GPUs this machine
    lacks, devices left empty) are not: the command silences them anyway.

    The port counts GPUs by their integer keys, as accelerate 1.15 and later do: with an older accelerate,
    or a device other than GPU indices and ``"cpu"``, the model is built and accelerate itself asked.
    """
    from ..compat import _bits, _no_split, balanced_memory_of_tree
    from ..compat_versions import installed_accelerate

    release = installed_accelerate()
    if not port_applies(max_memory) or "disk" in max_memory:
        from ..compare import accelerate_device_map as with_accelerate
        from . import build_meta_model

        return with_accelerate(build_meta_model(shape.name), max_memory, strategy, no_split, dtype)
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
    from ..compat_versions import installed_accelerate

    keys_ok = all(isinstance(key, int) or key in ("cpu", "disk") for key in max_memory)
    return keys_ok and installed_accelerate().counts_integer_keys_directly


def port_note() -> str:
    """What the command says when accelerate's map was computed by the port."""
    from ..compat_versions import installed_accelerate

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
    """:func:`devicemap.compat_warnings.warn_offloaded_buffers` from the shape: the buffers of the modules
    placed whole on CPU/disk (which stay on a GPU at run time) fit on no GPU."""
    if not offloaded:
        return
    total = shape.accelerate_buffer_bytes(offloaded, dtype, release)
    if not total > 0:
        return
    from fractions import Fraction  # here: it imports decimal

    gpus = [key for key in memory if key not in ("cpu", "disk")]
    room = any(memory[key] >= total + Fraction(used_bits.get(str(key), 0), 8) for key in gpus)
    if gpus and not room:
        warnings.warn(
            f"Current model requires {total} bytes of buffer for offloaded layers, which seems does not fit any "
            "GPU's remaining memory. If you are experiencing a OOM later, please consider using offload_buffers=True.",
            stacklevel=3,
        )
