"""Dtypes: the names devicemap accepts for ``dtype=``/``special_dtypes``, and the bits one element takes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Union

from ..errors import InvalidOptionError
from . import dtype_names

if TYPE_CHECKING:
    import torch

DtypeLike = Union[str, "torch.dtype"]


def storage_bits(dtype: torch.dtype) -> int:
    """Bits one element of ``dtype`` occupies in memory, sub-byte and packed dtypes included.

    torch stores every sub-byte dtype one element per byte (``int4``, ``uint4``, ``int2``, ... and the
    packed ``float4_e2m1fn_x2``, ``bits4x2``, whose element is a pair of 4-bit values): they take 8 bits,
    never 0. ``bool`` counts 1 bit, as accelerate counts it.

    >>> import torch
    >>> storage_bits(torch.bits4x2), storage_bits(torch.uint4), storage_bits(torch.bfloat16)
    (8, 8, 16)
    """
    import torch

    if dtype == torch.bool:
        return 1
    packed = {torch.quint4x2: 4, torch.quint2x4: 2}.get(dtype)  # legacy quantized dtypes do pack
    return packed if packed is not None else int(dtype.itemsize) * 8


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element: ``bool`` 1 bit (as accelerate counts it), sub-byte dtypes as torch stores them
    (``uint4``, ``int4``, ``float4_e2m1fn_x2``: one element per byte), others their width.

    >>> import torch
    >>> dtype_bits(torch.bfloat16), dtype_bits(torch.bool), dtype_bits(torch.uint4)
    (16, 1, 8)
    """
    return storage_bits(dtype)


def memory_bits(dtype: torch.dtype) -> int:
    """Bits per element a tensor takes in memory: :func:`dtype_bits`, except that a ``bool`` takes the byte
    torch stores per element (accelerate counts a bit, which under-counts attention-mask buffers 8x).

    >>> import torch
    >>> memory_bits(torch.bool), memory_bits(torch.bfloat16)
    (8, 16)
    """
    import torch

    return 8 if dtype == torch.bool else dtype_bits(dtype)


def target_bits(dtype: DtypeLike, option: str = "dtype") -> int:
    """Bits per element of a dtype weights are sized *as* (``dtype=``, ``special_dtypes``): a dtype
    holding less than a byte per value is refused, since converting to it is a quantizer's job.

    >>> target_bits("bfloat16"), target_bits("float8_e4m3fn")
    (16, 8)
    """
    named = dtype_names.known(dtype)
    if named is not None:  # a common name: answered without importing torch
        return named.bits
    import torch

    resolved = to_dtype(dtype, option)
    width = re.search(r"\d+", str(resolved).removeprefix("torch."))
    if resolved != torch.bool and width is not None and int(width.group()) < 8:
        raise InvalidOptionError(
            f"{option} {dtype!r} packs values below a byte, which only a quantizer produces; size 4-bit "
            "weights with quantization_config= (bitsandbytes, torchao) or plan the quantized checkpoint"
        )
    return dtype_bits(resolved)


def to_dtype(dtype: DtypeLike, option: str = "dtype") -> torch.dtype:
    """Accept ``torch.float16``, ``"float16"`` or ``"torch.float16"``; ``option`` names the argument in
    the error raised for anything else."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(found, torch.dtype):
            return found
    raise InvalidOptionError(
        f"unknown {option} {dtype!r}: use a torch.dtype or its name, e.g. 'float16' or 'bfloat16'"
    )
