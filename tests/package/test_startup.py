"""``import devicemap`` and the command on a catalog model or a safetensors checkpoint load neither torch
nor transformers (nor accelerate): each runs in a fresh interpreter, which reports what it imported.
The time this saves is measured by benches/bench_cli_startup.py, not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "accelerate")
PROBE = """
import json, sys
{code}
print("@@" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def loaded(code: str, env: dict[str, str] | None = None) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
        capture_output=True,
        text=True,
        env={**os.environ, "DEVICEMAP": "", **(env or {})},
        timeout=300,  # a hang guard, not a speed check
        check=False,
    )
    assert result.returncode == 0, result.stderr
    marker = next(line for line in result.stdout.splitlines() if line.startswith("@@"))
    return json.loads(marker[2:])


def command(*args: str) -> str:
    """Code running the command in-process (its exit code must be 0), as the console script does."""
    return f"from devicemap.cli import main\nassert main({list(args)!r}) == 0"


def test_import_devicemap_loads_no_torch():
    assert loaded("import devicemap; devicemap.__version__, devicemap.PlacementError") == []
    # public names resolve on first use; the plan of a tree needs no torch either
    assert loaded("from devicemap import ModuleTree, Workload, parse_size, plan, plan_checkpoint") == []
    assert loaded("import devicemap; dir(devicemap); devicemap.compat") == []


def test_the_loaders_still_bring_torch_when_used():
    assert "torch" in loaded("from devicemap import dispatch")


def test_devicemap_set_to_nothing_or_zero_imports_nothing_heavy():
    assert loaded("import devicemap", {"DEVICEMAP": "0"}) == []


COMMANDS = [
    "models",
    "plan llama-3-70b --gpus 4x24GiB --cpu 128GiB",
    "plan mixtral-8x7b --gpus 2x24GiB --cpu 64GiB --dtype bf16 --batch 4 --json",
    "plan llama-3.2-1b --gpus 2x1GiB --cpu 8GiB --balance compute --no-split LlamaMLP --pin lm_head=1",
    "compare llama-3-8b --gpus 2x8GiB --cpu 64GiB --dtype bf16",
    "export llama-3-8b --gpus 2x10GiB --dtype bf16 --to llama.cpp",
]


def _needs_torch_for_accelerate(args: str) -> bool:
    """compare (and the demo) before accelerate 1.15 run accelerate itself: it counts GPUs through torch."""
    from devicemap.cli.accelerate_side import port_applies

    return args.startswith(("compare", "demo")) and not port_applies({0: 1, "cpu": 1})


@pytest.mark.parametrize("args", COMMANDS)
def test_catalog_commands_load_no_torch(args):
    if _needs_torch_for_accelerate(args):
        pytest.skip(
            "the installed accelerate (< 1.15) counts GPUs through torch: compare runs it on the model"
        )
    assert loaded(command(*args.split())) == []


def test_help_loads_no_torch():
    code = """
import runpy, sys
sys.argv = ["devicemap", "--help"]
try:
    runpy.run_module("devicemap.cli", run_name="__main__")
except SystemExit as stop:
    assert stop.code == 0
"""
    assert loaded(code) == []


def test_the_demo_loads_no_torch(tmp_path):
    if _needs_torch_for_accelerate("demo"):
        pytest.skip(
            "the installed accelerate (< 1.15) counts GPUs through torch: the demo runs it on the model"
        )
    assert loaded(f"import os; os.chdir({str(tmp_path)!r})\n" + command("demo")) == []


def test_a_checkpoint_plan_loads_no_torch(tiny_checkpoints):
    _, folder = tiny_checkpoints["llama"]
    assert loaded(command("plan", str(folder), "--gpus", "2x1GiB", "--dtype", "bf16", "--batch", "2")) == []
