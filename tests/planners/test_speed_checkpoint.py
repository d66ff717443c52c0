"""objective="speed" from a checkpoint's headers: the blocks the speed objective plans on a model (a layer's
routed experts apart from its attention), sized as the headers store them, so a pre-quantized checkpoint is
placed, read and streamed at its stored width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import devicemap
from devicemap.cost.hardware import Hardware
from devicemap.errors import CheckpointError, InvalidOptionError
from tiny_models import small_qwen3_moe_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# The uncalibrated engine: these tiny blocks cost less than the calibrated 100 us per GPU<->CPU hop.
HARDWARE = Hardware.preset("rtx-4090", host="desktop-ddr5", engine="ideal")
MEMORY = {0: "16MiB", "cpu": "1GiB"}  # 8 MiB of it for the KV cache and logits


def config() -> transformers.Qwen3MoeConfig:
    return small_qwen3_moe_config(tie_word_embeddings=False)


def meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.Qwen3MoeForCausalLM(config()).to(torch.bfloat16)


def per_expert(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused expert tensors (transformers 5's ``experts.gate_up_proj``) under the names published
    checkpoints use, one module per expert (``experts.0.gate_proj.weight``, ...)."""
    stem, _, kind = name.rpartition(".")
    if kind == "gate_up_proj":
        gate, up = value.chunk(2, dim=1)
        return {
            **{f"{stem}.{e}.gate_proj.weight": gate[e] for e in range(len(value))},
            **{f"{stem}.{e}.up_proj.weight": up[e] for e in range(len(value))},
        }
    if kind == "down_proj" and stem.endswith("experts"):
        return {f"{stem}.{e}.down_proj.weight": value[e] for e in range(len(value))}
    return {name: value}


