"""load_checkpoint on MoE checkpoints as transformers 5 saves them: per-expert names on disk
(``experts.0.w1.weight``, ``experts.0.gate_proj.weight``, ...) that transformers fuses into
``experts.gate_up_proj`` / ``experts.down_proj`` while loading. Tiny models built from configs with random
weights; each split between the CPU and the disk must give the logits transformers gives unsplit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import devicemap

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
safetensors = pytest.importorskip("safetensors")

from accelerate import init_empty_weights  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "MixtralConfig") or int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 5 fuses MoE experts on load",
)

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {**SMALL, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **SMALL,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
}
IDS = torch.tensor([[1, 5, 9, 33, 64, 100, 127]])
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _save(kind: str, folder: Path, **save: Any) -> Path:
    config_class, fields = CONFIGS[kind]
    config = getattr(transformers, config_class)(**fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, **save)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    folders = {kind: _save(kind, root / kind) for kind in CONFIGS}
    folders["mixtral-sharded"] = _save("mixtral", root / "mixtral-sharded", max_shard_size="100KB")
    return folders


def _names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            names |= set(handle.keys())
    return names


def _meta(folder: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _reference(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)(IDS).logits


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _manifest(offload_dir: Path) -> dict[str, Any]:
    folders = sorted(offload_dir.iterdir())
    assert [f.name.startswith("devicemap-converted-") for f in folders] == [True], folders
    manifest: dict[str, Any] = json.loads((folders[0] / "devicemap-offload.json").read_text())
    return manifest


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe", "mixtral-sharded"])
def test_moe_checkpoint_split_between_cpu_and_disk_gives_the_unsplit_logits(
    saved: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    folder = saved[kind]
    names = _names(folder)
    # What transformers 5 writes: per-expert tensors, not the fused ones its modules hold.
    assert any(".experts.0." in name for name in names)
    assert not any(name.endswith(FUSED) for name in names)
    if kind.endswith("sharded"):
        assert len(list(folder.glob("*.safetensors"))) > 1
    before = _snapshot(folder)
    meta = _meta(folder)
    plan = devicemap.plan(meta, max_memory={"cpu": "2MiB", "disk": 0}, pins={"model.layers.1": "disk"})
    assert plan.device_map["model.layers.0"] == "cpu" and plan.device_map["model.layers.1"] == "disk"

    model = devicemap.load_checkpoint(meta, folder, plan, offload_dir=tmp_path, progress=False)

    assert torch.equal(_logits(model), _reference(folder))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "cpu"
    # Only the fused disk experts are written, into devicemap's own folder; the disk layer's other
    # weights (renamed ones included, e.g. Mixtral's block_sparse_moe.gate) stream from the checkpoint.
    written = set(_manifest(tmp_path)["tensors"])
    assert written == {f"model.layers.1.{name}" for name in FUSED}
    assert _snapshot(folder) == before


@pytest.mark.parametrize(("kind", "cpu"), [("mixtral", "600KiB"), ("qwen3_moe", "375KiB")])
def test_tight_budget_plan_from_the_checkpoint_headers_loads_the_moe_checkpoint(
    saved: dict[str, Path], tmp_path: Path, kind: str, cpu: str
) -> None:
    folder = saved[kind]
    meta = _meta(folder)
    # Room for the embeddings and one layer staged at a time: every layer goes to the disk.
    plan = devicemap.plan_checkpoint(folder, max_memory={"cpu": cpu, "disk": 0})
    modules = {name for name, _ in meta.named_modules()}
    # The header-only plan names the model's own modules, not the checkpoint's per-expert ones.
    assert set(plan.device_map) <= modules
    assert {"cpu", "disk"} <= set(plan.device_map.values())

    model = devicemap.load_checkpoint(meta, folder, plan, offload_dir=tmp_path, progress=False)

    assert torch.equal(_logits(model), _reference(folder))
    written = set(_manifest(tmp_path)["tensors"])
    assert written == {f"model.layers.{i}.{name}" for i in range(2) for name in FUSED}


def test_moe_checkpoint_with_dtype_conversion_reuses_its_converted_folder(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    folder = saved["mixtral"]
    want = _reference(folder, torch.bfloat16)
    for _ in range(2):
        meta = _meta(folder)
        plan = devicemap.plan(meta, max_memory={"cpu": "2MiB", "disk": 0}, pins={"model.layers.1": "disk"})
        model = devicemap.load_checkpoint(
            meta, folder, plan, offload_dir=tmp_path, dtype="bfloat16", progress=False
        )
        assert torch.equal(_logits(model), want)
    manifest = _manifest(tmp_path)  # the second load reused the first one's folder
    layer1 = {name for name in manifest["tensors"] if name.startswith("model.layers.1.")}
    assert {f"model.layers.1.{name}" for name in FUSED} <= layer1


def test_disk_offloaded_fused_experts_need_an_offload_dir(saved: dict[str, Path]) -> None:
    folder = saved["qwen3_moe"]
    meta = _meta(folder)
    plan = devicemap.plan(meta, max_memory={"cpu": "2MiB", "disk": 0}, pins={"model.layers.1": "disk"})
    with pytest.raises(devicemap.OffloadFolderError, match="experts.*pass offload_dir="):
        devicemap.load_checkpoint(meta, folder, plan, progress=False)
    assert all(p.device.type == "meta" for p in meta.parameters())  # refused before reading a tensor


def test_without_transformers_conversion_api_the_error_names_the_version(
    saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved["mixtral"]
    meta = _meta(folder)
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # as transformers 4 has none
    with pytest.raises(devicemap.CheckpointError, match=r"transformers >= 5\.0"):
        devicemap.load_checkpoint(meta, folder, {"": "cpu"}, progress=False)


def test_checkpoint_names_transformers_cannot_place_are_still_refused(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bad"
    folder.mkdir()
    source = saved["qwen3_moe"]
    (folder / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.mlp.experts.0.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(devicemap.CheckpointError, match="1 tensors the model does not have.*extra_proj"):
        devicemap.load_checkpoint(_meta(folder), folder, {"": "cpu"}, progress=False)
    assert os.listdir(tmp_path) == ["bad"]
