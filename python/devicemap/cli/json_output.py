"""What ``devicemap <command> --json`` prints: plain JSON built from the library's results.

Sizes are integer bytes; devices are an int GPU index or a string (``"cpu"``, ``"disk"``, ``"mps"``);
``null`` means unbounded (disk) or not given. Every command prints an object with an ``"inputs"`` key:

    inputs   {model, source ("catalog" | "config" | "checkpoint"), devices: [{device, capacity}],
              strategy (as asked), dtype, kv_dtype, workload: {batch_size, seq_len, kv_dtype} | null,
              pins: {module: device}, no_split: {classes: [str], source ("--no-split" | "model")} | null,
              gpu0_reserve, offload_buffers, quant, execution_device (plan's --execution-device)}

``plan``:    inputs, strategy (as resolved), device_map (accelerate's format, what ``--save`` writes),
             devices: [{device, capacity, weights, runtime, reserve, used, blocks: [str]}],
             offloaded: [{name, device, bytes, reason}],
             execution_map: {block: device that computes it (its GPU, the GPU staging it, or "cpu")}
``compare``: inputs, sides: [{method, devices: [{device, bytes}], offloaded: [str], peak_over_mean
             (largest GPU / mean GPU bytes; null without GPU bytes), min_gpu_memory, seconds}]
``export``:  inputs, target, text (what the command prints without --json), values (the numbers in the
             text, per target), stages: [{device, layers, first, last}], device_map
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..inputs.memory import DeviceKey
from ..plans import Plan
from .compare import Side
from .export import gpu_stages


def inputs_json(
    *,
    model: str,
    source: str,
    memory: dict[DeviceKey, int],
    strategy: str,
    dtype: str | None,
    kv_dtype: str | None = None,
    workload: Any = None,
    pins: dict[str, DeviceKey] | None = None,
    no_split: list[str] | None = None,
    no_split_given: bool = False,
    gpu0_reserve: int | None = None,
    offload_buffers: bool = False,
    quant: str | None = None,
    execution_device: DeviceKey | None = None,
) -> dict[str, Any]:
    """The inputs as the command understood them (sizes in bytes, dtype aliases resolved)."""
    return {
        "model": model,
        "source": source,
        # disk is given without a size (0 in the spec): it is unbounded, so null, as in the plan.
        "devices": [
            {"device": device, "capacity": None if device == "disk" else capacity}
            for device, capacity in memory.items()
        ],
        "strategy": strategy,
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "workload": None
        if workload is None
        else {"batch_size": workload.batch_size, "seq_len": workload.seq_len, "kv_dtype": workload.kv_dtype},
        "pins": dict(pins or {}),
        "no_split": None
        if no_split is None
        else {"classes": list(no_split), "source": "--no-split" if no_split_given else "model"},
        "gpu0_reserve": gpu0_reserve,
        "offload_buffers": offload_buffers,
        "quant": quant,
        "execution_device": execution_device,
    }


def plan_json(result: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """``plan --json``: the inputs, every device's bytes, what was offloaded and why, the device map."""
    return {
        "inputs": inputs,
        "strategy": result.strategy,
        "device_map": result.device_map,
        "devices": [
            {
                "device": u.device,
                "capacity": u.capacity,
                "weights": u.weights,
                "runtime": u.runtime,
                "reserve": u.reserve,
                "used": u.weights + u.runtime + u.reserve,
                "blocks": list(u.blocks),
            }
            for u in result.usage
        ],
        "offloaded": [
            {"name": o.name, "device": o.device, "bytes": o.bytes, "reason": _plain(o.reason)}
            for o in result.offloaded
        ],
        "execution_map": result.execution_map,
    }


def compare_json(sides: tuple[Side, ...], inputs: dict[str, Any]) -> dict[str, Any]:
    """``compare --json``: both methods' bytes per device, what left the GPUs, and balance."""
    return {
        "inputs": inputs,
        "sides": [
            {
                "method": side.method,
                "devices": [{"device": d, "bytes": n} for d, n in side.device_bytes.items()],
                "offloaded": list(side.offloaded),
                # NaN (no GPU bytes) is not JSON; null says "not defined".
                "peak_over_mean": None if math.isnan(side.peak_over_mean) else side.peak_over_mean,
                "min_gpu_memory": side.min_gpu_memory,
                "seconds": side.seconds,
            }
            for side in sides
        ],
    }


def export_json(result: Plan, model: Any, target: str, text: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """``export --json``: the printed text, the numbers in it, and the decoder layers of each GPU."""
    # llama.cpp keeps the first layers on the CPU when only part fits; pipeline engines refuse that
    # (and export() has already raised for them).
    stages = gpu_stages(result, model, allow_offload=target == "llama.cpp")
    counts = [len(layers) for _, layers in stages]
    return {
        "inputs": inputs,
        "target": target,
        "text": text,
        "values": _export_values(target, counts, stages),
        "stages": [
            {"device": device, "layers": len(layers), "first": layers[0], "last": layers[-1]}
            for device, layers in stages
        ],
        "device_map": result.device_map,
    }


def _export_values(target: str, counts: list[int], stages: list) -> dict[str, Any]:
    if target == "vllm":
        return {"pp_layer_partition": counts, "pipeline_parallel_size": len(counts)}
    if target == "llama.cpp":
        return {"n_gpu_layers": sum(counts), "tensor_split": counts if len(counts) > 1 else None}
    if target == "deepspeed":
        parts = [0]
        for count in counts:
            parts.append(parts[-1] + count)
        return {"num_stages": len(counts), "parts": parts}
    return {"split_points": [layers[0] for _, layers in stages[1:]]}  # pipelining: stage starts


def _plain(value: Any) -> Any:
    """A reason as JSON: text as is, a structured record as its fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def estimate_json(speed: Any) -> dict[str, Any]:
    """``plan --hardware ... --json``: predicted seconds per phase, per device and term, and decode tokens/s."""

    def phase(p: Any) -> dict[str, Any]:
        return {
            "seconds": p.seconds,
            "tokens": p.tokens,
            "dominant": p.dominant,
            "bottlenecks": dict(p.bottlenecks),
            "devices": [
                {
                    "device": d.device,
                    "blocks": d.blocks,
                    "weights_read": d.weights_read,
                    "compute": d.compute,
                    "weights_moved": d.weights_moved,
                    "disk_read": d.disk_read,
                    "activations_moved": d.activations_moved,
                    "total": d.total,
                }
                for d in p.devices
            ],
        }

    return {
        "hardware": {
            "gpus": [g.name for g in speed.hardware.gpus],
            "host": speed.hardware.host.name,
            "engine": speed.hardware.engine.name,
        },
        "prefill": phase(speed.prefill),
        "decode": phase(speed.decode),
        "tokens_per_second": speed.tokens_per_second,
    }
