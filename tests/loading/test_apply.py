"""Plans applied for real on the CPU: checkpoints loaded with parts on CPU and disk, rehearsed 2- and
4-GPU plans, dispatch of in-memory models, transformers loading; outputs equal the unsplit model."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import devicemap

KINDS = ("llama", "mixtral", "t5")


def inputs_for(model: torch.nn.Module) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (2, 7), generator=generator)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    batch = inputs_for(model)
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(input_ids=batch["input_ids"], max_new_tokens=4, do_sample=False)
    return logits, tokens


def empty_like(model: torch.nn.Module) -> torch.nn.Module:
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    with init_empty_weights():
        empty = auto.from_config(model.config)
    empty.tie_weights()
    return empty.eval()


def assert_same(model, loaded) -> None:
    want_logits, want_tokens = outputs(model)
    got_logits, got_tokens = outputs(loaded)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


def largest_block(folder) -> int:
    everything = devicemap.plan_checkpoint(folder, max_memory={"cpu": "1GiB"})
    return max(everything.block_bytes(name) for name in everything.assignments)


def memory(folder, gpus: int) -> dict:
    """About one block per GPU (GPU 0 also stages offloaded ones), one on the CPU, the rest on disk."""
    block = largest_block(folder)
    sizes = {g: int(block * 1.05) for g in range(gpus)}
    sizes[0] += block
    return {**sizes, "cpu": int(block * 1.05), "disk": 0}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gpus", [2, 4])
def test_checkpoint_loaded_on_gpus_cpu_and_disk_matches_the_model(tiny_checkpoints, tmp_path, kind, gpus):
    model, folder = tiny_checkpoints[kind]
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, gpus), strategy="sequential")
    placed = set(plan.device_map.values())
    assert len(placed & set(range(gpus))) == gpus, plan  # every GPU of the plan holds layers
    assert {"cpu", "disk"} <= placed or gpus == 4, plan
    loaded = devicemap.load_checkpoint(
        empty_like(model), folder, plan, offload_dir=tmp_path, rehearse=True, progress=False
    )
    assert_same(model, loaded)
    assert not list(tmp_path.iterdir())  # disk weights were read in place, nothing written


def test_rehearsal_keeps_the_hook_layout(tiny_checkpoints):
    model, folder = tiny_checkpoints["llama"]
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, 2))
    loaded = devicemap.load_checkpoint(empty_like(model), folder, plan, rehearse=True, progress=False)
    for name, device in plan.device_map.items():
        hooks = [getattr(m, "_hf_hook", None) for m in loaded.get_submodule(name).modules()]
        streamed = any(getattr(h, "offload", False) for h in hooks)
        assert streamed == (device in ("cpu", "disk")), name  # GPU layers resident, others streamed in


def test_dtype_conversion_writes_disk_weights_atomically(tiny_checkpoints, tmp_path, monkeypatch):
    model, folder = tiny_checkpoints["llama"]
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, 2), dtype="float64")
    target = tmp_path / "offload"
    from devicemap.loading import offload_folder

    original = offload_folder.ConvertedWeights.write
    calls = {"n": 0}

    def failing(self, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted in the middle of writing
        return original(self, tensors)

    monkeypatch.setattr(offload_folder.ConvertedWeights, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        devicemap.load_checkpoint(
            empty_like(model),
            folder,
            plan,
            offload_dir=target,
            dtype="float64",
            rehearse=True,
            progress=False,
        )
    assert not list(target.iterdir())  # nothing a later load could trust
    monkeypatch.setattr(offload_folder.ConvertedWeights, "write", original)
    loaded = devicemap.load_checkpoint(
        empty_like(model), folder, plan, offload_dir=target, dtype="float64", rehearse=True, progress=False
    )
    assert len(list(target.glob("devicemap-converted-*/devicemap-offload.json"))) == 1
    logits, _ = outputs(loaded)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits.float(), outputs(model)[0], rtol=1e-4, atol=1e-4)


def test_dispatch_of_an_in_memory_model_matches(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["mixtral"]
    plan = devicemap.plan(model, max_memory=memory(folder, 4), strategy="balanced")
    dispatched = devicemap.dispatch(copy.deepcopy(model), plan, offload_dir=tmp_path / "off", rehearse=True)
    assert_same(model, dispatched)
    spills = devicemap.plan(model, max_memory=memory(folder, 1))
    assert "disk" in spills.device_map.values()
    with pytest.raises(devicemap.PlacementError, match="offload_dir"):
        devicemap.dispatch(copy.deepcopy(model), spills, rehearse=True)
    dispatched = devicemap.dispatch(
        copy.deepcopy(model), spills, offload_dir=tmp_path / "spill", rehearse=True
    )
    assert_same(model, dispatched)


def test_from_pretrained_with_a_devicemap_plan(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["llama"]
    total = devicemap.ModuleTree.from_module(model).total_bytes
    loaded = devicemap.from_pretrained(
        folder, max_memory={"cpu": total // 2, "disk": 0}, offload_dir=tmp_path / "off"
    )
    assert set(loaded.devicemap_plan.device_map.values()) == {"cpu", "disk"}
    assert_same(model, loaded.eval())


def test_loading_into_the_wrong_model_is_refused(tiny_checkpoints):
    model, folder = tiny_checkpoints["mixtral"]
    other, _ = tiny_checkpoints["llama"]
    plan = devicemap.plan_checkpoint(folder, max_memory={"cpu": "1GiB"})
    with pytest.raises(devicemap.CheckpointError, match="does not have"):
        devicemap.load_checkpoint(empty_like(other), folder, plan, progress=False)


def test_offloaded_layers_run_on_the_gpu_holding_the_staging_room():
    from devicemap.loading.apply import _main_device

    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    plan = devicemap.plan(
        model, max_memory={0: "20KiB", 1: "40KiB", "cpu": "1MiB"}, strategy="balanced_low_0"
    )
    assert plan.reserve_bytes.get(0) and 0 not in plan.device_map.values()  # GPU 0 only stages
    assert _main_device(plan, dict(plan.device_map)) == 0  # dispatch_map() would refuse GPUs absent here


def test_dispatch_map_is_the_storage_map_and_execution_map_its_old_name():
    """``dispatch_map`` hands accelerate where each block is stored; ``execution_map()``, its deprecated
    alias (it reads like ``Plan.execution_map``, where each block computes), still works and warns."""
    device_map = {"model.layers.0": "cuda:0", "model.layers.1": "cpu", "lm_head": "disk"}
    stored = devicemap.dispatch_map(device_map, rehearse=True)
    assert stored["model.layers.1"] == "cpu" and stored["lm_head"] == "disk"
    assert type(stored["model.layers.0"]).__name__ == "RehearsalDevice"
    with pytest.warns(DeprecationWarning, match="dispatch_map"):
        assert devicemap.execution_map(device_map, rehearse=True).keys() == stored.keys()
