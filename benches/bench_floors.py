"""Floors: devicemap's planning paths against the cheapest pure-Python pass doing the same reading.

    .venv/bin/python benches/bench_floors.py            # full run (~5-10 minutes on 2 cores)
    .venv/bin/python benches/bench_floors.py --quick    # up to 100k modules (~1 minute)
    .venv/bin/python benches/bench_floors.py --quick --smoke   # tiny sizes, every section (< 30 s)
    .venv/bin/python benches/bench_floors.py --only headers --only memory   # some sections only

The measurements, each best-of-N wall clock in one process (the memory section excepted):

1. Header planning: a sharded safetensors checkpoint (160 shards x ~400 tensors; real headers, data
   left as sparse holes) planned with ``devicemap.plan_checkpoint``, against the floor = pure Python
   reading the index and every header (``struct`` + ``json.loads``) and summing tensor sizes per module.
   accelerate and transformers 5 have no header-only planner.
2. Module export: ``ModuleTree.from_module`` on a synthetic meta-device MoE model (1k .. 1M modules)
   against the floor = one pure-Python pass over every module's ``_modules`` / ``_parameters`` /
   ``_buffers`` dicts summing ``numel * element_size`` (no names built), and accelerate's and
   transformers 5's ``compute_module_sizes``.
3. Solve: ``_core.solve`` alone (the tree exported beforehand) with every Linear a block (no no-split
   classes: leaf-only) and with the decoder layer kept whole; ``devicemap.plan`` end to end for scale.
4. Memory: planning the largest model, one fresh subprocess per method: the peak RSS (VmHWM, reset
   once the model is built; ``ru_maxrss`` where it cannot be reset) over the RSS with the model built,
   for ``devicemap.plan``, accelerate's ``infer_auto_device_map`` and transformers 5's planner
   (``transformers_planner.py``), all with the layer kept whole, and how much the returned result
   keeps alive (RSS held while it lives, after ``malloc_trim``).

Each table prints its target next to the measured ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import devicemap
from devicemap import _core

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_checkpoint import write_sparse_shards  # noqa: E402
from bench_placement import SyntheticMoE, memory_for  # noqa: E402
from transformers_planner import transformers_device_map, unavailable_reason  # noqa: E402

EXPERTS = 64  # modules per SyntheticMoE layer: 5 + 4 * EXPERTS = 261
NO_SPLIT = ["MoELayer"]
TIED = {"head.weight": "embed.weight"}

# (label, layers, experts, shards): tensors = 3 + layers * (4 + 3 * experts), spread over the shards
HEADERS_FULL = [("16 x 400", 8, 265, 16), ("160 x 400", 80, 265, 160)]
HEADERS_QUICK = HEADERS_FULL  # cheap: the 160 x 400 the target names runs in --quick too (fewer repeats)
HEADERS_SMOKE = [("4 x ~40", 2, 6, 4)]
MODULES_FULL = [1_000, 10_000, 100_000, 1_000_000]
MODULES_QUICK = [1_000, 10_000, 100_000]
MODULES_SMOKE = [300, 1_000]

HEADER_TARGET = 1.2  # plan_checkpoint <= 1.2x the pure-Python header read
EXPORT_TARGET = 1.5  # from_module <= 1.5x the raw dict walk
SOLVE_TARGET = 0.100  # leaf-only solve < 100 ms at 1M modules


# -- helpers ---------------------------------------------------------------------------------------


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None  # the previous result is freed before the next run
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def repeats(modules: int) -> int:
    return 5 if modules < 100_000 else 3 if modules < 1_000_000 else 2


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def layers_for(modules: int) -> int:
    """SyntheticMoE layers giving about ``modules`` modules (5 + 261 per layer)."""
    return max(1, round((modules - 5) / (5 + 4 * EXPERTS)))


def build_model(modules: int) -> torch.nn.Module:
    with torch.device("meta"):
        return SyntheticMoE(layers_for(modules), EXPERTS)


def count_modules(model: torch.nn.Module) -> int:
    return sum(1 for _ in model.modules())


# -- 1. header planning ----------------------------------------------------------------------------


def header_floor(folder: Path) -> dict[str, int]:
    """Pure Python: the index, every shard's header (struct + json.loads), bytes summed per module."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sizes: dict[str, int] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with open(folder / shard, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            module = name.rpartition(".")[0]
            sizes[module] = sizes.get(module, 0) + (end - start)
    return sizes


