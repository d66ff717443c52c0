"""Where each block executes: ``plan.execution_map`` and ``execution_device=``.

Blocks on a GPU run there; a block stored on the CPU or disk is staged on a GPU chosen by the planner
(GPU 0 when it has room, as accelerate stages), or runs on the CPU when no GPU can stage it.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import check_device_map, infer_auto_device_map

import devicemap
from devicemap.cli import main
from tiny_models import big_vocab_llama_config

from plan_checks import check_hooks_follow_the_plan


def stack(n: int, width: int = 256) -> torch.nn.Sequential:
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)])


LAYER = 256 * 256 * 4 + 256 * 4  # bytes of one Linear(256, 256) in float32


def big_vocab_llama():
    """A Llama whose untied embedding and head (32000 x 64, 8 MB each) are larger than any GPU below."""
    from transformers import LlamaForCausalLM

    config = big_vocab_llama_config()
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def runs_on(plan: devicemap.Plan, prefix: str) -> set:
    return {d for name, d in plan.execution_map.items() if name == prefix or name.startswith(prefix + ".")}


def test_an_embedding_larger_than_any_gpu_gets_a_plan_that_runs_it_on_the_cpu():
    model = big_vocab_llama()
    memory = {0: "4MB", 1: "4MB", "cpu": "1GiB"}
    # accelerate returns a map for this input, so devicemap must too: staging every offloaded block on
    # GPU 0 cannot work here (it would need 8.19 MB free there).
    assert infer_auto_device_map(
        model, max_memory=dict(memory), no_split_module_classes=model._no_split_modules
    )
    plan = devicemap.plan(model, memory)
    check_device_map(model, plan.device_map)
    assert set(plan.execution_map) == set(plan.assignments)
    assert runs_on(plan, "model.embed_tokens") == {"cpu"}
    assert runs_on(plan, "lm_head") == {"cpu"}
    # The embedding and head can never be on a GPU, so they are planned off the GPUs first: the decoder
    # layers after the embedding then stay on the GPUs instead of following it off (as a plain chain would).
    assert {plan.device_map[k] for k in plan.device_map if k.startswith("model.layers")} <= {0, 1}
    reasons = {o.name: o.reason for o in plan.offloaded}
    assert "larger than every GPU" in reasons["model.embed_tokens"]
    assert "runs on the CPU: no GPU can stage its" in reasons["model.embed_tokens"]
    assert "runs on the CPU" in plan.explain()

    # Pinning the embedding to the CPU keeps the layers on the GPUs; the head still runs on the CPU.
    pinned = devicemap.plan(model, memory, pins={"model.embed_tokens": "cpu"})
    check_device_map(model, pinned.device_map)
    assert {pinned.device_map[k] for k in pinned.device_map if k.startswith("model.layers")} <= {0, 1}
    assert runs_on(pinned, "model.embed_tokens") == {"cpu"}
    assert runs_on(pinned, "lm_head") == {"cpu"}
    assert not any(pinned.reserve_bytes.values())
    assert pinned.device_map == plan.device_map  # what devicemap does by itself


def test_a_small_gpu0_leaves_the_staging_reserve_to_gpu1():
    model = stack(8)
    memory = {0: LAYER // 2, 1: 6 * LAYER, "cpu": "1GiB"}  # GPU 0 cannot stage a layer
    plan = devicemap.plan(model, memory)
    check_device_map(model, plan.device_map)
    usage = {u.device: u for u in plan.usage}
    assert usage[0].reserve == 0
    assert usage[1].reserve == LAYER
    assert [plan.device_map[str(i)] for i in range(8)] == [1] * 5 + ["cpu"] * 3
    assert {plan.execution_map[str(i)] for i in range(5, 8)} == {1}
    assert all(o.reason.endswith("; runs on GPU 1") for o in plan.offloaded)
    for u in plan.usage:
        assert u.capacity is None or u.used <= u.capacity


def test_execution_device_forces_where_offloaded_blocks_run():
    model = stack(8)
    memory = {0: 3 * LAYER + 64, 1: 3 * LAYER + 64, "cpu": "1GiB"}
    default = devicemap.plan(model, memory)
    assert default.reserve_bytes == {0: LAYER}
    offloaded = [o.name for o in default.offloaded]
    assert offloaded and {default.execution_map[n] for n in offloaded} == {0}

    for key in (1, "cuda:1", "1"):
        on_1 = devicemap.plan(model, memory, execution_device=key)
        assert on_1.reserve_bytes == {1: LAYER}
        assert {on_1.execution_map[o.name] for o in on_1.offloaded} == {1}

    on_cpu = devicemap.plan(model, memory, execution_device="cpu")
    assert on_cpu.reserve_bytes == {}
    assert {on_cpu.execution_map[o.name] for o in on_cpu.offloaded} == {"cpu"}
    # Without a staging reserve, one more layer stays on the GPUs.
    assert len(on_cpu.offloaded) == len(default.offloaded) - 1
    assert all("runs on the CPU" in o.reason for o in on_cpu.offloaded)
    # GPU-resident blocks always run where they are.
    for name, device in on_cpu.assignments.items():
        if device not in ("cpu", "disk"):
            assert on_cpu.execution_map[name] == device

    with pytest.raises(devicemap.UnknownDeviceError, match="execution_device 5 is not a device"):
        devicemap.plan(model, memory, execution_device=5)
    with pytest.raises(devicemap.UnknownDeviceError, match="cannot execute offloaded blocks"):
        devicemap.plan(model, memory, execution_device="disk")


# Recorded maps for inputs where GPU 0 can stage every offloaded block: there the plan is exactly the
# one of staging everything on GPU 0 (accelerate's rule), and every offloaded block runs on GPU 0.
UNCHANGED = [
    (8, {0: 3 * LAYER + 64, 1: 3 * LAYER + 64, "cpu": "1GiB"}, "auto", "OLD_0"),
    (8, {0: 4 * LAYER, "cpu": 2 * LAYER, "disk": 0}, "auto", "OLD_1"),
    (6, {0: 2 * LAYER, 1: 2 * LAYER, 2: 2 * LAYER, "cpu": "1GiB"}, "balanced_low_0", "OLD_2"),
    (8, {0: 2 * LAYER, 1: 5 * LAYER, "cpu": "1GiB"}, "sequential", "OLD_3"),
]


OLD = {
    "OLD_0": ({"0": 0, "1": 0, "2": 1, "3": 1, "4": 1, "5": "cpu", "6": "cpu", "7": "cpu"}, {0: LAYER}),
    "OLD_1": (
        {"0": 0, "1": 0, "2": 0, "3": "cpu", "4": "cpu", "5": "disk", "6": "disk", "7": "disk"},
        {0: LAYER},
    ),
    "OLD_2": ({"0": 0, "1": 0, "2": 1, "3": 1, "4": 2, "5": 2}, {}),
    "OLD_3": ({"0": 0, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": "cpu", "7": "cpu"}, {0: LAYER}),
}


@pytest.mark.parametrize("layers, memory, strategy, expected", UNCHANGED)
def test_plans_that_worked_before_are_unchanged(layers, memory, strategy, expected):
    model = stack(layers)
    plan = devicemap.plan(model, memory, strategy=strategy)
    device_map, reserve = OLD[expected]
    assert plan.device_map == device_map
    assert plan.reserve_bytes == reserve
    first_gpu = next(u.device for u in plan.usage if u.device not in ("cpu", "disk"))
    for name, device in plan.assignments.items():
        assert plan.execution_map[name] == (first_gpu if device in ("cpu", "disk") else device)
    assert not any("runs on" in o.reason for o in plan.offloaded)
    assert (
        devicemap.plan(model, memory, strategy=strategy, execution_device=first_gpu).device_map == device_map
    )


def test_plan_json_lists_the_execution_map(capsys):
    args = ["plan", "llama-3.2-1b", "--gpus", "1x1GiB", "--cpu", "8GiB", "--dtype", "bf16"]
    code = main([*args, "--execution-device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out)
    assert printed["inputs"]["execution_device"] == "cpu"
    offloaded = {o["name"] for o in printed["offloaded"]}
    assert offloaded and all(printed["execution_map"][n] == "cpu" for n in offloaded)


def test_a_block_no_gpu_can_hold_does_not_drag_the_layers_after_it_off_the_gpus():
    # gemma-2-9b's 1.7 GiB embedding is larger than each 1.5 GiB GPU: the embedding alone is planned off
    # the GPUs, not the whole chain from it on (which would leave the GPUs empty).
    from devicemap import catalog

    model = catalog.build_meta_model("gemma-2-9b")
    memory = {0: "1.5GiB", 1: "1.5GiB", 2: "1.5GiB", 3: "1.5GiB", "cpu": "64GiB"}
    plan = devicemap.plan(model, memory, dtype="bfloat16")
    on_gpus = sum(u.weights for u in plan.usage if isinstance(u.device, int))
    assert on_gpus > 4 * 1.4 * 2**30
    assert plan.assignments["model.embed_tokens"] == "cpu"
    assert "larger than every GPU" in {o.name: o.reason for o in plan.offloaded}["model.embed_tokens"]
    # a user's pin of the embedding to a GPU is kept (and refused there), never overridden
    with pytest.raises(devicemap.DoesNotFitError):
        devicemap.plan(model, memory, dtype="bfloat16", pins={"model.embed_tokens": 0})


def small_bert():
    """A small BERT masked LM with real weights: the word embedding is tied with the decoder (and the
    decoder's bias with ``cls.predictions.bias``), so embedding, bias and decoder are one tie group."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=4000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return BertForMaskedLM(config).eval()


def test_tied_groups_staged_elsewhere_run_on_the_cpu_or_past_the_cpu_rehearse_to_the_unsplit_logits(tmp_path):
    """Where the tied weights live and which device computes them, as accelerate's hooks run
    the plan (a CPU rehearsal: each hook computes where the plan says, the logits are the unsplit
    model's)."""
    import copy

    model = small_bert()
    ids = torch.randint(3, 4000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    tree = devicemap.ModuleTree.from_module(model)
    group = tree.module_bytes("bert.embeddings") + tree.module_bytes("cls.predictions.bias")
    layer = tree.module_bytes("bert.encoder.layer.0")
    transform = tree.module_bytes("cls.predictions.transform")
    roomy = {0: 3 * layer, 1: 2 * group, "cpu": tree.total_bytes}
    plans = {
        # the transform after the last layer fits only in room left on GPU 0 (no refusal)
        "tail": devicemap.plan(
            model, {0: layer - 1, 1: group + layer + transform // 2, "cpu": 3 * layer + transform // 2}
        ),
        # the tied group stored on the CPU, staged on GPU 1 (both tied blocks load the shared weight there)
        "staged on 1": devicemap.plan(model, roomy, pins={"bert.embeddings": "cpu"}, execution_device=1),
        # the tied group computed on the CPU where its weights are
        "on the cpu": devicemap.plan(model, roomy, pins={"bert.embeddings": "cpu"}, execution_device="cpu"),
    }
    assert plans["tail"].device_map["cls.predictions.transform"] == 0
    assert plans["tail"].reserve_bytes == {}
    tied = ("bert.embeddings", "cls.predictions.decoder", "cls.predictions.bias")
    assert {plans["staged on 1"].execution_map[b] for b in tied} == {1}
    assert plans["staged on 1"].reserve_bytes[1] >= tree.module_bytes("bert.embeddings")
    assert {plans["on the cpu"].execution_map[b] for b in tied} == {"cpu"}
    for name, plan in plans.items():
        placed = devicemap.dispatch(copy.deepcopy(model), plan, rehearse=True, offload_dir=tmp_path / name)
        check_hooks_follow_the_plan(placed, plan)
        with torch.no_grad():
            logits = placed(input_ids=ids).logits
        assert torch.allclose(logits, expected, atol=1e-6), name
