"""benches/bench_cli_startup.py (issue 21's start-up measurements) runs end to end, one process per row."""

import os
import subprocess
import sys

from repo import REPO

SCRIPT = REPO / "benches" / "bench_cli_startup.py"


def test_smoke_run_measures_every_command_and_says_what_it_imported():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        timeout=600,  # a hang guard, not a speed check: tests never assert time
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {
        line.split(" | ")[0].removeprefix("| "): line
        for line in result.stdout.splitlines()
        if line.startswith("| ")
    }
    for command in (
        "`python -c 'import devicemap'`",
        "`devicemap --help`",
        "`devicemap plan llama-3-70b --gpus 4x24GiB --cpu 128GiB`",
        "`devicemap plan <safetensors folder> --gpus 2x1MiB --cpu 1GiB`",
    ):
        assert rows[command].endswith("| none |"), rows[command]  # measured, and no torch
        assert " ms | " in rows[command]
    built = rows["... the same plan, building the model (as before the data)"]
    assert " ms | " in built and "torch, transformers" in built
    accelerate = rows["`accelerate estimate-memory <config folder>`"]
    assert " ms | " in accelerate or "skipped: " in accelerate  # offline it cannot look the model up
    assert "Targets (issue 21)" in result.stdout
