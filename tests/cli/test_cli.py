"""The devicemap command, through a subprocess: output, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import devicemap
from devicemap import catalog


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "devicemap.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_plan_json_matches_the_library():
    out = run("plan", "llama-3-8b", "--gpus", "2x8GiB", "--cpu", "64GiB", "--dtype", "bfloat16", "--json")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    expected = devicemap.plan(
        catalog.build_meta_model("llama-3-8b"),
        max_memory={0: "8GiB", 1: "8GiB", "cpu": "64GiB"},
        dtype="bfloat16",
    )
    # JSON turns int keys into strings only for dict keys; device values keep their types.
    assert printed["device_map"] == expected.device_map
    assert [d["device"] for d in printed["devices"]] == [0, 1, "cpu"]
    assert [d["weights"] for d in printed["devices"]] == list(expected.device_bytes.values())


def test_plan_table_and_max_memory_spec():
    out = run("plan", "mixtral-8x7b", "--max-memory", "0=40GiB,1=40GiB,cpu=200GiB", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    assert "devicemap plan (balanced)" in out.stdout
    assert "offloaded" in out.stdout  # 87 GiB of weights on 80 GiB of GPUs


def test_models_lists_the_catalog():
    out = run("models")
    assert out.returncode == 0
    assert len(out.stdout.strip().splitlines()) == len(catalog.names())
    assert "llama-3-70b" in out.stdout


def test_unknown_model_suggests_and_exits_2():
    out = run("plan", "llama-3-80b", "--gpus", "1x80GiB")
    assert out.returncode == 2
    assert "did you mean" in out.stderr and "llama-3-8b" in out.stderr


def test_bad_size_exits_2():
    out = run("plan", "llama-3-8b", "--gpus", "2x24 GB")
    assert out.returncode == 2
    assert "24 GB" in out.stderr


def test_does_not_fit_exits_1_and_says_how_much():
    out = run("plan", "llama-3-70b", "--gpus", "2x24GiB", "--cpu", "16GiB", "--dtype", "bfloat16")
    assert out.returncode == 1
    assert 'add "disk"' in out.stderr and "GiB of weights" in out.stderr


def test_usage_error_exits_2():
    assert run("plan").returncode == 2


def test_plan_writes_an_svg_with_one_bar_per_device(tmp_path):
    import xml.etree.ElementTree as ET

    target = tmp_path / "plan.svg"
    out = run(
        "plan",
        "llama-3-70b",
        "--gpus",
        "4x24GiB",
        "--cpu",
        "128GiB",
        "--dtype",
        "bfloat16",
        "--out",
        str(target),
    )
    assert out.returncode == 0, out.stderr
    root = ET.fromstring(target.read_text())
    ns = "{http://www.w3.org/2000/svg}"
    bars = [g for g in root.iter(f"{ns}g") if g.get("class") == "device"]
    assert [g.get("data-device") for g in bars] == ["0", "1", "2", "3", "cpu"]
    blocks = [r for r in root.iter(f"{ns}rect") if r.get("class") == "block"]
    assert len(blocks) == 80 + 4  # every decoder layer, embedding, rotary embedding, final norm, head
    assert not list(tmp_path.glob("*.tmp"))


def test_plan_html_and_workload(tmp_path):
    target = tmp_path / "plan.html"
    out = run(
        "plan",
        "llama-3-8b",
        "--gpus",
        "2x10GiB",
        "--dtype",
        "bfloat16",
        "--batch",
        "2",
        "--seq-len",
        "2048",
        "--out",
        str(target),
    )
    assert out.returncode == 0, out.stderr
    runtime = [line.split()[2:4] for line in out.stdout.splitlines() if line[:1] in "01"]
    assert all(value != "0" for value, _ in runtime)  # KV cache and activations are planned on both GPUs
    assert "<svg" in target.read_text() and "devicemap plan" in target.read_text()
    assert run("plan", "llama-3-8b", "--gpus", "1x80GiB", "--out", str(tmp_path / "plan.png")).returncode == 2
    too_big = run(
        "plan", "llama-3-8b", "--gpus", "2x10GiB", "--dtype", "bfloat16", "--batch", "8", "--seq-len", "4096"
    )
    assert too_big.returncode == 1 and 'add "disk"' in too_big.stderr  # no CPU/disk: no staging talk


def test_compare_shows_both_sides():
    out = run("compare", "llama-3-8b", "--gpus", "2x8GiB", "--cpu", "64GiB", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    assert "devicemap balanced" in out.stdout and "accelerate balanced" in out.stdout
    offload_row = next(line for line in out.stdout.splitlines() if line.startswith("blocks off the GPUs"))
    assert offload_row.split()[-2:] == ["0", "1"]  # accelerate spills lm_head, devicemap fits
    assert "min GPU memory" in out.stdout


def test_export_targets():
    args = ("llama-3-8b", "--gpus", "2x10GiB", "--dtype", "bfloat16")
    vllm = run("export", *args, "--to", "vllm")
    assert vllm.returncode == 0 and 'VLLM_PP_LAYER_PARTITION="16,16"' in vllm.stdout
    cpp = run("export", *args, "--to", "llama.cpp")
    assert "--n-gpu-layers 32" in cpp.stdout and "--tensor-split 16,16" in cpp.stdout
    ds = run("export", *args, "--to", "deepspeed")
    assert "parts = [0, 16, 32]" in ds.stdout
    pp = run("export", *args, "--to", "pipelining")
    assert '"model.layers.16": SplitPoint.BEGINNING' in pp.stdout
    offloading = run(
        "export", "llama-3-8b", "--gpus", "1x8GiB", "--cpu", "64GiB", "--dtype", "bfloat16", "--to", "vllm"
    )
    assert offloading.returncode == 2 and "off the GPUs" in offloading.stderr


def test_plan_a_checkpoint_from_its_headers(tiny_checkpoints):
    model, folder = tiny_checkpoints["llama"]
    total = devicemap.ModuleTree.from_module(model).total_bytes
    out = run("plan", str(folder), "--max-memory", f"0={total // 2}B,1={total // 2}B,cpu=1GiB", "--json")
    assert out.returncode == 0, out.stderr
    expected = devicemap.plan_checkpoint(folder, max_memory={0: total // 2, 1: total // 2, "cpu": "1GiB"})
    assert json.loads(out.stdout)["device_map"] == expected.device_map
    broken = folder.parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "model.safetensors").write_bytes(b"\x10\x00")
    bad = run("plan", str(broken / "model.safetensors"), "--gpus", "1x1GiB")
    assert bad.returncode == 2 and "truncated" in bad.stderr


def test_demo_plans_the_default_and_writes_the_picture(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "devicemap.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "devicemap plan (balanced)" in out.stdout and "accelerate 'balanced'" in out.stdout
    assert (tmp_path / "devicemap-demo.svg").read_text().count('class="device"') == 3
