"""The speed model (devicemap.cost.hardware, devicemap.cost.estimate): formulas on hand-made plans and blocks, the
presets and their errors. The CPU-side terms against measured CPU forward times: benches/bench_speed_model_cpu.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import devicemap
from devicemap.cost.engine import Engine
from devicemap.cost.estimate import TERMS, BlockCost, estimate, estimate_blocks, execution_devices
from devicemap.cost.hardware import (
    GPU,
    GPU_PRESETS,
    HOST_PRESETS,
    Hardware,
    Host,
    measure_disk_read,
    measure_host,
    pcie_bandwidth,
)
from repo import REPO
from tiny_models import tiny_llama_config

GIB = 2**30


def host(**changes: object) -> Host:
    """A round-number host: 100 GB/s RAM, 1 TFLOP/s, 5 GB/s disk, efficiencies 1."""
    values: dict[str, object] = dict(
        name="test-host",
        memory_bandwidth=100e9,
        flops_fp32=1e12,
        flops_bf16=1e12,
        disk_read=5e9,
        memory_efficiency=1.0,
        compute_efficiency=1.0,
    )
    values.update(changes)
    return Host(**values)  # type: ignore[arg-type]


def gpu(name: str = "test-gpu") -> GPU:
    """A round-number GPU: 1 TB/s, 100 TFLOP/s, 20 GB/s host link, efficiencies 1."""
    return GPU(
        name=name,
        memory_bytes=24 * GIB,
        memory_bandwidth=1e12,
        flops=100e12,
        flops_fp32=10e12,
        host_to_device=20e9,
        memory_efficiency=1.0,
        compute_efficiency=1.0,
    )


def hardware(gpus: int = 1, latency: float = 0.0) -> Hardware:
    """Round-number GPUs and host run by the ``ideal`` engine (no software loss): the formulas alone."""
    return Hardware(
        gpus=tuple(gpu(f"g{i}") for i in range(gpus)),
        host=host(),
        link_latency=latency,
        engine=Engine.preset("ideal"),
    )


def linear_stack(layers: int = 4, width: int = 1024) -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


# --- formulas on hand-made blocks -------------------------------------------------------------------------


def test_gpu_only_decode_is_weights_over_bandwidth() -> None:
    block = BlockCost("model", storage=0, execution=0, weight_bytes=10**10, flops_per_token=1e10)
    e = estimate_blocks([block], devicemap.Workload(batch_size=1, seq_len=1), hardware())
    assert e.decode.seconds == pytest.approx(10**10 / 1e12)
    assert e.dominant == "weights read"
    assert e.tokens_per_second == pytest.approx(100.0)


def test_prefill_compute_counts_tokens_and_causal_attention_pairs() -> None:
    block = BlockCost(
        "layer", storage=0, execution=0, weight_bytes=10, flops_per_token=1e9, attention_flops=1e3
    )
    wl = devicemap.Workload(batch_size=2, seq_len=100)
    e = estimate_blocks([block], wl, hardware())
    flops = 2 * 100 * 1e9 + 2 * (100 * 101 / 2) * 1e3
    assert e.prefill.seconds == pytest.approx(flops / 100e12)
    assert e.prefill.dominant == "compute"
    assert e.prefill.tokens == 200 and e.decode.tokens == 2


def test_decode_reads_the_kv_cache_of_the_whole_context() -> None:
    block = BlockCost(
        "layer", storage=0, execution=0, weight_bytes=10**9, flops_per_token=0, kv_bytes_per_token=1e5
    )
    e = estimate_blocks([block], devicemap.Workload(batch_size=4, seq_len=1000), hardware())
    assert e.decode.seconds == pytest.approx((10**9 + 4 * 1000 * 1e5) / 1e12)


def test_offloaded_block_executed_on_gpu_moves_all_its_weights_every_pass() -> None:
    blocks = [
        BlockCost("a", storage=0, execution=0, weight_bytes=10**9, flops_per_token=0),
        BlockCost("b", storage="cpu", execution=0, weight_bytes=2 * 10**9, flops_per_token=0),
        BlockCost("c", storage="disk", execution=0, weight_bytes=10**9, flops_per_token=0),
    ]
    e = estimate_blocks(blocks, devicemap.Workload(seq_len=1), hardware())
    (only,) = e.decode.devices
    assert only.device == 0 and only.blocks == 3
    assert only.weights_moved == pytest.approx(3e9 / 20e9)
    assert only.disk_read == pytest.approx(1e9 / 5e9)
    assert only.weights_read == pytest.approx(4e9 / 1e12)  # staged weights are read on the GPU too
    assert e.decode.seconds == pytest.approx(4e9 / 1e12 + 3e9 / 20e9 + 1e9 / 5e9)
    assert e.dominant == "disk read"
    assert e.prefill.seconds == pytest.approx(e.decode.seconds)  # one pass each, 1 token


def test_cpu_executed_block_uses_the_host_and_moves_activations_both_ways() -> None:
    blocks = [
        BlockCost("a", storage=0, execution=0, weight_bytes=10**9, flops_per_token=1e9),
        BlockCost("b", storage="cpu", execution="cpu", weight_bytes=10**9, flops_per_token=1e9),
        BlockCost("c", storage=0, execution=0, weight_bytes=10**9, flops_per_token=1e9),
    ]
    hw = hardware(latency=1e-5)
    wl = devicemap.Workload(seq_len=1000)
    e = estimate_blocks(blocks, wl, hw, hidden_bytes_per_token=8192)
    by_device = {d.device: d for d in e.decode.devices}
    assert by_device["cpu"].weights_read == pytest.approx(1e9 / 100e9)
    assert by_device["cpu"].compute == pytest.approx(1e9 / 1e12)
    assert by_device["cpu"].weights_moved == 0
    hop = 1e-5 + 8192 / 20e9
    assert by_device["cpu"].activations_moved == pytest.approx(hop)  # GPU 0 -> cpu
    assert by_device[0].activations_moved == pytest.approx(hop)  # cpu -> GPU 0
    assert e.decode.seconds == pytest.approx(2 * 1e9 / 1e12 + 1e9 / 100e9 + 2 * hop)
    prefill_cpu = {d.device: d for d in e.prefill.devices}["cpu"]
    assert prefill_cpu.compute == pytest.approx(1000 * 1e9 / 1e12)
    assert prefill_cpu.activations_moved == pytest.approx(1e-5 + 1000 * 8192 / 20e9)


def test_fp32_uses_fp32_flops_and_a_slow_bf16_matvec_limits_16_bit_reads() -> None:
    slow = Hardware(gpus=(gpu(),), host=host(memory_bandwidth_bf16=25e9), engine=Engine.preset("ideal"))
    block = BlockCost("b", storage="cpu", execution="cpu", weight_bytes=10**9, flops_per_token=1e12)
    wl = devicemap.Workload(seq_len=1)
    bf16 = estimate_blocks([block], wl, slow, dtype_bits=16)
    fp32 = estimate_blocks([block], wl, slow, dtype_bits=32)
    assert bf16.decode.devices[0].weights_read == pytest.approx(1e9 / 25e9)
    assert fp32.decode.devices[0].weights_read == pytest.approx(1e9 / 100e9)
    on_gpu = BlockCost("b", storage=0, execution=0, weight_bytes=1, flops_per_token=1e12)
    assert estimate_blocks([on_gpu], wl, slow, dtype_bits=32).decode.seconds == pytest.approx(1e12 / 10e12)
    assert estimate_blocks([on_gpu], wl, slow, dtype_bits=16).decode.seconds == pytest.approx(1e12 / 100e12)


def test_routed_experts_read_only_the_share_the_tokens_touch() -> None:
    block = BlockCost(
        "moe", storage="cpu", execution="cpu", weight_bytes=10**10, flops_per_token=0,
        expert_bytes=8 * 10**9, expert_share=2 / 8,
    )  # fmt: skip
    e = estimate_blocks([block], devicemap.Workload(batch_size=1, seq_len=64), hardware())
    assert e.decode.seconds == pytest.approx((2e9 + 8e9 * 0.25) / 100e9)
    touched = 1 - 0.75**64
    assert e.prefill.seconds == pytest.approx((2e9 + 8e9 * touched) / 100e9)
    # streaming the same block to a GPU moves all of it regardless
    streamed = estimate_blocks(
        [BlockCost("moe", "cpu", 0, 10**10, 0, expert_bytes=8 * 10**9, expert_share=0.25)],
        devicemap.Workload(seq_len=64),
        hardware(),
    )
    assert streamed.decode.devices[0].weights_moved == pytest.approx(1e10 / 20e9)


def test_embedding_lookups_read_only_the_rows_used() -> None:
    table = BlockCost(
        "embed", storage="cpu", execution="cpu", weight_bytes=10**9, flops_per_token=0,
        lookup_bytes=10**9, lookup_rows=100_000,
    )  # fmt: skip
    e = estimate_blocks([table], devicemap.Workload(batch_size=2, seq_len=1000), hardware())
    assert e.decode.seconds == pytest.approx(1e9 * 2 / 100_000 / 100e9)
    assert e.prefill.seconds == pytest.approx(1e9 * 2000 / 100_000 / 100e9)
    streamed = BlockCost("embed", "cpu", 0, 10**9, 0, lookup_bytes=10**9, lookup_rows=100_000)
    moved = estimate_blocks([streamed], devicemap.Workload(seq_len=1), hardware()).decode
    assert moved.devices[0].weights_moved == pytest.approx(1e9 / 20e9)  # accelerate moves the whole table


def test_bottlenecks_sum_to_the_phase_time_and_the_table_reads() -> None:
    blocks = [
        BlockCost("a", storage=0, execution=0, weight_bytes=10**9, flops_per_token=1e9),
        BlockCost("b", storage="disk", execution="cpu", weight_bytes=10**9, flops_per_token=1e9),
    ]
    e = estimate_blocks(
        blocks, devicemap.Workload(seq_len=512), hardware(latency=1e-5), hidden_bytes_per_token=4
    )
    for phase in (e.prefill, e.decode):
        assert sum(seconds for _, seconds in phase.bottlenecks) == pytest.approx(phase.seconds)
        assert sum(d.total for d in phase.devices) == pytest.approx(phase.seconds)
        assert [t for t, _ in phase.bottlenecks][0] == phase.dominant
        assert sorted(t for t, _ in phase.bottlenecks) == sorted(TERMS)
    text = str(e)
    assert "weights moved" in text and "GPU 0" in text and "cpu" in text
    assert "decode:" in text and "tokens/s" in text and "dominated by disk read" in text


# --- from plans ------------------------------------------------------------------------------------------


def test_gpu_only_plan_decode_is_weights_over_bandwidth() -> None:
    model = linear_stack(layers=4, width=1024)
    plan = devicemap.plan(model, max_memory={0: "1GiB", "cpu": "1GiB"}, dtype="bfloat16")
    assert set(plan.assignments.values()) == {0}
    e = estimate(plan, devicemap.Workload(seq_len=1), hardware(), model, dtype="bfloat16")
    weights = 4 * 1024 * 1024 * 2
    assert e.decode.seconds == pytest.approx(weights / 1e12)
    assert e.prefill.seconds == pytest.approx(weights / 1e12)  # 1 token: still bound by reading weights
    long = estimate(plan, devicemap.Workload(seq_len=4096), hardware(), model, dtype="bfloat16")
    assert long.prefill.seconds == pytest.approx(4096 * 2 * 4 * 1024 * 1024 / 100e12)
    assert long.prefill.dominant == "compute"


def test_plan_offloaded_blocks_run_on_gpu_0_unless_the_plan_says_otherwise() -> None:
    model = linear_stack(layers=4, width=1024)
    plan = devicemap.plan(model, max_memory={0: "5MiB", 1: "3MiB", "cpu": "1GiB"}, dtype="bfloat16")
    offloaded = [name for name, device in plan.assignments.items() if device == "cpu"]
    assert offloaded
    given = getattr(plan, "execution_map", None)
    if given is None:
        assert all(execution_devices(plan)[name] == 0 for name in offloaded)
    else:
        assert execution_devices(plan) == given
    e = estimate(plan, devicemap.Workload(seq_len=1), hardware(gpus=2), model, dtype="bfloat16")
    assert e.dominant == "weights moved"
    moved = sum(d.weights_moved for d in e.decode.devices)
    assert moved == pytest.approx(len(offloaded) * 1024 * 1024 * 2 / 20e9)
    # an execution map that runs them on the CPU, where they are stored, moves no weights
    plan.execution_map = {
        name: "cpu" if name in offloaded else device for name, device in plan.assignments.items()
    }  # type: ignore[attr-defined]
    on_cpu = estimate(plan, devicemap.Workload(seq_len=1), hardware(gpus=2), model, dtype="bfloat16")
    assert sum(d.weights_moved for d in on_cpu.decode.devices) == 0
    assert "cpu" in {d.device for d in on_cpu.decode.devices}
    assert {d.device: d for d in on_cpu.decode.devices}["cpu"].weights_read == pytest.approx(
        len(offloaded) * 1024 * 1024 * 2 / 100e9
    )


def test_config_gives_the_same_estimate_as_the_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=4)  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = devicemap.plan(model, max_memory={0: "3MiB", "cpu": "1GiB"})
    wl = devicemap.Workload(seq_len=256)
    hw = Hardware.preset("rtx-4090", host="desktop-ddr5")
    from_model = estimate(plan, wl, hw, model)
    assert estimate(plan, wl, hw, config) == from_model
    # attention and the KV cache are counted: a longer context costs more per decoded token
    longer = estimate(plan, devicemap.Workload(seq_len=4096), hw, model)
    assert longer.decode.seconds > from_model.decode.seconds


def test_mixture_of_experts_plan_counts_routed_share() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=500,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    plan = devicemap.plan(model, max_memory={"cpu": "1GiB"})
    e = estimate(
        plan, devicemap.Workload(seq_len=1), Hardware(gpus=(), host=host(), engine=Engine("ideal")), model
    )
    total = sum(plan.block_bytes(name) for name in plan.assignments)
    read = e.decode.devices[0].weights_read * 100e9
    assert read < 0.6 * total  # 2 of 8 experts read per token, not all


# --- hardware -------------------------------------------------------------------------------------------


def test_presets_are_sourced_and_plausible() -> None:
    assert {"h100-sxm", "h100-pcie", "a100-40gb", "a100-80gb-sxm", "l40s", "rtx-4090", "rtx-3090"} <= set(
        GPU_PRESETS
    )
    assert {"a10g", "t4", "l4"} <= set(GPU_PRESETS)
    for g in GPU_PRESETS.values():
        assert g.source and "PCIe" in g.source
        assert 100e9 < g.memory_bandwidth < 10e12 and 1e12 < g.flops < 5e15
        assert g.flops_fp32 < g.flops and 10e9 < g.host_to_device < 64e9
    for h in HOST_PRESETS.values():
        assert h.source and 10e9 < h.memory_bandwidth < 1e12
    assert pcie_bandwidth(4, 16, efficiency=1.0) == pytest.approx(31.5e9, rel=1e-3)
    assert GPU.preset("RTX_4090") is GPU_PRESETS["rtx-4090"]


def test_unknown_names_and_missing_gpus_are_clear_errors() -> None:
    with pytest.raises(devicemap.InvalidOptionError, match=r"unknown GPU 'v100'; known: a100-40gb.*rtx-4090"):
        Hardware.preset("v100")
    with pytest.raises(devicemap.InvalidOptionError, match=r"unknown host 'laptop'; known: desktop-ddr4"):
        Hardware.preset("l4", host="laptop")
    with pytest.raises(devicemap.InvalidOptionError, match="positive"):
        host(disk_read=0)
    with pytest.raises(devicemap.InvalidOptionError, match=r"efficiencies must be in \(0, 1\]"):
        host(memory_efficiency=1.5)
    block = BlockCost("x", storage=1, execution=1, weight_bytes=1, flops_per_token=1)
    with pytest.raises(devicemap.InvalidOptionError, match=r"uses GPU 1 but the hardware describes 1 GPU"):
        estimate_blocks([block], devicemap.Workload(), hardware())
    with pytest.raises(devicemap.InvalidOptionError, match="must be a devicemap.Hardware"):
        estimate_blocks([block], devicemap.Workload(), "rtx-4090")  # type: ignore[arg-type]
    plan = devicemap.plan(linear_stack(2), max_memory={0: "1GiB"})
    with pytest.raises(devicemap.InvalidOptionError, match="torch.nn.Module .* or a transformers config"):
        estimate(plan, None, hardware(), {"hidden_size": 4})


def test_measure_host_reports_positive_rates_and_how_it_measured(tmp_path: object) -> None:
    measured = measure_host(quick=True, directory=str(tmp_path))
    assert measured.measured and measured.memory_efficiency == 1.0
    for value in (measured.memory_bandwidth, measured.flops_fp32, measured.flops_bf16, measured.disk_read):
        assert math.isfinite(value) and value > 0
    details = dict(measured.details)
    assert "matrix-vector" in details["memory"] and "1024x1024" in details["flops"]
    _, method = measure_disk_read(8, str(tmp_path))
    assert "O_DIRECT" in method or "page cache" in method
    print("\n" + Hardware(gpus=(), host=measured).describe(), details)


# --- the CPU-side terms against a measured CPU forward: benches/bench_speed_model_cpu.py ------------------


def test_cpu_forward_bench_runs_and_reports_every_phase() -> None:
    """The measured check of the CPU terms is a benchmark (a ratio of timings depends on the machine's load);
    this only checks that it still runs and prints a row per dtype and phase."""
    script = REPO / "benches" / "bench_speed_model_cpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed check
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line
        for line in done.stdout.splitlines()
        if line.startswith("| float32") or line.startswith("| bfloat16")
    ]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        ("float32", "prefill"),
        ("float32", "decode"),
        ("bfloat16", "prefill"),
        ("bfloat16", "decode"),
    ]


def test_plan_executing_offloaded_blocks_on_the_cpu_moves_activations_not_weights() -> None:
    model = linear_stack(layers=4, width=1024)
    max_memory = {0: "5MiB", "cpu": "1GiB"}
    plan = devicemap.plan(model, max_memory=max_memory, dtype="bfloat16", execution_device="cpu")
    wl = devicemap.Workload(seq_len=1)
    e = estimate(plan, wl, hardware(latency=1e-5), model, dtype="bfloat16")
    devices = {d.device: d for d in e.decode.devices}
    assert set(devices) == {0, "cpu"}
    assert sum(d.weights_moved for d in devices.values()) == 0
    assert devices["cpu"].activations_moved == pytest.approx(1e-5)  # no config: hidden size unknown
    staged = devicemap.plan(model, max_memory=max_memory, dtype="bfloat16")
    streamed = estimate(staged, wl, hardware(), model, dtype="bfloat16")
    assert streamed.decode.seconds > e.decode.seconds


def test_compute_width_follows_the_planned_dtype() -> None:
    model = linear_stack(layers=2, width=1024)  # float32 on the meta device
    wl = devicemap.Workload(seq_len=4096)
    as_bf16 = devicemap.plan(model, max_memory={0: "1GiB"}, dtype="bfloat16")
    as_fp32 = devicemap.plan(model, max_memory={0: "1GiB"})
    flops = 4096 * 2 * 2 * 1024 * 1024
    assert estimate(as_bf16, wl, hardware(), model).prefill.seconds == pytest.approx(flops / 100e12)
    assert estimate(as_fp32, wl, hardware(), model).prefill.seconds == pytest.approx(flops / 10e12)


def test_plan_estimate_is_the_estimate_of_the_plan() -> None:
    model = linear_stack(layers=4, width=1024)
    plan = devicemap.plan(model, max_memory={0: "10MiB", "cpu": "1GiB"}, dtype="bfloat16")
    workload = devicemap.Workload(seq_len=128)
    via_method = plan.estimate(workload, hardware(), model, dtype="bfloat16")
    direct = estimate(plan, workload, hardware(), model, dtype="bfloat16")
    assert via_method.decode.seconds == direct.decode.seconds > 0
    assert via_method.prefill.seconds == direct.prefill.seconds
