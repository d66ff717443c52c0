"""Start-up of ``import devicemap`` and of the command: wall time of fresh processes, and whether each loaded
torch (issue 21).

    .venv/bin/python benches/bench_cli_startup.py              # 10 runs of each command
    .venv/bin/python benches/bench_cli_startup.py --runs 30
    .venv/bin/python benches/bench_cli_startup.py --smoke      # 1 run each (what the test runs)

Each row runs its command in a new interpreter ``--runs`` times, after one run that writes the modules'
bytecode (as pip does at install; ``PYTHONDONTWRITEBYTECODE`` is ignored), and gives the median and the fastest run;
one more run with ``PYTHONPROFILEIMPORTTIME=1`` says which of torch / transformers / accelerate it imported.
The commands: ``import devicemap``; ``devicemap --help``; a plan of a bundled model (``llama-3-70b`` on
4 x 24 GiB, from its shape shipped as data); the same plan building the model with transformers on the meta
device, as every catalog plan did before the shapes shipped as data (the data switched off in-process); a plan
of a small random safetensors checkpoint (headers only) written to a temporary folder; and, for scale,
``python -c 'import torch'`` and accelerate's own ``accelerate estimate-memory`` on that checkpoint's
``config.json`` when it runs offline (it looks every model up on the Hugging Face Hub first, so offline it
is skipped, saying why).

Targets on a 2-core machine: ``import devicemap`` without torch, ``devicemap --help`` < 150 ms, a catalog or
checkpoint plan < 400 ms. Benchmarks are benchmarks: the tests run this script once (``--smoke``) and
never assert a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "accelerate")
PLAN = ["plan", "llama-3-70b", "--gpus", "4x24GiB", "--cpu", "128GiB"]
BUILT = (
    "import sys; from devicemap import cli; from devicemap.catalog import trees; "
    "trees.shape = lambda name: None; sys.exit(cli.main(sys.argv[1:]))"
)
"""The command with the catalog's data switched off: it builds the model, as before the data shipped."""


def devicemap_command() -> list[str]:
    """The installed ``devicemap`` console script, else ``python -m devicemap.cli``."""
    script = Path(sys.executable).parent / "devicemap"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "devicemap.cli"]


def write_checkpoint(folder: Path) -> Path:
    """A small safetensors checkpoint of random float16 weights (a 4-layer Llama-like shape), written by
    hand in the safetensors format (8-byte header length, JSON header, data), with its config.json."""
    hidden, vocab, layers = 256, 1000, 4
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            shapes[f"model.layers.{i}.{part}.weight"] = [hidden, hidden]
        for part, shape in (("mlp.up_proj", [512, hidden]), ("mlp.down_proj", [hidden, 512])):
            shapes[f"model.layers.{i}.{part}.weight"] = shape
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1] * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text + os.urandom(offset))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": 512,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    return time.perf_counter() - start, done


def _loaded(done: subprocess.CompletedProcess) -> str:
    """The heavy modules a process imported, from the ``-X importtime`` report that any interpreter writes to
    stderr with PYTHONPROFILEIMPORTTIME=1."""
    found = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name in HEAVY:
                found.add(name)
    return ", ".join(sorted(found, key=HEAVY.index)) or "none"


def measure(label: str, command: list[str], runs: int, env: dict[str, str], smoke: bool = False) -> str:
    """One table row: median and fastest of ``runs`` fresh processes, and what they imported. ``smoke``:
    one process, timed while it reports its imports (which costs it a little)."""
    if smoke:
        seconds, done = run_once(command, {**env, "PYTHONPROFILEIMPORTTIME": "1"})
        if done.returncode != 0:
            return f"| {label} | failed (exit {done.returncode}): {_last_line(done)} | | |"
        return f"| {label} | {seconds * 1e3:.0f} ms | {seconds * 1e3:.0f} ms | {_loaded(done)} |"
    _, done = run_once(command, env)  # warms the page cache and __pycache__
    if done.returncode != 0:
        return f"| {label} | failed (exit {done.returncode}): {_last_line(done)} | | |"
    times = [run_once(command, env)[0] for _ in range(runs)]
    _, probed = run_once(command, {**env, "PYTHONPROFILEIMPORTTIME": "1"})
    return f"| {label} | {statistics.median(times) * 1e3:.0f} ms | {min(times) * 1e3:.0f} ms | {_loaded(probed)} |"


def accelerate_row(folder: Path, runs: int, env: dict[str, str], smoke: bool) -> str:
    """``accelerate estimate-memory`` on the checkpoint's config, or why it cannot run here."""
    accelerate = Path(sys.executable).parent / "accelerate"
    label = "`accelerate estimate-memory <config folder>`"
    if not accelerate.is_file() and shutil.which("accelerate") is None:
        return f"| {label} | skipped: accelerate's command is not installed | | |"
    command = [str(accelerate) if accelerate.is_file() else "accelerate", "estimate-memory", str(folder)]
    command += ["--library_name", "transformers"]
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    _, done = run_once(command, offline)
    if done.returncode != 0:
        why = _last_line(done)
        return (
            f"| {label} | skipped: it looks the model up on the Hugging Face Hub first and cannot run offline "
            f"({why}) | | |"
        )
    return measure(label, command, runs, offline, smoke)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    text = (lines[-1] if lines else "no output").replace("|", "/")
    return (text[:97] + "...") if len(text) > 100 else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command (default 10)")
    parser.add_argument("--smoke", action="store_true", help="one run of each command (for the tests)")
    args = parser.parse_args(argv)
    runs = 1 if args.smoke else max(1, args.runs)
    # Modules compiled once, as an installed package runs (pip compiles them at install): a
    # PYTHONDONTWRITEBYTECODE in this environment would have every run recompile devicemap's sources.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["DEVICEMAP"] = ""
    dm = devicemap_command()
    print(f"# devicemap start-up ({runs} run(s) each, fresh processes; {os.cpu_count()} CPUs)\n")
    print("| command | median | fastest | imported (of torch, transformers, accelerate) |")
    print("|---|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="devicemap-bench-") as temporary:
        folder = write_checkpoint(Path(temporary) / "checkpoint")
        rows = [
            ("`python -c 'import devicemap'`", [sys.executable, "-c", "import devicemap"]),
            ("`devicemap --help`", [*dm, "--help"]),
            (f"`devicemap {' '.join(PLAN)}`", [*dm, *PLAN]),
            (
                "... the same plan, building the model (as before the data)",
                [sys.executable, "-c", BUILT, *PLAN],
            ),
            ("`devicemap plan <safetensors folder> --gpus 2x1MiB --cpu 1GiB`", [*dm, "plan", str(folder)]),
            ("`python -c 'import torch'` (for scale)", [sys.executable, "-c", "import torch"]),
        ]
        for label, command in rows:
            if "plan" in command and str(folder) in command:
                command = [*command, "--gpus", "2x1MiB", "--cpu", "1GiB"]
            print(measure(label, command, runs, env, args.smoke), flush=True)
        print(accelerate_row(folder, runs, env, args.smoke))
    print(
        "\nTargets (issue 21): import without torch; --help < 150 ms; a catalog or checkpoint plan < 400 ms."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
