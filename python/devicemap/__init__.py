"""devicemap: decide where each layer of a large PyTorch model lives (GPUs, CPU, disk).

    >>> import torch, devicemap
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)])
    >>> plan = devicemap.plan(model, max_memory={0: "200MiB", 1: "200MiB", "cpu": "8GiB"})
    >>> sorted(set(plan.device_map.values()), key=str)
    [0, 1, 'cpu']

``plan.device_map`` is accelerate's format, accepted by transformers' ``from_pretrained`` and by
accelerate's ``dispatch_model`` / ``load_checkpoint_and_dispatch``. ``devicemap.compat`` holds
drop-in replacements for accelerate's ``infer_auto_device_map`` and ``get_balanced_memory``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._core import __version__
from .errors import (
    AccelerateCompatError,
    CheckpointError,
    DoesNotFitError,
    DuplicateDeviceError,
    InternalError,
    InvalidOptionError,
    InvalidSizeError,
    InvalidTreeError,
    OffloadFolderError,
    PinConflictError,
    PlacementError,
    TiedPinConflictError,
    UnknownDeviceError,
    UnknownModuleError,
)

if TYPE_CHECKING:  # what the names below are, for type checkers and IDEs; imported on first use
    from . import compat
    from .cost.estimate import Estimate
    from .cost.hardware import GPU, Hardware, Host, measure_host
    from .inputs.memory import available_memory, normalize_max_memory, parse_size
    from .inputs.options import STRATEGIES, Balance, Strategy
    from .integrations import install, installed, uninstall
    from .integrations import install_from_environment as install_from_environment
    from .loading.apply import dispatch, dispatch_map, execution_map, from_pretrained, load_checkpoint
    from .planners.api import plan, plan_checkpoint
    from .planners.stages import Stage, StagePlan, pipeline, plan_stages
    from .plans import DeviceUsage, Offload, Plan
    from .sizing.checkpoint import checkpoint_tree
    from .sizing.tree import ModuleTree
    from .sizing.workload import Workload

# Public name -> the submodule defining it, imported on first use (PEP 562), so that `import devicemap`
# (and the `devicemap` command) load torch only when something needs it: the loaders do, a plan from a
# ModuleTree, a catalog shape or a checkpoint's headers does not.
_LAZY = {
    "compat": "compat",
    **dict.fromkeys(
        ("dispatch", "dispatch_map", "execution_map", "from_pretrained", "load_checkpoint"), "loading.apply"
    ),
    **dict.fromkeys(("plan", "plan_checkpoint"), "planners.api"),
    "checkpoint_tree": "sizing.checkpoint",
    "Estimate": "cost.estimate",
    **dict.fromkeys(("install", "install_from_environment", "installed", "uninstall"), "integrations"),
    **dict.fromkeys(("GPU", "Hardware", "Host", "measure_host"), "cost.hardware"),
    **dict.fromkeys(("available_memory", "normalize_max_memory", "parse_size"), "inputs.memory"),
    **dict.fromkeys(("STRATEGIES", "Balance", "Strategy"), "inputs.options"),
    **dict.fromkeys(("DeviceUsage", "Offload", "Plan"), "plans"),
    **dict.fromkeys(("Stage", "StagePlan", "pipeline", "plan_stages"), "planners.stages"),
    "ModuleTree": "sizing.tree",
    "Workload": "sizing.workload",
}


if not TYPE_CHECKING:  # type checkers read the imports above, and flag a misspelt name as usual

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        found = importlib.import_module(f"{__name__}.{module}")
        value = found if name == module else getattr(found, name)
        globals()[name] = value  # later lookups find it directly
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "STRATEGIES",
    "AccelerateCompatError",
    "Balance",
    "CheckpointError",
    "DeviceUsage",
    "DoesNotFitError",
    "DuplicateDeviceError",
    "Estimate",
    "GPU",
    "Hardware",
    "Host",
    "InternalError",
    "InvalidOptionError",
    "InvalidSizeError",
    "InvalidTreeError",
    "ModuleTree",
    "Offload",
    "OffloadFolderError",
    "PinConflictError",
    "Plan",
    "Stage",
    "StagePlan",
    "Strategy",
    "PlacementError",
    "TiedPinConflictError",
    "UnknownDeviceError",
    "UnknownModuleError",
    "Workload",
    "__version__",
    "available_memory",
    "checkpoint_tree",
    "dispatch",
    "dispatch_map",
    "execution_map",
    "from_pretrained",
    "install",
    "installed",
    "load_checkpoint",
    "measure_host",
    "plan_checkpoint",
    "compat",
    "normalize_max_memory",
    "parse_size",
    "pipeline",
    "plan",
    "plan_stages",
    "uninstall",
]

# DEVICEMAP=1: existing from_pretrained/load_checkpoint_and_dispatch calls use devicemap's plans (the
# devicemap_hooks.pth start-up line does this even for programs that never import devicemap). The
# integrations (and importlib.metadata, ~40 ms) are imported only when the variable is set at all.
if os.environ.get("DEVICEMAP", "").strip():
    from .integrations import install_from_environment as _install_from_environment

    _install_from_environment()
