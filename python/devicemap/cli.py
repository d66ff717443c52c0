"""The ``devicemap`` command: plan a model on a device spec and show where every layer goes.

    devicemap demo                                   # the bundled default: llama-3-8b on 2 x 8 GiB
    devicemap models                                 # bundled model shapes
    devicemap plan llama-3-70b --gpus 4x24GiB --cpu 128GiB --dtype bfloat16 --out plan.svg
    devicemap plan ./my-model/config.json --max-memory 0=20GiB,1=20GiB,cpu=64GiB --json
    devicemap plan ./checkpoint/ --gpus 2x80GiB --dtype bfloat16           # safetensors headers only
    devicemap compare mixtral-8x7b --gpus 2x48GiB --cpu 64GiB --dtype bfloat16
    devicemap export llama-3-70b --gpus 4x40GiB --dtype bfloat16 --to vllm

Exit codes: 0 planned; 1 the model does not fit; 2 bad usage or input (one line on stderr naming the
input and the fix); 3 a bug in devicemap (a traceback to report); 130 interrupted; 141 the output was
closed early (e.g. piped into ``head``), as for a command stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

from . import __version__, cli_inputs
from .checkpoint import plan_checkpoint
from .compare import accelerate_device_map, compare
from .errors import DoesNotFitError, InternalError, InvalidOptionError, PlacementError
from .export import TARGETS, export
from .memory import DeviceKey, parse_size
from .planning import STRATEGIES, Plan, plan
from .render import plan_to_html, plan_to_svg
from .tree import ModuleTree
from .workload import Workload

DEMO_MODEL = "llama-3-8b"
DEMO_GPUS = "2x8GiB"
DEMO_CPU = "64GiB"
DEMO_PICTURE = "devicemap-demo.svg"

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for `cat big | head -1`


class _Parser(argparse.ArgumentParser):
    """argparse that raises a devicemap error instead of printing usage and exiting, so every bad input
    ends the same way: one ``devicemap: ...`` line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise InvalidOptionError(f"{message} (see `{self.prog} --help`)")


def add_model_and_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="catalog name (see `devicemap models`), config.json, model folder, or a safetensors checkpoint "
        "(file, index or folder; `plan` reads its headers only)",
    )
    p.add_argument(
        "--gpus",
        help="GPU sizes: '4x24GiB' or '80GiB,40GiB'; a number without a unit is bytes and must be >= 1 MiB",
    )
    p.add_argument("--cpu", help="CPU memory for offloaded layers, e.g. '64GiB'")
    p.add_argument("--disk", action="store_true", help="allow offloading to disk")
    p.add_argument(
        "--max-memory",
        help="accelerate-style spec instead of --gpus/--cpu/--disk: '0=20GiB,1=20GiB,cpu=64GiB,disk' "
        "(each device once; every device but disk needs a size)",
    )
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    p.add_argument(
        "--dtype",
        help=f"size weights as this dtype: {cli_inputs.accepted_dtypes()}; default: the model's own dtypes",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="devicemap",
        description="Decide where each layer of a model lives.",
        epilog="exit codes: 0 planned, 1 the model does not fit, 2 bad usage or input, 3 a bug in devicemap "
        "(please report it), 130 interrupted, 141 output closed early (e.g. piped into head)",
    )
    parser.add_argument("--version", action="version", version=f"devicemap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help=f"plan {DEMO_MODEL} on {DEMO_GPUS} + {DEMO_CPU} CPU and compare with accelerate"
    )
    sub.add_parser("models", help="list the bundled model shapes")
    p = sub.add_parser("plan", help="plan a model on a device spec")
    add_model_and_devices(p)
    p.add_argument("--batch", type=int, help="plan KV cache and activations for this batch size (>= 1)")
    p.add_argument(
        "--seq-len",
        type=int,
        help="... and this sequence length (>= 1; default 2048 with --batch; --seq-len alone plans batch 1)",
    )
    p.add_argument(
        "--kv-dtype",
        help="dtype of the KV cache (with --batch/--seq-len); default: the compute dtype, i.e. --dtype when it "
        "is a floating dtype, else the config's dtype, else bfloat16",
    )
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
                "runtime": u.runtime,
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
    """The device spec: --max-memory alone, or --gpus/--cpu/--disk (never a mix, which would be ambiguous)."""
    if args.max_memory is not None:
        mixed = [flag for flag, given in (("--gpus", args.gpus), ("--cpu", args.cpu)) if given is not None]
        mixed += ["--disk"] if args.disk else []
        if mixed:
            raise InvalidOptionError(
                f"--max-memory cannot be combined with {' and '.join(mixed)}: it names every device itself; "
                "use one or the other, e.g. --max-memory 0=24GiB,cpu=64GiB,disk"
            )
        return cli_inputs.max_memory(args.max_memory)
    memory: dict[DeviceKey, object] = dict(cli_inputs.gpu_sizes(args.gpus)) if args.gpus is not None else {}
    if args.cpu is not None:
        memory["cpu"] = cli_inputs.size("--cpu", args.cpu)
    if args.disk:
        memory["disk"] = 0
    if not memory:
        raise InvalidOptionError(
            "give the devices: --gpus 2x24GiB [--cpu 64GiB] [--disk], or --max-memory ..."
        )
    return memory


