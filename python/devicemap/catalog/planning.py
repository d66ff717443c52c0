"""Plans of bundled models from their data (:mod:`devicemap.catalog.trees`), without torch.

:func:`plan_shape` gives the :class:`~devicemap.Plan` that :func:`devicemap.plan` gives for the model
``build_meta_model(name)`` builds (accelerate's map for it: :mod:`devicemap.cli.accelerate_side`). The command
uses them for catalog names, so
``devicemap plan llama-3-70b ...`` never imports torch or transformers; what needs the model's modules
(``--quant``, ``--objective speed``, ``--hardware``) builds it as before.

    >>> from devicemap.catalog import trees
    >>> plan = plan_shape(trees.shape("llama-3-8b"), {0: "8GiB", 1: "8GiB"}, dtype="bfloat16")
    >>> plan.device_map["model.layers.16"]
    1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..errors import InvalidOptionError
from ..inputs.dtypes import DtypeLike
from ..inputs.memory import DeviceKey, MaxMemory, Size, normalize_max_memory
from ..inputs.options import Balance, PlacementOptions, Strategy
from ..planners.solve import plan_tree
from ..plans import Plan
from ..sizing.workload import RuntimeMemory, Workload
from .trees import CatalogShape

if TYPE_CHECKING:
    pass

__all__ = ["plan_shape"]


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
    return plan_tree(tree, normalize_max_memory(max_memory), options, runtime, compute)
