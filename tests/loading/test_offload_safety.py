"""Offload folders never lose a user's files, never mix two models' weights, and never keep the
leftovers of killed loads; loads refuse bad folders and incomplete checkpoints before reading a tensor."""

from __future__ import annotations

import copy
import gc
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate import init_empty_weights
from test_apply import assert_same, empty_like, memory, outputs

import devicemap
from conftest import _tiny_configs


def load_converted(model, folder, offload_dir, **options):
    """Load with the disk part converted to float64, so weights are written to ``offload_dir``."""
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, 2), dtype="float64")
    assert "disk" in plan.device_map.values(), plan
    return devicemap.load_checkpoint(
        empty_like(model),
        folder,
        plan,
        offload_dir=offload_dir,
        dtype="float64",
        rehearse=True,
        progress=False,
        **options,
    )


def assert_close_to(model, loaded) -> None:
    logits, _ = outputs(loaded)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits.float(), outputs(model)[0], rtol=1e-4, atol=1e-4)


def user_files(folder) -> dict:
    """What a user keeps in a folder: a file, a hidden file, a sub-folder with a file, an index.json."""
    (folder / "sub").mkdir(parents=True)
    files = {
        folder / "notes.txt": "mine",
        folder / ".hidden": "also mine",
        folder / "sub" / "data.bin": "keep me",
        folder / "index.json": "{}",
    }
    for path, text in files.items():
        path.write_text(text)
    return files


def assert_kept(files: dict) -> None:
    for path, text in files.items():
        assert path.read_text() == text, path


