"""Typing for the Rust extension (devicemap._core). Use the public API in `devicemap` instead."""

from collections.abc import Callable
from os import PathLike
from typing import Any, Final, TypeAlias, final

__all__ = [
    "Tree",
    "ModuleWalk",
    "SolveResult",
    "DeviceUsageRecord",
    "OffloadRecord",
    "solve",
    "infer_auto_device_map",
    "balanced_budget",
    "parse_device",
    "parse_size",
    "speed_program",
    "tree_from_checkpoint",
    "checkpoint_tensors",
    "_panic_for_tests",
    "PlacementError",
    "InvalidSizeError",
    "UnknownDeviceError",
    "DuplicateDeviceError",
    "InvalidOptionError",
    "UnknownModuleError",
    "TiedPinConflictError",
    "PinConflictError",
    "DoesNotFitError",
    "InvalidTreeError",
    "AccelerateCompatError",
    "CheckpointError",
    "InternalError",
    "KIND_MODULE",
    "KIND_PARAMETER",
    "KIND_BUFFER",
    "KIND_NON_PERSISTENT_BUFFER",
    "KIND_PARAMETER_ALIAS",
    "ACCELERATORS",
    "BALANCES",
    "BLOCK_CLASS",
    "STRATEGIES",
    "__version__",
]

# Private: the extension has no such name; the public alias is devicemap.memory.DeviceKey.
_DeviceKey: TypeAlias = int | str
"""A device as accelerate's maps spell it: an int GPU index, or "mps" / "cpu" / "disk"."""

__version__: str

# Codes of Tree's `kinds` column (the core's NodeKind).
KIND_MODULE: Final[int]
KIND_PARAMETER: Final[int]
KIND_BUFFER: Final[int]
KIND_NON_PERSISTENT_BUFFER: Final[int]
KIND_PARAMETER_ALIAS: Final[int]
BLOCK_CLASS: Final[str]
STRATEGIES: Final[list[str]]
ACCELERATORS: Final[list[str]]
"""Device types whose ``"<type>:N"`` keys are GPU ``N``."""
"""The strategy names the core parses, in the order the docs list them."""
BALANCES: Final[list[str]]
"""The balance modes the core parses."""
"""Class name of the blocks a checkpoint tree groups its layers into."""

# pyclasses without `subclass` cannot be subclassed at runtime.
@final
class Tree:
    # The binding builds Tree in `#[new]`, so the signature lives on __new__, not __init__.
    def __new__(
        cls,
        names: list[str],
        parents: list[int],
        kinds: list[int],
        classes: list[int],
        class_names: list[str],
        bits: list[int],
        duplicate: list[bool],
        tie: list[int],
    ) -> Tree: ...
    def __len__(self) -> int: ...
    def name(self, node: int) -> str: ...
    def find(self, name: str) -> int | None: ...
    def subtree_bits(self, node: int) -> int: ...
    def class_name(self, node: int) -> str: ...
    def kind(self, node: int) -> str: ...
    def tie_groups(self) -> list[list[str]]: ...
    def suggest(self, name: str) -> list[str]: ...
    def columns(
        self,
    ) -> tuple[list[str], list[int], list[int], list[int], list[str], list[int], list[bool], list[int]]:
        """The columns ``Tree(...)`` takes, read back: ``Tree(*tree.columns())`` is the same tree."""
    def modules_of_class(self, class_name: str) -> list[str]: ...

@final
class ModuleWalk:
    """One export walk over a torch module graph (see ``devicemap.tree.ModuleTree.from_module``)."""

    def __new__(
        cls,
        model: object,
        element_bits: Callable[[Any], int],
        named_bits: Callable[[str, Any], int] | None = None,
        untie: bool = False,
        like_named_children: bool = False,
    ) -> ModuleWalk: ...
    def parameter_groups(self) -> list[list[int]]: ...
    def buffer_groups(self) -> list[list[int]]: ...
    def parameter_nodes(self) -> list[int]: ...
    def full_names(self, nodes: list[int]) -> list[str]: ...
    @property
    def total_bits(self) -> int: ...
    def types(self) -> list[type]: ...
    def build(self, tie_groups: list[list[int]]) -> Tree: ...

@final
class DeviceUsageRecord:
    """What one device holds in a plan, in bytes (used sizes rounded up, capacity rounded down)."""

    @property
    def device(self) -> _DeviceKey: ...
    @property
    def capacity(self) -> int | None: ...
    @property
    def weights(self) -> int: ...
    @property
    def runtime(self) -> int: ...
    @property
    def reserve(self) -> int: ...
    @property
    def compute(self) -> int: ...
    @property
    def blocks(self) -> list[str]: ...

