"""Header-only planning of safetensors checkpoints, and every corrupt-header fault."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import devicemap

from model_strategies import describe, max_memories, models
from plan_checks import device_of

KINDS = ("llama", "mixtral", "t5")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["sequential", "balanced"])
@pytest.mark.parametrize("gpu_share", [0.34, 0.6])
def test_header_plan_places_every_weight_like_the_model_plan(tiny_checkpoints, kind, strategy, gpu_share):
    model, folder = tiny_checkpoints[kind]
    assert (folder / "model.safetensors.index.json").exists()  # really sharded
    total = devicemap.ModuleTree.from_module(model).total_bytes
    memory = {0: int(total * gpu_share), 1: int(total * gpu_share), "cpu": total, "disk": 0}
    # The instantiated model also holds non-persistent buffers (rotary tables) that no checkpoint
    # stores; with buffers offloaded they do not weigh on GPU 0's staging reserve, so both plans see
    # the same weights.
    from_headers = devicemap.plan_checkpoint(
        folder, max_memory=memory, strategy=strategy, offload_buffers=True
    )
    from_model = devicemap.plan(model, max_memory=memory, strategy=strategy, offload_buffers=True)
    for name in model.state_dict():
        assert device_of(name, from_headers.device_map) == device_of(name, from_model.device_map), name
    assert len(set(from_headers.device_map.values())) >= 2


def test_tied_head_missing_from_the_checkpoint_is_planned_with_the_embedding(tiny_checkpoints):
    model, folder = tiny_checkpoints["llama"]
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in names  # transformers drops the tied copy when saving
    tree = devicemap.checkpoint_tree(folder)
    assert tree.tied_groups == [["lm_head.weight", "model.embed_tokens.weight"]]
    saved = model.state_dict()
    not_saved = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in saved)
    assert not_saved > 0  # rotary tables are non-persistent
    assert tree.total_bytes == devicemap.ModuleTree.from_module(model).total_bytes - not_saved


def test_dtype_and_single_files(tiny_checkpoints, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_checkpoints["mixtral"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    full = devicemap.checkpoint_tree(tmp_path / "model.safetensors", block_pattern="model.layers.*")
    half = devicemap.checkpoint_tree(
        tmp_path / "model.safetensors", dtype="float16", block_pattern="model.layers.*"
    )
    assert full.total_bytes == 2 * half.total_bytes
    assert full.total_bytes == sum(v.numel() * v.element_size() for v in state.values())


def write_raw(path, header: bytes, data: int, length: int | None = None) -> None:
    size = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + header + b"\0" * data)


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (
            b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
            16,
            10_000,
            "larger than the file",
        ),
        (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]', 16, None, "malformed JSON"),
        (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}', 16, None, "out of range"),
        (
            b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},'
            b' "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}',
            24,
            None,
            "overlap",
        ),
        (b'{"w": {"dtype": "F17", "shape": [4], "data_offsets": [0, 16]}}', 16, None, "unknown dtype"),
        (b'{"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}', 16, None, "does not match"),
        (b'{"w": {"dtype": "F32", "shape": [4]}}', 16, None, "data_offsets"),
    ],
)
def test_corrupt_headers_raise_checkpoint_errors(tmp_path, header, data, length, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data, length)
    with pytest.raises(devicemap.CheckpointError, match=message) as info:
        devicemap.plan_checkpoint(path, max_memory={"cpu": "1GiB"})
    assert "bad.safetensors" in str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(devicemap.CheckpointError, match="truncated"):
        devicemap.checkpoint_tree(path)


def test_missing_shard_and_bad_index(tiny_checkpoints, tmp_path):
    _, folder = tiny_checkpoints["llama"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards[1:]:
        (tmp_path / shard).write_bytes((folder / shard).read_bytes())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        devicemap.CheckpointError, match=f'shard "{shards[0]}" listed in the index is missing'
    ):
        devicemap.plan_checkpoint(tmp_path, max_memory={"cpu": "1GiB"})
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(devicemap.CheckpointError, match="weight_map"):
        devicemap.checkpoint_tree(tmp_path)
    with pytest.raises(devicemap.CheckpointError, match="no such file"):
        devicemap.checkpoint_tree(tmp_path / "nothing-here")


@settings(
    max_examples=int(os.environ.get("DEVICEMAP_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), model=models(max_ties=0))
def test_header_trees_plan_random_models_like_the_models(tmp_path, data, model):
    """Random nested models (buffers removed: a checkpoint cannot tell them from parameters), saved as
    safetensors: planning from the headers puts every weight where planning the model does."""
    from safetensors.torch import save_file

    for module in model.modules():
        module._buffers.clear()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assume(state)
    note(describe(model))
    path = tmp_path / f"random-{data.draw(st.integers(0, 10**9))}.safetensors"
    save_file(state, path)
    memory = data.draw(max_memories(model))
    memory["disk"] = 0
    strategy = data.draw(st.sampled_from(devicemap.STRATEGIES))
    try:
        from_model = devicemap.plan(model, max_memory=memory, strategy=strategy, no_split_module_classes=[])
    except devicemap.DoesNotFitError:
        with pytest.raises(devicemap.DoesNotFitError):
            devicemap.plan_checkpoint(path, max_memory=memory, strategy=strategy)
        return
    from_headers = devicemap.plan_checkpoint(path, max_memory=memory, strategy=strategy)
    for name in state:
        assert device_of(name, from_headers.device_map) == device_of(name, from_model.device_map), name


def test_workload_from_the_checkpoint_config_matches_the_model(tiny_checkpoints):
    model, folder = tiny_checkpoints["llama"]
    workload = devicemap.Workload(batch_size=2, seq_len=64, kv_dtype="float32")
    memory = {0: "1MiB", 1: "1MiB", "cpu": "1GiB"}
    from_headers = devicemap.plan_checkpoint(folder, max_memory=memory, workload=workload, dtype="float32")
    from_model = devicemap.plan(model, max_memory=memory, workload=workload, dtype="float32")
    for header_usage, model_usage in zip(from_headers.usage, from_model.usage, strict=False):
        assert header_usage.runtime == model_usage.runtime, header_usage.device
    assert sum(u.runtime for u in from_headers.usage) > 0
    with pytest.raises(devicemap.CheckpointError, match="config.json"):
        devicemap.plan_checkpoint(folder, max_memory=memory, workload=workload, config={})


@pytest.mark.parametrize("count", [-3, 2**64, 10**30])
def test_layer_counts_no_layer_list_can_have_are_ignored(tmp_path, count):
    # A config.json count below zero or past the core's 64-bit counters names no layer list: it is
    # ignored (the plan is the one without a config), never an OverflowError from the conversion.
    from safetensors.torch import save_file

    save_file({f"model.layers.{i}.weight": torch.zeros(8) for i in range(3)}, tmp_path / "model.safetensors")
    memory = {"cpu": "1GiB"}
    plan = devicemap.plan_checkpoint(tmp_path, max_memory=memory, config={"num_hidden_layers": count})
    assert plan.device_map == devicemap.plan_checkpoint(tmp_path, max_memory=memory, config={}).device_map
