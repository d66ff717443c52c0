"""Bad input raises a specific devicemap error whose message names the input and the fix."""

from __future__ import annotations

import pytest
import torch

import devicemap


@pytest.fixture
def model():
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("20 GB", "spaces"),
        ("-1", "negative"),
        ("20XB", "unknown unit"),
        ("1000", "no unit"),
        ("GB", "number"),
    ],
)
def test_bad_size_strings(model, size, fragment):
    with pytest.raises(devicemap.InvalidSizeError, match=fragment) as info:
        devicemap.plan(model, max_memory={0: size, "cpu": "1GiB"})
    assert repr(size).strip("'") in str(info.value)
    assert "max_memory[0]" in str(info.value)


@pytest.mark.parametrize("size", [-5, float("nan"), True, [1]])
def test_bad_size_values(model, size):
    with pytest.raises(devicemap.InvalidSizeError):
        devicemap.plan(model, max_memory={"cpu": size})


def test_sizes_use_accelerate_units():
    assert devicemap.parse_size("20GiB") == 20 * 2**30
    assert devicemap.parse_size("20GB") == 20 * 10**9
    assert devicemap.parse_size("512MiB") == 512 * 2**20
    assert devicemap.parse_size("8Gb") == 10**9


def test_unknown_device_key(model):
    with pytest.raises(devicemap.UnknownDeviceError, match='"tpu".*"cpu"'):
        devicemap.plan(model, max_memory={"tpu": "1GiB"})
    with pytest.raises(devicemap.UnknownDeviceError, match="twice"):
        devicemap.plan(model, max_memory={0: "1GiB", "cuda:0": "1GiB"})


def test_pin_to_unknown_module_suggests_names(model):
    with pytest.raises(devicemap.UnknownModuleError, match=r"'3'|\"3\"") as info:
        devicemap.plan(model, max_memory={0: "1GiB", "cpu": "1GiB"}, pins={"3": 0})
    assert "did you mean" in str(info.value)


def test_pin_to_device_not_in_max_memory(model):
    with pytest.raises(devicemap.UnknownDeviceError, match="pin"):
        devicemap.plan(model, max_memory={0: "1GiB", "cpu": "1GiB"}, pins={"1": 3})


def test_tied_parameters_pinned_apart():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].weight = model[0].weight
    with pytest.raises(devicemap.TiedPinConflictError, match="0.weight") as info:
        devicemap.plan(model, max_memory={0: "1GiB", 1: "1GiB"}, pins={"0": 0, "1": 1})
    assert "same device" in str(info.value)


def test_model_that_fits_nowhere_says_how_much(model):
    with pytest.raises(devicemap.DoesNotFitError) as info:
        devicemap.plan(model, max_memory={0: "20KiB", "cpu": "10KiB"})
    message = str(info.value)
    assert "KiB of weights" in message and 'add "disk"' in message


def test_unknown_strategy(model):
    with pytest.raises(devicemap.PlacementError, match="balanced_low_0"):
        devicemap.plan(model, max_memory={"cpu": "1GiB"}, strategy="greedy")


def test_errors_are_value_errors():
    assert issubclass(devicemap.PlacementError, ValueError)
    for cls in (devicemap.InvalidSizeError, devicemap.DoesNotFitError, devicemap.UnknownModuleError):
        assert issubclass(cls, devicemap.PlacementError)


def test_a_rust_panic_becomes_an_exception():
    from devicemap import _core

    with pytest.raises(devicemap.InternalError, match="deliberate test panic"):
        _core._panic_for_tests()
    assert devicemap.parse_size("1KiB") == 1024  # the interpreter is still fine