@final
class OffloadRecord:
    """A block placed on CPU or disk, its bytes (rounded up) and why."""

    @property
    def name(self) -> str: ...
    @property
    def device(self) -> _DeviceKey: ...
    @property
    def bytes(self) -> int: ...
    @property
    def reason(self) -> str: ...

@final
class SolveResult:
    """What solve returns: the strategy that ran, (module, device) pairs in model order, usage, offloads."""

    @property
    def strategy(self) -> str: ...
    @property
    def device_map(self) -> list[tuple[str, _DeviceKey]]: ...
    @property
    def assignments(self) -> list[tuple[str, _DeviceKey]]: ...
    @property
    def execution_map(self) -> list[tuple[str, _DeviceKey]]:
        """Every block and the device that computes it: its own GPU, or for an offloaded block the GPU
        that stages it or "cpu"."""
    @property
    def usage(self) -> list[DeviceUsageRecord]: ...
    @property
    def offloaded(self) -> list[OffloadRecord]: ...
    def maps(
        self,
    ) -> tuple[dict[str, _DeviceKey], dict[str, _DeviceKey], dict[str, _DeviceKey]]:
        """``device_map``, ``assignments`` and ``execution_map`` as dicts {name: device}."""
    def offload_rows(self) -> list[tuple[str, _DeviceKey, int, str]]:
        """``offloaded`` as (name, device, bytes, reason) tuples."""
    def blocks_over(self, limit: int) -> list[str]:
        """Names of the blocks larger than ``limit`` bytes (sizes rounded up), in model order."""

def solve(
    tree: Tree,
    devices: list[tuple[str, int | None]],
    strategy: str,
    no_split_module_classes: list[str],
    pins: list[tuple[str, str]],
    offload_buffers: bool,
    runtime: list[tuple[str, int]] = ...,
    activation_bits: int = 0,
    compute: list[tuple[str, int]] = ...,
    balance: str = ...,  # "memory"; pyo3 cannot show a Rust String default
    gpu0_reserve_bits: int = 0,
    execution_device: str | None = None,
) -> SolveResult: ...
def infer_auto_device_map(
    tree: Tree,
    max_memory: list[tuple[str, int]],
    no_split_module_classes: list[str],
    fallback_allocation: bool,
    clean_result: bool,
    accelerate_version: tuple[int, int, int],
) -> tuple[
    list[tuple[str, _DeviceKey]],
    list[tuple[str, int]],
    list[tuple[str, str]],
    list[tuple[str, int, list[str]]],
]: ...
def balanced_budget(
    tree: Tree, no_split_module_classes: list[str], share_devices: int
) -> tuple[int, int]: ...
def parse_size(text: str) -> int: ...
def parse_device(key: str) -> int | str: ...
def speed_program(
    weights: list[int],
    runtimes: list[int],
    costs: list[list[float | None]],
    gpu_capacity: list[int],
    cpu_capacity: int | None,
    activation: int,
    switch: list[list[float]],
    unit: int,
    cpu_unit: int,
) -> tuple[tuple[float, list[int]] | None, tuple[int, int, int]]: ...
def tree_from_checkpoint(
    path: str | PathLike[str],  # the binding takes a PathBuf
    block_patterns: list[str],
    layer_counts: list[int],
    tie_groups: list[list[str]],
    dtype_bits: int | None = None,
) -> Tree: ...
def checkpoint_tensors(path: str | PathLike[str]) -> list[tuple[str, str, list[int], str, int, int]]: ...
def _panic_for_tests() -> None: ...

class PlacementError(ValueError): ...
class InvalidSizeError(PlacementError): ...
class UnknownDeviceError(PlacementError): ...
class DuplicateDeviceError(UnknownDeviceError): ...
class InvalidOptionError(PlacementError): ...
class UnknownModuleError(PlacementError): ...
class TiedPinConflictError(PlacementError): ...
class PinConflictError(PlacementError): ...

class DoesNotFitError(PlacementError):
    shortfall: str | None
    """``"no_disk"``, ``"staging"``, ``"pinned"``, ``"before_free_layers"``, ``"no_device"`` (None: raised
    from Python, the message only)."""
    device: int | str | None
    """The device that is short (accelerate's key), if one is."""
    missing_bytes: int | None
    """What the short device lacks, or the weights left without a device."""

class InvalidTreeError(PlacementError): ...
class AccelerateCompatError(PlacementError): ...
class CheckpointError(PlacementError): ...
class InternalError(Exception): ...
