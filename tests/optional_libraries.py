"""Optional libraries the tests use, skipped for the reason they cannot run here and no other.

``pytest.importorskip`` skips only when a library is missing (an ``ImportError``). With the oldest supported
versions (``DEVICEMAP_DEPS=oldest``, torch 2.4) two upstream limits also stop tests, each detected by the
feature that is missing, never by a version number:

- torchao 0.13 (the test extras' floor) stops at import on torch 2.4 with ``AttributeError: module 'torch'
  has no attribute 'int1'`` (torch.int1 is new in torch 2.6); peft and diffusers import torchao whenever it
  is installed (peft's LoRA layers, diffusers' model and quantizer modules), so they stop with it;
- transformers 5 swaps quantized layers in with ``torch.nn.Module.set_submodule``, which torch 2.4 lacks,
  so no bitsandbytes model loads there.

One upstream limit of transformers 5.0 stops loads whatever the torch: its ``from_pretrained`` attaches
accelerate's offload hooks only to a map naming two devices or more, so a model mapped whole to disk keeps its
weights on the meta device (:func:`transformers_whole_disk_problem`, detected by trying such a load).

Any other import failure still fails the test.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
import tempfile
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


@functools.cache
def transformers_whole_disk_problem() -> str | None:
    """Why transformers' ``from_pretrained`` cannot run a model it maps whole to disk; None when it can.

    transformers 5.0 dispatches the loaded model (attaches accelerate's hooks, which load offloaded weights
    as each module runs) only when the map names two devices or more: with a map whose only device is
    ``"disk"`` the weights stay on the meta device, and the forward pass fails (Llama: ``unknown device type
    for autocast``) or returns meta tensors (T5). Later 5.x dispatch any map naming the disk. Tried on a
    tiny Llama with ``device_map={"": "disk"}``, outside devicemap (which passes a dict map through)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with tempfile.TemporaryDirectory() as folder:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        model = transformers.LlamaForCausalLM.from_pretrained(
            folder, device_map={"": "disk"}, offload_folder=f"{folder}/offload"
        )
        try:
            with torch.no_grad():
                logits = model(torch.tensor([[1, 2, 3]])).logits
        except Exception as error:  # what a model left on the meta device raises
            detail = f"{type(error).__name__}: {error}"
        else:
            if not logits.is_meta:
                return None
            detail = "its outputs are meta tensors"
    return (
        f"transformers {importlib.metadata.version('transformers')} cannot run a model mapped whole to disk: "
        "from_pretrained attaches accelerate's offload hooks only to a map naming two devices or more, and "
        f"leaves the weights of a map naming only the disk on the meta device ({detail[:160]})"
    )
