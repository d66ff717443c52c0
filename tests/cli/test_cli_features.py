"""The command's placement flags (--pin, --no-split, --gpu0-reserve, --offload-buffers), --save and the
JSON every command prints with --json.

Each flag must change the plan exactly as the library's argument of the same name does, so every test
compares the command's device map with ``devicemap.plan`` on the same meta model. Runs in-process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

import devicemap
from devicemap import catalog
from devicemap.cli import command as cli
from devicemap.cli import inputs as cli_inputs
from optional_libraries import import_torchao_quantization
from tiny_models import tiny_llama_config

SMALL = "llama-3.2-1b"  # the cheapest bundled model to build
DEVICES = ("--gpus", "2x1GiB", "--cpu", "8GiB", "--dtype", "bf16")
LIBRARY_MEMORY = {0: "1GiB", 1: "1GiB", "cpu": "8GiB"}


@pytest.fixture(scope="module")
def small_model():
    return catalog.build_meta_model(SMALL)


def command_json(capsys, *args: str) -> dict:
    """Run ``devicemap <args> --json`` in-process; assert exit 0; return the printed object."""
    code = cli.main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def refused(capsys, *args: str) -> str:
    """Run the command in-process; assert exit 2 with one ``devicemap: ...`` line; return that line."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    assert code == 2, (args, captured.err)
    line = captured.err.strip()
    assert line.startswith("devicemap: ") and "\n" not in line, line
    return line


def library_map(model, **kwargs) -> dict:
    return devicemap.plan(model, max_memory=LIBRARY_MEMORY, dtype="bfloat16", **kwargs).device_map


# ----- placement flags: the same plan as the library's arguments ---------------------------------------


def test_pins_place_modules_as_the_library_does(capsys, small_model):
    printed = command_json(
        capsys, "plan", SMALL, *DEVICES, "--pin", "lm_head=1", "--pin", "model.layers.0=cpu"
    )
    expected = library_map(small_model, pins={"lm_head": 1, "model.layers.0": "cpu"})
    assert printed["device_map"] == expected
    assert expected != library_map(small_model)  # the pins moved something
    assert printed["inputs"]["pins"] == {"lm_head": 1, "model.layers.0": "cpu"}


def test_bad_pins_are_refused_naming_the_pin(capsys):
    line = refused(capsys, "plan", SMALL, *DEVICES, "--pin", "lm_haed=0")
    assert "lm_haed" in line and "did you mean lm_head" in line  # the library's UnknownModuleError
    line = refused(capsys, "plan", SMALL, *DEVICES, "--pin", "lm_head=3")
    assert "--pin 'lm_head=3'" in line and "not in the device spec" in line
    line = refused(capsys, "plan", SMALL, *DEVICES, "--pin", "lm_head=disk")
    assert "not in the device spec" in line and "--disk" in line
    line = refused(capsys, "plan", SMALL, *DEVICES, "--pin", "lm_head")
    assert "MODULE=DEVICE" in line
    line = refused(capsys, "plan", SMALL, *DEVICES, "--pin", "lm_head=gpu7x")
    assert "--pin 'lm_head=gpu7x'" in line and "unknown device" in line
    line = refused(capsys, "plan", SMALL, *DEVICES, "--pin", "lm_head=0", "--pin", "lm_head=1")
    assert "already pinned" in line


def test_no_split_replaces_the_models_own_classes(capsys, small_model):
    # With only LlamaMLP kept whole, decoder layers may be cut between their attention and MLP.
    printed = command_json(capsys, "plan", SMALL, *DEVICES, "--no-split", "LlamaMLP")
    expected = library_map(small_model, no_split_module_classes=["LlamaMLP"])
    assert printed["device_map"] == expected
    assert expected != library_map(small_model)
    assert printed["inputs"]["no_split"] == {"classes": ["LlamaMLP"], "source": "--no-split"}
    default = command_json(capsys, "plan", SMALL, *DEVICES)
    assert default["inputs"]["no_split"] == {"classes": ["LlamaDecoderLayer"], "source": "model"}


def test_no_split_class_the_model_lacks_is_refused(capsys):
    line = refused(capsys, "plan", SMALL, *DEVICES, "--no-split", "LlamaDecoderLayr")
    assert "'LlamaDecoderLayr'" in line and "did you mean LlamaDecoderLayer" in line