def another_llama(tmp_path):
    """A second checkpoint of the same architecture with different random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(_tiny_configs()["llama"]).eval()
    model.tie_weights()
    folder = tmp_path / "other-llama"
    model.save_pretrained(folder, max_shard_size="100KB", safe_serialization=True)
    return model, folder


def test_a_converting_load_keeps_the_users_files(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["llama"]
    offload = tmp_path / "offload"
    files = user_files(offload)
    assert_close_to(model, load_converted(model, folder, offload))
    assert_kept(files)
    assert len(list(offload.glob("devicemap-converted-*"))) == 1
    assert not [p for p in tmp_path.iterdir() if p != offload]  # nothing renamed beside it


def test_offload_dir_set_to_the_working_directory_keeps_it(tiny_checkpoints, tmp_path, monkeypatch):
    model, folder = tiny_checkpoints["llama"]
    work = tmp_path / "work"
    files = user_files(work)
    monkeypatch.chdir(work)
    assert_close_to(model, load_converted(model, folder, os.getcwd()))
    assert os.getcwd() == str(work) and work.is_dir()
    assert_kept(files)


def test_an_offload_dir_that_is_a_file_is_refused_and_untouched(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["llama"]
    path = tmp_path / "offload"
    path.write_text("a file of mine")
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, 2), dtype="float64")
    empty = empty_like(model)
    with pytest.raises(devicemap.OffloadFolderError, match="is an existing file"):
        devicemap.load_checkpoint(
            empty, folder, plan, offload_dir=path, dtype="float64", rehearse=True, progress=False
        )
    assert all(p.is_meta for p in empty.parameters())  # refused before any tensor was loaded
    spills = devicemap.plan(model, max_memory=memory(folder, 1))
    with pytest.raises(devicemap.OffloadFolderError, match="is an existing file"):
        devicemap.dispatch(copy.deepcopy(model), spills, offload_dir=path, rehearse=True)
    assert path.read_text() == "a file of mine"
    assert list(tmp_path.iterdir()) == [path]  # not renamed, nothing beside it


def test_an_offload_dir_that_cannot_be_created_is_refused_before_loading(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["llama"]
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, 2), dtype="float64")
    empty = empty_like(model)
    with pytest.raises(devicemap.OffloadFolderError, match="cannot be created"):
        devicemap.load_checkpoint(
            empty,
            folder,
            plan,
            offload_dir=blocker / "offload",
            dtype="float64",
            rehearse=True,
            progress=False,
        )
    assert all(p.is_meta for p in empty.parameters())
    assert blocker.read_text() == "mine" and list(tmp_path.iterdir()) == [blocker]


def test_two_checkpoints_loaded_into_one_offload_dir_keep_their_own_weights(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["llama"]
    other, other_folder = another_llama(tmp_path)
    offload = tmp_path / "offload"
    first = load_converted(model, folder, offload)
    second = load_converted(other, other_folder, offload)
    assert_close_to(model, first)  # still its own disk weights after the second load
    assert_close_to(other, second)
    assert len(list(offload.glob("devicemap-converted-*"))) == 2


def test_loads_of_one_checkpoint_share_one_complete_folder(tiny_checkpoints, tmp_path, monkeypatch):
    import safetensors.torch

    model, folder = tiny_checkpoints["llama"]
    offload = tmp_path / "offload"
    save_file = safetensors.torch.save_file
    concurrent = []

    def save_while_another_load_runs(*args, **kwargs):
        save_file(*args, **kwargs)
        if not concurrent:  # a second load of the same content runs to the end meanwhile
            concurrent.append(None)
            concurrent[0] = load_converted(model, folder, offload)

    monkeypatch.setattr(safetensors.torch, "save_file", save_while_another_load_runs)
    first = load_converted(model, folder, offload)
    assert_close_to(model, first)
    assert_close_to(model, concurrent[0])
    assert [p.name.startswith("devicemap-converted-") for p in offload.iterdir()] == [True]

    def no_save(*args, **kwargs):
        raise AssertionError("a complete folder for the same content is reused, not rewritten")

    monkeypatch.setattr(safetensors.torch, "save_file", no_save)
    assert_close_to(model, load_converted(model, folder, offload))


def test_a_checkpoint_replaced_with_its_modification_time_kept_is_converted_again(tiny_checkpoints, tmp_path):
    """``cp -p`` / ``rsync -a`` / ``tar x`` of another checkpoint of the same architecture over the first keeps
    every size and modification time: the first's converted disk weights must not be reused, mixed into
    the second's CPU weights (wrong outputs, no error)."""
    import shutil

    model, original = tiny_checkpoints["llama"]
    folder = tmp_path / "ckpt"
    shutil.copytree(original, folder)
    offload = tmp_path / "offload"
    assert_close_to(model, load_converted(model, folder, offload))
    other, other_folder = another_llama(tmp_path)
    shards = sorted(folder.glob("*.safetensors"))
    assert [p.stat().st_size for p in shards] == [(other_folder / p.name).stat().st_size for p in shards]
    for shard in shards:
        kept = shard.stat()
        shutil.copyfile(other_folder / shard.name, shard)  # written in place, as cp -p does ...
        os.utime(shard, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # ... then its times restored
        assert shard.stat().st_mtime_ns == kept.st_mtime_ns and shard.stat().st_size == kept.st_size
    assert_close_to(other, load_converted(other, folder, offload))
    assert len(list(offload.glob("devicemap-converted-*"))) == 2


KILLED_LOAD = textwrap.dedent(
    """
    import ast, sys, time
    import devicemap
    import safetensors.torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, offload, max_memory = sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.tie_weights()
    plan = devicemap.plan_checkpoint(folder, max_memory=max_memory, dtype="float64")
    save_file = safetensors.torch.save_file

    def save_then_wait(*args, **kwargs):
        save_file(*args, **kwargs)
        print("written", flush=True)
        time.sleep(600)  # killed here, in the middle of the load

    safetensors.torch.save_file = save_then_wait
    devicemap.load_checkpoint(
        model, folder, plan, offload_dir=offload, dtype="float64", rehearse=True, progress=False
    )
    """
)


def test_a_killed_load_leaves_nothing_after_the_next_load(tiny_checkpoints, tmp_path):
    model, folder = tiny_checkpoints["llama"]
    offload = tmp_path / "offload"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_LOAD, str(folder), str(offload), repr(memory(folder, 2))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line == "written\n", line or child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert [p for p in tmp_path.rglob(".*partial*") if p.is_dir()]  # the killed load's, left behind
    unrelated = [offload / ".cache", offload / ".devicemap-partial-mine", tmp_path / ".other"]
    for path in unrelated:
        path.mkdir(parents=True)
        (path / "file").write_text("mine")

    assert_close_to(model, load_converted(model, folder, offload))
    hidden = {p for p in tmp_path.rglob(".*") if p.is_dir()}
    assert hidden == set(unrelated)  # the killed load's staging folder is gone, nothing else
    assert all((path / "file").read_text() == "mine" for path in unrelated)


def test_a_missing_offload_dir_is_reported_before_any_tensor_loads(tiny_checkpoints):
    model, folder = tiny_checkpoints["llama"]
    plan = devicemap.plan_checkpoint(folder, max_memory=memory(folder, 2), dtype="float64")
    empty = empty_like(model)
    with pytest.raises(devicemap.OffloadFolderError, match="offload_dir="):
        devicemap.load_checkpoint(empty, folder, plan, dtype="float64", rehearse=True, progress=False)
    assert all(p.is_meta for p in empty.parameters())


def test_a_checkpoint_missing_tensors_is_refused_up_front(tiny_checkpoints, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_checkpoints["llama"]
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    dropped = ["model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if k not in dropped}, partial)
    plan = devicemap.plan(model, max_memory={"cpu": "1GiB"})
    empty = empty_like(model)
    with pytest.raises(devicemap.CheckpointError) as refused:
        devicemap.load_checkpoint(empty, partial, plan, progress=False)
    message = str(refused.value)
    assert str(partial) in message and "lacks 2 " in message
    assert all(name in message for name in dropped)
    assert all(p.is_meta for p in empty.parameters())


class SharedHead(torch.nn.Module):
    """A plain module with a parameter shared by two layers and a persistent buffer with a value."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 8, bias=False)
        self.mid = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 8, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((8,), 2.0))

    def forward(self, x):
        return self.head(self.mid(self.embed(x))) * self.scale


def empty_shared_head() -> SharedHead:
    with init_empty_weights():
        empty = SharedHead().eval()  # buffers keep their values, parameters are on meta
    empty.head.weight = empty.embed.weight  # accelerate's empty init re-creates each parameter: tie again
    return empty


def test_tied_partners_and_buffers_with_values_are_not_missing(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = SharedHead().eval()
    stored = {"embed.weight": model.embed.weight, "mid.weight": model.mid.weight, "mid.bias": model.mid.bias}
    checkpoint = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in stored.items()}, checkpoint)
    empty = empty_shared_head()
    plan = devicemap.plan(empty, max_memory={"cpu": "1GiB"})
    loaded = devicemap.load_checkpoint(empty, checkpoint, plan, progress=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

    del stored["mid.bias"]
    save_file({k: v.detach().contiguous() for k, v in stored.items()}, checkpoint)
    empty = empty_shared_head()
    with pytest.raises(devicemap.CheckpointError, match=r"lacks 1 .*mid\.bias"):
        devicemap.load_checkpoint(empty, checkpoint, plan, progress=False)


def spilling(model, block_bytes: int) -> devicemap.Plan:
    plan = devicemap.plan(model, max_memory={"cpu": block_bytes, "disk": 0})
    assert "disk" in plan.device_map.values(), plan
    return plan


def test_dispatches_into_one_offload_dir_keep_their_weights_and_the_users_files(tmp_path):
    def sequential(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)]).eval()

    offload = tmp_path / "offload"
    files = user_files(offload)
    models = [sequential(0), sequential(1)]
    plans = [spilling(m, 3000) for m in models]
    dispatched = [
        devicemap.dispatch(copy.deepcopy(m), p, offload_dir=offload)
        for m, p in zip(models, plans, strict=False)
    ]
    x = torch.randn(2, 16)
    with torch.no_grad():
        for model, placed in zip(models, dispatched, strict=False):
            torch.testing.assert_close(placed(x), model(x))
    assert_kept(files)
    assert len(list(offload.glob("devicemap-dispatch-*"))) == 2

    del dispatched, placed
    gc.collect()
    assert not list(offload.glob("devicemap-*"))  # each model's folder went with it
    assert_kept(files)


def test_from_pretrained_loads_into_one_offload_dir_keep_their_weights(tmp_path):
    from transformers import MixtralForCausalLM

    # Saved in the legacy per-expert layout: transformers re-saves the merged experts it offloads to
    # disk as <tensor name>.safetensors in its offload folder, the same names for both models.
    offload = tmp_path / "offload"
    files = user_files(offload)
    models, loaded = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(_tiny_configs()["mixtral"]).eval()
        folder = tmp_path / f"mixtral-{seed}"
        model.save_pretrained(folder, safe_serialization=True)
        total = devicemap.ModuleTree.from_module(model).total_bytes
        limits = {"cpu": total // 2, "disk": 0}
        models.append(model)
        loaded.append(devicemap.from_pretrained(folder, max_memory=limits, offload_dir=offload).eval())
    for model, placed in zip(models, loaded, strict=False):
        assert_same(model, placed)  # the first model still computes with its own disk weights
    assert_kept(files)
    del loaded, placed
    gc.collect()
    assert not list(offload.glob("devicemap-*"))  # each model's folder went with it
