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

from . import compat
from ._core import __version__
from .cost.estimate import Estimate
from .cost.hardware import GPU, Hardware, Host, measure_host
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
from .inputs.memory import available_memory, normalize_max_memory, parse_size
from .inputs.options import STRATEGIES, Balance, Strategy
from .integrations import install, install_from_environment, installed, uninstall
from .loading.apply import dispatch, dispatch_map, execution_map, from_pretrained, load_checkpoint
from .planners.api import plan, plan_checkpoint
from .planners.stages import Stage, StagePlan, pipeline, plan_stages
from .plans import DeviceUsage, Offload, Plan
from .sizing.checkpoint import checkpoint_tree
from .sizing.tree import ModuleTree
from .sizing.workload import Workload

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
# devicemap_hooks.pth start-up line does this even for programs that never import devicemap).
install_from_environment()
