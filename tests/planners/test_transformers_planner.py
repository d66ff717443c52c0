"""benches/transformers_planner.py returns the map transformers 5's own from_pretrained computes.

The benchmarks put transformers 5's planner in a column beside accelerate's; these tests check that
the column is what ``AutoModelForCausalLM.from_pretrained(path, device_map=..., max_memory=...)``
really does: a real load on CPU + disk (``hf_device_map``), and with GPU keys (no GPU here) the map
captured from inside from_pretrained's own call before it would move weights.
"""

from __future__ import annotations

import sys

import pytest
import torch

from repo import REPO
from tiny_models import tiny_llama_config

sys.path.insert(0, str(REPO / "benches"))

import transformers_planner as tp  # noqa: E402

pytestmark = pytest.mark.skipif(tp.unavailable_reason() is not None, reason=str(tp.unavailable_reason()))

STRATEGIES = ["auto", "balanced", "balanced_low_0", "sequential"]


@pytest.fixture(autouse=True)
def transformers_own_planner():
    """These tests are about transformers' own planner: devicemap's hooks (which ``DEVICEMAP=1`` may
    have installed at start-up) are taken out for each test and put back after it."""
    import devicemap.integrations as hooks

    was = hooks.is_installed()
    if was:
        hooks.uninstall()
    yield
    if was:
        hooks.install()


def test_from_pretrained_calls_the_function_we_call():
    import transformers.integrations.accelerate as ia
    import transformers.modeling_utils as mu

    assert mu._get_device_map is ia._get_device_map


def _config(tied: bool):

    return tiny_llama_config(vocab_size=1024, intermediate_size=160, tie_word_embeddings=tied)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def saved_llama(request, tmp_path_factory):
    """A tiny Llama saved as one safetensors file, with the fp32 meta model of the same config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(request.param)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("llama-tied" if request.param else "llama-untied")
    model.save_pretrained(folder, safe_serialization=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return folder, meta


def _layer_bytes(meta, dtype_bytes: int) -> int:
    return sum(p.numel() for p in meta.model.layers[0].parameters()) * dtype_bytes


def _devices(device_map: dict) -> set:
    return set(device_map.values())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cpu_layers", [3.5, 5.5])
def test_real_load_on_cpu_and_disk_matches(saved_llama, tmp_path, strategy, cpu_layers):
    """from_pretrained loads for real (CPU + disk offload); its hf_device_map is our function's map."""
    from transformers import AutoModelForCausalLM

    folder, meta = saved_llama
    memory = {"cpu": int(cpu_layers * _layer_bytes(meta, 2)), "disk": 10**9}
    loaded = AutoModelForCausalLM.from_pretrained(
        folder,
        device_map=strategy,
        max_memory=dict(memory),
        dtype=torch.bfloat16,
        offload_folder=str(tmp_path / "offload"),
    )
    # fp32 meta model + dtype: the function rebuilds it as from_pretrained does (bf16, untied)
    ours = tp.transformers_device_map(meta, memory, strategy, dtype="bfloat16")
    assert _devices(ours) == {"cpu", "disk"}, ours  # a real split, not a trivial {"": "cpu"}
    assert loaded.hf_device_map == ours


class _Planned(Exception):
    """Raised from inside from_pretrained once its device map is computed (no GPU to load onto)."""


