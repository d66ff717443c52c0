"""The ``devicemap`` command: plan a model on a device spec and show where every layer goes.

    devicemap demo                                   # the bundled default: llama-3-8b on 2 x 8 GiB
    devicemap models                                 # bundled model shapes
    devicemap plan llama-3-70b --gpus 4x24GiB --cpu 128GiB --dtype bfloat16 --out plan.svg
    devicemap plan ./my-model/config.json --max-memory 0=20GiB,1=20GiB,cpu=64GiB --json
    devicemap plan ./checkpoint/ --gpus 2x80GiB --dtype bfloat16           # safetensors headers only
    devicemap compare mixtral-8x7b --gpus 2x48GiB --cpu 64GiB --dtype bfloat16
    devicemap export llama-3-70b --gpus 4x40GiB --dtype bfloat16 --to vllm

Exit codes: 0 planned, 1 the model does not fit, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from .checkpoint import plan_checkpoint
from .compare import accelerate_device_map, compare
from .errors import DoesNotFitError, PlacementError
from .export import TARGETS, export
from .memory import DeviceKey, device_key, parse_size
from .planning import STRATEGIES, Plan, plan
from .render import plan_to_html, plan_to_svg
from .tree import ModuleTree
from .workload import Workload

DEMO_MODEL = "llama-3-8b"
DEMO_GPUS = "2x8GiB"
DEMO_CPU = "64GiB"
DEMO_PICTURE = "devicemap-demo.svg"


def cli_size(text: str) -> int:
    """A size on the command line: plain digits are bytes, otherwise a string like '24GiB'."""
    return int(text) if text.isdigit() else parse_size(text)


def parse_gpus(text: str) -> dict[DeviceKey, int]:
    """``"4x24GiB"`` -> four GPUs of 24 GiB; ``"80GiB,40GiB"`` -> GPU 0 and GPU 1.

    >>> parse_gpus("2x1KiB")
    {0: 1024, 1: 1024}
    """
    sizes: list[int] = []
    for part in text.split(","):
        count, sep, size = part.partition("x")
        if sep and count.isdigit():
            sizes.extend([cli_size(size)] * int(count))
        else:
            sizes.append(cli_size(part))
    return dict(enumerate(sizes))


def parse_max_memory(text: str) -> dict[DeviceKey, object]:
    """``"0=20GiB,1=20GiB,cpu=64GiB,disk"`` -> a max_memory dict."""
    memory: dict[DeviceKey, object] = {}
    for part in text.split(","):
        key, sep, size = part.partition("=")
        memory[device_key(key)] = cli_size(size) if sep else 0
    return memory


def load_model(source: str, num_hidden_layers: Optional[int] = None):
    """A meta-device model from a catalog name, a config.json or a folder holding one."""
    from . import catalog

    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.exists():
        config = json.loads(path.read_text())
        return catalog.build_meta_model(config, num_hidden_layers=num_hidden_layers)
    return catalog.build_meta_model(source, num_hidden_layers=num_hidden_layers)


def add_model_and_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="catalog name (see `devicemap models`), config.json, model folder, or a safetensors checkpoint "
        "(file, index or folder; `plan` reads its headers only)",
    )
    p.add_argument("--gpus", help="GPU sizes: '4x24GiB' or '80GiB,40GiB'")
    p.add_argument("--cpu", help="CPU memory for offloaded layers, e.g. '64GiB'")
    p.add_argument("--disk", action="store_true", help="allow offloading to disk")
    p.add_argument("--max-memory", help="accelerate-style spec: '0=20GiB,1=20GiB,cpu=64GiB,disk'")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    p.add_argument("--dtype", help="size weights as this dtype, e.g. bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devicemap", description="Decide where each layer of a model lives."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help=f"plan {DEMO_MODEL} on {DEMO_GPUS} + {DEMO_CPU} CPU and compare with accelerate"
    )
    sub.add_parser("models", help="list the bundled model shapes")
    p = sub.add_parser("plan", help="plan a model on a device spec")
    add_model_and_devices(p)
    p.add_argument("--batch", type=int, help="plan KV cache and activations for this batch size")
    p.add_argument("--seq-len", type=int, help="... and this sequence length (default 2048 with --batch)")
    p.add_argument("--balance", default="memory", choices=("memory", "compute"))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", help="write a picture of the plan: a .svg or .html file")
    c = sub.add_parser("compare", help="devicemap and accelerate side by side on the same inputs")
    add_model_and_devices(c)
    e = sub.add_parser("export", help="print the split for another engine")
    add_model_and_devices(e)
    e.add_argument("--to", required=True, choices=TARGETS, help="target engine")
    return parser


def plan_to_json(result: Plan) -> dict:
    return {
        "strategy": result.strategy,
        "device_map": result.device_map,
        "devices": [
            {
                "device": u.device,
                "capacity": u.capacity,
                "weights": u.weights,
                "reserve": u.reserve,
                "blocks": list(u.blocks),
            }
            for u in result.usage
        ],
        "offloaded": [
            {"name": o.name, "device": o.device, "bytes": o.bytes, "reason": o.reason}
            for o in result.offloaded
        ],
    }


def memory_from_args(args: argparse.Namespace) -> dict[DeviceKey, object]:
    if args.max_memory:
        return parse_max_memory(args.max_memory)
    memory: dict[DeviceKey, object] = dict(parse_gpus(args.gpus)) if args.gpus else {}
    if args.cpu:
        memory["cpu"] = cli_size(args.cpu)
    if args.disk:
        memory["disk"] = 0
    if not memory:
        raise PlacementError("give the devices: --gpus 2x24GiB [--cpu 64GiB] [--disk], or --max-memory ...")
    return memory


def workload_from_args(args: argparse.Namespace) -> Optional[Workload]:
    if args.batch is None and args.seq_len is None:
        return None
    return Workload(batch_size=args.batch or 1, seq_len=args.seq_len or 2048, kv_dtype=args.dtype)


def write_picture(result: Plan, path: str, title: str) -> None:
    target = Path(path)
    if target.suffix not in (".svg", ".html"):
        raise PlacementError(f"--out {path!r}: use a .svg or .html file name")
    text = plan_to_html(result, title) if target.suffix == ".html" else plan_to_svg(result, title)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(target)  # never leave a half-written picture


def is_checkpoint(source: str) -> bool:
    """A safetensors file, an index, or a folder of safetensors files (planned from headers alone)."""
    path = Path(source)
    if path.is_dir():
        return (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))
    return path.name.endswith((".safetensors", ".safetensors.index.json")) and path.exists()


def run_plan(args: argparse.Namespace) -> int:
    if is_checkpoint(args.model):
        if args.balance != "memory":
            raise PlacementError("--balance compute needs the model's modules: plan its config.json instead")
        result = plan_checkpoint(
            args.model,
            max_memory=memory_from_args(args),
            strategy=args.strategy,
            dtype=args.dtype,
            workload=workload_from_args(args),
        )
    else:
        result = plan(
            load_model(args.model),
            max_memory=memory_from_args(args),
            strategy=args.strategy,
            dtype=args.dtype,
            workload=workload_from_args(args),
            balance=args.balance,
        )
    print(json.dumps(plan_to_json(result), indent=2) if args.json else result)
    if args.out:
        write_picture(result, args.out, f"{args.model}")
        if not args.json:
            print(f"picture written to {args.out}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    sides = compare(model, memory_from_args(args), strategy=args.strategy, dtype=args.dtype)
    devices = list(dict.fromkeys(d for side in sides for d in side.device_bytes))
    rows = [("", *(side.method for side in sides))]
    for device in devices:
        rows.append((f"bytes on {device}", *(_gib(side.device_bytes.get(device, 0)) for side in sides)))
    rows.append(("blocks off the GPUs", *(str(len(side.offloaded)) for side in sides)))
    rows.append(("largest GPU / mean", *(f"{side.peak_over_mean:.2f}" for side in sides)))
    rows.append(
        (
            "min GPU memory, no offload",
            *(_gib(side.min_gpu_memory) if side.min_gpu_memory else "-" for side in sides),
        )
    )
    rows.append(("time (sizes + placement)", *(f"{side.seconds * 1e3:.1f} ms" for side in sides)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def run_export(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    result = plan(model, max_memory=memory_from_args(args), strategy=args.strategy, dtype=args.dtype)
    print(export(result, model, args.to))
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_models() -> int:
    from . import catalog

    for name in catalog.names():
        print(f"{name:24s} {catalog.parameter_count(name) / 1e9:8.2f} B parameters")
    return 0


def run_demo() -> int:
    """The main job on the bundled default: plan, show, and compare with accelerate's 'balanced'."""
    model = load_model(DEMO_MODEL)
    memory = {**parse_gpus(DEMO_GPUS), "cpu": parse_size(DEMO_CPU)}
    start = time.perf_counter()
    result = plan(model, max_memory=memory, strategy="balanced", dtype="bfloat16")
    ours = time.perf_counter() - start
    print(f"{DEMO_MODEL} (bfloat16) on GPUs {DEMO_GPUS} + CPU {DEMO_CPU}\n")
    print(result)
    start = time.perf_counter()
    theirs = accelerate_device_map(model, memory, "balanced", list(model._no_split_modules), "bfloat16")
    acc_time = time.perf_counter() - start
    offloaded = [k for k, v in theirs.items() if v in ("cpu", "disk")]
    tree = ModuleTree.from_module(model, dtype="bfloat16")
    loads: dict = {}
    for name, device in theirs.items():
        loads[device] = loads.get(device, 0) + tree.module_bytes(name)
    print("\naccelerate 'balanced' (get_balanced_memory + infer_auto_device_map) on the same inputs:")
    for device, used in loads.items():
        print(f"  {device}: {used / 2**30:.2f} GiB")
    more = " ..." if len(offloaded) > 4 else ""
    print(f"  {len(offloaded)} module(s) off the GPUs: {', '.join(offloaded[:4])}{more}")
    print(f"devicemap: {len(result.offloaded)} block(s) off the GPUs")
    print(f"time: devicemap {ours * 1e3:.1f} ms, accelerate {acc_time * 1e3:.1f} ms ({acc_time / ours:.1f}x)")
    write_picture(result, DEMO_PICTURE, f"{DEMO_MODEL} on {DEMO_GPUS}")
    print(f"picture of the plan: {DEMO_PICTURE}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # accelerate warns about every GPU index this machine lacks; planning for other machines is the point.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        if args.command == "demo":
            return run_demo()
        if args.command == "models":
            return run_models()
        if args.command == "compare":
            return run_compare(args)
        if args.command == "export":
            return run_export(args)
        return run_plan(args)
    except DoesNotFitError as err:
        print(f"devicemap: {err}", file=sys.stderr)
        return 1
    except (PlacementError, FileNotFoundError, json.JSONDecodeError, OSError) as err:
        print(f"devicemap: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