def save(folder: Path, fp8: bool = False, unfused: bool = False) -> Path:
    """A random Qwen3-MoE checkpoint in bfloat16, or with its layers' matrices stored as float8 (one
    float32 scale each), as an FP8 checkpoint stores them; ``unfused``: one module per expert."""
    torch.manual_seed(0)
    state = transformers.Qwen3MoeForCausalLM(config()).to(torch.bfloat16).state_dict()
    if unfused:
        state = {k: v for name, value in state.items() for k, v in per_expert(name, value).items()}
    tensors = {}
    for name, value in state.items():
        if fp8 and ".layers." in name and value.dim() >= 2:
            tensors[name] = value.to(torch.float8_e4m3fn).contiguous()
            tensors[f"{name}_scale_inv"] = torch.ones(1, dtype=torch.float32)
        else:
            tensors[name] = value.contiguous()
    folder.mkdir()
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    described = config().to_dict()
    if fp8:
        described["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(described))
    return folder


def speed_plan(folder: Path, memory: dict = MEMORY) -> devicemap.Plan:
    return devicemap.plan_checkpoint(folder, memory, dtype="bfloat16", objective="speed", hardware=HARDWARE)


def test_the_headers_give_the_blocks_and_bytes_a_model_gives(tmp_path) -> None:
    from_headers = speed_plan(save(tmp_path / "bf16"))
    model = meta_model()
    from_model = devicemap.plan(model, MEMORY, dtype="bfloat16", objective="speed", hardware=HARDWARE)
    # The rotary table is a buffer checkpoints do not save.
    assert set(from_headers.assignments) == set(from_model.assignments) - {"model.rotary_emb"}
    assert "model.layers.0.mlp.experts" in from_headers.assignments  # experts apart from attention
    for name in from_headers.assignments:
        assert from_headers.block_bytes(name) == from_model.block_bytes(name), name
    for usage in from_headers.usage:
        assert usage.capacity is None or usage.used <= usage.capacity
    # It is a speed plan: some experts run on the CPU, faster than the memory plan of the same headers.
    assert any(from_headers.execution_map[n] == "cpu" for n in from_headers.assignments if "experts" in n)
    memory_plan = devicemap.plan_checkpoint(tmp_path / "bf16", MEMORY, dtype="bfloat16")
    workload = devicemap.Workload()
    fast = from_headers.estimate(workload, HARDWARE, model, dtype="bfloat16").decode.seconds
    plain = memory_plan.estimate(workload, HARDWARE, model, dtype="bfloat16").decode.seconds
    assert fast < plain


def test_one_module_per_expert_in_the_headers_makes_the_same_blocks(tmp_path) -> None:
    fused, unfused = (
        speed_plan(save(tmp_path / "fused")),
        speed_plan(save(tmp_path / "unfused", unfused=True)),
    )
    assert set(unfused.assignments) == set(fused.assignments)
    for name in fused.assignments:
        assert unfused.block_bytes(name) == fused.block_bytes(name), name
    assert unfused.assignments == fused.assignments


def test_a_pre_quantized_checkpoint_is_planned_at_its_stored_width(tmp_path) -> None:
    bf16, fp8 = speed_plan(save(tmp_path / "bf16")), speed_plan(save(tmp_path / "fp8", fp8=True))
    experts = "model.layers.0.mlp.experts"
    # float8 matrices plus their scales: about half the bytes
    assert fp8.block_bytes(experts) < 0.55 * bf16.block_bytes(experts)

    def on_gpu(plan: devicemap.Plan) -> int:
        return sum(1 for name, device in plan.assignments.items() if "experts" in name and device == 0)

    assert on_gpu(fp8) > on_gpu(bf16)  # the same GPU holds more of the smaller experts
    model, workload = meta_model(), devicemap.Workload()
    predicted = [p.estimate(workload, HARDWARE, model, dtype="bfloat16").decode.seconds for p in (fp8, bf16)]
    assert predicted[0] < predicted[1]


def test_a_checkpoint_speed_plan_names_what_it_misses(tmp_path) -> None:
    folder = save(tmp_path / "bf16")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json.*config=.*model="):
        speed_plan(folder)
    # With the model given, no config is needed for its compute (the bytes still come from the headers).
    plan = devicemap.plan_checkpoint(
        folder, MEMORY, dtype="bfloat16", objective="speed", hardware=HARDWARE, model=meta_model()
    )
    assert "model.layers.0.mlp.experts" in plan.assignments
    with pytest.raises(InvalidOptionError, match="hardware= and model= are used by objective='speed'"):
        devicemap.plan_checkpoint(folder, MEMORY, hardware=HARDWARE)
    with pytest.raises(InvalidOptionError, match="needs hardware="):
        devicemap.plan_checkpoint(folder, MEMORY, objective="speed", model=meta_model())


def test_the_command_plans_a_checkpoint_for_speed(tmp_path, capsys) -> None:
    from devicemap.cli import command as cli

    folder = save(tmp_path / "fp8", fp8=True)
    args = [
        "plan",
        str(folder),
        "--gpus",
        "1x16MiB",
        "--cpu",
        "1GiB",
        "--dtype",
        "bf16",
        "--objective",
        "speed",
    ]
    assert cli.main([*args, "--hardware", "rtx-4090", "--engine", "ideal", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["estimate"]["hardware"]["engine"] == "ideal"
    assert printed["device_map"] == speed_plan(folder).device_map
    (folder / "config.json").unlink()
    assert cli.main([*args, "--hardware", "rtx-4090"]) == 2
    assert "config.json beside the checkpoint" in capsys.readouterr().err


def test_a_pre_quantized_bitsandbytes_checkpoint_pays_its_kernels_per_call(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from dataclasses import replace

    from devicemap.sizing.quantization import pre_quantized_modules, quantized_sizer

    bnb = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    model = meta_model()
    sizer = quantized_sizer(model, bnb, "bfloat16", pre_quantized=True)
    tensors = {}  # the entries bitsandbytes saves (weight, SCB), each as bytes of its stored size
    for name, param in model.named_parameters():
        parts = sizer.parts(name)
        if parts is None:
            tensors[name] = torch.zeros(param.shape, dtype=torch.bfloat16)
        else:
            tensors.update(
                {entry: torch.zeros(bits // 8, dtype=torch.uint8) for entry, bits in parts.items()}
            )
    folder = tmp_path / "int8"
    folder.mkdir()
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config().to_dict(), "quantization_config": bnb}))
    hardware = Hardware.preset("rtx-4090", host="desktop-ddr5")  # the calibrated accelerate engine
    plan = devicemap.plan_checkpoint(
        folder, {0: "64MiB"}, dtype="bfloat16", objective="speed", hardware=hardware
    )
    method, converted = pre_quantized_modules(model, bnb)
    assert method == "bitsandbytes_8bit" and converted and plan.tree.quantized_modules == (method, converted)
    free = replace(hardware, engine=replace(hardware.engine, quantized_call_seconds=()))
    workload = devicemap.Workload()
    charged, plain = (
        plan.estimate(workload, hw, model, dtype="bfloat16").decode.seconds for hw in (hardware, free)
    )
    assert charged - plain == pytest.approx(len(converted) * hardware.engine.call_seconds(method))
