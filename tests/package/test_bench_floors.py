"""benches/bench_floors.py (the planning floors and their targets) runs end to end at its smoke sizes."""

import os
import subprocess
import sys

from repo import REPO

SCRIPT = REPO / "benches" / "bench_floors.py"
SECTIONS = [
    "## 1. Header planning",
    "## 2. Module export",
    "## 3. Solve",
    "## 4. Peak memory",
    "Targets: header planning",
]


def test_smoke_run_prints_every_section_with_its_target():
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--smoke"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,  # a hang guard, not a speed check: tests never assert time
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in SECTIONS:
        assert section in out, f"missing {section!r}:\n{out}"
    # every section has a table row with a measured time, and every target is judged somewhere
    assert "| 4 x ~40 | 4 |" in out
    assert "| 1,049 |" in out
    assert "1,049 modules |" in out
    for method in ("devicemap.plan", "accelerate infer_auto_device_map"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        assert "failed" not in row, row
        assert "MiB" in row, row
    assert "**devicemap / accelerate**" in out
