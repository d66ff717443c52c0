"""A speed plan keeps the workload's runtime memory (KV cache, activations, logits) inside every device's
budget, exactly as a memory plan does, and says truly why each block is off the GPUs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicemap
from devicemap.cost.hardware import GPU, Hardware
from devicemap.errors import DoesNotFitError, InvalidOptionError, UnknownDeviceError

transformers = pytest.importorskip("transformers")

HARDWARE = Hardware.preset("rtx-4090", gpus=2, host="desktop-ddr5")
# Blocks of these tiny models take microseconds: without calibration's per-hop cost, GPU and CPU both pay.
IDEAL = Hardware.preset("rtx-4090", gpus=2, host="desktop-ddr5", engine="ideal")


def tiny_model(moe: bool, layers: int, hidden: int, vocab: int) -> torch.nn.Module:
    shape = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": vocab,
    }
    with torch.device("meta"):
        if moe:
            config = transformers.Qwen3MoeConfig(
                **shape, moe_intermediate_size=hidden, num_experts=4, num_experts_per_tok=2
            )
            return transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).to(torch.bfloat16)


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.nn.Module, dict, devicemap.Workload | None]:
    model = tiny_model(
        moe=draw(st.booleans()),
        layers=draw(st.integers(1, 4)),
        hidden=draw(st.sampled_from([64, 128, 256])),
        vocab=draw(st.sampled_from([256, 4096])),
    )
    weights = sum(p.numel() * 2 for p in model.parameters())
    gpus = draw(st.integers(1, 2))
    memory: dict = {i: int(weights * draw(st.floats(0.05, 1.5))) for i in range(gpus)}
    memory["cpu"] = int(weights * draw(st.floats(0.1, 2.0)))
    if draw(st.booleans()):
        memory["disk"] = 1 << 40
    workload = draw(
        st.none()
        | st.builds(
            devicemap.Workload,
            batch_size=st.integers(1, 4),
            seq_len=st.integers(1, 4096),
        )
    )
    return model, memory, workload


@settings(max_examples=40, deadline=None)
@given(problems())
def test_a_speed_plan_keeps_the_runtime_memory_inside_every_budget(problem) -> None:
    model, memory, workload = problem
    planned = (
        workload or devicemap.Workload()
    )  # the workload the speed objective predicts is the one it keeps
    try:
        speed = devicemap.plan(model, memory, objective="speed", hardware=HARDWARE, workload=workload)
    except DoesNotFitError:
        # Only where no memory plan with that workload fits either (the speed objective tries those too).
        with pytest.raises(DoesNotFitError):
            devicemap.plan(model, memory, workload=planned)
        return
    for usage in speed.usage:
        if usage.capacity is not None:
            assert usage.used <= usage.capacity, usage
    # The KV cache, logits and at least one activation buffer are somewhere: a plan on one roomy GPU has
    # exactly those, and nothing of them can vanish by spreading the blocks out (a GPU staging offloaded
    # blocks keeps their runtime memory in its reserve, with the room to copy them in).
    alone = devicemap.plan(model, {0: 1 << 40}, workload=planned).usage[0].runtime
    assert sum(u.runtime + u.reserve for u in speed.usage) >= alone > 0


def test_the_plan_the_issue_named_keeps_its_kv_cache_on_the_gpu() -> None:
    from devicemap import catalog

    model = catalog.build_meta_model("mixtral-8x7b")
    hardware = Hardware.preset("rtx-4090", host="desktop-ddr5")
    speed = devicemap.plan(
        model, {0: "24GiB", "cpu": "128GiB"}, dtype="bfloat16", objective="speed", hardware=hardware
    )
    gpu = speed.usage[0]
    assert gpu.runtime > 0 and gpu.used <= gpu.capacity


def small_moe_plan(hardware: Hardware, **options: object) -> devicemap.Plan:
    model = tiny_model(moe=True, layers=4, hidden=256, vocab=4096)
    weights = sum(p.numel() * 2 for p in model.parameters())
    memory = {0: weights // 2, "cpu": 4 * weights}
    return devicemap.plan(
        model,
        memory,
        objective="speed",
        hardware=hardware,
        workload=devicemap.Workload(batch_size=1, seq_len=256),
        **options,
    )


def test_blocks_the_gpu_has_no_room_for_say_so() -> None:
    plan = small_moe_plan(IDEAL)
    assert plan.offloaded
    for offload in plan.offloaded:
        assert plan.execution_map[offload.name] == "cpu"
        assert "pinned" not in offload.reason
        assert "no room left on the GPUs" in offload.reason or "beside its neighbours" in offload.reason
    assert any("no room left on the GPUs" in o.reason for o in plan.offloaded)


def test_blocks_that_run_faster_on_the_cpu_say_so() -> None:
    # A GPU whose memory is slower than the host's: every block reads its weights faster on the CPU.
    slow = dataclasses.replace(GPU.preset("rtx-4090"), memory_bandwidth=5e9)
    plan = small_moe_plan(dataclasses.replace(IDEAL, gpus=(slow,)))
    assert plan.offloaded
    faster = [o for o in plan.offloaded if "runs faster there" in o.reason]
    assert faster and all(plan.execution_map[o.name] == "cpu" for o in faster)


def test_pinned_blocks_say_they_are_pinned_and_stay_where_pinned() -> None:
    plan = small_moe_plan(IDEAL, pins={"model.layers.3": "cpu", "lm_head": 0})
    assert plan.device_map["lm_head"] == 0
    pinned = [o for o in plan.offloaded if o.name.startswith("model.layers.3.")]
    assert pinned and all("pinned" in o.reason for o in pinned)
    assert all("pinned" not in o.reason for o in plan.offloaded if o not in pinned)
    with pytest.raises(InvalidOptionError, match="part of block"):
        small_moe_plan(IDEAL, pins={"model.layers.3.self_attn.q_proj": "cpu"})
    with pytest.raises(UnknownDeviceError, match="no device 'disk'"):
        small_moe_plan(IDEAL, pins={"model.layers.3": "disk"})


def test_streamed_blocks_say_they_are_streamed() -> None:
    # A host slower than its PCIe link: copying a block to the GPU beats reading it on the CPU.
    slow_host = dataclasses.replace(IDEAL.host, memory_bandwidth=1e9)
    plan = small_moe_plan(dataclasses.replace(IDEAL, gpus=IDEAL.gpus[:1], host=slow_host))
    assert plan.offloaded
    for offload in plan.offloaded:
        assert plan.execution_map[offload.name] == 0
        assert "streamed to GPU 0" in offload.reason and "pinned" not in offload.reason
