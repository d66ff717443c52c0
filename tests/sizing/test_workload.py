"""Workload-aware memory (KV cache, activations, logits), compute balance and GPU 0 reserve."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap.sizing.compute import flops_per_token
from devicemap.sizing.workload import decoder_layers, output_head

from plan_checks import check_plan, device_of


def cache_bytes_per_layer(cache) -> list[int]:
    """Bytes of each layer's key and value tensors in a transformers cache (4.x and 5.x layouts)."""
    if hasattr(cache, "layers"):
        return [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]
    return [k.nbytes + v.nbytes for k, v in zip(cache.key_cache, cache.value_cache, strict=False)]


def test_kv_formula_matches_a_real_cache(tiny_llama):
    batch, seq = 3, 17
    ids = torch.randint(0, tiny_llama.config.vocab_size, (batch, seq))
    with torch.no_grad():
        out = tiny_llama(input_ids=ids, use_cache=True)
    measured = cache_bytes_per_layer(out.past_key_values)
    assert len(measured) == tiny_llama.config.num_hidden_layers
    workload = devicemap.Workload(batch_size=batch, seq_len=seq, kv_dtype=torch.float32)
    assert all(m == workload.kv_cache_bytes_per_layer(tiny_llama.config) for m in measured)
    half = devicemap.Workload(batch_size=batch, seq_len=seq, kv_dtype="bfloat16")
    assert half.kv_cache_bytes_per_layer(tiny_llama.config) * 2 == measured[0]


def test_decoder_layers_and_head_are_found(tiny_llama):
    layers = decoder_layers(tiny_llama, tiny_llama.config)
    assert layers == [f"model.layers.{i}" for i in range(6)]
    assert output_head(tiny_llama) == "lm_head"


def test_kv_cache_is_planned_on_the_device_running_each_layer(tiny_llama):
    workload = devicemap.Workload(batch_size=1, seq_len=64, kv_dtype="float32", logits_tokens=1)
    kv = workload.kv_cache_bytes_per_layer(tiny_llama.config)
    memory = {0: "1MiB", 1: "1MiB", "cpu": "1GiB"}
    plan = devicemap.plan(tiny_llama, max_memory=memory, workload=workload)
    check_plan(tiny_llama, plan)
    activation = workload.activation_bytes(tiny_llama.config, torch.float32)
    for gpu in (0, 1):
        layers_here = sum(1 for i in range(6) if device_of(f"model.layers.{i}.mlp", plan.device_map) == gpu)
        head = workload.logits_bytes(tiny_llama.config) if device_of("lm_head", plan.device_map) == gpu else 0
        usage = next(u for u in plan.usage if u.device == gpu)
        assert usage.runtime == activation + layers_here * kv + head
        assert usage.used <= usage.capacity
    # Without the workload the same memory holds more layers on the GPUs.
    bare = devicemap.plan(tiny_llama, max_memory=memory)
    assert len(bare.offloaded) <= len(plan.offloaded)


def test_offloaded_layers_keep_their_cache_on_gpu0(tiny_llama):
    workload = devicemap.Workload(batch_size=1, seq_len=32, kv_dtype="float32", logits_tokens=1)
    kv = workload.kv_cache_bytes_per_layer(tiny_llama.config)
    plan = devicemap.plan(
        tiny_llama, max_memory={0: "700KiB", "cpu": "1GiB"}, workload=workload, strategy="sequential"
    )
    offloaded_layers = {o.name for o in plan.offloaded if o.name.startswith("model.layers.")}
    assert offloaded_layers, plan
    gpu0 = plan.usage[0]
    assert gpu0.reserve >= len(offloaded_layers) * kv
    assert gpu0.used <= gpu0.capacity


def test_workload_needs_a_config():
    with pytest.raises(ValueError, match="config"):
        devicemap.plan(torch.nn.Linear(2, 2), max_memory={"cpu": "1GiB"}, workload=devicemap.Workload())
    with pytest.raises(ValueError, match="batch_size"):
        devicemap.Workload(batch_size=0)


def test_only_routed_experts_count_towards_compute(tiny_mixtral):
    flops = dict(flops_per_token(tiny_mixtral))
    expert_names = [n for n in flops if ".experts" in n]
    assert expert_names
    expert_params = sum(
        p.numel()
        for n, m in tiny_mixtral.named_modules()
        if n in expert_names
        for p in m.parameters(recurse=False)
    )
    config = tiny_mixtral.config
    share = config.num_experts_per_tok / config.num_local_experts
    assert share < 1
    assert sum(flops[n] for n in expert_names) == pytest.approx(2 * expert_params * share, rel=1e-6)
    assert "model.embed_tokens" not in flops
    assert flops["lm_head"] == 2 * tiny_mixtral.lm_head.weight.numel()


def test_compute_balance_lowers_the_compute_peak(tiny_mixtral):
    memory = {0: "1GiB", 1: "1GiB", 2: "1GiB"}
    by_memory = devicemap.plan(tiny_mixtral, max_memory=memory, strategy="balanced")
    by_memory_compute = {u.device: u.compute for u in by_memory.usage}
    assert sum(by_memory_compute.values()) == 0  # compute is only counted when balancing by it
    by_compute = devicemap.plan(tiny_mixtral, max_memory=memory, strategy="balanced", balance="compute")
    peak = max(u.compute for u in by_compute.usage)
    total = sum(u.compute for u in by_compute.usage)
    assert total == sum(f for _, f in flops_per_token(tiny_mixtral))
    assert peak < total  # actually spread over GPUs
    assert peak <= compute_peak_of(by_memory, dict(flops_per_token(tiny_mixtral)))
    check_plan(tiny_mixtral, by_compute)


def compute_peak_of(plan: devicemap.Plan, flops: dict) -> int:
    per_device: dict = {}
    for name, f in flops.items():
        device = device_of(name, plan.device_map)
        per_device[device] = per_device.get(device, 0) + f
    return max(per_device.values())


def test_gpu0_reserve_is_kept_free(tiny_llama):
    plan = devicemap.plan(
        tiny_llama, max_memory={0: "1MiB", 1: "1MiB"}, strategy="balanced_low_0", gpu0_reserve="512KiB"
    )
    gpu0 = plan.usage[0]
    assert gpu0.reserve == 512 * 1024
    assert gpu0.used <= gpu0.capacity
