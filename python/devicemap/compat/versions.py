"""Which accelerate :mod:`devicemap.compat` reproduces, and what each release does differently.

The drop-ins return what the *installed* accelerate returns. Its version is read once, from the package
metadata (``importlib.metadata``, the same record ``pip`` shows), and every behaviour that changed
within accelerate 1.x is a named predicate of :class:`AccelerateRelease` here, the one place on the
Python side that maps versions to behaviours. The placement loop itself is chosen in the Rust core, from
the same version (``AccelerateVersion`` in ``rust/core/src/strategy/accelerate_version.rs``).

Releases below 1.0 (under devicemap's floor) are treated as 1.0, releases newer than the newest one
checked (:data:`NEWEST_CHECKED`) as that one.

>>> AccelerateRelease.parse("1.1.1").has_fallback_allocation
False
>>> AccelerateRelease.parse("1.17.0.dev0").version
(1, 17, 0)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AccelerateCompatError

if TYPE_CHECKING:
    import torch

__all__ = ["NEWEST_CHECKED", "OLDEST_SUPPORTED", "AccelerateRelease", "installed_accelerate"]

OLDEST_SUPPORTED = (1, 0, 0)
"""devicemap's floor (``accelerate>=1.0`` in pyproject.toml)."""
NEWEST_CHECKED = (1, 16, 0)
"""The newest release whose placement code was read and compared against."""


@dataclass(frozen=True)
class AccelerateRelease:
    """An accelerate release and the behaviours of its placement helpers that differ between releases.

    Each predicate names the release that introduced the behaviour (read from accelerate's
    ``utils/modeling.py``, release by release)."""

    version: tuple[int, int, int]

    @classmethod
    def parse(cls, text: str) -> AccelerateRelease:
        """``"1.16.0"``, ``"1.2"``, ``"1.17.0.dev0"``, ``"1.3.0rc1"``: the leading release numbers."""
        numbers: list[int] = []
        for part in text.strip().split(".")[:3]:
            digits = re.match(r"\d*", part)
            if digits is None or not digits.group():
                break
            numbers.append(int(digits.group()))
            if digits.group() != part:
                break
        if not numbers:
            raise ValueError(f"cannot read accelerate's version {text!r}")
        major, minor, patch = (numbers + [0, 0])[:3]
        return cls((major, minor, patch))

    def _at_least(self, major: int, minor: int) -> bool:
        return self.version >= (major, minor, 0)

    # -- infer_auto_device_map ------------------------------------------------------------------
    @property
    def has_fallback_allocation(self) -> bool:
        """1.2: ``infer_auto_device_map`` takes ``fallback_allocation`` (the new loop; the core knows it)."""
        return self._at_least(1, 2)

    @property
    def reads_decoder_text_config(self) -> bool:
        """1.7: the untied-weights check reads ``config.get_text_config(decoder=True)``, not ``config``."""
        return self._at_least(1, 7)

    @property
    def warns_with_deprecated_logger_warn(self) -> bool:
        """Before 1.8 the untied-weights warning went through ``logger.warn``, which also emits a
        ``DeprecationWarning``."""
        return not self._at_least(1, 8)

    # -- both helpers -----------------------------------------------------------------------------
    @property
    def no_split_takes_any_iterable(self) -> bool:
        """1.14: ``no_split_module_classes`` as a str is one class, any other value goes through
        ``list()``; before, anything but a list or tuple was one (never matching) entry."""
        return self._at_least(1, 14)

    # -- get_balanced_memory ----------------------------------------------------------------------
    @property
    def counts_mps(self) -> bool:
        """1.6: ``get_balanced_memory`` counts an ``"mps"`` key as an accelerator where MPS is the backend."""
        return self._at_least(1, 6)

    @property
    def counts_integer_keys_directly(self) -> bool:
        """1.15: integer keys are counted as accelerators without ``torch.device(key)`` (which raises on
        torch builds without an accelerator)."""
        return self._at_least(1, 15)

    @property
    def backend_decides_device_type(self) -> bool:
        """1.16: the accelerator type is torch's current backend (none on a machine without one), not the
        first available of npu, mlu, ... with ``"cuda"`` as the default."""
        return self._at_least(1, 16)

    @property
    def low_zero_reads_listed_gpus(self) -> bool:
        """1.16: ``low_zero`` sums the budgets of the GPUs listed after the first, not of GPUs
        ``1 .. n-1`` (a ``KeyError`` when the GPUs are numbered otherwise)."""
        return self._at_least(1, 16)

    # -- get_max_memory ---------------------------------------------------------------------------
    @property
    def integrated_cuda_shares_ram(self) -> bool:
        """1.15: ``get_max_memory()`` gives no ``"cpu"`` budget on an integrated CUDA device (shared RAM)."""
        return self._at_least(1, 15)

    # -- sizes (compute_module_sizes' dtype_byte_size) -------------------------------------------
    def element_bits(self, dtype: torch.dtype) -> int:
        """Bits accelerate counts per element of ``dtype``: ``bool`` 1; from 1.16 the element size torch
        stores; before, the trailing number of the dtype's name in whole bytes (so the sub-byte and packed
        dtypes ``uint4``, ``int2``, ``quint4x2``, ``float4_e2m1fn_x2``, ``bits2x4`` count 0), except the
        float8 dtypes it lists (``float8_e4m3fn``; ``float8_e5m2`` from 1.8, 0 before; the ``fnuz`` and
        ``e8m0fnu`` ones from 1.14, before which accelerate raises ``ValueError``).

        >>> import torch
        >>> [AccelerateRelease(v).element_bits(torch.float8_e5m2) for v in [(1, 7, 0), (1, 8, 0)]]
        [0, 8]
        """
        return self.element_bits_of(str(dtype).removeprefix("torch."), int(dtype.itemsize))

    def element_bits_of(self, name: str, itemsize: int) -> int:
        """:meth:`element_bits` of the dtype torch names ``name`` (``str(dtype)`` without ``torch.``), whose
        elements take ``itemsize`` bytes: the same answer without torch (for the catalog's data trees).

        >>> AccelerateRelease((1, 7, 0)).element_bits_of("bool", 1), NEWEST.element_bits_of("uint4", 1)
        (1, 8)
        """
        if name == "bool":
            return 1
        if self._at_least(1, 16):
            return itemsize * 8
        float8 = {"float8_e4m3fn"}
        if self._at_least(1, 8):
            float8.add("float8_e5m2")
        if self._at_least(1, 14):
            float8.update({"float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"})
        if name in float8:
            return 8
        width = re.search(r"[^\d](\d+)$", f"torch.{name}")
        if width is None:
            raise AccelerateCompatError(
                f"accelerate {'.'.join(map(str, self.version))} cannot size torch.{name} tensors (its dtype_byte_size "
                "raises ValueError); accelerate 1.14 and later can"
            )
        return int(width.group(1)) // 8 * 8

    @property
    def core_version(self) -> tuple[int, int, int]:
        """The version handed to the core, clamped to the supported range."""
        return max(OLDEST_SUPPORTED, self.version)


NEWEST = AccelerateRelease(NEWEST_CHECKED)


@functools.cache
def installed_accelerate() -> AccelerateRelease:
    """The installed accelerate's release (read once, from the package metadata; the newest checked
    behaviour when accelerate is not installed).

    >>> installed_accelerate().version >= (1, 0, 0)
    True
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return AccelerateRelease.parse(version("accelerate"))
    except (PackageNotFoundError, ValueError):
        return NEWEST
