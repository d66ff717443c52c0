"""The ``devicemap`` command: plan a model on a device spec and show where every layer goes.

    devicemap demo                                   # the bundled default: llama-3-8b on 2 x 8 GiB
    devicemap models                                 # bundled model shapes
    devicemap plan llama-3-70b --gpus 4x24GiB --cpu 128GiB --dtype bfloat16 --out plan.svg
    devicemap plan ./my-model/config.json --max-memory 0=20GiB,1=20GiB,cpu=64GiB --json
    devicemap plan ./my-model/ --gpus 2x24GiB --pin lm_head=0 --gpu0-reserve 2GiB --save device_map.json
    devicemap plan ./checkpoint/ --gpus 2x80GiB --dtype bfloat16           # safetensors headers only
    devicemap compare mixtral-8x7b --gpus 2x48GiB --cpu 64GiB --dtype bfloat16
    devicemap export llama-3-70b --gpus 4x40GiB --dtype bfloat16 --to vllm

Exit codes: 0 planned; 1 the model does not fit; 2 bad usage or input (one line on stderr naming the
input and the fix); 3 a bug in devicemap (a traceback to report); 130 interrupted; 141 the output was
closed early (e.g. piped into ``head``), as for a command stopped by SIGPIPE.

``--save device_map.json`` writes the plan's device map, which loads back with
``from_pretrained(model, device_map=json.load(open("device_map.json")))``. ``--json`` prints every
command's result as JSON; the schema is in :mod:`devicemap.cli.json_output`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from .. import catalog
from .._core import __version__
from ..catalog import trees
from ..catalog.planning import plan_shape
from ..catalog.trees import CatalogShape
from ..cost.engine import ENGINE_PRESETS
from ..errors import DoesNotFitError, InternalError, InvalidOptionError, PlacementError
from ..formatting import shown_message
from ..inputs.memory import DeviceKey, device_key, parse_size
from ..inputs.options import OBJECTIVES, STRATEGIES, PlacementOptions
from ..planners.api import plan, plan_checkpoint
from ..plans import Plan
from ..sizing.tree import ModuleTree, declared_no_split_classes
from ..sizing.workload import Workload
from . import inputs as cli_inputs
from . import json_output as cli_json
from .accelerate_side import accelerate_device_map, port_applies, port_note
from .compare import compare, plan_of_map
from .export import TARGETS, export
from .render import plan_to_html, plan_to_svg

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


def add_placement_options(p: argparse.ArgumentParser) -> None:
    """Flags that steer where layers go, for the commands that make a devicemap plan."""
    p.add_argument(
        "--pin",
        action="append",
        metavar="MODULE=DEVICE",
        help="keep a module on a device, e.g. --pin lm_head=0 --pin model.embed_tokens=cpu (repeatable; "
        "the device must be in the device spec)",
    )
    p.add_argument(
        "--gpu0-reserve",
        metavar="SIZE",
        help="memory to keep free on GPU 0 on top of the plan, e.g. 2GiB (for generate's extra buffers)",
    )
    p.add_argument(
        "--quant",
        choices=tuple(cli_inputs.QUANT_PRESETS),
        help="size weights as this quantizer stores them and keep its offload rules (bnb-*: bitsandbytes, "
        "nf4 4-bit / double-quant / fp4 / LLM.int8 / LLM.int8 with fp32 CPU offload; torchao-*: weight-only "
        "int8 / fp8; gguf-*: the tensors llama.cpp loads from a GGUF file of that type, for --to llama.cpp); a "
        "pre-quantized checkpoint needs none, its headers give the sizes",
    )
    p.add_argument(
        "--offload-buffers",
        action="store_true",
        help="offload buffers with their layers (default: buffers of offloaded layers stay on the GPU "
        "that runs them, and the plan reserves room for them there)",
    )


def add_no_split(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-split",
        action="append",
        metavar="CLASS",
        help="a module class never split across devices (repeatable); when given, these REPLACE the "
        "model's own _no_split_modules instead of adding to them",
    )


def add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json", action="store_true", help=f"print {what} as JSON (see devicemap.cli.json_output)"
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
    p.add_argument(
        "--execution-device",
        metavar="DEVICE",
        help="where layers stored on the CPU or disk compute: a GPU (e.g. 1 or cuda:1; it keeps the room to "
        "stage them) or cpu; default: GPU 0 when it has room, else the GPU keeping the most layers on the "
        "GPUs, else the CPU for layers no GPU can stage",
    )
    p.add_argument(
        "--objective",
        default="memory",
        choices=OBJECTIVES,
        help="memory (default: the plan of --strategy) or speed: the placement with the least predicted decode "
        "time on --hardware (needed) within memory, e.g. MoE experts stored and run on the CPU",
    )
    add_placement_options(p)
    add_no_split(p)
    add_json(p, "the plan, its inputs and every device's bytes")
    p.add_argument(
        "--hardware",
        metavar="GPU[,HOST]",
        help="predict prefill and decode time of the plan on this hardware: a GPU preset for every GPU of the "
        "spec (h100-sxm, a100-80gb-sxm, l40s, rtx-4090, ...) and a host preset (desktop-ddr5, server-ddr5-12ch, "
        "...) or 'measure' for this machine; uses --batch/--seq-len (default batch 1, 2048 tokens)",
    )
    add_engine(p)
    p.add_argument(
        "--explain",
        action="store_true",
        help="list every block on the CPU or disk and why it is there (default: the first 10)",
    )
    p.add_argument("--out", help="write a picture of the plan: a .svg or .html file")
    p.add_argument(
        "--save",
        metavar="FILE",
        help="write the plan's device_map as JSON (e.g. device_map.json), the form "
        "from_pretrained(device_map=...) and accelerate take",
    )
    c = sub.add_parser("compare", help="devicemap and accelerate side by side on the same inputs")
    add_model_and_devices(c)
    c.add_argument(
        "--hardware",
        metavar="GPU[,HOST]",
        help="also predict each placement's decode tokens/s on this hardware (batch 1, 2048 tokens)",
    )
    add_engine(c)
    add_no_split(c)
    add_json(c, "both sides")
    e = sub.add_parser("export", help="print the split for another engine")
    add_model_and_devices(e)
    e.add_argument("--to", required=True, choices=TARGETS, help="target engine")
    e.add_argument(
        "--objective",
        default="memory",
        choices=OBJECTIVES,
        help="memory (default) or speed (needs --hardware): with speed, MoE experts the plan keeps and runs "
        "on the CPU become llama.cpp's --n-cpu-moe / -ot flags",
    )
    e.add_argument("--hardware", metavar="GPU[,HOST]", help="the hardware --objective speed plans for")
    add_engine(e, default_note="llama.cpp with --to llama.cpp, else accelerate")
    add_placement_options(e)
    add_no_split(e)
    add_json(e, "the target, the exported text and its numbers")
    return parser


def memory_from_args(args: argparse.Namespace) -> dict[DeviceKey, int]:
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
    memory: dict[DeviceKey, int] = dict(cli_inputs.gpu_sizes(args.gpus)) if args.gpus is not None else {}
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
    args: argparse.Namespace, source: cli_inputs.ModelSource, dtype: str | None
) -> Workload | None:
    batch = cli_inputs.at_least_one("--batch", args.batch)
    seq_len = cli_inputs.at_least_one("--seq-len", args.seq_len)
    if batch is None and seq_len is None:
        if args.kv_dtype is not None:
            raise InvalidOptionError("--kv-dtype sizes the KV cache: give --batch and/or --seq-len with it")
        return None
    kv_dtype = cli_inputs.kv_dtype(args.kv_dtype, dtype, source)
    return Workload(batch_size=batch or 1, seq_len=seq_len or 2048, kv_dtype=kv_dtype)


def write_picture(result: Plan, path: Path, title: str) -> None:

    text = plan_to_html(result, title) if path.suffix.lower() == ".html" else plan_to_svg(result, title)
    write_atomically(path, text, "the picture")


def _default_file_mode() -> int:
    """The mode open() would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, text: str, what: str) -> None:
    """Write ``text`` to the file ``path`` names, respecting what is there.

    A regular file (or a new one) is written through a private temporary file beside it and renamed over
    it, so a failure never leaves half a file; through a symlink, the file it points at is replaced and the
    link kept. Our own standard output or error (``/dev/stdout``) gets the text as printed output; anything
    else that is not a regular file (a device such as ``/dev/null``, a FIFO) is written to as a shell
    redirection would, never replaced. A folder, or a symlink to nothing, is refused."""
    try:
        status = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        status = None
    except OSError as err:
        raise InvalidOptionError(f"cannot write {what} {str(path)!r}: {err.strerror or err}") from None
    if status is None:
        if path.is_symlink():
            raise InvalidOptionError(
                f"cannot write {what} {str(path)!r}: it is a symlink to {os.readlink(path)!r}, which does not "
                "exist: create the target or pass another path"
            )
        _replace_regular_file(path, text, what)
    elif stat.S_ISDIR(status.st_mode):
        raise InvalidOptionError(f"cannot write {what} {str(path)!r}: it is a folder; pass a file path")
    elif (stream := _own_stream(status)) is not None:
        stream.write(text)
        stream.flush()
    elif stat.S_ISREG(status.st_mode):
        _replace_regular_file(Path(os.path.realpath(path)), text, what)
    else:
        try:
            with open(path, "w", encoding="utf-8") as file:
                file.write(text)
        except OSError as err:
            raise InvalidOptionError(f"cannot write {what} {str(path)!r}: {err.strerror or err}") from None


