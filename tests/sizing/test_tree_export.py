"""ModuleTree.from_module: sizes equal accelerate's compute_module_sizes, on meta and real models."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import compute_module_sizes, find_tied_parameters
from hypothesis import given, settings
from hypothesis import strategies as st

import devicemap
from tiny_models import tiny_llama_config

from model_strategies import models


def assert_sizes_match(model, **kwargs):
    """Sizes equal accelerate's, except that a bool tensor takes a byte per element (as torch stores it)
    where accelerate counts a bit; the accelerate port (``accelerate_tie_order``) counts a bit too."""
    from accelerate.utils import named_module_tensors

    tree = devicemap.ModuleTree.from_module(model, **kwargs)
    port = devicemap.ModuleTree.from_module(model, accelerate_tie_order=True, **kwargs)
    expected = compute_module_sizes(model, **kwargs)
    bool_bits: dict[str, int] = {}  # 7 more bits per bool element, under every prefix (as accelerate sums)
    special = kwargs.get("special_dtypes") or {}
    for name, tensor in named_module_tensors(model, recurse=True):
        if tensor.dtype == torch.bool and name not in special:
            parts = name.split(".")
            for i in range(len(parts) + 1):
                prefix = ".".join(parts[:i])
                bool_bits[prefix] = bool_bits.get(prefix, 0) + 7 * tensor.numel()
    for name, size in list(expected.items()):
        assert port.module_bytes(name) == -(-int(size * 8) // 8), name
        assert tree.module_bytes(name) == -(-(int(size * 8) + bool_bits.get(name, 0)) // 8), name
    return tree


def test_a_bool_tensor_counts_a_byte_per_element():
    """An attention mask buffer (gpt-neo, bark, clvp...) takes a byte per element on its device; counted
    as a bit (accelerate's rule), a plan would over-fill GPUs by 7/8 of every mask."""
    module = torch.nn.Module()
    module.register_buffer("mask", torch.ones(64, 64, dtype=torch.bool), persistent=False)
    assert devicemap.ModuleTree.from_module(module).total_bytes == 64 * 64
    assert devicemap.ModuleTree.from_module(module, accelerate_tie_order=True).total_bytes == 64 * 64 // 8


@settings(max_examples=150, deadline=None)
@given(model=models(), dtype=st.sampled_from([None, "float16", torch.bfloat16, "float32", "int8"]))
def test_sizes_and_ties_match_accelerate(model, dtype):
    tree = assert_sizes_match(model, dtype=dtype)
    assert sorted(tree.tied_groups) == sorted(find_tied_parameters(model))


def test_meta_device_model_exports_without_allocating(tiny_llama):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_llama.config)
    meta.tie_weights()
    assert all(p.device.type == "meta" for p in meta.parameters())
    tree = assert_sizes_match(meta, dtype="bfloat16")
    assert tree.total_bytes == assert_sizes_match(tiny_llama, dtype="bfloat16").total_bytes
    assert tree.tied_groups == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert "LlamaDecoderLayer" in tree.no_split_module_classes


def test_buffers_count_whether_persistent_or_not():
    module = torch.nn.Module()
    module.register_buffer("kept", torch.zeros(10), persistent=True)
    module.register_buffer("scratch", torch.zeros(6, dtype=torch.float16), persistent=False)
    tree = devicemap.ModuleTree.from_module(module)
    assert tree.module_bytes("kept") == 40 and tree.module_bytes("scratch") == 12
    assert tree.total_bytes == 52


def test_dtype_shrinks_floats_only_and_special_dtypes_override():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(8))
    module.register_buffer("ids", torch.zeros(8, dtype=torch.int64))
    tree = devicemap.ModuleTree.from_module(module, dtype="float16", special_dtypes={"ids": "int8"})
    assert tree.module_bytes("weight") == 16  # float32 -> float16
    assert tree.module_bytes("ids") == 8  # special dtype wins, even for integers
    assert (
        devicemap.ModuleTree.from_module(module, dtype=torch.float64).module_bytes("weight") == 32
    )  # never grows


def test_unknown_names_and_dtypes_are_reported():
    tree = devicemap.ModuleTree.from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(devicemap.UnknownModuleError, match="did you mean 0.weight"):
        tree.module_bytes("0.weigth")
    with pytest.raises(ValueError, match="unknown dtype 'float17'"):
        devicemap.ModuleTree.from_module(torch.nn.Linear(2, 2), dtype="float17")
    with pytest.raises(devicemap.InvalidOptionError, match="torch.nn.Module"):
        devicemap.ModuleTree.from_module("not a model")


def test_malformed_columns_raise_instead_of_crashing():
    from devicemap import _core

    with pytest.raises(devicemap.InvalidTreeError, match="parent"):
        _core.Tree(["", "a"], [-1, 7], [0, 1], [0, 0], ["M"], [0, 8], [False, False], [-1, -1])
    with pytest.raises(devicemap.InvalidTreeError, match="column"):
        _core.Tree(["", "a"], [-1], [0, 1], [0, 0], ["M"], [0, 8], [False, False], [-1, -1])


def test_a_60k_module_tree_exports():
    layers = torch.nn.ModuleList()
    with torch.device("meta"):
        for _ in range(20):
            layers.append(torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3000)))
    tree = devicemap.ModuleTree.from_module(layers)
    assert len(tree) == 1 + 20 + 20 * 3000 * 3
    assert tree.total_bytes == 20 * 3000 * (64 + 8) * 4


def _tied_llama_config():

    return tiny_llama_config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, tie_word_embeddings=True
    )


def test_ties_transformers_declares_count_on_a_meta_model_not_tied_yet():
    """transformers 5.0 builds models untied (from_pretrained ties them after planning); later 5.x tie
    at construction. Both plan the same: the declared tie holds for meta tensors, the model is left as it
    was, and a materialized untied model is sized as it is in memory."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_tied_llama_config())
    model.tie_weights()
    tied = devicemap.ModuleTree.from_module(model)
    assert ["lm_head.weight", "model.embed_tokens.weight"] in tied.tied_groups
    head = torch.nn.Parameter(torch.empty(512, 32, device="meta"))
    model.lm_head.weight = head  # as transformers 5.0 builds it
    assert model.all_tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    untied = devicemap.ModuleTree.from_module(model)
    assert untied.total_bytes == tied.total_bytes
    assert untied.tied_groups == tied.tied_groups
    assert model.lm_head.weight is head  # restored
    real = LlamaForCausalLM(_tied_llama_config())
    real.lm_head.weight = torch.nn.Parameter(real.model.embed_tokens.weight.detach().clone())
    assert devicemap.ModuleTree.from_module(real).total_bytes == tied.total_bytes + 512 * 32 * 4


def test_no_split_classes_of_sub_models_are_the_models():
    """BertForMaskedLM declares no class itself; its BertModel declares BertLayer and BertEmbeddings,
    which transformers 5.0 gathers in _get_no_split_modules and later 5.x at construction."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    with torch.device("meta"):
        model = BertForMaskedLM(config)
    tree = devicemap.ModuleTree.from_module(model)
    assert tree.no_split_module_classes == ["BertEmbeddings", "BertLayer"]
