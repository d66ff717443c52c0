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


class InvalidOptionError(PlacementError):
    """An option with a value devicemap does not accept: a strategy, balance, dtype, flag or workload
    field (the message names the option, the value and what is accepted)."""


class OffloadFolderError(PlacementError):
    """An ``offload_dir`` devicemap cannot use safely (a file, unwritable, missing when required); the
    message names the folder and the fix. devicemap never deletes or renames files it did not create."""


__all__ = [
    "AccelerateCompatError",
    "CheckpointError",
    "DoesNotFitError",
    "InternalError",
    "InvalidOptionError",
    "InvalidSizeError",
    "InvalidTreeError",
    "OffloadFolderError",
    "PinConflictError",
    "PlacementError",
    "TiedPinConflictError",
    "UnknownDeviceError",
    "UnknownModuleError",
]