def _own_stream(status: os.stat_result) -> TextIO | None:
    """This process's standard output or error, if it writes to the file ``status`` describes."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if os.path.samestat(status, os.fstat(stream.fileno())):
                return stream
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _replace_regular_file(path: Path, text: str, what: str) -> None:
    temporary: str | None = None
    try:
        import tempfile  # here: it imports shutil, bz2 and lzma, which every other command would pay for

        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, _default_file_mode())  # mkstemp makes it private (0600); a plain file is not
        os.replace(temporary, path)
    except OSError as err:
        raise InvalidOptionError(f"cannot write {what} {str(path)!r}: {err.strerror or err}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def add_engine(parser: argparse.ArgumentParser, default_note: str = "accelerate") -> None:
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINE_PRESETS),
        help="the software that runs the plan, whose fitted efficiencies the speed model uses with --hardware "
        f"(devicemap.cost.engine; default: {default_note}); ideal: the uncalibrated formulas",
    )


def engine_from_args(args: argparse.Namespace) -> str:
    """``--engine``, else llama.cpp's when exporting to it (its plan runs there), else accelerate's."""
    if args.engine is not None:
        return str(args.engine)
    return "llama.cpp" if getattr(args, "to", None) == "llama.cpp" else "accelerate"


def hardware_from_args(args: argparse.Namespace, memory: dict[DeviceKey, int]) -> Any:
    """``--hardware GPU[,HOST]`` for the spec's GPUs, run by ``--engine`` (None when absent);
    ``--objective speed`` needs it."""
    if args.hardware is not None:
        gpus = sum(1 for key in memory if isinstance(key, int))
        return cli_inputs.hardware(args.hardware, gpus, engine_from_args(args))
    if args.engine is not None:
        raise InvalidOptionError(
            f"--engine {args.engine} says what runs the plan for the speed model: add --hardware GPU[,HOST]"
        )
    if getattr(args, "objective", "memory") == "speed":
        raise InvalidOptionError(
            "--objective speed predicts decode time on some hardware: add --hardware GPU[,HOST] "
            "(e.g. --hardware rtx-4090,desktop-ddr5)"
        )
    return None


def placement_from_args(args: argparse.Namespace, memory: dict[DeviceKey, int]) -> dict:
    """--pin, --gpu0-reserve and --offload-buffers as the library's keyword arguments."""
    reserve = None
    if args.gpu0_reserve is not None:
        if 0 not in memory:
            raise InvalidOptionError(
                f"--gpu0-reserve {args.gpu0_reserve!r} keeps room on GPU 0, and the device spec has no GPU 0; "
                "add it with --gpus/--max-memory or drop --gpu0-reserve"
            )
        reserve = cli_inputs.size("--gpu0-reserve", args.gpu0_reserve)
    return {
        "pins": cli_inputs.pins(args.pin, memory),
        "gpu0_reserve": reserve,
        "offload_buffers": args.offload_buffers,
    }