def test_gpu0_reserve_keeps_room_on_gpu_0(capsys, small_model):
    printed = command_json(capsys, "plan", SMALL, *DEVICES, "--gpu0-reserve", "300MiB")
    assert printed["device_map"] == library_map(small_model, gpu0_reserve=300 * 2**20)
    assert printed["device_map"] != library_map(small_model)
    assert printed["inputs"]["gpu0_reserve"] == 300 * 2**20
    gpu0 = next(d for d in printed["devices"] if d["device"] == 0)
    assert gpu0["reserve"] >= 300 * 2**20


def test_gpu0_reserve_is_refused_without_gpu_0_or_with_a_bad_size(capsys):
    line = refused(capsys, "plan", SMALL, "--cpu", "8GiB", "--gpu0-reserve", "1GiB")
    assert "--gpu0-reserve" in line and "no GPU 0" in line
    line = refused(capsys, "plan", SMALL, *DEVICES, "--gpu0-reserve", "20 GB")
    assert "--gpu0-reserve '20 GB'" in line


def test_offload_buffers_as_the_library(capsys, small_model):
    printed = command_json(capsys, "plan", SMALL, *DEVICES, "--offload-buffers")
    assert printed["device_map"] == library_map(small_model, offload_buffers=True)
    assert printed["inputs"]["offload_buffers"] is True


@pytest.mark.parametrize("preset", ["bnb-4bit", "bnb-8bit", "torchao-int8"])
def test_quant_sizes_weights_as_the_library_does(capsys, small_model, preset):
    if preset.startswith("torchao"):
        import_torchao_quantization()
    printed = command_json(capsys, "plan", SMALL, "--gpus", "2x1GiB", "--dtype", "bf16", "--quant", preset)
    config = cli_inputs.quantization(preset)
    expected = devicemap.plan(
        small_model, max_memory={0: "1GiB", 1: "1GiB"}, dtype="bfloat16", quantization_config=config
    )
    assert printed["device_map"] == expected.device_map
    assert [d["weights"] for d in printed["devices"]] == [u.weights for u in expected.usage]
    assert printed["inputs"]["quant"] == preset
    # 4-bit or 8-bit weights: far less than the bf16 model
    bf16 = devicemap.plan(small_model, max_memory={"cpu": "64GiB"}, dtype="bfloat16")
    assert sum(u.weights for u in expected.usage) < 0.7 * sum(u.weights for u in bf16.usage)


