"""Calibrate the speed model's engine efficiencies on published measurements.

    .venv/bin/python benches/calibrate.py            # the table: measured, before, after, held-out errors
    .venv/bin/python benches/calibrate.py --write    # also print the fitted values for cost/engine.py

For every row of ``benches/calibration/published.json`` (sources and conditions there) the script builds the
setup's model on the meta device, sizes its weights at the row's stored width (``bits_per_weight``: 16 or 32
for floats, the GGUF file's average for llama.cpp quantizations), places its blocks as the setup did
(``placement``: all on the GPU; accelerate's fill of each GPU with the rest streamed from the CPU; llama.cpp's
``-ngl`` or ``--n-cpu-moe``) and predicts the row's metric with :func:`devicemap.cost.estimate.estimate_blocks`:

- *before*: the ``ideal`` engine, i.e. the speed model before calibration (streamed copies at the pinned
  rate, CPU reads at the host's STREAM share, 10 us per hop, no per-token overhead);
- *after*: the engine preset the row names (``Engine.preset(row["engine"])``, the shipped values);
- *fitted*: the efficiencies this run fits, starting from the preset.

The fit: for each engine, the free efficiencies (:data:`FREE`) minimise the sum over its ``fit`` rows of
``log(predicted / measured)^2`` plus a small pull (:data:`PRIOR_WEIGHT`) of ``log(value / preset)^2`` that
keeps parameters the rows cannot separate near the preset, by coordinate search on a multiplicative grid
(no scipy). The split is fixed in the data file (``use``: fit / held-out / excluded); held-out rows never
enter the fit. Errors are reported as ratios >= 1 (``max(p/m, m/p)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "calibration" / "published.json"
CONFIGS = HERE / "calibration" / "configs"

FREE: dict[str, tuple[str, ...]] = {
    # Rows with streamed weights and GPU-only rows: the stream rate and the per-pass overhead. No published
    # accelerate row here runs blocks on the CPU, so the CPU shares and the hop stay as the preset says.
    "accelerate": ("stream_efficiency_pageable", "token_overhead_seconds"),
    "llama.cpp": (
        "token_overhead_seconds",
        "cpu_dense_efficiency",
        "cpu_expert_efficiency",
        "hop_seconds",
        "prefill_efficiency",
    ),
}
"""The efficiencies fitted per engine (the rows can say something about them)."""

PRIOR_WEIGHT = 0.01
"""Weight of the pull toward the preset values, per parameter (in log units squared)."""

HOSTS: dict[str, Any] = {}


def _hosts() -> dict[str, Any]:
    from devicemap.cost.hardware import HOST_PRESETS, Host

    if not HOSTS:
        HOSTS.update(HOST_PRESETS)
        desktop = HOST_PRESETS["desktop-ddr4"]
        # llmfit PR #755: "the measured ~102 GB/s quad-channel DDR4" of this box = 4 channels x 8 bytes x
        # 3200 MT/s. FLOP/s are not stated: the desktop-ddr4 preset's (no row runs a CPU prefill).
        HOSTS["i9-10900x"] = Host(
            "i9-10900x",
            memory_bandwidth=4 * 8 * 3200e6,
            flops_fp32=desktop.flops_fp32,
            flops_bf16=desktop.flops_bf16,
            disk_read=desktop.disk_read,
            source="llmfit PR #755: i9-10900X, ~102 GB/s quad-channel DDR4 (4 x DDR4-3200); FLOP/s not stated",
        )
    return HOSTS


def load_rows(path: Path = DATA) -> list[dict[str, Any]]:
    """The rows of the published data file."""
    return list(json.loads(path.read_text())["rows"])


# ---------------------------------------------------------------------------------------------------------
# Building each setup


@dataclass
class _Placement:
    """What the speed model reads of a plan (devicemap.cost.estimate.Placement), for a hand-made device map."""

    assignments: dict[str, Any]
    execution_map: dict[str, Any]
    tree: Any

    def block_bytes(self, name: str) -> int:
        return int(self.tree.module_bytes(name))


@dataclass(frozen=True)
class Setup:
    """A row's blocks (in execution order), ready for estimate_blocks."""

    blocks: tuple[Any, ...]
    hidden_bytes: float
    bits: int


