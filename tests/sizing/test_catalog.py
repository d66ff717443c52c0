"""The bundled model shapes build on the meta device, have their advertised sizes, and devicemap.compat
places them exactly like accelerate."""

from __future__ import annotations

import pytest
from accelerate.utils import infer_auto_device_map as acc_infer

import devicemap
from devicemap import catalog
from devicemap.compat import infer_auto_device_map

# (name, parameters low, high): the size in the name, within rounding of the published counts.
EXPECTED = [
    ("llama-2-7b", 6.5e9, 7.0e9),
    ("llama-3-8b", 7.9e9, 8.1e9),
    ("llama-3-70b", 70.0e9, 71.0e9),
    ("llama-3.1-405b", 405e9, 406.5e9),
    ("llama-3.2-1b", 1.2e9, 1.3e9),
    ("mistral-7b", 7.1e9, 7.3e9),
    ("mixtral-8x7b", 46.5e9, 47.0e9),
    ("mixtral-8x22b", 140e9, 141.5e9),
    ("qwen2.5-0.5b", 0.48e9, 0.5e9),
    ("qwen2.5-7b", 7.5e9, 7.7e9),
    ("qwen2.5-72b", 72.5e9, 73.0e9),
    ("qwen3-30b-a3b", 30.0e9, 31.0e9),
    ("gemma-2-9b", 9.1e9, 9.3e9),
    ("phi-3-mini", 3.7e9, 3.9e9),
    ("falcon-7b", 6.8e9, 7.0e9),
    ("opt-6.7b", 6.6e9, 6.7e9),
    ("t5-large", 0.73e9, 0.75e9),
    ("deepseek-v2-lite", 15.6e9, 15.8e9),
]


def test_every_bundled_model_is_checked():
    assert sorted(name for name, _, _ in EXPECTED) == catalog.names()


@pytest.mark.parametrize(("name", "low", "high"), EXPECTED)
def test_parameter_counts_match_the_published_sizes(name, low, high):
    assert low <= catalog.parameter_count(name) <= high


@pytest.mark.parametrize(
    "name", ["llama-3.2-1b", "mixtral-8x7b", "qwen3-30b-a3b", "t5-large", "falcon-7b", "opt-6.7b"]
)
def test_compat_matches_accelerate_on_real_shapes(name):
    model = catalog.build_meta_model(name, num_hidden_layers=6)
    no_split = list(model._no_split_modules)
    total = devicemap.ModuleTree.from_module(model, dtype="bfloat16").total_bytes
    memory = {0: total * 6 // 10, 1: total * 3 // 10, "cpu": total * 3 // 10}
    kwargs = dict(no_split_module_classes=no_split, dtype="bfloat16")
    expected = acc_infer(model, max_memory=dict(memory), **kwargs)
    assert infer_auto_device_map(model, max_memory=dict(memory), **kwargs) == dict(expected)
    assert len(set(expected.values())) >= 3, expected  # really split over GPUs, CPU and disk


def test_tied_embeddings_are_tied():
    tree = devicemap.ModuleTree.from_module(catalog.build_meta_model("llama-3.2-1b", num_hidden_layers=1))
    assert tree.tied_groups == [["lm_head.weight", "model.embed_tokens.weight"]]


def test_unknown_name_suggests_close_names():
    with pytest.raises(devicemap.UnknownModuleError, match="did you mean llama-3-8b"):
        catalog.load_config("llama-3-8")


def test_configs_are_copies():
    config = catalog.load_config("mistral-7b")
    config["hidden_size"] = 1
    assert catalog.load_config("mistral-7b")["hidden_size"] == 4096
