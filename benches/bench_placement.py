"""Placement speed: devicemap against accelerate, in one process, on the same trees.

    .venv/bin/python benches/bench_placement.py           # full run (a few minutes)
    .venv/bin/python benches/bench_placement.py --quick   # smoke run (< 1 minute)

For each tree (catalog models built on the meta device, and a synthetic mixture-of-experts tree with
60k+ modules) and a max_memory that puts ~90% on 4 GPUs and the rest on the CPU, it times:

(a) end to end, size export + planning: ``accelerate.utils.infer_auto_device_map(model, ...)`` against
    ``devicemap.compat.infer_auto_device_map`` (same inputs, same result) and ``devicemap.plan``;
(b) the solve alone: accelerate with its size and tie computations cached (every call of
    ``compute_module_sizes`` / ``find_tied_parameters`` answered from a cache filled by a warm-up run),
    against the Rust solves on an exported tree.

and (c) end to end, transformers 5's own planner: what ``from_pretrained(device_map="auto",
max_memory=...)`` computes (``transformers.integrations.accelerate._get_device_map``: its own
get_balanced_memory + infer_auto_device_map, sizes and tie rules; see ``transformers_planner.py``), on
the same tree built as from_pretrained builds it (load dtype, ties from ``all_tied_weights_keys``),
against ``devicemap.plan`` (whose default ``"auto"`` is also balanced over several GPUs). Skipped, with
the reason printed, on transformers < 5.

Times are best-of-N wall clock; the ratios (accelerate or transformers / devicemap) are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import accelerate.utils.modeling as acc_modeling
import torch
from accelerate.utils import infer_auto_device_map as acc_infer

import devicemap
from devicemap import _core, catalog
from devicemap.compat import infer_auto_device_map as dm_infer
from devicemap.compat.versions import installed_accelerate
from transformers_planner import build_like_from_pretrained, transformers_device_map, unavailable_reason

CATALOG_MODELS = ["llama-3-8b", "llama-3-70b", "llama-3.1-405b", "mixtral-8x22b", "qwen3-30b-a3b", "t5-large"]
QUICK_MODELS = ["llama-3-8b", "qwen3-30b-a3b"]


class Expert(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(width, 2 * width, bias=False)
        self.up = torch.nn.Linear(width, 2 * width, bias=False)
        self.down = torch.nn.Linear(2 * width, width, bias=False)


class MoELayer(torch.nn.Module):
    def __init__(self, width: int, experts: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.attn = torch.nn.Linear(width, 4 * width)
        self.router = torch.nn.Linear(width, experts, bias=False)
        self.experts = torch.nn.ModuleList(Expert(width) for _ in range(experts))


class SyntheticMoE(torch.nn.Module):
    """An MoE language model with one module per expert projection (as older checkpoints have)."""

    def __init__(self, layers: int, experts: int, width: int = 64, vocab: int = 32000) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(MoELayer(width, experts) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@contextlib.contextmanager
def cached_accelerate_sizes() -> Iterator[None]:
    """Answer accelerate's size and tie computations from a cache (filled on first use)."""
    sizes, ties = acc_modeling.compute_module_sizes, acc_modeling.find_tied_parameters
    size_cache: dict = {}
    tie_cache: dict = {}

    def cached_sizes(model, dtype=None, special_dtypes=None, buffers_only=False):
        key = (id(model), str(dtype), buffers_only, repr(special_dtypes))
        if key not in size_cache:
            size_cache[key] = sizes(
                model, dtype=dtype, special_dtypes=special_dtypes, buffers_only=buffers_only
            )
        return size_cache[key].copy()

    def cached_ties(model, **kwargs):
        if id(model) not in tie_cache:
            tie_cache[id(model)] = ties(model, **kwargs)
        return [list(g) for g in tie_cache[id(model)]]

    acc_modeling.compute_module_sizes, acc_modeling.find_tied_parameters = cached_sizes, cached_ties
    try:
        yield
    finally:
        acc_modeling.compute_module_sizes, acc_modeling.find_tied_parameters = sizes, ties


def memory_for(total: int, gpus: int = 4, on_gpus: float = 0.9) -> dict:
    return {**{g: int(total * on_gpus / gpus) for g in range(gpus)}, "cpu": 2 * total}


def transformers_side(model: torch.nn.Module, dtype, no_split: list[str], tied: dict | None):
    """(model, keyword arguments) for transformers_device_map: a PreTrainedModel rebuilt as
    from_pretrained builds it in ``dtype``; a plain module as is, with its no-split classes and ties."""
    if hasattr(model, "get_init_context"):
        return build_like_from_pretrained(model, dtype), {}
    return model, {"no_split_module_classes": no_split, "tied_weights_keys": tied or {}}