def bench_headers(cases: list[tuple[str, int, int, int]], repeat: int) -> None:
    print("\n## 1. Header planning (plan_checkpoint vs pure-Python header read)\n", flush=True)
    print("| checkpoint | shards | tensors | plan_checkpoint | pure-Python floor | ratio | target ≤ 1.2x |")
    print("|---|---:|---:|---:|---:|---:|:---:|")
    memory = {g: "40GiB" for g in range(4)} | {"cpu": "1TiB"}
    for label, layers, experts, shards in cases:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            tensors = write_sparse_shards(folder, layers, experts, shards)
            floor_time, sizes = best_of(lambda: header_floor(folder), repeat)  # noqa: B023
            dm_time, plan = best_of(
                lambda: devicemap.plan_checkpoint(folder, max_memory=memory),  # noqa: B023
                repeat,
            )
            total = sum(sizes.values())
            assert sum(u.weights for u in plan.usage) == total, "plan and floor disagree on the total"
        ratio = dm_time / floor_time
        print(
            f"| {label} | {shards} | {tensors:,} | {ms(dm_time)} | {ms(floor_time)} | {ratio:.2f}x | "
            f"{verdict(ratio <= HEADER_TARGET)} |",
            flush=True,
        )


# -- 2. module export ------------------------------------------------------------------------------


def dict_walk(model: torch.nn.Module) -> int:
    """The cheapest pure-Python pass: every module's dicts, numel * element size summed, no names."""
    total = 0
    stack = [model]
    pop, push = stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:
            continue
        for tensor in module._parameters.values():
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        for tensor in module._buffers.values():
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        push(module._modules.values())
    return total


def transformers_sizes(model: torch.nn.Module):
    from transformers.integrations.accelerate import compute_module_sizes

    return compute_module_sizes(model)


def bench_export(models: dict[int, torch.nn.Module], tf: bool) -> dict[int, devicemap.ModuleTree]:
    from accelerate.utils import compute_module_sizes as acc_sizes

    print("\n## 2. Module export (ModuleTree.from_module vs the raw dict walk)\n", flush=True)
    print(
        "| modules | from_module | dict-walk floor | ratio | target ≤ 1.5x | accelerate compute_module_sizes "
        "| ratio" + (" | transformers 5 compute_module_sizes | ratio" if tf else "") + " |"
    )
    print("|---:|---:|---:|---:|:---:|---:|---:|" + ("---:|---:|" if tf else ""))
    trees = {}
    for target, model in models.items():
        n, repeat = count_modules(model), repeats(target)
        floor_time, _ = best_of(lambda: dict_walk(model), repeat)  # noqa: B023
        dm_time, tree = best_of(lambda: devicemap.ModuleTree.from_module(model), repeat)  # noqa: B023
        trees[target] = tree
        other = max(1, repeat - 2)
        acc_time, _ = best_of(lambda: acc_sizes(model), other)  # noqa: B023
        tf_cells = ""
        if tf:
            tf_time, _ = best_of(lambda: transformers_sizes(model), other)  # noqa: B023
            tf_cells = f" | {ms(tf_time)} | {tf_time / dm_time:.2f}x"
        ratio = dm_time / floor_time
        print(
            f"| {n:,} | {ms(dm_time)} | {ms(floor_time)} | {ratio:.2f}x | {verdict(ratio <= EXPORT_TARGET)} | "
            f"{ms(acc_time)} | {acc_time / dm_time:.2f}x" + tf_cells + " |",
            flush=True,
        )
    print("\n(ratio = devicemap / floor; the accelerate and transformers ratios are theirs / devicemap's)")
    return trees


# -- 3. solve --------------------------------------------------------------------------------------


def bench_solve(models: dict[int, torch.nn.Module], trees: dict[int, devicemap.ModuleTree]) -> None:
    print("\n## 3. Solve (_core.solve alone, export excluded; strategy 'auto', 4 GPUs + CPU)\n", flush=True)
    print(
        "| modules | solve, leaf-only | solve, layer no-split | devicemap.plan e2e (leaf-only) "
        "| solve share of plan | target: leaf-only < 100 ms at 1M |"
    )
    print("|---:|---:|---:|---:|---:|:---:|")
    for target, tree in trees.items():
        model, repeat = models[target], repeats(target)
        memory = memory_for(tree.total_bytes)
        devices = [(str(k), v * 8) for k, v in memory.items()]
        leaf, _ = best_of(lambda: _core.solve(tree.core, devices, "auto", [], [], False), repeat)  # noqa: B023
        layer, _ = best_of(
            lambda: _core.solve(tree.core, devices, "auto", NO_SPLIT, [], False),  # noqa: B023
            repeat,
        )
        e2e, _ = best_of(
            lambda: devicemap.plan(model, max_memory=memory, no_split_module_classes=[]),  # noqa: B023
            max(1, repeat - 2),
        )
        goal = verdict(leaf < SOLVE_TARGET) if target >= 1_000_000 else "— (1M only)"
        print(
            f"| {len(tree):,} nodes / {count_modules(model):,} modules | {ms(leaf)} | {ms(layer)} | {ms(e2e)} | "
            f"{leaf / e2e:.0%} | {goal} |",
            flush=True,
        )


# -- 4. memory -------------------------------------------------------------------------------------

