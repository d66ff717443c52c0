"""Optional libraries the tests import, skipped for the reason they cannot run here and no other.

``pytest.importorskip`` skips only when a library is missing (an ``ImportError``). A library can also be
installed and still fail to import: each torchao release supports a few torch releases only, and torchao
0.13 (the test extras' floor) stops at import on torch 2.4 (the oldest supported torch) with
``AttributeError: module 'torch' has no attribute 'int1'`` (torch.int1 is new in torch 2.6). Tests that
need such a library skip naming both versions; any other import failure still fails the test.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

import pytest
import torch


def import_torchao_quantization() -> ModuleType:
    """``torchao.quantization``; skips the test when torchao is missing or made for a newer torch."""
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] == "torchao":
            pytest.skip("torchao is not installed")
        raise
    except AttributeError as error:
        missing = re.fullmatch(r"module 'torch' has no attribute '(\w+)'", str(error))
        if missing is None or hasattr(torch, missing[1]):
            raise
        pytest.skip(
            f"torchao {importlib.metadata.version('torchao')} cannot import with torch {torch.__version__}: "
            f"it uses torch.{missing[1]}, which torch {torch.__version__} lacks (torchao needs a newer torch)"
        )