def bench_tree(
    label: str,
    model: torch.nn.Module,
    dtype,
    no_split: list[str],
    repeat: int,
    tied: dict | None = None,
    with_transformers: bool = True,
) -> dict:
    tree_time, tree = best_of(lambda: devicemap.ModuleTree.from_module(model, dtype=dtype), repeat)
    memory = memory_for(tree.total_bytes)
    kwargs = dict(no_split_module_classes=no_split, dtype=dtype)
    acc_repeat = max(1, repeat // 2)
    acc_time, expected = best_of(lambda: acc_infer(model, max_memory=dict(memory), **kwargs), acc_repeat)
    dm_time, got = best_of(lambda: dm_infer(model, max_memory=dict(memory), **kwargs), repeat)
    plan_time, _ = best_of(
        lambda: devicemap.plan(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype),
        repeat,
    )
    tf_time = None
    if with_transformers:
        tf_model, tf_kwargs = transformers_side(model, dtype, no_split, tied)
        tf_time, _ = best_of(
            lambda: transformers_device_map(tf_model, dict(memory), "auto", **tf_kwargs), acc_repeat
        )
    with cached_accelerate_sizes():
        acc_infer(model, max_memory=dict(memory), **kwargs)  # fills the cache
        acc_solve, _ = best_of(lambda: acc_infer(model, max_memory=dict(memory), **kwargs), acc_repeat)
    bits = [(str(k), v * 8) for k, v in memory.items()]
    version = installed_accelerate().core_version
    compat_solve, _ = best_of(
        lambda: _core.infer_auto_device_map(tree.core, bits, no_split, False, True, version), repeat
    )
    own = [(k, b) for k, b in bits]
    own_solve, _ = best_of(lambda: _core.solve(tree.core, own, "sequential", no_split, [], False), repeat)
    return {
        "tree": label,
        "modules": sum(1 for _ in model.modules()),
        "export": tree_time,
        "acc_e2e": acc_time,
        "dm_e2e": dm_time,
        "plan_e2e": plan_time,
        "tf_e2e": tf_time,
        "acc_solve": acc_solve,
        "compat_solve": compat_solve,
        "own_solve": own_solve,
        "equal": got == dict(expected),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def print_table(rows: list[dict]) -> None:
    tf = all(r["tf_e2e"] is not None for r in rows)
    print(
        "\n| tree | modules | accelerate e2e | devicemap.compat e2e | ratio | devicemap.plan e2e | ratio "
        + ("| transformers 5 e2e | ratio " if tf else "")
        + "| accelerate solve | devicemap solve (compat / own) | ratio | same map |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if tf else "") + "---:|---:|---:|:---:|")
    for r in rows:
        tf_cells = f"{ms(r['tf_e2e'])} | {r['tf_e2e'] / r['plan_e2e']:.1f}x | " if tf else ""
        print(
            f"| {r['tree']} | {r['modules']:,} | {ms(r['acc_e2e'])} | {ms(r['dm_e2e'])} | "
            f"{r['acc_e2e'] / r['dm_e2e']:.1f}x | {ms(r['plan_e2e'])} | {r['acc_e2e'] / r['plan_e2e']:.1f}x | "
            + tf_cells
            + f"{ms(r['acc_solve'])} | {ms(r['compat_solve'])} / {ms(r['own_solve'])} | "
            f"{r['acc_solve'] / r['compat_solve']:.0f}x | {'yes' if r['equal'] else 'NO'} |"
        )
    print(
        "\n(export = ModuleTree.from_module alone: "
        + ", ".join(f"{r['tree']} {ms(r['export'])}" for r in rows)
        + ")"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller trees and repeats")
    args = parser.parse_args()
    repeat = 2 if args.quick else 5
    skip = unavailable_reason()
    if skip is not None:
        print(f"  no transformers-5 column: {skip}", flush=True)
    tf = skip is None
    rows = []
    for name in QUICK_MODELS if args.quick else CATALOG_MODELS:
        model = catalog.build_meta_model(name)
        no_split = sorted(model._no_split_modules)
        rows.append(bench_tree(name, model, "bfloat16", no_split, repeat, with_transformers=tf))
        print(f"  {name}: done", flush=True)
    layers, experts = (8, 64) if args.quick else (60, 256)
    with torch.device("meta"):
        moe = SyntheticMoE(layers, experts)
    label = f"synthetic MoE {layers}x{experts}"
    tied = {"head.weight": "embed.weight"}
    for suffix, no_split in ((" (no no-split)", []), (" (MoELayer no-split)", ["MoELayer"])):
        rows.append(bench_tree(label + suffix, moe, None, no_split, repeat, tied, with_transformers=tf))
    print_table(rows)
    if not all(r["equal"] for r in rows):
        raise SystemExit("devicemap.compat disagreed with accelerate on some tree (see 'same map')")


if __name__ == "__main__":
    main()
