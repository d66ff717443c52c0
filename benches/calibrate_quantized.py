"""Fit the accelerate engine's fixed time per call of a quantized module on published measurements.

    .venv/bin/python benches/calibrate_quantized.py

bitsandbytes' kernels at batch 1 are not bound by the bytes they read: each call of a quantized ``Linear``
costs a fixed time (dequantization, LLM.int8's outlier split, launches) that the bytes alone do not
predict. ``benches/calibration/quantized.json`` holds per-token latencies of the same models in float16
and through bitsandbytes 8-bit and 4-bit on one GPU (source and assumptions there). For each row and
method the script predicts decode on that GPU with the accelerate engine twice, in float16 and quantized
(sized as the quantizer stores the weights, no call cost), and takes the call cost that explains the rest
of the measured difference::

    seconds per call = ((measured quantized - measured fp16) - (predicted quantized - predicted fp16)) / calls

(differences of the same model on the same machine: the engine's per-token overhead and the GPU's read
share cancel). The fit is the median over the ``fit`` rows; ``held-out`` rows report the error of the
predicted quantized / float16 ratio against the measured one. The shipped values sit in
``devicemap/cost/engine.py`` (``ACCELERATE.quantized_call_seconds``).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "calibration" / "quantized.json"
METHODS = {
    "bitsandbytes_8bit": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "bitsandbytes_4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
}
WORKLOAD_TOKENS = 256


def predict(shape: str, method: str | None, call_seconds: float) -> tuple[float, int]:
    """Predicted decode seconds of ``shape`` all on one A10G (``method``: the quantizer, None: float16), and
    the quantized module calls per token."""
    import devicemap
    from devicemap import catalog
    from devicemap.cost.estimate import model_block_costs
    from devicemap.cost.hardware import Hardware

    model = catalog.build_meta_model(shape)
    config = METHODS[method] if method else None
    plan = devicemap.plan(model, {0: "24GiB"}, dtype="float16", quantization_config=config)
    engine = Hardware.preset("a10g").engine
    calls = {method: call_seconds} if method else {}
    engine = dataclasses.replace(engine, quantized_call_seconds=tuple(calls.items()))
    hardware = dataclasses.replace(Hardware.preset("a10g", host="desktop-ddr4"), engine=engine)
    workload = devicemap.Workload(batch_size=1, seq_len=WORKLOAD_TOKENS, kv_dtype="float16")
    seconds = plan.estimate(workload, hardware, model, dtype="float16").decode.seconds
    costs = model_block_costs(plan, workload, model, dtype="float16")[0]
    return seconds, sum(c.quantized_calls for c in costs)


def load() -> dict[str, Any]:
    return json.loads(DATA.read_text())  # type: ignore[no-any-return]


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per quantized module call, per method: the median over the ``fit`` rows (module docstring)."""
    fitted: dict[str, float] = {}
    for method in METHODS:
        estimates = []
        for row in (r for r in rows if r["use"] == "fit"):
            fp16, _ = predict(row["shape"], None, 0.0)
            quantized, calls = predict(row["shape"], method, 0.0)
            measured = (row[f"{method}_ms"] - row["fp16_ms"]) / 1e3
            estimates.append((measured - (quantized - fp16)) / calls)
        fitted[method] = statistics.median(estimates)
    return fitted


def table(rows: list[dict[str, Any]], fitted: dict[str, float]) -> list[dict[str, Any]]:
    """Per row and method: measured and predicted milliseconds (float16 and quantized) and the errors."""
    results = []
    for row in rows:
        fp16, _ = predict(row["shape"], None, 0.0)
        for method, seconds in fitted.items():
            quantized, _ = predict(row["shape"], method, seconds)
            measured, predicted = row[f"{method}_ms"] / row["fp16_ms"], quantized / fp16
            results.append(
                {
                    "row": row,
                    "method": method,
                    "predicted_fp16_ms": fp16 * 1e3,
                    "predicted_ms": quantized * 1e3,
                    "error": ratio(quantized * 1e3, row[f"{method}_ms"]),
                    "relative_error": ratio(predicted, measured),
                    "measured_ratio": measured,
                    "predicted_ratio": predicted,
                }
            )
    return results


def main() -> None:
    data = load()
    fitted = fit(data["rows"])
    results = table(data["rows"], fitted)
    print(f"source: {data['source']}\n")
    print(
        "| model | method | use | measured ms (fp16 -> quantized) | predicted ms | error | x fp16 measured | predicted |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        row, method = r["row"], r["method"]
        print(
            f"| {row['model']} | {method} | {row['use']} | {row['fp16_ms']} -> {row[f'{method}_ms']} | "
            f"{r['predicted_fp16_ms']:.1f} -> {r['predicted_ms']:.1f} | {r['error']:.2f}x | "
            f"{r['measured_ratio']:.2f} | {r['predicted_ratio']:.2f} |"
        )
    print()
    for method, seconds in fitted.items():
        print(f"fitted: {method} {seconds * 1e6:.0f} us per quantized module call")
    held = [r for r in results if r["row"]["use"] == "held-out"]
    if held:
        absolute, relative = [r["error"] for r in held], [r["relative_error"] for r in held]
        print(
            f"held-out: quantized latency within {max(absolute):.2f}x (median {statistics.median(absolute):.2f}x); "
            f"its ratio to float16 within {max(relative):.2f}x (median {statistics.median(relative):.2f}x)"
        )


def ratio(a: float, b: float) -> float:
    """The error of ``a`` against ``b`` as a ratio >= 1."""
    return max(a / b, b / a)


if __name__ == "__main__":
    main()
