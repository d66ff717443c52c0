"""The dtypes devicemap sizes most, by name, without importing torch.

:func:`devicemap.inputs.dtypes.to_dtype` resolves a name through torch (``getattr(torch, name)``), which costs a
torch import (seconds) to a command that only needs a width. This table answers for the names the
command accepts (``--dtype``, ``--kv-dtype``: see :mod:`devicemap.cli.inputs`), the integer and bool
dtypes tensors hold, and torch's short aliases (``half``, ``float``, ``long``, ...), read exactly as
``to_dtype`` reads a name; any other name (``complex64``, ``uint4``, ...) is left to torch. A test checks
every entry against torch.

>>> known("torch.bfloat16")
DtypeInfo(name='bfloat16', bits=16, floating=True)
>>> known("half").name, known("bool").memory_bits, known("complex64")
('float16', 8, None)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DtypeInfo", "known"]


@dataclass(frozen=True)
class DtypeInfo:
    """What sizing needs of a dtype: torch's name for it, its bits per element and whether it floats."""

    name: str
    """torch's name (``str(dtype)`` without ``torch.``): ``"float16"`` for ``"half"``."""
    bits: int
    """Bits per element as :func:`devicemap.inputs.dtypes.dtype_bits` counts them (``bool``: 1, as accelerate)."""
    floating: bool
    """``torch.dtype.is_floating_point``."""

    @property
    def memory_bits(self) -> int:
        """Bits per element in memory (:func:`devicemap.inputs.dtypes.memory_bits`): a ``bool`` takes a byte."""
        return 8 if self.name == "bool" else self.bits

    @property
    def itemsize(self) -> int:
        """``torch.dtype.itemsize``: bytes per element as torch stores it."""
        return self.memory_bits // 8

    @property
    def keeps_width(self) -> bool:
        """Integer and bool tensors keep their width whatever dtype floating weights are sized as."""
        return self.name.startswith(("uint", "int", "bool"))


_TABLE = {
    info.name: info
    for info in [
        DtypeInfo("bool", 1, False),
        DtypeInfo("uint8", 8, False),
        DtypeInfo("int8", 8, False),
        DtypeInfo("int16", 16, False),
        DtypeInfo("int32", 32, False),
        DtypeInfo("int64", 64, False),
        DtypeInfo("float8_e4m3fn", 8, True),
        DtypeInfo("float8_e5m2", 8, True),
        DtypeInfo("float16", 16, True),
        DtypeInfo("bfloat16", 16, True),
        DtypeInfo("float32", 32, True),
        DtypeInfo("float64", 64, True),
    ]
}
# torch's other attribute names for the same dtypes (torch.half is torch.float16, ...).
_ALIASES = {
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "short": "int16",
    "int": "int32",
    "long": "int64",
}


def known(dtype: object) -> DtypeInfo | None:
    """The :class:`DtypeInfo` of a dtype name as :func:`devicemap.inputs.dtypes.to_dtype` reads it (``"float16"``,
    ``"torch.float16"``, ``"half"``), or ``None``: not a string (a ``torch.dtype``), or a name this table
    leaves to torch (which may know it, or refuse it)."""
    if not isinstance(dtype, str):
        return None
    name = dtype.replace("torch.", "")  # as to_dtype reads it
    return _TABLE.get(_ALIASES.get(name, name))


def names() -> list[str]:
    """Every name :func:`known` answers for (torch's own and its aliases), for tests."""
    return [*_TABLE, *_ALIASES]