def _model(shape: str) -> Any:
    from devicemap import catalog

    file = CONFIGS / f"{shape}.json"
    if file.is_file():
        return catalog.build_meta_model(json.loads(file.read_text()))
    return catalog.build_meta_model(shape)


def _blocks(model: Any) -> tuple[list[str], list[str], dict[str, int]]:
    """The model cut into blocks: every child of a decoder layer (an MoE layer's children too, so routed
    experts are a block of their own) and every top-level piece outside the layers. Returns the blocks, the
    decoder layer names, and each block's layer index (-1 outside the layers)."""
    from devicemap.sizing.compute import expert_share, is_routed_experts
    from devicemap.sizing.workload import decoder_layers

    config = model.config
    layers = decoder_layers(model, config)
    index = {name: i for i, name in enumerate(layers)}
    experts, _ = expert_share(config)
    blocks: list[str] = []
    layer_of: dict[str, int] = {}

    def has_params(module: Any) -> bool:
        return any(True for _ in module.parameters())

    def holds_experts(module: Any) -> bool:
        return bool(experts) and any(
            is_routed_experts(n.rsplit(".", 1)[-1], m, experts) for n, m in module.named_modules() if n
        )

    def walk(name: str, module: Any) -> None:
        if name in index:
            for child_name, child in module.named_children():
                full = f"{name}.{child_name}"
                if not has_params(child):
                    continue
                parts = list(child.named_children()) if holds_experts(child) else []
                for part_name, part in parts:
                    if has_params(part):
                        blocks.append(f"{full}.{part_name}")
                        layer_of[f"{full}.{part_name}"] = index[name]
                if not parts:
                    blocks.append(full)
                    layer_of[full] = index[name]
            return
        children = [(n, c) for n, c in module.named_children() if has_params(c)]
        own = any(True for _ in module.parameters(recurse=False))
        if own or not children:
            if has_params(module):
                blocks.append(name)
                layer_of[name] = -1
            return
        for child_name, child in children:
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", model)
    # run order: the pieces before the layers, the layers, then the rest (final norm, output head)
    head = [b for b in blocks if layer_of[b] == -1 and _before_layers(b, layers)]
    tail = [b for b in blocks if layer_of[b] == -1 and b not in head]
    body = [b for b in blocks if layer_of[b] >= 0]
    return head + body + tail, layers, layer_of


def _before_layers(block: str, layers: Sequence[str]) -> bool:
    leaf = block.rsplit(".", 1)[-1]
    return "emb" in leaf or "wte" in leaf or "embed" in block


def _is_experts(block: str, model: Any) -> bool:
    from devicemap.sizing.compute import expert_share, is_routed_experts

    experts, _ = expert_share(model.config)
    module = model.get_submodule(block)
    return bool(experts) and is_routed_experts(block.rsplit(".", 1)[-1], module, experts)


