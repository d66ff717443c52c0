"""A speed plan's own execution choice for prefill: CPU-run blocks without a KV cache streamed to a GPU
for passes long enough that copying their weights beats computing on the CPU, within memory, and the
estimate costing the prefill that would run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import devicemap
from devicemap.cost.estimate import activation_time, block_time, model_block_costs
from devicemap.cost.hardware import Hardware
from devicemap.errors import InvalidOptionError

transformers = pytest.importorskip("transformers")

# The uncalibrated engine: with accelerate's pageable copies (~4 GB/s) or llama.cpp's CPU shares, streaming
# this model's experts for a 2048-token prefill does not repay the decode time its room costs over 256 tokens.
HARDWARE = Hardware.preset("rtx-4090", host="desktop-ddr5", engine="ideal")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from devicemap import catalog

    return catalog.build_meta_model("qwen3-30b-a3b")  # 61 GB in bf16: its experts do not fit a 24 GiB GPU


DECODE_ONLY = devicemap.Workload(batch_size=1, seq_len=2048)
REQUEST = replace(DECODE_ONLY, new_tokens=256)


def speed_plan(model: torch.nn.Module, workload: devicemap.Workload) -> devicemap.Plan:
    memory = {0: "24GiB", "cpu": "64GiB"}
    return devicemap.plan(
        model, memory, dtype="bfloat16", objective="speed", hardware=HARDWARE, workload=workload
    )


def test_a_request_plan_keeps_room_to_stream_experts_for_prefill_and_prefills_faster(model) -> None:
    request = REQUEST
    plain, streaming = speed_plan(model, DECODE_ONLY), speed_plan(model, request)
    assert not plain.prefill_streams  # fastest decode fills the GPU
    assert streaming.prefill_streams
    costs = {c.name: c for c in model_block_costs(streaming, request, model, dtype="bfloat16")[0]}
    for name, stream in streaming.prefill_streams.items():
        assert streaming.assignments[name] == "cpu" and streaming.execution_map[name] == "cpu"
        assert costs[name].kv_bytes_per_token == 0
        assert 1 < stream.min_tokens <= request.seq_len
        reason = next(o.reason for o in streaming.offloaded if o.name == name)
        assert f"streams it to GPU {stream.device}" in reason
    for usage in streaming.usage:
        if usage.capacity is not None:
            assert usage.used <= usage.capacity
    # The room for the largest streamed block and the pass's hidden states is left free on its GPU.
    gpu = streaming.usage[0]
    largest = max(streaming.block_bytes(name) for name in streaming.prefill_streams)
    assert gpu.capacity - gpu.used >= largest
    before = plain.estimate(request, HARDWARE, model, dtype="bfloat16")
    after = streaming.estimate(request, HARDWARE, model, dtype="bfloat16")
    assert after.prefill.seconds < before.prefill.seconds
    request_time = [e.prefill.seconds + 256 * e.decode.seconds for e in (before, after)]
    assert request_time[1] < request_time[0]


def test_the_threshold_is_the_fewest_tokens_from_which_streaming_wins(model) -> None:
    request = REQUEST
    plan = speed_plan(model, request)
    assert plan.prefill_streams
    costs, hidden_bytes, bits = model_block_costs(plan, request, model, dtype="bfloat16")
    for cost in costs:
        stream = plan.prefill_streams.get(cost.name)
        if stream is None:
            continue
        in_place = replace(cost, prefill_execution=None)
        streamed = replace(in_place, execution=stream.device)

        def wins(tokens: int, in_place=in_place, streamed=streamed, gpu=stream.device) -> bool:
            one = devicemap.Workload(batch_size=1, seq_len=tokens)
            hops = 2 * activation_time(HARDWARE, "cpu", gpu, tokens * hidden_bytes)
            here = block_time(in_place, one, HARDWARE, phase="prefill", dtype_bits=bits)
            return block_time(streamed, one, HARDWARE, phase="prefill", dtype_bits=bits) + hops < here

        assert wins(stream.min_tokens) and not wins(stream.min_tokens - 1)


def test_the_estimate_streams_only_passes_from_the_threshold(model) -> None:
    request = REQUEST
    plan = speed_plan(model, request)
    streams = dict(plan.prefill_streams)
    with_streams = plan.estimate(request, HARDWARE, model, dtype="bfloat16")
    plan.prefill_streams = {}
    without = plan.estimate(request, HARDWARE, model, dtype="bfloat16")
    assert with_streams.prefill.seconds < without.prefill.seconds
    assert with_streams.decode.seconds == without.decode.seconds  # one token is below every threshold
    moved = {d.device: d.weights_moved for d in with_streams.prefill.devices}
    assert moved.get(0, 0) > 0 and not any(d.weights_moved for d in without.prefill.devices)
    # A prefill shorter than every threshold runs as decode does: on the CPU.
    plan.prefill_streams = streams
    short = replace(request, seq_len=min(s.min_tokens for s in streams.values()) - 1)
    shorter = plan.estimate(short, HARDWARE, model, dtype="bfloat16")
    assert not any(d.weights_moved for d in shorter.prefill.devices)


def test_new_tokens_is_checked() -> None:
    with pytest.raises(InvalidOptionError, match="new_tokens"):
        devicemap.Workload(new_tokens=-1)
    with pytest.raises(InvalidOptionError, match="new_tokens"):
        devicemap.Workload(new_tokens=1.5)  # type: ignore[arg-type]