METHODS = ["devicemap.plan", "accelerate infer_auto_device_map", "transformers 5 planner"]


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    """The process's peak RSS (VmHWM), in bytes; reset by ``_reset_peak``."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``clear_refs`` 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _settle() -> int:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss()


def memory_worker(method: str, modules: int) -> None:
    """Run in a fresh process: build the model, plan once with ``method``, print the RSS readings (JSON)."""
    model = build_model(modules)
    memory = memory_for(dict_walk(model))
    if method == "devicemap.plan":

        def run():
            return devicemap.plan(model, max_memory=memory, no_split_module_classes=NO_SPLIT)
    elif method == "accelerate infer_auto_device_map":
        from accelerate.utils import infer_auto_device_map

        def run():
            return infer_auto_device_map(model, max_memory=dict(memory), no_split_module_classes=NO_SPLIT)
    else:

        def run():
            return transformers_device_map(
                model, dict(memory), "auto", no_split_module_classes=NO_SPLIT, tied_weights_keys=TIED
            )

    before = _settle()
    reset = _reset_peak()
    peak_before = _peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = _peak()
    held = _settle()
    del result
    after = _settle()
    print(
        json.dumps(
            {
                "model": before,
                "peak_before": peak_before,
                "reset": reset,
                "peak": peak,
                "held": held,
                "after": after,
                "seconds": seconds,
                "modules": count_modules(model),
            }
        )
    )


def run_worker(method: str, modules: int) -> dict | str:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-worker", method, "--modules", str(modules)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(modules: int, tf: bool) -> None:
    print(f"\n## 4. Peak memory of planning ~{modules:,} modules (fresh subprocess per method)\n", flush=True)
    methods = METHODS if tf else METHODS[:2]
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores; RSS is per process
        results = dict(zip(methods, pool.map(lambda m: run_worker(m, modules), methods), strict=True))
    mib = 2**20
    print(
        "| method | modules | model RSS | extra peak over the model | result keeps alive | plan time "
        "| target: devicemap peak ≤ accelerate's |"
    )
    print("|---|---:|---:|---:|---:|---:|:---:|")
    extra = {}
    for method, r in results.items():
        if isinstance(r, str):
            print(f"| {method} | — | — | {r} | — | — | |")
            continue
        extra[method] = r["peak"] - r["model"]
        bound = "" if r["reset"] or r["peak"] > r["peak_before"] else " (≤: under the build peak)"
        print(
            f"| {method} | {r['modules']:,} | {r['model'] / mib:,.0f} MiB | +{extra[method] / mib:,.0f} MiB{bound} | "
            f"{(r['held'] - r['after']) / mib:+,.0f} MiB | {ms(r['seconds'])} | |"
        )
    dm, acc = extra.get(METHODS[0]), extra.get(METHODS[1])
    if dm is not None and acc is not None:
        print(
            f"| **devicemap / accelerate** | | | {dm / acc:.2f}x | | | {verdict(dm <= acc)} |"
            if acc > 0
            else f"| **devicemap / accelerate** | | | accelerate +0 MiB | | | {verdict(dm <= 0)} |"
        )


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 100k modules, fewer repeats")
    parser.add_argument("--smoke", action="store_true", help="with --quick: tiny sizes (the test's run)")
    parser.add_argument(
        "--only",
        choices=["headers", "export", "solve", "memory"],
        action="append",
        help="run these sections only (repeatable; solve implies the export it needs)",
    )
    parser.add_argument("--memory-worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--modules", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.modules)
        return
    if args.smoke:
        headers, sizes, header_repeat = HEADERS_SMOKE, MODULES_SMOKE, 2
    elif args.quick:
        headers, sizes, header_repeat = HEADERS_QUICK, MODULES_QUICK, 3
    else:
        headers, sizes, header_repeat = HEADERS_FULL, MODULES_FULL, 5
    skip = unavailable_reason()
    tf = skip is None
    print(f"# devicemap floors ({'smoke' if args.smoke else 'quick' if args.quick else 'full'} run)")
    print(
        f"torch {torch.__version__}, devicemap {devicemap.__version__}; best-of-N wall clock in one process"
        + (f"\n  no transformers-5 column: {skip}" if skip else ""),
        flush=True,
    )
    only = set(args.only or ["headers", "export", "solve", "memory"])
    if "headers" in only:
        bench_headers(headers, header_repeat)
    if only & {"export", "solve"}:
        start = time.perf_counter()
        models = {n: build_model(n) for n in sizes}
        print(f"\n(built {len(models)} meta models in {time.perf_counter() - start:.1f} s)", flush=True)
        trees = bench_export(models, tf)
        if "solve" in only:
            bench_solve(models, trees)
        del models, trees
        gc.collect()
    if "memory" in only:
        bench_memory(sizes[-1], tf)
    print(
        "\nTargets: header planning ≤ 1.2x the pure-Python header read; export ≤ 1.5x the raw "
        "dict walk; leaf-only solve < 100 ms at 1M modules; peak planning memory ≤ accelerate's."
    )


if __name__ == "__main__":
    main()