def _from_pretrained_map(folder, strategy: str, memory: dict, monkeypatch) -> dict:
    """The map transformers' from_pretrained computes, captured from its own _get_device_map call."""
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM

    real = mu._get_device_map
    seen = {}

    def capture(model, device_map, max_memory, hf_quantizer):
        seen["map"] = real(model, device_map, max_memory, hf_quantizer)
        raise _Planned

    monkeypatch.setattr(mu, "_get_device_map", capture)
    with pytest.raises(_Planned):
        AutoModelForCausalLM.from_pretrained(
            folder, device_map=strategy, max_memory=dict(memory), dtype=torch.bfloat16
        )
    monkeypatch.setattr(mu, "_get_device_map", real)
    return seen["map"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("gpu_layers", [3.5, 4.5, 6.0])
def test_gpu_plans_match_from_pretrained(saved_llama, monkeypatch, strategy, gpu_layers):
    folder, meta = saved_llama
    layer = _layer_bytes(meta, 2)
    memory = {0: int(gpu_layers * layer), 1: int(gpu_layers * layer), "cpu": 100 * layer}
    expected = _from_pretrained_map(folder, strategy, memory, monkeypatch)
    ours = tp.transformers_device_map(meta, memory, strategy, dtype=torch.bfloat16)
    assert ours == expected
    if strategy != "balanced_low_0":
        assert {0, 1} <= _devices(ours), ours  # both GPUs used: the GPU rules were exercised


def test_differs_from_accelerate_where_transformers_rules_differ():
    """The column is not accelerate's under another name. Tied Llama, 2 GPUs of 6 layers each,
    "balanced": from transformers 5.18 its budget adds 1.25 x the biggest leaf (the 128 KiB embedding)
    to GPU 0, accelerate's 1.25 x the larger of one decoder layer and the mean leaf; so transformers
    keeps layers 0-2 on GPU 0 where accelerate keeps 0-1. transformers 5.0-5.17 budget as accelerate
    does, and keep 0-1 too (the tie rule, which differs in every 5.x, is checked below)."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    from devicemap.cli.compare import accelerate_device_map

    config = _config(tied=True)
    config.vocab_size = 1024
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layer = _layer_bytes(meta, 2)
    memory = {0: 6 * layer, 1: 6 * layer, "cpu": 100 * layer}
    ours = tp.transformers_device_map(meta, memory, "balanced", dtype="bfloat16")
    theirs = accelerate_device_map(meta, memory, "balanced", sorted(meta._no_split_modules), "bfloat16")
    biggest_leaf_budget = Version(transformers.__version__) >= Version("5.18")
    expected = [0, 0, 0, 1, 1, 1] if biggest_leaf_budget else [0, 0, 1, 1, 1, 1]
    assert [ours[f"model.layers.{i}"] for i in range(6)] == expected
    assert [theirs[f"model.layers.{i}"] for i in range(6)] == [0, 0, 1, 1, 1, 1]


def test_plain_module_with_overrides_leaves_it_unchanged():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, 16)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
            self.head = torch.nn.Linear(16, 100, bias=False)
            self.head.weight = self.embed.weight

    with torch.device("meta"):
        net = Net()
    memory = {0: 8000, 1: 8000, "cpu": 10**6}
    no_split = ["Linear"]
    keys = {"head.weight": "embed.weight"}
    got = tp.transformers_device_map(
        net, memory, "sequential", no_split_module_classes=no_split, tied_weights_keys=keys
    )
    assert got == {"embed": 0, "head": 0, "blocks": 1}  # the tie rule came from the keys
    # transformers 5 takes ties from the keys only: a tie by object identity alone is not kept together
    alone = tp.transformers_device_map(net, memory, "sequential", no_split_module_classes=no_split)
    assert alone == {"embed": 0, "head": 1, "blocks": 1}
    assert "_no_split_modules" not in net.__dict__ and "all_tied_weights_keys" not in net.__dict__


def test_refused_below_transformers_5(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    assert "transformers 4.57.1" in str(tp.unavailable_reason())
    with pytest.raises(tp.TransformersPlannerUnavailable, match=">= 5"):
        tp.transformers_device_map(torch.nn.Linear(2, 2), {"cpu": 100})


def test_unknown_strategy_refused(saved_llama):
    _, meta = saved_llama
    with pytest.raises(ValueError, match="strategy must be one of"):
        tp.transformers_device_map(meta, {"cpu": 10**9}, "fastest")
