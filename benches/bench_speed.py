"""Predicted decode speed of plans: accelerate's placement against devicemap's, on the same hardware.

    .venv/bin/python benches/bench_speed.py            # the scenarios below
    .venv/bin/python benches/bench_speed.py --quick    # the first two
    .venv/bin/python benches/bench_speed.py --planning-time   # only the planning-time grid (below)

Nothing runs on a GPU: each plan is costed by devicemap's speed model (``devicemap.cost.estimate``: weights
read, weights streamed to the GPU for offloaded layers, compute, activations moved; presets with their
datasheet sources in ``devicemap/hardware.py``). For every scenario (a catalog model in bfloat16 on a
device spec, batch 1 with a 2048-token KV cache) it prints the predicted decode tokens/s of

- accelerate: what transformers does for ``device_map="auto"`` (get_balanced_memory + infer_auto_device_map);
  offloaded layers run on GPU 0, their weights streamed over PCIe every token;
- devicemap memory: ``devicemap.plan`` (most weights on the GPUs; offloaded layers staged on a GPU);
- devicemap CPU-run: ``devicemap.plan(..., execution_device="cpu")``: offloaded layers stay in CPU memory and
  run there (only activations cross PCIe);
- devicemap speed: ``devicemap.plan(..., objective="speed", hardware=...)``: per block, resident on a GPU or
  stored and run on the CPU, chosen for the least predicted decode time (MoE experts become blocks of their own,
  so attention stays on the GPU while experts run on the CPU, as llama.cpp users do with ``--n-cpu-moe``);

and the assumptions (GPU and host presets). Then the **planning time** of ``objective="speed"`` (CPU seconds of
``devicemap.plan``) over a grid: bundled mixture-of-experts and dense shapes x 1-4 rtx-4090 GPUs (24 GiB) x a
roomy (256 GiB) or tight (16 GiB) CPU x with/without disk, plus the cases that once took minutes, beside the
memory objective on the same inputs: a table, then the worst case and the median. These are predictions: ``benches/gpu_check.py`` measures real
runs next to the estimates on a CUDA machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import devicemap
from devicemap import catalog
from devicemap.cli.compare import accelerate_device_map, plan_of_map
from devicemap.cost.hardware import Hardware

GIB = 2**30
WORKLOAD = devicemap.Workload(batch_size=1, seq_len=2048, kv_dtype="bfloat16")

# (model, GPU preset, GPUs, GPU memory GiB, host preset, CPU memory GiB)
SCENARIOS = [
    ("mixtral-8x7b", "rtx-4090", 1, 24, "desktop-ddr5", 128),
    ("qwen3-30b-a3b", "rtx-4090", 1, 24, "desktop-ddr5", 64),
    ("llama-3-70b", "rtx-4090", 2, 24, "desktop-ddr5", 128),
    ("deepseek-v2-lite", "t4", 1, 16, "desktop-ddr4", 32),
    ("llama-3-8b", "rtx-3090", 1, 8, "desktop-ddr5", 32),
    ("mixtral-8x22b", "a100-80gb-sxm", 2, 80, "server-ddr5-12ch", 512),
]


def scenario(name: str, gpu: str, gpus: int, gpu_gib: int, host: str, cpu_gib: int) -> dict:
    model = catalog.build_meta_model(name)
    memory = {**{i: gpu_gib * GIB for i in range(gpus)}, "cpu": cpu_gib * GIB}
    hardware = Hardware.preset(gpu, gpus=gpus, host=host)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    accelerate_map = accelerate_device_map(model, memory, "auto", no_split, "bfloat16")
    plans = {
        "accelerate": plan_of_map(model, accelerate_map, "bfloat16"),
        "devicemap memory": devicemap.plan(model, memory, dtype="bfloat16", workload=WORKLOAD),
        "devicemap CPU-run": devicemap.plan(
            model, memory, dtype="bfloat16", workload=WORKLOAD, execution_device="cpu"
        ),
        "devicemap speed": devicemap.plan(
            model, memory, dtype="bfloat16", workload=WORKLOAD, objective="speed", hardware=hardware
        ),
    }
    row: dict = {"model": name, "hardware": f"{gpus} x {gpu} ({gpu_gib} GiB), {host} ({cpu_gib} GiB)"}
    for label, plan in plans.items():
        estimate = plan.estimate(WORKLOAD, hardware, model, dtype="bfloat16")
        on_gpus = sum(u.weights for u in plan.usage if isinstance(u.device, int))
        row[label] = (estimate.tokens_per_second, on_gpus / GIB, estimate.dominant)
    return row


PLANNING_MODELS = [
    "mixtral-8x7b",
    "mixtral-8x22b",
    "qwen3-30b-a3b",
    "deepseek-v2-lite",
    "llama-3-70b",
    "llama-3-8b",
]
# (model, GPUs, CPU GiB, disk): the cases that took minutes before the program moved to Rust (issue 22)
PLANNING_EXTRA = [("mixtral-8x7b", 2, 40, True), ("mixtral-8x22b", 2, 128, True)]


def planning_grid() -> list[tuple[str, int, int, bool]]:
    grid = [
        (name, gpus, cpu, disk)
        for name in PLANNING_MODELS
        for gpus in (1, 2, 3, 4)
        for cpu in (256, 16)
        for disk in (False, True)
    ]
    return grid + PLANNING_EXTRA


def _cpu_seconds(model: object, memory: dict, **options: object) -> float:
    """CPU seconds of one ``devicemap.plan`` (a plan that does not fit is an answer too)."""
    start = time.process_time()
    with contextlib.suppress(devicemap.DoesNotFitError):
        devicemap.plan(model, memory, dtype="bfloat16", workload=WORKLOAD, **options)  # type: ignore[arg-type]
    return time.process_time() - start


def planning_times() -> None:
    """The planning-time table and summary (module docstring)."""
    models = {name: catalog.build_meta_model(name) for name in PLANNING_MODELS}
    print("| model | GPUs x 24 GiB | CPU GiB | disk | speed objective s | memory objective s |")
    print("|---|---:|---:|---|---:|---:|")
    speed_times: list[tuple[float, str]] = []
    memory_times: list[float] = []
    for name, gpus, cpu, disk in planning_grid():
        model = models[name]
        memory: dict = {**{i: 24 * GIB for i in range(gpus)}, "cpu": cpu * GIB}
        if disk:
            memory["disk"] = 0
        hardware = Hardware.preset("rtx-4090", gpus=gpus, host="desktop-ddr5")
        fast = _cpu_seconds(model, memory, objective="speed", hardware=hardware)
        plain = _cpu_seconds(model, memory)
        label = f"{name}, {gpus} x 24 GiB, {cpu} GiB CPU{', disk' if disk else ''}"
        speed_times.append((fast, label))
        memory_times.append(plain)
        print(
            f"| {name} | {gpus} | {cpu} | {'yes' if disk else 'no'} | {fast:.3f} | {plain:.3f} |", flush=True
        )
    worst = max(speed_times)
    print(
        f"\nPlanning time over {len(speed_times)} cases: speed objective worst {worst[0]:.3f} s ({worst[1]}), "
        f"median {statistics.median(t for t, _ in speed_times):.3f} s; memory objective worst "
        f"{max(memory_times):.3f} s, median {statistics.median(memory_times):.3f} s (CPU seconds)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first two scenarios only")
    parser.add_argument("--planning-time", action="store_true", help="only the planning-time grid")
    args = parser.parse_args()
    if args.planning_time:
        planning_times()
        return
    rows = [scenario(*s) for s in (SCENARIOS[:2] if args.quick else SCENARIOS)]
    labels = ("accelerate", "devicemap memory", "devicemap CPU-run", "devicemap speed")
    print(
        "| model | hardware | "
        + " | ".join(f"{label} tok/s (GiB on GPUs)" for label in labels)
        + " | best vs accelerate | accelerate bound by |"
    )
    print("|---|---|" + "---:|" * len(labels) + "---:|---|")
    for row in rows:
        cells = [f"{row[label][0]:.2f} ({row[label][1]:.1f})" for label in labels]
        best = max(row[label][0] for label in labels[1:])
        print(
            f"| {row['model']} | {row['hardware']} | "
            + " | ".join(cells)
            + f" | {best / row['accelerate'][0]:.1f}x | {row['accelerate'][2]} |"
        )
    print(f"\nWorkload: batch {WORKLOAD.batch_size}, {WORKLOAD.seq_len}-token KV cache, bfloat16 weights.")
    for name in sorted({s[1] for s in SCENARIOS}):
        g = Hardware.preset(name).gpus[0]
        print(
            f"{name}: {g.memory_bandwidth / 1e9:.0f} GB/s, H2D {g.host_to_device / 1e9:.1f} GB/s ({g.source})"
        )
    for name in sorted({s[4] for s in SCENARIOS}):
        h = Hardware.preset(None, host=name).host
        print(f"{name}: {h.memory_bandwidth / 1e9:.0f} GB/s memory ({h.source})")
    if not args.quick:
        print()
        planning_times()


if __name__ == "__main__":
    main()
