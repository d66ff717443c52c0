"""Hardware, estimates, quantization configs and the speed objective check their inputs on the way in:
every fault is an InvalidOptionError naming the input (never a TypeError, OverflowError, KeyError,
AssertionError or AttributeError from deep inside), counts are bounded before anything is allocated, and
messages quote a bounded part of what they were given."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap import GPU, Hardware, Host
from optional_libraries import import_torchao_quantization
from tiny_models import tiny_llama_config


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(num_hidden_layers=2, vocab_size=512, num_key_value_heads=4)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


HOST = Host.preset("desktop-ddr5")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Hardware(gpus=None, host=HOST), "Hardware.gpus must be a tuple"),
        (lambda: Hardware(gpus=5, host=HOST), "Hardware.gpus must be a tuple"),
        (lambda: Hardware.preset(123), "gpu must be a preset name"),
        (
            lambda: Hardware(gpus=(), host=HOST, link_latency="1"),
            "link_latency .* non-negative finite number",
        ),
        (lambda: GPU("x", 1, 10**400, 1.0, 1.0, 1.0), r"memory_bandwidth must be a positive finite number"),
        (
            lambda: GPU("x", 1, float("nan"), 1.0, 1.0, 1.0),
            r"memory_bandwidth must be a positive finite number",
        ),
        (lambda: GPU("x", -1, 1.0, 1.0, 1.0, 1.0), "memory_bytes must be a non-negative int"),
        (lambda: Host(7, 1.0, 1.0, 1.0, 1.0), "host name must be a string"),  # type: ignore[arg-type]
    ],
    ids=[
        "gpus-None",
        "gpus-5",
        "preset-123",
        "latency-str",
        "bandwidth-10**400",
        "bandwidth-nan",
        "memory-neg",
        "host-name",
    ],
)
def test_hardware_fields_are_checked_on_the_way_in(build, message):
    with pytest.raises(devicemap.InvalidOptionError, match=message):
        build()


@pytest.mark.parametrize("count", [10**9, 10**12])
def test_a_huge_gpu_count_is_refused_at_once(count):
    """The count is checked before anything is built: Hardware.preset('rtx-4090', gpus=10**9) would run for
    minutes and take gigabytes, 10**12 end in MemoryError."""
    with pytest.raises(devicemap.InvalidOptionError, match="gpus must be an int from 0 to 4096"):
        Hardware.preset("rtx-4090", gpus=count)


def test_estimate_arguments_are_checked(tiny_llama):
    plan = devicemap.plan(tiny_llama, max_memory={0: "64MiB"})
    with pytest.raises(devicemap.InvalidOptionError, match="workload must be a devicemap.Workload"):
        plan.estimate("x", Hardware.preset("rtx-4090"), tiny_llama)  # type: ignore[arg-type]
    with pytest.raises(devicemap.InvalidOptionError, match="hardware must be a devicemap.Hardware"):
        plan.estimate(None, "rtx-4090", tiny_llama)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"quant_method": "torchao"}, r"bad quantization_config .*KeyError: 'quant_type'"),
        (
            {"quant_method": "torchao", "quant_type": "int4_weight_only"},
            "bad quantization_config .*AssertionError",
        ),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": [1, None]},
            r"llm_int8_skip_modules must be a list of module names",
        ),
    ],
    ids=["torchao-no-type", "torchao-str-type", "bnb-skip-junk"],
)
def test_bad_quantization_configs_are_invalid_option_errors(tiny_llama, config, message):
    """transformers validates a torchao dict only after importing torchao (its TorchAoConfig does), and
    devicemap says first when torchao cannot import (tests/test_quantization.py checks that message): the
    torchao cases need a torchao that imports with this torch."""
    if config["quant_method"] == "torchao":
        import_torchao_quantization()
    with pytest.raises(devicemap.InvalidOptionError, match=message):
        devicemap.plan(tiny_llama, max_memory={"cpu": "1GiB"}, quantization_config=config)


@pytest.mark.parametrize(
    "option",
    [{"execution_device": "cpu"}, {"strategy": "balanced"}, {"balance": "compute"}],
    ids=["execution_device", "strategy", "balance"],
)
def test_the_speed_objective_refuses_options_it_would_ignore(tiny_llama, option):
    """objective='speed' chooses every block's device itself: execution_device=, strategy and balance would
    be silently ignored, so they are refused."""
    name = next(iter(option))
    with pytest.raises(
        devicemap.InvalidOptionError, match=rf"objective='speed' .*{name}=.* would be ignored"
    ):
        devicemap.plan(
            tiny_llama,
            max_memory={0: "64MiB", "cpu": "1GiB"},
            objective="speed",
            hardware=Hardware.preset("rtx-4090"),
            **option,
        )
