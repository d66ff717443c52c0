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