def _devices(
    row: Mapping[str, Any], model: Any, tree: Any, order: list[str], layer_of: dict[str, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """storage and execution device of every block, as the row's setup placed them."""
    placement = row["placement"]
    kind = placement["kind"]
    storage: dict[str, Any] = {}
    execution: dict[str, Any] = {}
    scale = row["bits_per_weight"] / 16.0
    n_layers = max(layer_of.values()) + 1
    if kind == "all-gpu":
        for b in order:
            storage[b] = execution[b] = 0
    elif kind == "accelerate":
        # accelerate's device_map="auto": whole layers in order fill GPU 0 up to its reported use (GiB), then
        # GPU 1, ...; the tail it reports on the CPU (offload_gib, or all that overflows the GPUs when
        # offload_rest) is offloaded (CPU RAM, or disk) and runs on GPU 0, its weights streamed every pass.
        caps = [gib * 2**30 for gib in placement["gpu_gib"]]
        offload = placement.get("offload", "cpu")
        groups: list[list[str]] = []
        for b in order:
            key = layer_of[b]
            if groups and key >= 0 and layer_of[groups[-1][0]] == key:
                groups[-1].append(b)
            else:
                groups.append([b])
        sizes = [sum(tree.module_bytes(b) for b in group) * scale for group in groups]
        tail = len(groups)
        offloaded = 0.0
        while tail > 0 and offloaded + sizes[tail - 1] / 2 < placement.get("offload_gib", 0) * 2**30:
            tail -= 1
            offloaded += sizes[tail]
        gpu, used = 0, 0.0
        for i, group in enumerate(groups):
            if i >= tail:
                where: Any = offload
            else:
                while gpu < len(caps) - 1 and used + sizes[i] > caps[gpu] * 1.02:
                    gpu, used = gpu + 1, 0.0
                full = used + sizes[i] > caps[gpu] * 1.02
                where = offload if full and placement.get("offload_rest") else gpu
                used += sizes[i]
            for b in group:
                storage[b] = where
                execution[b] = where if isinstance(where, int) else 0
    elif kind == "ngl":
        first_gpu = n_layers - int(placement["layers_on_gpu"])
        for b in order:
            layer = layer_of[b]
            on_gpu = layer >= first_gpu if layer >= 0 else (not _before_layers(b, []) and first_gpu < 0)
            storage[b] = execution[b] = 0 if on_gpu else "cpu"
    elif kind == "cpu-moe":
        count = int(placement["layers"])
        for b in order:
            on_cpu = layer_of[b] >= 0 and layer_of[b] < count and _is_experts(b, model)
            storage[b] = execution[b] = "cpu" if on_cpu else 0
    else:
        raise ValueError(f"row {row['id']}: unknown placement kind {kind!r}")
    return storage, execution


def build(row: Mapping[str, Any]) -> Setup:
    """The blocks of a row's setup, sized at its stored width."""
    from devicemap.cost.estimate import model_block_costs
    from devicemap.sizing.tree import ModuleTree
    from devicemap.sizing.workload import Workload

    model = _model(row["shape"])
    float_bits = 32 if row["bits_per_weight"] >= 32 else 16
    dtype = "float32" if float_bits == 32 else "float16"
    tree = ModuleTree.from_module(model, dtype="float16")  # sized at 16 bits, then scaled to the stored width
    order, _, layer_of = _blocks(model)
    storage, execution = _devices(row, model, tree, order, layer_of)
    plan = _Placement({b: storage[b] for b in order}, {b: execution[b] for b in order}, tree)
    costs, hidden_bytes, bits = model_block_costs(plan, Workload(batch_size=1, seq_len=1), model, dtype=dtype)
    scale = row["bits_per_weight"] / 16.0
    scaled = tuple(
        dataclasses.replace(
            c,
            weight_bytes=int(c.weight_bytes * scale),
            expert_bytes=int(c.expert_bytes * scale),
            lookup_bytes=int(c.lookup_bytes * scale),
        )
        for c in costs
    )
    return Setup(scaled, hidden_bytes, bits)


# ---------------------------------------------------------------------------------------------------------
# Predicting a row


def hardware_of(row: Mapping[str, Any], engine: Any) -> Any:
    from devicemap.cost.hardware import Hardware

    return Hardware.preset(list(row["gpus"]), host=_hosts()[row["host"]], engine=engine)


def predict(row: Mapping[str, Any], setup: Setup, engine: Any) -> float:
    """The row's metric as the speed model predicts it with ``engine``."""
    from devicemap.cost.estimate import estimate_blocks
    from devicemap.sizing.workload import Workload

    hw = hardware_of(row, engine)
    b, p, n = int(row["batch"]), int(row["prompt_tokens"]), int(row["new_tokens"])

    def run(seq_len: int) -> Any:
        return estimate_blocks(
            setup.blocks,
            Workload(batch_size=b, seq_len=max(1, seq_len)),
            hw,
            hidden_bytes_per_token=setup.hidden_bytes,
            dtype_bits=setup.bits,
        )

    metric = row["metric"]
    if metric == "prefill_tokens_per_second":
        return b * p / run(p).prefill.seconds
    decode = run(p + n // 2).decode.seconds
    if metric == "decode_tokens_per_second":
        return b / decode
    total = run(p).prefill.seconds + (n - 1) * decode
    if metric == "generate_seconds_per_token":
        return total / n
    if metric == "generation_tokens_per_second":
        return b * n / total
    raise ValueError(f"row {row['id']}: unknown metric {metric!r}")


def error(predicted: float, measured: float) -> float:
    """How far off, as a ratio >= 1."""
    return max(predicted / measured, measured / predicted)


# ---------------------------------------------------------------------------------------------------------
# Fitting


def fit(
    rows: Sequence[Mapping[str, Any]],
    setups: Mapping[str, Setup],
    start: Any,
    free: Sequence[str],
    objective_rows: Callable[[Mapping[str, Any]], bool] = lambda r: r["use"] == "fit",
) -> Any:
    """The engine with ``free`` fields fitted on the rows ``objective_rows`` selects (see the module docstring)."""
    chosen = [r for r in rows if objective_rows(r)]

    def loss(engine: Any) -> float:
        total = 0.0
        for r in chosen:
            total += math.log(predict(r, setups[r["id"]], engine) / r["measured"]) ** 2
        for name in free:
            value, prior = getattr(engine, name), getattr(start, name)
            if prior > 0 and value > 0:
                total += PRIOR_WEIGHT * math.log(value / prior) ** 2
        return total

    best, best_loss = start, loss(start)
    for step in (2.0, 1.4, 1.15, 1.05, 1.02):
        improved = True
        while improved:
            improved = False
            for name in free:
                for factor in (step, 1 / step):
                    value = getattr(best, name) * factor
                    if value == 0 and "seconds" in name:
                        value = 1e-6
                    try:
                        candidate = dataclasses.replace(best, **{name: value})
                    except Exception:  # noqa: BLE001 - out of the field's range: not a candidate
                        continue
                    candidate_loss = loss(candidate)
                    if candidate_loss < best_loss - 1e-12:
                        best, best_loss, improved = candidate, candidate_loss, True
    return best


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Result:
    row: Mapping[str, Any]
    before: float
    after: float
    fitted: float


def evaluate(rows: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[Result], dict[str, Any]]:
    """Predict every row before calibration, with the shipped presets, and with a fresh fit."""
    from devicemap.cost.engine import Engine

    rows = list(rows if rows is not None else load_rows())
    setups = {r["id"]: build(r) for r in rows}
    ideal = Engine.preset("ideal")
    fitted: dict[str, Any] = {}
    for engine_name, free in FREE.items():
        mine = [r for r in rows if r["engine"] == engine_name]
        fitted[engine_name] = fit(mine, setups, Engine.preset(engine_name), free)
    results = [
        Result(
            row=r,
            before=predict(r, setups[r["id"]], ideal),
            after=predict(r, setups[r["id"]], Engine.preset(r["engine"])),
            fitted=predict(r, setups[r["id"]], fitted[r["engine"]]),
        )
        for r in rows
    ]
    return results, fitted


def summary(results: Sequence[Result], use: str, which: str) -> tuple[float, float]:
    """Median and worst error (ratios >= 1) of the rows with ``use`` for ``which`` prediction."""
    errors = [error(getattr(x, which), x.row["measured"]) for x in results if x.row["use"] == use]
    return statistics.median(errors), max(errors)


def table(results: Sequence[Result]) -> str:
    header = ("setup", "engine", "use", "measured", "unit", "before", "after", "after/measured")
    lines = [header]
    for x in results:
        r = x.row
        lines.append(
            (
                r["id"],
                r["engine"],
                r["use"],
                f"{r['measured']:.4g}",
                r["unit"],
                f"{x.before:.4g}",
                f"{x.after:.4g}",
                f"{x.after / r['measured']:.2f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="print the fitted values for cost/engine.py")
    args = parser.parse_args(argv)
    results, fitted = evaluate()
    print(table(results))
    print()
    for use in ("fit", "held-out"):
        for which, label in (("before", "before calibration"), ("after", "shipped presets")):
            median, worst = summary(results, use, which)
            print(f"{use:8} rows, {label:18}: median error {median:.2f}x, worst {worst:.2f}x")
    median, worst = summary(results, "held-out", "fitted")
    print(f"held-out rows, this run's fit       : median error {median:.2f}x, worst {worst:.2f}x")
    if args.write:
        print()
        for name, engine in fitted.items():
            print(
                f"# {name}: fitted on "
                + ", ".join(r.row["id"] for r in results if r.row["engine"] == name and r.row["use"] == "fit")
            )
            for field in FREE[name]:
                print(f"    {field}={getattr(engine, field):.3g},")
    return 0


if __name__ == "__main__":
    sys.exit(main())
