"""Test configuration: hypothesis draws the same examples on every run (derandomized, no example
database) unless ``DEVICEMAP_EXPLORE=1`` asks for random exploration (see ``exploration.py``)."""

import pytest
from hypothesis import settings

from exploration import EXPLORE

settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("explore" if EXPLORE else "deterministic")


@pytest.fixture(scope="session")
def tiny_llama():
    """A small Llama-style causal LM with tied embeddings, random weights (no download)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_configs()["llama"])
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_mixtral():
    """A small Mixtral-style mixture-of-experts LM on the meta device."""
    import torch
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        return MixtralForCausalLM(_tiny_configs()["mixtral"])


def _tiny_configs():
    from transformers import MixtralConfig, T5Config

    from tiny_models import tiny_llama_config

    return {
        "llama": tiny_llama_config(vocab_size=512, tie_word_embeddings=True),
        "mixtral": MixtralConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
        "t5": T5Config(
            vocab_size=256,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=3,
            num_decoder_layers=3,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=True,
        ),
    }


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Small Llama (tied embeddings), Mixtral and T5 models with random weights, saved as sharded
    safetensors with their config.json. Returns {kind: (model, folder)}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    found = {}
    for kind, config in _tiny_configs().items():
        torch.manual_seed(0)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_config(config).eval()
        folder = tmp_path_factory.mktemp(kind)
        if kind == "mixtral":
            # transformers 5 saves MoE experts in the legacy per-expert layout and converts them when
            # loading; write the model's own tensor names instead, as a hand-made sharded checkpoint.
            save_sharded(model, folder, shards=3)
        else:
            model.save_pretrained(folder, max_shard_size="100KB", safe_serialization=True)
        found[kind] = (model, folder)
    return found


def save_sharded(model, folder, shards: int) -> None:
    """A sharded safetensors checkpoint of ``model.state_dict()`` with its index and config.json."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    model.config.save_pretrained(folder)


@pytest.fixture(scope="session")
def catalog_data_as_built():
    """``check(name)``: whether the shape of catalog model ``name`` shipped as data (what the command plans) is
    the tree the installed transformers builds. When it is not, the test is skipped if the data was made with
    other versions of torch/transformers (the oldest supported transformers builds some models otherwise:
    the command plans the data's shape), and fails if the versions are the same (the data is stale)."""
    from devicemap import ModuleTree, catalog
    from devicemap.catalog import tree_export, trees

    answers: dict[str, bool] = {}

    def check(name: str) -> None:
        if name not in answers:
            shape = trees.shape(name)
            built = ModuleTree.from_module(catalog.build_meta_model(name)).core.columns()
            answers[name] = shape is not None and shape.tree().core.columns() == built
        if answers[name]:
            return
        recorded = (trees._load(name) or {}).get("generated_with")
        installed = tree_export.versions()
        if recorded != installed:
            pytest.skip(f"{name}'s data was made with {recorded}; {installed} builds it otherwise")
        pytest.fail(f"{name}'s data is stale: rerun `.venv/bin/python scripts/export_catalog_trees.py`")

    return check
