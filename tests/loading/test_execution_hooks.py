"""Blocks compute where the plan says: dispatch / load_checkpoint attach
accelerate's hooks with each block's execution device. A CPU-stored block that runs on the CPU keeps its
weights in CPU memory (no offload hook, nothing streamed); a disk-stored one streams them into the CPU;
blocks planned on GPUs run on the rehearsal's stand-in GPU. Logits equal the unsplit model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import devicemap
from devicemap.loading.apply import RehearsalDevice
from devicemap.loading.execution_hooks import by_execution
from tiny_models import big_vocab_llama_config

INPUT = torch.tensor([[1, 5, 9, 31999, 7]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(big_vocab_llama_config()).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model(INPUT).logits
    return folder, expected


def meta_model() -> LlamaForCausalLM:
    from accelerate import init_empty_weights

    with init_empty_weights():  # weights on meta; buffers (rotary inv_freq) computed on the CPU
        return LlamaForCausalLM(big_vocab_llama_config()).eval()


def hook_device(module: torch.nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return None if hook is None else hook.execution_device


def check_hooks_follow_the_plan(model: torch.nn.Module, plan: devicemap.Plan) -> None:
    refined, runs_on = by_execution(plan.device_map, plan.execution_map)
    for key, device in runs_on.items():
        actual = hook_device(model.get_submodule(key))
        if device == "cpu" and type(device) is str:
            assert type(actual) is str and actual == "cpu", (key, actual)  # the CPU itself, not a stand-in
        else:
            assert isinstance(actual, RehearsalDevice), (key, actual)


def test_an_embedding_no_gpu_can_stage_runs_on_the_cpu_in_cpu_memory(saved):
    folder, expected = saved
    plan = devicemap.plan(meta_model(), {0: "4MB", 1: "4MB", "cpu": "1GiB"})
    assert (
        plan.execution_map["model.embed_tokens"] == "cpu" and plan.assignments["model.embed_tokens"] == "cpu"
    )
    model = devicemap.load_checkpoint(meta_model(), folder, plan, rehearse=True)
    check_hooks_follow_the_plan(model, plan)
    embed = model.model.embed_tokens
    assert embed.weight.device.type == "cpu"  # materialised in CPU memory, not meta: nothing is streamed
    assert not embed._hf_hook.offload
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)


def test_every_offloaded_block_on_the_cpu_from_memory_and_from_disk(saved, tmp_path):
    folder, expected = saved
    memory = {0: "8.3MB", "cpu": "8.5MB", "disk": 0}  # GPU 0: the embedding; the CPU: two layers
    plan = devicemap.plan(meta_model(), memory, execution_device="cpu")
    stored = set(plan.assignments.values())
    assert {"cpu", "disk"} <= stored and 0 in stored
    model = devicemap.load_checkpoint(meta_model(), folder, plan, rehearse=True, offload_dir=tmp_path)
    check_hooks_follow_the_plan(model, plan)
    for block, device in plan.assignments.items():
        leaves = [m for m in model.get_submodule(block).modules() if m._parameters]
        if device == "disk":  # streamed from disk into the CPU per forward: weights stay on meta
            assert all(m._hf_hook.offload and m._hf_hook.execution_device == "cpu" for m in leaves), block
            assert all(p.device.type == "meta" for m in leaves for p in m.parameters()), block
        if device == "cpu":  # kept in CPU memory and computed there: nothing streamed
            assert all(p.device.type == "cpu" for m in leaves for p in m.parameters()), block
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)


def test_dispatch_runs_cpu_executed_blocks_on_the_cpu(saved):
    folder, expected = saved
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    plan = devicemap.plan(meta_model(), {0: "4MB", "cpu": "1GiB"})
    assert "cpu" in plan.execution_map.values()
    dispatched = devicemap.dispatch(model, plan, rehearse=True)
    check_hooks_follow_the_plan(dispatched, plan)
    with torch.no_grad():
        assert torch.allclose(dispatched(INPUT).logits, expected, atol=1e-5)


def test_a_key_covering_blocks_that_run_on_different_devices_is_split():
    refined, runs_on = by_execution(
        {"model": "cpu", "lm_head": 0}, {"model.a": 0, "model.b": "cpu", "model.c": "cpu", "lm_head": 0}
    )
    assert refined == {"model.a": "cpu", "model.b": "cpu", "model.c": "cpu", "lm_head": 0}
    assert runs_on == {"model.a": 0, "model.b": "cpu", "model.c": "cpu", "lm_head": 0}
    # one execution device per key: kept as is
    assert by_execution({"model": "cpu"}, {"model.a": 0, "model.b": 0})[0] == {"model": "cpu"}


LAYER = 64 * 64 * 4 + 64 * 4  # bytes of one Linear(64, 64) in float32


def stack() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).eval()


@pytest.mark.parametrize(
    "memory",
    [{0: LAYER + 64, "cpu": "1MiB"}, {0: LAYER // 2, 1: LAYER + 64, "cpu": "1MiB"}],
    ids=["gpu0-stages", "gpu1-stages"],
)
def test_every_block_on_the_cpu_is_still_staged_on_the_planned_gpu(memory):
    # accelerate's dispatch_model attaches no hooks to a map whose only device is the CPU: it would move
    # the model there and run every block on the CPU instead of the GPU the plan stages it on.
    plan = devicemap.plan(stack(), memory)
    assert plan.device_map == {"": "cpu"} and len(set(plan.execution_map.values())) == 1
    assert "cpu" not in plan.execution_map.values()
    x = torch.ones(2, 64)
    expected = stack()(x)
    model = devicemap.dispatch(stack(), plan, rehearse=True)
    check_hooks_follow_the_plan(model, plan)
    assert all(layer._hf_hook.offload for layer in model)  # streamed from CPU memory, as planned
    with torch.no_grad():
        assert torch.allclose(model(x), expected)


def test_load_checkpoint_stages_a_cpu_only_map_on_the_gpu(saved):
    folder, expected = saved
    plan = devicemap.plan(meta_model(), {0: "8.5MB", "cpu": "1GiB"})
    assert set(plan.device_map.values()) == {"cpu"} and set(plan.execution_map.values()) == {0}
    model = devicemap.load_checkpoint(meta_model(), folder, plan, rehearse=True, progress=False)
    check_hooks_follow_the_plan(model, plan)
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)


def test_rehearsing_a_plan_that_offloads_every_block_to_one_gpu_runs_on_the_stand_in(tmp_path):
    # No GPU key in the map, one GPU stages everything: in a rehearsal the hooks must execute on the
    # stand-in, not on "cuda:0".
    plan = devicemap.plan(stack(), {0: LAYER + 64, "cpu": LAYER + 64, "disk": 0})
    assert 0 not in plan.device_map.values() and set(plan.execution_map.values()) == {0}
    x = torch.ones(2, 64)
    expected = stack()(x)
    model = devicemap.dispatch(stack(), plan, rehearse=True, offload_dir=tmp_path)
    assert all(isinstance(layer._hf_hook.execution_device, RehearsalDevice) for layer in model)
    with torch.no_grad():
        assert torch.allclose(model(x), expected)


def test_from_pretrained_follows_the_plans_execution_devices(saved, tmp_path):
    # transformers' loader runs every offloaded layer on one device; devicemap.from_pretrained loads through
    # load_checkpoint when the plan says otherwise (here: rehearsed, the embedding and head run on the CPU).
    folder, expected = saved
    model = devicemap.from_pretrained(
        folder, max_memory={0: "4MB", 1: "4MB", "cpu": "1GiB"}, rehearse=True, offload_dir=tmp_path
    )
    plan = model.devicemap_plan
    assert plan.execution_map["model.embed_tokens"] == "cpu"
    check_hooks_follow_the_plan(model, plan)
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits, expected, atol=1e-5)
    with pytest.raises(devicemap.InvalidOptionError, match="attn_implementation"):
        devicemap.from_pretrained(
            folder, max_memory={"cpu": "1GiB"}, rehearse=True, attn_implementation="eager"
        )
