"""benches/gpu_check.py: a clear skip without CUDA GPUs, and the whole flow in a CPU rehearsal."""

import os
import subprocess
import sys

import pytest

from repo import REPO

SCRIPT = REPO / "benches" / "gpu_check.py"
SKIP_LINE = (
    "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure — "
    "run it on a machine with CUDA GPUs"
)
VARIANTS = ["accelerate", "devicemap memory", "devicemap execution_device=cpu", "devicemap speed"]


def run(*args: str) -> subprocess.CompletedProcess:
    # No GPU visible to the child, so the skip and the rehearsal behave the same on any machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
        check=False,
    )


def test_without_cuda_it_prints_one_clear_line_and_exits_0():
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SKIP_LINE


@pytest.mark.parametrize("model", ["tiny", "moe-tiny"])
def test_rehearsal_loads_every_variant_and_prints_the_table(model):
    result = run("--rehearse", "--quick", "--model", model)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| variant |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == ["variant", "weights per device", "offloaded run on", "logits ok"]
    assert "prefill measured" in columns and "decode estimated" in columns
    rows = {
        cells[0]: cells
        for line in lines
        if line.startswith("| ") and not line.startswith("| variant |")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert list(rows) == VARIANTS, result.stdout
    for name, cells in rows.items():
        assert len(cells) == len(columns), cells
        assert cells[columns.index("logits ok")].startswith("yes"), (name, cells)
        for column in ("prefill measured", "prefill estimated", "decode measured", "decode estimated"):
            assert cells[columns.index(column)].endswith(("ms", " s")), (name, column, cells)
    assert "cpu" in rows["accelerate"][1] and "GPU 0" in rows["accelerate"][1]  # something is offloaded
    assert rows["accelerate"][2] == "GPU 0"  # accelerate streams offloaded layers to GPU 0
    assert rows["devicemap execution_device=cpu"][2] == "cpu"
    if model.startswith("moe"):  # the speed plan runs experts on the CPU, measured beside its estimate
        assert "cpu" in rows["devicemap speed"][2]
