"""Exports of speed plans: routed experts the plan keeps and runs on the CPU, with the rest of their layer on a
GPU, become llama.cpp's ``--n-cpu-moe N`` (the first N layers' experts) or an ``-ot`` override naming the layers;
pipeline engines, which need whole layers on GPUs, refuse such a plan saying why."""

from __future__ import annotations

import json
import re

import pytest

import devicemap
from devicemap import catalog
from devicemap.cli import command as cli
from devicemap.cli.export import cpu_expert_layers, export, layer_devices
from devicemap.cost.hardware import Hardware

HARDWARE = Hardware.preset("rtx-4090", gpus=1, host="desktop-ddr5")


def speed_plan(name: str, gpu_gib: int, cpu_gib: int):
    model = catalog.build_meta_model(name)
    memory = {0: f"{gpu_gib}GiB", "cpu": f"{cpu_gib}GiB"}
    return model, devicemap.plan(model, memory, dtype="bfloat16", objective="speed", hardware=HARDWARE)


@pytest.mark.parametrize(("name", "gpu", "cpu"), [("mixtral-8x7b", 24, 128), ("qwen3-30b-a3b", 24, 64)])
def test_llama_cpp_flags_name_exactly_the_layers_whose_experts_run_on_the_cpu(name, gpu, cpu):
    model, plan = speed_plan(name, gpu, cpu)
    on_cpu = cpu_expert_layers(plan, model)
    assert on_cpu, "a model larger than the GPU keeps some experts on the CPU"
    for index in on_cpu:  # their experts are stored on the CPU and run there
        experts = [k for k in plan.execution_map if k.startswith(f"model.layers.{index}.") and "expert" in k]
        assert experts and all(plan.execution_map[k] == "cpu" for k in experts)
    flags = export(plan, model, "llama.cpp")
    layers = model.config.num_hidden_layers
    # Layers whose attention and norms the plan keeps off the GPU: the first ones (fewer --n-gpu-layers)
    # or named by a whole-layer override.
    dense_off = [i for i, (_, device) in enumerate(layer_devices(plan, model)) if not isinstance(device, int)]
    gpu_layers = int(re.search(r"--n-gpu-layers (\d+)", flags).group(1))
    whole = re.search(r'-ot "blk\\\.\(([\d|]+)\)\\\.=CPU"', flags)
    named_off = [int(i) for i in whole.group(1).split("|")] if whole else list(range(layers - gpu_layers))
    assert named_off == dense_off and (whole is None or gpu_layers == layers)
    moe = re.search(r"--n-cpu-moe (\d+)", flags)
    override = re.search(r'-ot "blk\\\.\(([\d|]+)\)\\\.ffn_\.\*_exps\\\.=CPU"', flags)
    named = list(range(int(moe.group(1)))) if moe else [int(i) for i in override.group(1).split("|")]
    assert named == on_cpu


def test_pipeline_engines_refuse_a_plan_with_experts_on_the_cpu():
    model, plan = speed_plan("mixtral-8x7b", 24, 128)
    with pytest.raises(devicemap.PlacementError, match="routed experts .* on the CPU.*llama.cpp"):
        export(plan, model, "vllm")


def test_the_command_exports_a_speed_plan(capsys):
    args = [
        "export",
        "mixtral-8x7b",
        "--gpus",
        "1x24GiB",
        "--cpu",
        "128GiB",
        "--dtype",
        "bf16",
        "--to",
        "llama.cpp",
    ]
    assert cli.main([*args, "--objective", "speed", "--hardware", "rtx-4090"]) == 0
    assert "_exps\\.=CPU" in capsys.readouterr().out  # experts of some layers run on the CPU
    assert cli.main(args) == 0  # the memory plan streams whole layers: no expert override
    memory_flags = capsys.readouterr().out
    assert "--n-cpu-moe" not in memory_flags and "-ot" not in memory_flags
    assert cli.main([*args, "--objective", "speed"]) == 2
    assert "--hardware" in capsys.readouterr().err


@pytest.mark.parametrize(("engine", "expected"), [(None, "llama.cpp"), ("accelerate", "accelerate")])
def test_an_export_to_llama_cpp_plans_for_llama_cpp_unless_told(capsys, engine, expected):
    args = ["export", "qwen3-30b-a3b", "--gpus", "1x24GiB", "--cpu", "64GiB", "--dtype", "bf16"]
    args += ["--to", "llama.cpp", "--objective", "speed", "--hardware", "rtx-4090", "--json"]
    assert cli.main([*args, *(["--engine", engine] if engine else [])]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["objective"] == "speed" and printed["hardware"]["engine"] == expected
    model = catalog.build_meta_model("qwen3-30b-a3b")
    hardware = Hardware.preset("rtx-4090", host="desktop-ddr5", engine=expected)
    memory = {0: "24GiB", "cpu": "64GiB"}
    plan = devicemap.plan(model, memory, dtype="bfloat16", objective="speed", hardware=hardware)
    assert printed["text"] == export(plan, model, "llama.cpp")


def test_an_engine_without_hardware_is_refused(capsys):
    args = ["plan", "qwen3-30b-a3b", "--gpus", "1x24GiB", "--cpu", "64GiB", "--engine", "llama.cpp"]
    assert cli.main(args) == 2
    assert "--hardware" in capsys.readouterr().err
