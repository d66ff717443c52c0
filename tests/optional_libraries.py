"""Optional libraries the tests use, skipped for the reason they cannot run here and no other.

``pytest.importorskip`` skips only when a library is missing (an ``ImportError``). With the oldest supported
versions (``DEVICEMAP_DEPS=oldest``, torch 2.4) two upstream limits also stop tests, each detected by the
feature that is missing, never by a version number:

- torchao 0.13 (the test extras' floor) stops at import on torch 2.4 with ``AttributeError: module 'torch'
  has no attribute 'int1'`` (torch.int1 is new in torch 2.6); peft and diffusers import torchao whenever it
  is installed (peft's LoRA layers, diffusers' model and quantizer modules), so they stop with it;
- transformers 5 swaps quantized layers in with ``torch.nn.Module.set_submodule``, which torch 2.4 lacks,
  so no bitsandbytes model loads there.

Any other import failure still fails the test.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from types import ModuleType

import pytest
import torch


@functools.cache
def torchao_problem() -> str | None:
    """Why torchao, installed, cannot be imported with this torch; None when it imports or is absent."""
    try:
        importlib.import_module("torchao.quantization")
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] == "torchao":
            return None
        raise
    except AttributeError as error:
        missing = re.fullmatch(r"module 'torch' has no attribute '(\w+)'", str(error))
        if missing is None or hasattr(torch, missing[1]):
            raise
        return (
            f"torchao {importlib.metadata.version('torchao')} cannot import with torch {torch.__version__}: "
            f"it uses torch.{missing[1]}, which torch {torch.__version__} lacks (torchao needs a newer torch)"
        )
    return None


def import_torchao_quantization() -> ModuleType:
    """``torchao.quantization``; skips the test when torchao is missing or made for a newer torch."""
    problem = torchao_problem()
    if problem is not None:
        pytest.skip(problem)
    return pytest.importorskip("torchao.quantization")


def import_with_torchao(library: str) -> ModuleType:
    """``library`` (``"peft"``, ``"diffusers"``), which imports torchao when torchao is installed; skips the
    test when it is missing, or when the installed torchao cannot import with this torch."""
    module = pytest.importorskip(library)
    problem = torchao_problem()
    if problem is not None:
        pytest.skip(
            f"{library} {importlib.metadata.version(library)} imports the installed torchao, and {problem}"
        )
    return module


def import_bitsandbytes_for_transformers() -> ModuleType:
    """bitsandbytes, to load models through transformers' quantizer; skips the test when bitsandbytes is
    missing, or when this torch lacks the ``nn.Module.set_submodule`` transformers 5 quantizes with."""
    module = pytest.importorskip("bitsandbytes")
    if not hasattr(torch.nn.Module, "set_submodule"):
        pytest.skip(
            f"transformers {importlib.metadata.version('transformers')} swaps quantized layers in with "
            f"torch.nn.Module.set_submodule, which torch {torch.__version__} lacks"
        )
    return module
