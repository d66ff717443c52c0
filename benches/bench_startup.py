"""What ``DEVICEMAP=1`` costs a process that never uses a loader: start-up time with and without it.

    .venv/bin/python benches/bench_startup.py              # 40 runs of each command, each way
    .venv/bin/python benches/bench_startup.py --runs 200

``devicemap_hooks.pth`` runs in every Python process of the environment devicemap is installed in. With
``DEVICEMAP=1`` it arms a finder that installs devicemap when transformers, accelerate, diffusers or peft is
first imported, and imports nothing else. The commands below import none of them, so the target is the
time without the variable (ratio <= 1.1x). Runs alternate between the two settings so that the machine's
load drifts over both alike; the table gives the median and the fastest run of each.

The last row shows what the variable defers, not a cost of it: a process that does import transformers
installs devicemap then (and imports torch), which the same import pays for without devicemap too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -m pip --version": [sys.executable, "-m", "pip", "--version"],
    "python -c 'import json, sqlite3'": [sys.executable, "-c", "import json, sqlite3"],
}
WITH_LOADER = {
    "python -c 'import transformers.modeling_utils'": [
        sys.executable,
        "-c",
        "import transformers.modeling_utils",
    ]
}


def run_once(command: list[str], devicemap: str) -> float:
    env = {**os.environ, "DEVICEMAP": devicemap}
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def measure(command: list[str], runs: int) -> dict[str, list[float]]:
    """Seconds per run with DEVICEMAP unset-equivalent ("0") and "1", alternating."""
    times: dict[str, list[float]] = {"0": [], "1": []}
    run_once(command, "0")  # warm the page cache and __pycache__
    run_once(command, "1")
    for i in range(runs):
        for value in ("0", "1") if i % 2 == 0 else ("1", "0"):
            times[value].append(run_once(command, value))
    return times


def check_nothing_heavy_is_imported() -> str:
    """With DEVICEMAP=1, which of torch / devicemap a bare interpreter has imported."""
    probe = "import sys; print(sorted(m for m in ('torch', 'devicemap', 'transformers') if m in sys.modules))"
    env = {**os.environ, "DEVICEMAP": "1"}
    return subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=40, help="runs of each command with and without DEVICEMAP=1"
    )
    args = parser.parse_args()
    print(f"modules a bare interpreter imported with DEVICEMAP=1: {check_nothing_heavy_is_imported()}")
    print()
    print(
        "| command | without: median (fastest) | DEVICEMAP=1: median (fastest) | ratio of medians | target |"
    )
    print("|---|---:|---:|---:|---|")
    for label, command in {**COMMANDS, **WITH_LOADER}.items():
        runs = args.runs if label in COMMANDS else max(3, args.runs // 10)
        times = measure(command, runs)
        without, with_ = statistics.median(times["0"]), statistics.median(times["1"])
        target = "<= 1.1x" if label in COMMANDS else "(installs devicemap: not a start-up cost)"
        print(
            f"| `{label}` | {without * 1e3:.1f} ms ({min(times['0']) * 1e3:.1f}) "
            f"| {with_ * 1e3:.1f} ms ({min(times['1']) * 1e3:.1f}) | {with_ / without:.3f}x | {target} |"
        )


if __name__ == "__main__":
    main()