def workload_from_args(
    args: argparse.Namespace, source: cli_inputs.ModelSource, dtype: Optional[str]
) -> Optional[Workload]:
    batch = cli_inputs.at_least_one("--batch", args.batch)
    seq_len = cli_inputs.at_least_one("--seq-len", args.seq_len)
    if batch is None and seq_len is None:
        if args.kv_dtype is not None:
            raise InvalidOptionError("--kv-dtype sizes the KV cache: give --batch and/or --seq-len with it")
        return None
    kv_dtype = cli_inputs.kv_dtype(args.kv_dtype, dtype, source)
    return Workload(batch_size=batch or 1, seq_len=seq_len or 2048, kv_dtype=kv_dtype)


def write_picture(result: Plan, path: Path, title: str) -> None:
    """Write through a private temporary file beside the target, so a failure never leaves half a picture
    (nor overwrites anything but the target)."""
    text = plan_to_html(result, title) if path.suffix.lower() == ".html" else plan_to_svg(result, title)
    temporary: Optional[str] = None
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as err:
        raise InvalidOptionError(f"cannot write the picture {str(path)!r}: {err.strerror or err}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def run_plan(args: argparse.Namespace) -> int:
    source = cli_inputs.model_source(args.model)
    memory = memory_from_args(args)
    dtype = cli_inputs.weights_dtype(args.dtype, source)
    workload = workload_from_args(args, source, dtype)
    picture = cli_inputs.picture_path(args.out) if args.out is not None else None
    if source.kind == "checkpoint":
        if args.balance != "memory":
            raise InvalidOptionError(
                "--balance compute needs the model's modules: plan its config.json (or the catalog name) instead"
            )
        result = plan_checkpoint(
            str(source.path), max_memory=memory, strategy=args.strategy, dtype=dtype, workload=workload
        )
    else:
        result = plan(
            source.meta_model("plan"),
            max_memory=memory,
            strategy=args.strategy,
            dtype=dtype,
            workload=workload,
            balance=args.balance,
        )
    print(json.dumps(plan_to_json(result), indent=2) if args.json else result)
    if picture is not None:
        write_picture(result, picture, f"{args.model}")
        if not args.json:
            print(f"picture written to {args.out}")
    return 0


def model_memory_dtype(args: argparse.Namespace, command: str):
    """The inputs `compare` and `export` share: the meta model, the device spec and the dtype."""
    source = cli_inputs.model_source(args.model)
    memory = memory_from_args(args)
    dtype = cli_inputs.weights_dtype(args.dtype, source)
    return source.meta_model(command), memory, dtype


def run_compare(args: argparse.Namespace) -> int:
    model, memory, dtype = model_memory_dtype(args, "compare")
    sides = compare(model, memory, strategy=args.strategy, dtype=dtype)
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
    model, memory, dtype = model_memory_dtype(args, "export")
    result = plan(model, max_memory=memory, strategy=args.strategy, dtype=dtype)
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
    from . import catalog

    model = catalog.build_meta_model(DEMO_MODEL)
    memory = {**cli_inputs.gpu_sizes(DEMO_GPUS), "cpu": parse_size(DEMO_CPU)}
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
    write_picture(result, Path(DEMO_PICTURE), f"{DEMO_MODEL} on {DEMO_GPUS}")
    print(f"picture of the plan: {DEMO_PICTURE}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return run_demo()
    if args.command == "models":
        return run_models()
    if args.command == "compare":
        return run_compare(args)
    if args.command == "export":
        return run_export(args)
    return run_plan(args)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command; return its exit code (see the module docstring). Bad input never shows a traceback."""
    # accelerate warns about every GPU index this machine lacks; planning for other machines is the point.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        code = run(build_parser().parse_args(argv))
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_OUTPUT_CLOSED
    except KeyboardInterrupt:
        print("devicemap: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DoesNotFitError as err:
        print(f"devicemap: {err}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except InternalError:
        return _report_bug()
    except PlacementError as err:
        print(f"devicemap: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - anything else is a devicemap bug: show it, ask for a report
        return _report_bug()


def _report_bug() -> int:
    traceback.print_exc()
    print(
        "devicemap: internal error (a bug in devicemap, not in your input); please report it with the "
        "command line and the traceback above at the project's issue tracker",
        file=sys.stderr,
    )
    return EXIT_BUG


def _discard_stdout() -> None:
    """After the reader went away, point stdout at /dev/null so Python's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured in tests): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
