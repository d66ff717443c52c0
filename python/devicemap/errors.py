"""devicemap's exceptions. Every one derives from :class:`PlacementError`, itself a ``ValueError``.

Each message names the offending input and how to fix it, e.g.::

    >>> import devicemap
    >>> devicemap.parse_size("20 GB")
    Traceback (most recent call last):
    ...
    devicemap.InvalidSizeError: invalid memory size "20 GB": it contains spaces; ...
"""

from ._core import (
    AccelerateCompatError,
    CheckpointError,
    DoesNotFitError,
    InternalError,
    InvalidSizeError,
    InvalidTreeError,
    PinConflictError,
    PlacementError,
    TiedPinConflictError,
    UnknownDeviceError,
    UnknownModuleError,
)

__all__ = [
    "AccelerateCompatError",
    "CheckpointError",
    "DoesNotFitError",
    "InternalError",
    "InvalidSizeError",
    "InvalidTreeError",
    "PinConflictError",
    "PlacementError",
    "TiedPinConflictError",
    "UnknownDeviceError",
    "UnknownModuleError",
]
