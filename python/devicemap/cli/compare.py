"""devicemap and accelerate side by side on the same model and devices (``devicemap compare``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..catalog.planning import plan_shape
from ..catalog.trees import CatalogShape
from ..errors import DoesNotFitError
from ..inputs.dtypes import DtypeLike
from ..inputs.memory import DeviceKey, MaxMemory, normalize_max_memory
from ..inputs.options import Strategy
from ..planners.api import plan
from ..plans import Plan
from ..sizing.tree import ModuleTree
from .accelerate_side import accelerate_device_map

if TYPE_CHECKING:
    import torch

MIB = 2**20
Placer = Callable[[int], dict]


@dataclass(frozen=True)
class Side:
    """One method's placement: bytes per device, what left the GPUs, balance, and cost."""

    method: str
    device_bytes: dict[DeviceKey, int]
    offloaded: list[str]
    seconds: float
    min_gpu_memory: int | None
    """Smallest equal per-GPU memory with nothing on CPU/disk (to 1 MiB), None without GPUs."""
    device_map: dict[str, DeviceKey] = field(default_factory=dict)
    """The placement itself (accelerate's format)."""

    @property
    def peak_over_mean(self) -> float:
        gpus = [v for k, v in self.device_bytes.items() if isinstance(k, int)]
        return max(gpus) / (sum(gpus) / len(gpus)) if gpus and sum(gpus) else float("nan")


def min_equal_gpu_memory(place: Placer, low: int, high: int) -> int:
    """Smallest per-GPU memory (to 1 MiB) for which ``place(memory)`` keeps everything on GPUs."""

    def on_gpus(memory: int) -> bool:
        return all(isinstance(d, int) for d in place(memory).values())

    while not on_gpus(high):
        high *= 2
    while high - low > MIB:
        mid = (low + high) // 2
        if on_gpus(mid):
            high = mid
        else:
            low = mid
    return high


def plan_of_map(model: torch.nn.Module, device_map: Mapping[str, DeviceKey], dtype: DtypeLike | None) -> Plan:
    """A device map made elsewhere (accelerate's) as a devicemap :class:`Plan`, so the speed model can cost
    it: every key pinned where the map puts it, on devices with room to spare; offloaded blocks run on the
    map's first GPU, as accelerate's ``dispatch_model`` runs them."""
    gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
    roomy: dict[DeviceKey, int] = {**{g: 2**50 for g in gpus}, "cpu": 2**50, "disk": 0}
    execution = gpus[0] if gpus else "cpu"
    return plan(model, roomy, dtype=dtype, pins=dict(device_map), execution_device=execution)


def compare(
    model: torch.nn.Module,
    max_memory: MaxMemory,
    strategy: Strategy = "auto",
    dtype: DtypeLike | None = None,
    no_split_module_classes: list[str] | None = None,
) -> tuple[Side, Side]:
    """(devicemap, accelerate) on the same inputs. ``model`` may be a bundled model as data (a CatalogShape):
    both sides then come from its data, without torch."""
    memory = normalize_max_memory(max_memory)
    gpus = [k for k in memory if isinstance(k, int)]
    shape = model if isinstance(model, CatalogShape) else None
    tree = shape.tree(dtype) if shape is not None else ModuleTree.from_module(model, dtype=dtype)
    no_split = list(no_split_module_classes or tree.no_split_module_classes)
    # accelerate always may spill to disk, and get_balanced_memory crashes on a "disk" key.
    acc_memory = {k: v for k, v in memory.items() if k != "disk"}
    acc_strategy = "balanced" if strategy == "auto" else strategy  # transformers' device_map="auto"

    def with_gpus(size: int) -> dict:
        return {**{g: size for g in gpus}, "cpu": 4 * tree.total_bytes}

    def ours(size: int) -> dict:
        memory = {**with_gpus(size), "disk": 0}
        try:
            return plan(
                tree, max_memory=memory, strategy=strategy, no_split_module_classes=no_split
            ).device_map
        except DoesNotFitError:
            return {"": "cpu"}

    def theirs(size: int) -> dict:
        return accelerate_device_map(model, with_gpus(size), acc_strategy, no_split, dtype)

    start = time.perf_counter()  # end to end, like accelerate's call: size export + solve
    # The caller's max_memory, not the normalized one: that holds None for disk, which is no Size.
    if shape is not None:
        mine = plan_shape(shape, max_memory, strategy=strategy, no_split_module_classes=no_split, dtype=dtype)
    else:
        mine = plan(
            model, max_memory=max_memory, strategy=strategy, no_split_module_classes=no_split, dtype=dtype
        )
    mine_seconds = time.perf_counter() - start
    start = time.perf_counter()
    other = accelerate_device_map(model, acc_memory, acc_strategy, no_split, dtype)
    other_seconds = time.perf_counter() - start
    other_bytes: dict[DeviceKey, int] = {k: 0 for k in memory}
    for name, device in other.items():
        other_bytes[device] = other_bytes.get(device, 0) + tree.module_bytes(name)

    low = tree.total_bytes // max(len(gpus), 1) - MIB
    high = tree.total_bytes
    return (
        Side(
            f"devicemap {mine.strategy}",
            mine.device_bytes,
            [o.name for o in mine.offloaded],
            mine_seconds,
            min_equal_gpu_memory(ours, max(low, 0), high) if gpus else None,
            dict(mine.device_map),
        ),
        Side(
            f"accelerate {acc_strategy}",
            other_bytes,
            [n for n, d in other.items() if not isinstance(d, int)],
            other_seconds,
            min_equal_gpu_memory(theirs, max(low, 0), high) if gpus else None,
            dict(other),
        ),
    )
