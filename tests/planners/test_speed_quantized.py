"""objective="speed" with a quantizer: blocks sized as the quantizer stores them, its offload rule and its
load headroom kept, exactly as the memory objective keeps them, and decode predicted on the stored bytes."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap.cost.hardware import Hardware
from devicemap.errors import DoesNotFitError
from optional_libraries import import_torchao_quantization
from tiny_models import small_qwen3_moe_config

transformers = pytest.importorskip("transformers")

# The uncalibrated engine: these tiny models' blocks cost less than the calibrated 100 us per GPU<->CPU hop.
HARDWARE = Hardware.preset("rtx-4090", host="desktop-ddr5", engine="ideal")
WORKLOAD = devicemap.Workload(batch_size=1, seq_len=256)
BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def moe() -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.Qwen3MoeForCausalLM(small_qwen3_moe_config()).to(torch.bfloat16)


def dense() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def plans(
    memory: dict, config: object, model: torch.nn.Module | None = None
) -> tuple[devicemap.Plan, devicemap.Plan]:
    model = model or moe()
    common = {"dtype": "bfloat16", "quantization_config": config, "workload": WORKLOAD}
    speed = devicemap.plan(model, memory, objective="speed", hardware=HARDWARE, **common)
    return speed, devicemap.plan(model, memory, **common)


def test_a_quantizer_that_refuses_offload_gets_a_gpu_only_speed_plan_with_its_headroom() -> None:
    model = moe()
    quantized = devicemap.ModuleTree.from_module(model, dtype="bfloat16", quantization_config=BNB_4BIT)
    room = 2 * quantized.module_bytes("")
    speed, memory_plan = plans({0: room, "cpu": 8 * room}, BNB_4BIT)
    assert set(speed.device_map.values()) == {0}
    # The same headroom to convert weights as the memory plan keeps, within the same capacity.
    assert speed.usage[0].reserve == memory_plan.usage[0].reserve > 0
    assert speed.usage[0].used <= room and speed.usage[0].weights == memory_plan.usage[0].weights
    with pytest.raises(DoesNotFitError):
        plans({0: quantized.module_bytes("") // 2, "cpu": 8 * room}, BNB_4BIT)


def test_fp32_offload_counts_blocks_on_the_cpu_at_their_unquantized_size() -> None:
    config = {**BNB_4BIT, "llm_int8_enable_fp32_cpu_offload": True}
    model = moe()
    quantized = devicemap.ModuleTree.from_module(model, dtype="bfloat16", quantization_config=config)
    plain = devicemap.ModuleTree.from_module(model, dtype="bfloat16")
    gpu = quantized.module_bytes("") // 2
    speed, _ = plans({0: gpu, "cpu": 4 * plain.module_bytes("")}, config)
    on_cpu = [name for name, device in speed.assignments.items() if device == "cpu"]
    assert on_cpu
    cpu = next(u for u in speed.usage if u.device == "cpu")
    assert cpu.weights == sum(plain.module_bytes(name) for name in on_cpu)
    assert all(u.used <= u.capacity for u in speed.usage if u.capacity is not None)


def test_quantized_weights_make_the_speed_plan_keep_more_on_the_gpu_and_decode_faster() -> None:
    config = transformers.TorchAoConfig(import_torchao_quantization().Int8WeightOnlyConfig())
    model = dense()  # torchao quantizes its linear layers: about half the bytes
    plain = devicemap.ModuleTree.from_module(model, dtype="bfloat16").module_bytes("")
    memory = {0: plain // 2, "cpu": 4 * plain}
    quantized, _ = plans(memory, config, model)
    unquantized = devicemap.plan(
        model, memory, dtype="bfloat16", objective="speed", hardware=HARDWARE, workload=WORKLOAD
    )
    on_gpu = [sum(1 for d in p.assignments.values() if d == 0) for p in (quantized, unquantized)]
    assert on_gpu[0] > on_gpu[1]
    fast = quantized.estimate(WORKLOAD, HARDWARE, model, dtype="bfloat16").decode.seconds
    slow = unquantized.estimate(WORKLOAD, HARDWARE, model, dtype="bfloat16").decode.seconds
    assert fast < slow