def model_no_split(model) -> list[str]:
    """The classes a transformers model declares unsplittable (what the library uses by default)."""
    if isinstance(model, CatalogShape):
        return list(model.no_split_module_classes)
    return declared_no_split_classes(model)


def catalog_shape(source: cli_inputs.ModelSource, *needs_modules: object) -> CatalogShape | None:
    """The bundled model as data, planned without torch or transformers; None when the source is no catalog
    name, or when one of ``needs_modules`` (flags such as --quant or --hardware) asks for the model itself."""
    if any(needs_modules):
        return None
    return source.shape()


def run_plan(args: argparse.Namespace) -> int:
    source = cli_inputs.model_source(args.model)
    memory = memory_from_args(args)
    dtype = cli_inputs.weights_dtype(args.dtype, source)
    workload = workload_from_args(args, source, dtype)
    placement = placement_from_args(args, memory)
    picture = cli_inputs.picture_path(args.out) if args.out is not None else None
    saved = cli_inputs.output_file("--save", args.save, "device_map.json") if args.save is not None else None
    quant = cli_inputs.quantization(args.quant)
    execution_device = args.execution_device
    if execution_device is not None:
        # Checked before the model is sized: a wrong key is named at once.
        execution_device = PlacementOptions.parse(execution_device=execution_device).execution_device
    machine = hardware_from_args(args, memory)
    no_split: list[str] | None = None
    checkpoint_model: Any = (
        None  # a checkpoint's model, built from its config.json when the speed model needs it
    )
    if source.kind == "checkpoint":
        needs_modules = [
            flag
            for flag, given in (
                ("--balance compute", args.balance != "memory"),
                ("--no-split", args.no_split),
                ("--quant", args.quant),
                ("--execution-device", args.execution_device),
            )
            if given
        ]
        if needs_modules:
            raise InvalidOptionError(
                f"{' and '.join(needs_modules)} need the model's modules, and a checkpoint is planned from its "
                "headers: plan its config.json (or the catalog name) instead"
            )
        if machine is not None and source.config is None:
            raise InvalidOptionError(
                "--hardware and --objective speed cost the model's modules, built from its config.json: add "
                "the model's config.json beside the checkpoint"
            )
        # built once, for the speed objective and the estimate (the bytes are the headers')
        checkpoint_model = source.meta_model("plan") if machine is not None else None
        result = plan_checkpoint(
            str(source.path),
            max_memory=memory,
            strategy=args.strategy,
            dtype=dtype,
            workload=workload,
            # sized from the headers (a pre-quantized checkpoint at its stored width), costed on the
            # model its config.json describes
            objective=args.objective,
            hardware=machine if args.objective == "speed" else None,
            model=checkpoint_model if args.objective == "speed" else None,
            **placement,
        )
    elif (shape := catalog_shape(source, args.quant, args.objective == "speed", machine)) is not None:
        model = shape
        no_split = cli_inputs.no_split_classes(args.no_split, shape)
        result = plan_shape(
            shape,
            max_memory=memory,
            strategy=args.strategy,
            no_split_module_classes=no_split,
            dtype=dtype,
            workload=workload,
            balance=args.balance,
            execution_device=execution_device,
            **placement,
        )
        no_split = no_split if no_split is not None else model_no_split(shape)
    else:
        model = source.meta_model("plan")
        no_split = cli_inputs.no_split_classes(args.no_split, model)
        result = plan(
            model,
            max_memory=memory,
            strategy=args.strategy,
            no_split_module_classes=no_split,
            dtype=dtype,
            workload=workload,
            balance=args.balance,
            quantization_config=quant,
            execution_device=execution_device,
            objective=args.objective,
            hardware=machine if args.objective == "speed" else None,
            **placement,
        )
        no_split = no_split if no_split is not None else model_no_split(model)
    speed = None
    if machine is not None:
        described = model if source.kind != "checkpoint" else checkpoint_model
        speed = result.estimate(workload, machine, described, dtype=dtype)
    if args.json:
        # The CLI builds its Workload with a dtype name (cli_inputs.kv_dtype), never a torch.dtype.
        kv_dtype = workload.kv_dtype if workload is not None else None
        kv_dtype_name = kv_dtype if isinstance(kv_dtype, str) else None
        inputs = cli_json.inputs_json(
            model=args.model,
            source=source.kind,
            memory=memory,
            strategy=args.strategy,
            dtype=dtype,
            kv_dtype=kv_dtype_name,
            workload=workload,
            no_split=no_split,
            no_split_given=bool(args.no_split),
            quant=args.quant,
            execution_device=None if execution_device is None else device_key(execution_device),
            **placement,
        )
        printed = cli_json.plan_json(result, inputs)
        if speed is not None:
            printed["estimate"] = cli_json.estimate_json(speed)
        print(json.dumps(printed, indent=2))
    else:
        print(result.explain() if args.explain else result.table(more="devicemap plan --explain lists all"))
        if speed is not None:
            print(speed)
    if picture is not None:
        write_picture(result, picture, f"{args.model}")
        if not args.json:
            print(f"picture written to {args.out}")
    if saved is not None:
        write_atomically(saved, json.dumps(result.device_map, indent=2) + "\n", "the device map")
        if not args.json:
            print(f"device_map written to {args.save}")
    return 0


