"""GPU check: load a small model with accelerate's plan and devicemap's plans on real CUDA GPUs, check the
logits, and print measured prefill and decode times next to devicemap's estimates.

    .venv/bin/python benches/gpu_check.py                       # on a machine with CUDA GPUs
    .venv/bin/python benches/gpu_check.py --gpus 2 --model medium --gpu-preset a100-80gb-sxm
    .venv/bin/python benches/gpu_check.py --rehearse --quick    # the same flow on the CPU (GPUs played by it)

On a CPU-only machine it prints one line saying there is nothing to measure and exits 0.

What it does:

1. Builds a Llama-style model from a config (``--model tiny | small | medium``; or Mixtral-style,
   ``moe-tiny | moe-small``, whose experts the speed plan runs on the CPU; random weights, seeded),
   saves it as safetensors to a temporary folder, and computes the reference logits of the unsplit model
   on the CPU in float32: one prefill of ``--seq-len`` tokens and ``--decode`` decode steps (the decode
   tokens are the reference's greedy choices, fed to every variant, so logits are comparable).
2. Gives each GPU ``--gpu-fraction`` (default 0.6) of the model's size divided by the GPU count, and the
   CPU room for all of it, so part of the model is offloaded.
3. For each variant, plans on the meta model, loads the checkpoint with that plan, runs the prefill and
   the decode steps (``use_cache=True``, ``past_key_values``), best of ``--repeat`` (CUDA synchronized
   before every clock read; wall clock on the CPU), and checks the logits against the reference:

   - ``accelerate``: ``get_balanced_memory`` + ``infer_auto_device_map`` (as transformers' ``device_map=
     "auto"`` does), loaded with ``accelerate.load_checkpoint_and_dispatch``; offloaded layers are
     streamed to GPU 0 for every forward pass;
   - ``devicemap memory``: ``devicemap.plan`` (default objective: keep the most on the GPUs), loaded with
     ``devicemap.load_checkpoint``;
   - ``devicemap execution_device=cpu``: the same storage, offloaded blocks computed on the CPU (only
     activations cross PCIe);
   - ``devicemap speed``: ``plan(objective="speed")``, when this devicemap's ``plan`` accepts it.

   A variant is one entry of :data:`VARIANTS`: a new objective is one more row.
4. Estimates each plan with ``devicemap.cost.estimate.estimate`` on ``Hardware.preset(--gpu-preset, gpus=N)``
   with this host measured (``Hardware.measure_host``); in a rehearsal the "GPUs" are the CPU, described
   by the measured host's own numbers.

Prints a markdown table: variant, bytes per device, where offloaded blocks run, logits ok, measured and
estimated prefill / decode, measured / estimated. Exit status 1 when any variant's logits differ.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SKIP_LINE = (
    "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure — "
    "run it on a machine with CUDA GPUs"
)

MODELS: dict[str, dict[str, int]] = {
    # hidden, layers, vocab, intermediate, heads, kv heads
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        vocab_size=4096,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        vocab_size=32000,
        intermediate_size=2816,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "medium": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        vocab_size=32000,
        intermediate_size=5632,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}
MOE_MODELS: dict[str, dict[str, int]] = {
    # Mixtral-style: 8 routed experts, 2 per token. The speed objective keeps attention on the GPU and runs
    # experts it has no room for on the CPU: the CPU-run path of the speed model, measured.
    "moe-tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        vocab_size=4096,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    "moe-small": dict(
        hidden_size=1024,
        num_hidden_layers=8,
        vocab_size=32000,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
}
GPU_NAMES = (  # substrings of torch.cuda.get_device_name() -> devicemap GPU preset
    ("H100 PCIe", "h100-pcie"),
    ("H100", "h100-sxm"),
    ("A100-SXM4-40GB", "a100-40gb"),
    ("A100-PCIE-40GB", "a100-40gb"),
    ("A100 80GB PCIe", "a100-80gb-pcie"),
    ("A100", "a100-80gb-sxm"),
    ("L40S", "l40s"),
    ("4090", "rtx-4090"),
    ("3090", "rtx-3090"),
    ("A10G", "a10g"),
    ("T4", "t4"),
    ("L4", "l4"),
)


# ---------------------------------------------------------------------------------------------------------
# Variants: how each plan is made and loaded. Adding an objective = adding one Variant.


@dataclass
class Setup:
    config: Any
    meta_model: torch.nn.Module
    max_memory: dict[Any, int]
    dtype: torch.dtype
    checkpoint: Path
    offload_dir: Path
    rehearse: bool
    hardware: Any = None
    """What ``objective="speed"`` predicts decode time on (the hardware of the estimates)."""
    workload: Any = None


@dataclass
class Variant:
    name: str
    make_plan: Callable[[Setup], Any]
    """Returns a devicemap Plan (accelerate's map is wrapped in one, for the estimate and the summary)."""
    load: Callable[[Setup, Any], torch.nn.Module]
    available: Callable[[], str | None] = lambda: None
    """None when the variant can run here, else why not (printed, row skipped)."""


def _devicemap_plan(**options: Any) -> Callable[[Setup], Any]:
    def make(setup: Setup) -> Any:
        import devicemap

        given = dict(options)
        if given.get("objective") == "speed":  # it plans for the hardware the estimates use
            given.update(hardware=setup.hardware, workload=setup.workload)
        return devicemap.plan(setup.meta_model, max_memory=setup.max_memory, dtype=setup.dtype, **given)

    return make


def _devicemap_load(setup: Setup, plan: Any) -> torch.nn.Module:
    import devicemap

    return devicemap.load_checkpoint(
        _empty_model(setup.config),
        setup.checkpoint,
        plan,
        offload_dir=setup.offload_dir,
        dtype=setup.dtype,
        rehearse=setup.rehearse,
        progress=False,
    )


def _accelerate_plan(setup: Setup) -> Any:
    """What transformers does for device_map="auto", as a devicemap Plan the speed model can cost (offloaded
    layers run on the map's first GPU, as accelerate's dispatch runs them)."""
    from devicemap.cli.compare import accelerate_device_map, plan_of_map

    no_split = list(setup.meta_model._no_split_modules or [])
    device_map = accelerate_device_map(setup.meta_model, setup.max_memory, "balanced", no_split, setup.dtype)
    return plan_of_map(setup.meta_model, device_map, setup.dtype)


def _accelerate_load(setup: Setup, plan: Any) -> torch.nn.Module:
    from accelerate import load_checkpoint_and_dispatch

    import devicemap

    # In a rehearsal every GPU index becomes devicemap's CPU stand-in, which accelerate treats as a GPU
    # (resident layers stay put, offloaded ones are streamed in by its own hooks).
    device_map = devicemap.dispatch_map(plan.device_map, rehearse=setup.rehearse)
    if setup.config.model_type == "mixtral":
        # transformers 5 saves Mixtral's fused experts in the per-expert layout of the Hub and converts them
        # back while loading; accelerate's own loader does not, so the model is loaded by transformers on
        # the CPU and dispatched with accelerate's hooks (the same hooks, placed on a model in memory).
        from accelerate import dispatch_model
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(setup.checkpoint, dtype=setup.dtype).eval()
        return dispatch_model(loaded, device_map=device_map, offload_dir=str(setup.offload_dir))
    return load_checkpoint_and_dispatch(
        _empty_model(setup.config),
        str(setup.checkpoint),
        device_map=device_map,
        offload_folder=str(setup.offload_dir),
        dtype=setup.dtype,
        no_split_module_classes=list(setup.meta_model._no_split_modules or []),
    )


VARIANTS: list[Variant] = [
    Variant("accelerate", _accelerate_plan, _accelerate_load),
    Variant("devicemap memory", _devicemap_plan(), _devicemap_load),
    Variant("devicemap execution_device=cpu", _devicemap_plan(execution_device="cpu"), _devicemap_load),
    Variant("devicemap speed", _devicemap_plan(objective="speed"), _devicemap_load),
]


# ---------------------------------------------------------------------------------------------------------
# Model, reference, timing


def build_config(size: str) -> Any:
    from transformers import LlamaConfig, MixtralConfig

    if size in MOE_MODELS:
        return MixtralConfig(**MOE_MODELS[size], tie_word_embeddings=False, max_position_embeddings=4096)
    return LlamaConfig(**MODELS[size], tie_word_embeddings=False, max_position_embeddings=4096)


def causal_lm(config: Any) -> torch.nn.Module:
    """The model of ``config`` (Llama or Mixtral), on the current default device."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).eval()


def _empty_model(config: Any) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return causal_lm(config)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Run:
    prefill_logits: torch.Tensor
    decode_logits: list[torch.Tensor]
    prefill_seconds: float
    decode_seconds: float
    """Mean seconds per decode step."""


def _cache_keyword(model: torch.nn.Module) -> str:
    """``past_key_values``, or ``cache`` on transformers versions that renamed it (5.2x deprecates the old name)."""
    forward = getattr(model, "_old_forward", model.forward)  # accelerate's hooks wrap forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def run_model(model: torch.nn.Module, ids: torch.Tensor, decode_ids: list[torch.Tensor], repeat: int) -> Run:
    """Prefill ``ids`` then decode ``decode_ids`` one token at a time with the KV cache; best of
    ``repeat`` for each phase (the logits of the last run), after one untimed warm-up of both phases."""
    best_prefill = best_decode = float("inf")
    prefill_logits: torch.Tensor | None = None
    decode_logits: list[torch.Tensor] = []
    keyword = _cache_keyword(model)
    with torch.no_grad():
        out = model(ids, use_cache=True)  # warm-up: kernels, allocator, hooks' first moves
        if decode_ids:
            model(decode_ids[0], use_cache=True, **{keyword: _cache_of(out)})
        for _ in range(max(1, repeat)):
            _sync()
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            _sync()
            best_prefill = min(best_prefill, time.perf_counter() - start)
            prefill_logits = out.logits[:, -1].float().cpu()
            past = _cache_of(out)
            decode_logits = []
            elapsed = 0.0
            for token in decode_ids:
                _sync()
                start = time.perf_counter()
                out = model(token, use_cache=True, **{keyword: past})
                _sync()
                elapsed += time.perf_counter() - start
                past = _cache_of(out)
                decode_logits.append(out.logits[:, -1].float().cpu())
            if decode_ids:
                best_decode = min(best_decode, elapsed / len(decode_ids))
    assert prefill_logits is not None
    return Run(prefill_logits, decode_logits, best_prefill, best_decode if decode_ids else float("nan"))


def reference_run(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[Run, list[torch.Tensor]]:
    """The unsplit model's logits and its greedy decode tokens (fed to every variant)."""
    tokens: list[torch.Tensor] = []
    keyword = _cache_keyword(model)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, last = _cache_of(out), out.logits[:, -1]
        for _ in range(steps):
            token = last.argmax(-1, keepdim=True)
            tokens.append(token)
            out = model(token, use_cache=True, **{keyword: past})
            past, last = _cache_of(out), out.logits[:, -1]
    return run_model(model, ids, tokens, 1), tokens


def max_difference(run: Run, reference: Run) -> float:
    pairs = [(run.prefill_logits, reference.prefill_logits)]
    pairs += list(zip(run.decode_logits, reference.decode_logits, strict=True))
    return max(float((a - b).abs().max()) for a, b in pairs)


def tolerance(dtype: torch.dtype) -> float:
    """Largest absolute logit difference accepted against the float32 CPU reference."""
    return 1e-3 if dtype == torch.float32 else 0.15


# ---------------------------------------------------------------------------------------------------------
# Hardware for the estimates


def guess_preset() -> str | None:
    name = torch.cuda.get_device_name(0)
    for part, preset in GPU_NAMES:
        if part.lower() in name.lower():
            return preset
    return None


def hardware_for(args: argparse.Namespace, gpus: int, directory: Path) -> tuple[Any, str]:
    """The Hardware to estimate with, and a line saying what it is."""
    from devicemap.cost.engine import Engine
    from devicemap.cost.hardware import GPU, Hardware

    measured = Hardware.measure_host(None, 0, quick=True, directory=directory).host
    engine = Engine.preset(args.engine)
    if args.rehearse:
        stand_in = GPU(
            name="cpu-stand-in",
            memory_bytes=2**40,
            memory_bandwidth=measured.memory_bandwidth,
            flops=measured.flops_bf16,
            flops_fp32=measured.flops_fp32,
            host_to_device=1e13,  # the stand-in "streams" a CPU-stored layer without copying it
            source="rehearsal: the measured host plays every GPU",
            memory_efficiency=1.0,
            compute_efficiency=1.0,
        )
        # No link to copy over (the engine's share of the link rate and its cost per hop are about a PCIe
        # copy), and the "GPUs" run the same CPU kernels as the CPU: a CPU-only share would only bias
        # between identical devices. The per-pass overhead stays.
        engine = dataclasses.replace(
            engine,
            name=f"{engine.name} (rehearsal)",
            stream_efficiency_pageable=1.0,
            hop_seconds=0.0,
            cpu_dense_efficiency=1.0,
            cpu_expert_efficiency=1.0,
        )
        hardware = Hardware(gpus=(stand_in,) * gpus, host=measured, engine=engine)
        return hardware, (
            f"rehearsal: {gpus} GPU(s) played by this CPU (measured host numbers); engine {engine.name}"
        )
    preset = args.gpu_preset if args.gpu_preset != "auto" else guess_preset()
    note = ""
    if preset is None:
        preset, note = (
            "rtx-4090",
            f" (no preset matches {torch.cuda.get_device_name(0)!r}: pass --gpu-preset)",
        )
    hardware = Hardware.preset(preset, gpus=gpus, host=measured, engine=engine)
    return hardware, f"GPUs: {gpus} x {preset}{note}; host: measured; engine {engine.name}"


# ---------------------------------------------------------------------------------------------------------
# Table


def _bytes(n: float) -> str:
    if n == 0:
        return "0"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "—"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _device(d: Any) -> str:
    return f"GPU {d}" if isinstance(d, int) else str(d)


def placement_summary(plan: Any) -> str:
    return ", ".join(f"{_device(d)} {_bytes(b)}" for d, b in plan.device_bytes.items() if b or d != "disk")


def offloaded_run_on(plan: Any) -> str:
    runs = sorted(
        {_device(plan.execution_map[b]) for b, d in plan.assignments.items() if d in ("cpu", "disk")}
    )
    return ", ".join(runs) or "nothing offloaded"


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompt, few steps")
    parser.add_argument("--rehearse", action="store_true", help="run on the CPU with GPUs played by it")
    parser.add_argument(
        "--model",
        choices=sorted({**MODELS, **MOE_MODELS}),
        default=None,
        help="default: small (quick: tiny); moe-*: Mixtral-style, experts run on the CPU by the speed plan",
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs to plan over (default: all visible; 1 rehearsing)"
    )
    parser.add_argument("--gpu-fraction", type=float, default=0.6, help="GPU memory, as a share of the model")
    parser.add_argument("--seq-len", type=int, default=None, help="prefill tokens (default 512; quick 32)")
    parser.add_argument("--decode", type=int, default=None, help="decode steps (default 32; quick 4)")
    parser.add_argument("--repeat", type=int, default=None, help="best of N runs (default 3; quick 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--gpu-preset", default="auto", help="devicemap GPU preset for the estimate (auto: by name)"
    )
    parser.add_argument(
        "--engine",
        choices=("accelerate", "ideal"),
        default="accelerate",
        help="speed-model engine of the estimates and the speed plan (devicemap.cost.engine); accelerate: "
        "the calibrated default, ideal: the uncalibrated formulas (to compare)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not available and not args.rehearse:
        print(SKIP_LINE)
        return 0
    gpus = args.gpus if args.gpus is not None else (1 if args.rehearse else available)
    if gpus < 1 or (not args.rehearse and gpus > available):
        parser.error(f"--gpus must be between 1 and {available if not args.rehearse else 'any'}, got {gpus}")
    size = args.model or ("tiny" if args.quick else "small")
    seq_len = args.seq_len or (32 if args.quick else 512)
    steps = args.decode if args.decode is not None else (4 if args.quick else 32)
    repeat = args.repeat or (1 if args.quick else 3)
    dtype = getattr(torch, args.dtype)

    import devicemap
    from devicemap.cost.estimate import estimate

    with workspace() as work:
        config = build_config(size)
        torch.manual_seed(args.seed)
        reference_model = causal_lm(config)
        reference_model.save_pretrained(work / "ckpt", max_shard_size="100GB")
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator)
        reference, tokens = reference_run(reference_model, ids, steps)
        del reference_model
        gc.collect()

        with torch.device("meta"):
            meta_model = causal_lm(config).to(dtype)
        total = devicemap.ModuleTree.from_module(meta_model, dtype=dtype).total_bytes
        per_gpu = int(total * args.gpu_fraction / gpus)
        max_memory: dict[Any, int] = dict.fromkeys(range(gpus), per_gpu)
        max_memory["cpu"] = 4 * total
        hardware, hardware_line = hardware_for(args, gpus, work)
        workload = devicemap.Workload(batch_size=1, seq_len=seq_len)
        setup = Setup(
            config,
            meta_model,
            max_memory,
            dtype,
            work / "ckpt",
            work / "offload",
            args.rehearse,
            hardware,
            workload,
        )

        print(
            f"gpu_check: {type(meta_model).__name__} {size} model ({_bytes(total)} in {args.dtype}), {gpus} GPU(s) of "
            f"{_bytes(per_gpu)} each + CPU; prefill {seq_len} tokens, {steps} decode steps, best of {repeat}"
        )
        print(f"hardware for the estimates: {hardware_line}")
        print()
        header = (
            "variant",
            "weights per device",
            "offloaded run on",
            "logits ok",
            "prefill measured",
            "prefill estimated",
            "decode measured",
            "decode estimated",
            "measured / estimated (prefill, decode)",
        )
        rows: list[tuple[str, ...]] = []
        skipped: list[str] = []
        failed = False
        for variant in VARIANTS:
            reason = variant.available()
            if reason is not None:
                skipped.append(f"{variant.name}: skipped, {reason}")
                continue
            plan = variant.make_plan(setup)
            shutil.rmtree(setup.offload_dir, ignore_errors=True)
            setup.offload_dir.mkdir()
            model = variant.load(setup, plan)
            run = run_model(model, ids, tokens, repeat)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            diff = max_difference(run, reference)
            ok = diff <= tolerance(dtype)
            failed |= not ok
            predicted = estimate(plan, workload, hardware, meta_model, dtype=dtype)
            rows.append(
                (
                    variant.name,
                    placement_summary(plan),
                    offloaded_run_on(plan),
                    f"{'yes' if ok else 'NO'} (max diff {diff:.1e})",
                    _time(run.prefill_seconds),
                    _time(predicted.prefill.seconds),
                    _time(run.decode_seconds),
                    _time(predicted.decode.seconds),
                    f"{run.prefill_seconds / predicted.prefill.seconds:.2f}x, "
                    f"{run.decode_seconds / predicted.decode.seconds:.2f}x",
                )
            )
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        for line in skipped:
            print(line)
        if failed:
            print(f"gpu_check: logits differ from the unsplit model beyond {tolerance(dtype):g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
