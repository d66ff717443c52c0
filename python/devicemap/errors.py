"""devicemap's exceptions. Bad input raises a :class:`PlacementError` subclass (itself a ``ValueError``);
a bug in devicemap raises :class:`InternalError`, which derives from ``Exception`` only, so that
``except ValueError`` or ``except PlacementError`` around bad input never hides it.

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
    DuplicateDeviceError,
    InternalError,
    InvalidOptionError,
    InvalidSizeError,
    InvalidTreeError,
    PinConflictError,
    PlacementError,
    TiedPinConflictError,
    UnknownDeviceError,
    UnknownModuleError,
)

# A DoesNotFitError from the core carries what is short: ``shortfall`` (``"no_disk"``, ``"staging"``,
# ``"pinned"``, ``"before_free_layers"``, ``"no_device"``), the short ``device`` (accelerate's key, or None)
# and ``missing_bytes``. One raised from Python carries the sentence only: these class defaults say so.
DoesNotFitError.shortfall = None
DoesNotFitError.device = None
DoesNotFitError.missing_bytes = None


class OffloadFolderError(PlacementError):
    """An ``offload_dir`` devicemap cannot use safely (a file, unwritable, missing when required); the
    message names the folder and the fix. devicemap never deletes or renames files it did not create."""


__all__ = [
    "AccelerateCompatError",
    "CheckpointError",
    "DoesNotFitError",
    "DuplicateDeviceError",
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