def test_quant_that_refuses_offload_explains_the_shortfall(capsys):
    code = cli.main(
        ["plan", SMALL, "--gpus", "1x256MiB", "--cpu", "8GiB", "--dtype", "bf16", "--quant", "bnb-4bit"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "bitsandbytes refuses CPU/disk" in err and "'cpu'" in err


def test_quant_on_a_checkpoint_or_an_unknown_preset_is_refused(capsys, tiny_checkpoints):
    _, folder = tiny_checkpoints["llama"]
    assert "--quant" in refused(capsys, "plan", str(folder), "--cpu", "1GiB", "--quant", "bnb-4bit")
    assert "bnb-8bit" in refused(capsys, "plan", SMALL, "--cpu", "1GiB", "--quant", "int3")


def test_export_takes_the_placement_flags(capsys, small_model):
    flags = ("--pin", "model.norm=0", "--gpu0-reserve", "1GiB", "--offload-buffers")
    printed = command_json(
        capsys, "export", SMALL, "--gpus", "2x2GiB", "--dtype", "bf16", "--to", "vllm", *flags
    )
    memory = {0: "2GiB", 1: "2GiB"}
    kwargs = {"pins": {"model.norm": 0}, "gpu0_reserve": 2**30, "offload_buffers": True}
    expected = devicemap.plan(small_model, max_memory=memory, dtype="bfloat16", **kwargs).device_map
    assert printed["device_map"] == expected
    assert expected != devicemap.plan(small_model, max_memory=memory, dtype="bfloat16").device_map
    assert printed["values"]["pp_layer_partition"] == [stage["layers"] for stage in printed["stages"]]


@pytest.mark.parametrize("target", ["vllm", "deepspeed", "pipelining"])
def test_a_pin_that_breaks_the_layer_order_cannot_be_exported(capsys, target):
    # Layer 2 pinned to GPU 1 sits between GPU 0's layers: a layer count per stage would misplace it.
    line = refused(
        capsys,
        "export",
        SMALL,
        "--gpus",
        "2x8GiB",
        "--dtype",
        "bf16",
        "--to",
        target,
        "--pin",
        "model.layers.2=1",
    )
    assert "model.layers.3" in line and "GPU 0" in line and "model.layers.2" in line


def test_no_split_on_a_checkpoint_is_refused(capsys, tiny_checkpoints):
    _, folder = tiny_checkpoints["llama"]
    line = refused(capsys, "plan", str(folder), "--cpu", "1GiB", "--no-split", "LlamaDecoderLayer")
    assert "--no-split" in line and "config.json" in line


# ----- --save device_map.json ------------------------------------------------------------------------


def test_save_writes_the_device_map(capsys, tmp_path, small_model):
    target = tmp_path / "device_map.json"
    code = cli.main(["plan", SMALL, *DEVICES, "--pin", "lm_head=1", "--save", str(target)])
    out = capsys.readouterr().out
    assert code == 0 and f"device_map written to {target}" in out
    assert json.loads(target.read_text()) == library_map(small_model, pins={"lm_head": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_map.json"]  # no temporary left behind


def test_save_refuses_a_folder_or_a_missing_folder_before_planning(capsys, tmp_path):
    line = refused(capsys, "plan", SMALL, *DEVICES, "--save", str(tmp_path))
    assert "--save" in line and "is a folder" in line
    line = refused(capsys, "plan", SMALL, *DEVICES, "--save", str(tmp_path / "missing" / "map.json"))
    assert "does not exist" in line
    # checked up front: a plan that does not fit still reports the bad path, and nothing is written
    line = refused(capsys, "plan", SMALL, "--gpus", "1x1GiB", "--save", str(tmp_path / "missing" / "m.json"))
    assert "does not exist" in line
    assert list(tmp_path.iterdir()) == []


def run_command(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "devicemap.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def test_save_writes_into_devices_fifos_and_standard_output_without_replacing_them(
    capsys, tmp_path, small_model
):
    """Only regular files are replaced (atomically): ``--save /dev/null`` run as root must not replace the
    device node with a regular file, nor ``--save /dev/stdout`` the symlink (printing nothing and saying
    "written"). A device or FIFO is written into, standard output prints the map."""
    import threading

    expected = library_map(small_model)
    null = tmp_path / "null"  # a /dev/null of our own: the machine's is not put at risk
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert cli.main(["plan", SMALL, *DEVICES, "--save", str(null)]) == 0
    assert stat.S_ISCHR(null.stat().st_mode)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert cli.main(["plan", SMALL, *DEVICES, "--save", str(fifo)]) == 0
    reader.join(timeout=300)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and json.loads(received[0]) == expected
    capsys.readouterr()

    # The real standard output (pytest's capture is not a file): the command in a child process.
    done = run_command("plan", SMALL, *DEVICES, "--save", "/dev/stdout")
    assert done.returncode == 0, done.stderr
    printed = done.stdout[done.stdout.index("{\n") : done.stdout.index("\n}\n") + 3]
    assert json.loads(printed) == expected


def test_save_through_a_symlink_replaces_its_target_and_keeps_the_link(capsys, tmp_path, small_model):
    target = tmp_path / "maps" / "device_map.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "current.json"
    link.symlink_to(target)
    assert cli.main(["plan", SMALL, *DEVICES, "--save", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text()) == library_map(small_model)
    assert sorted(p.name for p in target.parent.iterdir()) == ["device_map.json"]  # no temporary left

    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere" / "map.json")
    line = refused(capsys, "plan", SMALL, *DEVICES, "--save", str(dangling))
    assert "symlink" in line and "does not exist" in line
    assert dangling.is_symlink()


def test_saved_map_loads_with_from_pretrained(capsys, tmp_path):
    """The file is what transformers takes: a tiny Llama saved to disk loads with it, cpu and disk."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    original = LlamaForCausalLM(config)
    folder = tmp_path / "tiny"
    original.save_pretrained(folder)
    saved = tmp_path / "device_map.json"
    # CPU room for about half the weights (~11 MiB): the rest goes to disk (no GPU on this machine).
    half = sum(p.numel() * p.element_size() for p in original.parameters()) // 2
    code = cli.main(
        ["plan", str(folder / "config.json"), "--max-memory", f"cpu={half}B,disk", "--save", str(saved)]
    )
    assert code == 0, capsys.readouterr().err
    device_map = json.loads(saved.read_text())
    assert set(device_map.values()) == {"cpu", "disk"}

    loaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map=json.load(saved.open()), offload_folder=str(tmp_path / "offload")
    )
    assert loaded.hf_device_map == device_map
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, original(tokens).logits, atol=1e-5)


# ----- --json on every command: keys and types --------------------------------------------------------

DEVICE_KEY = (int, str)
INPUT_KEYS = {
    "model": str,
    "source": str,
    "devices": list,
    "strategy": str,
    "dtype": (str, type(None)),
    "kv_dtype": (str, type(None)),
    "workload": (dict, type(None)),
    "pins": dict,
    "no_split": (dict, type(None)),
    "gpu0_reserve": (int, type(None)),
    "offload_buffers": bool,
    "quant": (str, type(None)),
    "execution_device": (int, str, type(None)),
}


def assert_shape(value: dict, shape: dict) -> None:
    assert set(value) == set(shape), set(value) ^ set(shape)
    for key, kind in shape.items():
        assert isinstance(value[key], kind), (key, value[key])


def assert_inputs(inputs: dict) -> None:
    assert_shape(inputs, INPUT_KEYS)
    for device in inputs["devices"]:
        assert_shape(device, {"device": DEVICE_KEY, "capacity": (int, type(None))})


def test_plan_json_schema(capsys):
    printed = command_json(
        capsys, "plan", SMALL, "--gpus", "1x1GiB", "--cpu", "1GiB", "--disk", "--batch", "2"
    )
    assert_shape(
        printed,
        {
            "inputs": dict,
            "strategy": str,
            "device_map": dict,
            "devices": list,
            "offloaded": list,
            "execution_map": dict,
        },
    )
    assert_inputs(printed["inputs"])
    assert printed["inputs"]["devices"][-1] == {"device": "disk", "capacity": None}
    assert_shape(printed["inputs"]["workload"], {"batch_size": int, "seq_len": int, "kv_dtype": str})
    for device in printed["devices"]:
        shape = {"weights": int, "runtime": int, "reserve": int, "used": int, "blocks": list}
        assert_shape(device, {"device": DEVICE_KEY, "capacity": (int, type(None)), **shape})
        assert device["used"] == device["weights"] + device["runtime"] + device["reserve"]
    assert printed["devices"][0]["runtime"] > 0  # the KV cache of --batch 2
    assert printed["offloaded"], "1 GiB of GPU cannot hold a 1B model in float32"
    for offload in printed["offloaded"]:
        assert_shape(offload, {"name": str, "device": DEVICE_KEY, "bytes": int, "reason": (str, dict)})
    assert all(isinstance(v, DEVICE_KEY) for v in printed["device_map"].values())
    assert all(isinstance(v, DEVICE_KEY) for v in printed["execution_map"].values())


def test_compare_json_schema(capsys):
    printed = command_json(capsys, "compare", SMALL, "--gpus", "2x2GiB", "--dtype", "bf16")
    assert_shape(printed, {"inputs": dict, "sides": list})
    assert_inputs(printed["inputs"])
    assert [side["method"].split()[0] for side in printed["sides"]] == ["devicemap", "accelerate"]
    for side in printed["sides"]:
        shape = {"method": str, "devices": list, "offloaded": list, "peak_over_mean": (float, type(None))}
        assert_shape(side, {**shape, "min_gpu_memory": (int, type(None)), "seconds": float})
        for device in side["devices"]:
            assert_shape(device, {"device": DEVICE_KEY, "bytes": int})


@pytest.mark.parametrize(
    "target, values",
    [
        ("vllm", {"pp_layer_partition": list, "pipeline_parallel_size": int}),
        ("llama.cpp", {"n_gpu_layers": int, "tensor_split": (list, type(None))}),
        ("deepspeed", {"num_stages": int, "parts": list}),
        ("pipelining", {"split_points": list}),
    ],
)
def test_export_json_schema(capsys, target, values):
    printed = command_json(capsys, "export", SMALL, "--gpus", "2x2GiB", "--dtype", "bf16", "--to", target)
    shape = {"inputs": dict, "target": str, "text": str, "values": dict, "stages": list, "device_map": dict}
    assert_shape(printed, {**shape, "objective": str, "hardware": type(None)})
    assert_inputs(printed["inputs"])
    assert_shape(printed["values"], values)
    assert cli.main(["export", SMALL, "--gpus", "2x2GiB", "--dtype", "bf16", "--to", target]) == 0
    assert capsys.readouterr().out.strip() == printed["text"]  # the same text as without --json
    for stage in printed["stages"]:
        assert_shape(stage, {"device": int, "layers": int, "first": str, "last": str})
    assert sum(stage["layers"] for stage in printed["stages"]) == 16


def test_saved_files_get_the_usual_permissions(capsys, tmp_path):
    target = tmp_path / "device_map.json"
    assert cli.main(["plan", SMALL, "--gpus", "2x8GiB", "--dtype", "bf16", "--save", str(target)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


# ----- --hardware: predicted speed of the plan -------------------------------------------------------


def test_hardware_prints_the_plans_estimate(capsys, small_model):
    from devicemap.cost.hardware import Hardware

    args = ("plan", SMALL, "--gpus", "1x1GiB", "--cpu", "8GiB", "--dtype", "bf16", "--seq-len", "512")
    printed = command_json(capsys, *args, "--hardware", "rtx-4090,server-ddr5-8ch")
    estimate = printed["estimate"]
    assert estimate["hardware"] == {"gpus": ["rtx-4090"], "host": "server-ddr5-8ch", "engine": "accelerate"}
    expected = devicemap.plan(
        small_model,
        max_memory={0: "1GiB", "cpu": "8GiB"},
        dtype="bfloat16",
        workload=devicemap.Workload(batch_size=1, seq_len=512, kv_dtype="bfloat16"),
    ).estimate(
        devicemap.Workload(batch_size=1, seq_len=512, kv_dtype="bfloat16"),
        Hardware.preset("rtx-4090", gpus=1, host="server-ddr5-8ch"),
        small_model,
        dtype="bfloat16",
    )
    assert estimate["decode"]["seconds"] == pytest.approx(expected.decode.seconds)
    assert estimate["tokens_per_second"] == pytest.approx(expected.tokens_per_second)
    assert estimate["decode"]["dominant"] == "weights moved"  # offloaded layers streamed over PCIe
    # running the offloaded layers on the CPU moves activations instead of weights: faster decode
    on_cpu = command_json(
        capsys, *args, "--hardware", "rtx-4090,server-ddr5-8ch", "--execution-device", "cpu"
    )
    assert on_cpu["estimate"]["tokens_per_second"] > estimate["tokens_per_second"]
    text = cli.main([*args, "--hardware", "rtx-4090"])
    assert text == 0 and "tokens/s" in capsys.readouterr().out


def test_an_unknown_hardware_preset_is_refused_naming_the_known_ones(capsys):
    line = refused(capsys, "plan", SMALL, "--gpus", "1x1GiB", "--cpu", "8GiB", "--hardware", "h900")
    assert "h900" in line and "rtx-4090" in line


def test_compare_predicts_both_placements_speed_on_the_same_hardware(capsys, small_model):
    from devicemap.cli.compare import plan_of_map
    from devicemap.cost.hardware import Hardware

    args = ("compare", SMALL, "--gpus", "1x1GiB", "--cpu", "8GiB", "--dtype", "bf16")
    printed = command_json(capsys, *args, "--hardware", "rtx-4090")
    speeds = [side["predicted_decode_tokens_per_second"] for side in printed["sides"]]
    machine = Hardware.preset("rtx-4090", gpus=1)
    for side, speed in zip(printed["sides"], speeds, strict=True):
        device_map = devicemap.plan(small_model, {0: "1GiB", "cpu": "8GiB"}, dtype="bfloat16").device_map
        if side["method"].startswith("accelerate"):
            from devicemap.cli.compare import accelerate_device_map

            device_map = accelerate_device_map(
                small_model,
                {0: 2**30, "cpu": 8 * 2**30},
                "balanced",
                small_model._no_split_modules,
                "bfloat16",
            )
        costed = plan_of_map(small_model, device_map, "bfloat16").estimate(
            devicemap.Workload(), machine, small_model, dtype="bfloat16"
        )
        assert speed == pytest.approx(costed.tokens_per_second)
    assert "predicted_decode_tokens_per_second" not in command_json(capsys, *args)["sides"][0]


def test_explain_lists_every_offloaded_block_with_its_reason(capsys):
    args = ["plan", "llama-3-8b", "--gpus", "1x4GiB", "--cpu", "64GiB", "--dtype", "bf16"]
    assert cli.main(args) == 0
    short = capsys.readouterr().out
    assert "more (devicemap plan --explain lists all)" in short
    assert cli.main([*args, "--explain"]) == 0
    full = capsys.readouterr().out
    plan = devicemap.plan(
        catalog.build_meta_model("llama-3-8b"), {0: "4GiB", "cpu": "64GiB"}, dtype="bfloat16"
    )
    assert "lists all" not in full and len(plan.offloaded) > 10
    for offload in plan.offloaded:
        assert f"{offload.name} -> {offload.device} " in full and offload.reason in full