def model_memory_dtype(args: argparse.Namespace, command: str, *needs_modules: object):
    """The inputs `compare` and `export` share: the model source, meta model (a catalog model as data unless
    one of ``needs_modules`` asks for its modules), device spec, dtype and the --no-split classes (None: the
    model's own)."""
    source = cli_inputs.model_source(args.model)
    memory = memory_from_args(args)
    dtype = cli_inputs.weights_dtype(args.dtype, source)
    model = catalog_shape(source, *needs_modules) or source.meta_model(command)
    return source, model, memory, dtype, cli_inputs.no_split_classes(args.no_split, model)


def shared_inputs_json(args, source, model, memory, dtype, no_split, **placement) -> dict:
    return cli_json.inputs_json(
        model=args.model,
        source=source.kind,
        memory=memory,
        strategy=args.strategy,
        dtype=dtype,
        no_split=no_split if no_split is not None else model_no_split(model),
        no_split_given=no_split is not None,
        **placement,
    )


def run_compare(args: argparse.Namespace) -> int:
    # --hardware costs both maps with the speed model, which reads the model's modules
    source, model, memory, dtype, no_split = model_memory_dtype(args, "compare", args.hardware)
    if isinstance(model, CatalogShape) and not port_applies(memory):
        # an accelerate older than 1.15 counts GPUs through torch: run it on the model, as before
        source, model, memory, dtype, no_split = model_memory_dtype(args, "compare", True)
    machine = hardware_from_args(args, memory)
    sides = compare(model, memory, strategy=args.strategy, dtype=dtype, no_split_module_classes=no_split)
    speeds: list[float] = []
    if machine is not None:  # both placements costed by the same speed model on the same hardware
        workload = Workload()
        for side in sides:
            costed = plan_of_map(model, side.device_map, dtype)
            speeds.append(costed.estimate(workload, machine, model, dtype=dtype).tokens_per_second)
    if args.json:
        inputs = shared_inputs_json(args, source, model, memory, dtype, no_split)
        printed = cli_json.compare_json(sides, inputs)
        for side, speed in zip(printed["sides"], speeds, strict=False):
            side["predicted_decode_tokens_per_second"] = speed
        print(json.dumps(printed, indent=2))
        return 0
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
    if speeds:
        rows.append((f"decode on {args.hardware} (predicted)", *(f"{s:.2f} tokens/s" for s in speeds)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    if isinstance(model, CatalogShape):
        print(f"{port_note()} (so its time is the port's)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    needs_modules = (args.quant, args.objective == "speed")
    source, model, memory, dtype, no_split = model_memory_dtype(args, "export", *needs_modules)
    placement = placement_from_args(args, memory)
    machine = hardware_from_args(args, memory)
    if isinstance(model, CatalogShape):
        result = plan_shape(
            model,
            max_memory=memory,
            strategy=args.strategy,
            no_split_module_classes=no_split,
            dtype=dtype,
            **placement,
        )
    else:
        result = plan(
            model,
            max_memory=memory,
            strategy=args.strategy,
            no_split_module_classes=no_split,
            dtype=dtype,
            quantization_config=cli_inputs.quantization(args.quant),
            objective=args.objective,
            hardware=machine if args.objective == "speed" else None,
            **placement,
        )
    text = export(result, model, args.to)
    if args.json:
        inputs = shared_inputs_json(
            args, source, model, memory, dtype, no_split, quant=args.quant, **placement
        )
        printed = cli_json.export_json(result, model, args.to, text, inputs)
        printed["objective"] = args.objective
        # what the speed objective planned for (None: --hardware not given)
        printed["hardware"] = machine and {
            "gpus": [g.name for g in machine.gpus],
            "host": machine.host.name,
            "engine": machine.engine.name,
        }
        print(json.dumps(printed, indent=2))
    else:
        print(text)
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_models() -> int:
    for name in catalog.names():
        print(f"{name:24s} {catalog.parameter_count(name) / 1e9:8.2f} B parameters")
    return 0


def run_demo() -> int:
    """The main job on the bundled default: plan, show, and compare with accelerate's 'balanced'."""
    memory = {**cli_inputs.gpu_sizes(DEMO_GPUS), "cpu": parse_size(DEMO_CPU)}
    # the bundled model as data, unless the installed accelerate needs torch to count GPUs (before 1.15)
    shape = trees.shape(DEMO_MODEL) if port_applies(memory) else None
    model: Any = shape or catalog.build_meta_model(DEMO_MODEL)
    start = time.perf_counter()
    if isinstance(model, CatalogShape):  # the bundled model as data: no torch, no transformers
        result = plan_shape(model, max_memory=memory, strategy="balanced", dtype="bfloat16")
    else:
        result = plan(model, max_memory=memory, strategy="balanced", dtype="bfloat16")
    ours = time.perf_counter() - start
    print(f"{DEMO_MODEL} (bfloat16) on GPUs {DEMO_GPUS} + CPU {DEMO_CPU}\n")
    print(result)
    start = time.perf_counter()
    theirs = accelerate_device_map(model, memory, "balanced", model_no_split(model), "bfloat16")
    acc_time = time.perf_counter() - start
    offloaded = [k for k, v in theirs.items() if v in ("cpu", "disk")]
    tree = shape.tree("bfloat16") if shape else ModuleTree.from_module(model, dtype="bfloat16")
    loads: dict = {}
    for name, device in theirs.items():
        loads[device] = loads.get(device, 0) + tree.module_bytes(name)
    print("\naccelerate 'balanced' (get_balanced_memory + infer_auto_device_map) on the same inputs:")
    for device, used in loads.items():
        print(f"  {device}: {used / 2**30:.2f} GiB")
    more = " ..." if len(offloaded) > 4 else ""
    print(f"  {len(offloaded)} module(s) off the GPUs: {', '.join(offloaded[:4])}{more}")
    print(f"devicemap: {len(result.offloaded)} block(s) off the GPUs")
    if shape:
        print(f"time: devicemap {ours * 1e3:.1f} ms ({port_note()}, so not timed)")
    else:
        print(
            f"time: devicemap {ours * 1e3:.1f} ms, accelerate {acc_time * 1e3:.1f} ms ({acc_time / ours:.1f}x)"
        )
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


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code (see the module docstring). Bad input never shows a traceback."""
    # accelerate warns about every GPU index this machine lacks; planning for other machines is the point.
    # Quiet only while the command runs: a program calling main() keeps its own logging settings.
    accelerate_logger = logging.getLogger("accelerate")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        return _run_reporting_errors(argv)
    finally:
        accelerate_logger.setLevel(level)


def _run_reporting_errors(argv: list[str] | None) -> int:
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
        print(f"devicemap: {shown_message(str(err))}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except InternalError:
        return _report_bug()
    except PlacementError as err:
        print(f"devicemap: {shown_message(str(err))}", file=sys.stderr)
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
