"""The exception classes and the one mapping from the core's errors to them (rust/python/src/errors.rs).

The core is called directly (``devicemap._core.solve``) where the Python layer would refuse the input
first: these tests pin down what the core itself reports.
"""

import pytest
import torch

import devicemap
import devicemap.errors
from devicemap import _core

BAD_INPUT_CLASSES = [
    name for name in devicemap.errors.__all__ if name not in ("PlacementError", "InternalError")
]


@pytest.fixture(scope="module")
def tree():
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    return devicemap.ModuleTree.from_module(model).core


def solve(tree, devices=(("cpu", 1 << 40),), strategy="auto", balance="memory"):
    return _core.solve(tree, list(devices), strategy, [], [], False, balance=balance)


@pytest.mark.parametrize("name", BAD_INPUT_CLASSES)
def test_every_bad_input_class_is_a_placement_error_and_a_value_error(name):
    cls = getattr(devicemap.errors, name)
    assert issubclass(cls, devicemap.PlacementError) and issubclass(cls, ValueError)


def test_internal_error_is_an_exception_that_except_value_error_does_not_catch():
    assert issubclass(devicemap.InternalError, Exception)
    assert not issubclass(devicemap.InternalError, ValueError)
    assert not issubclass(devicemap.InternalError, devicemap.PlacementError)
    with pytest.raises(devicemap.InternalError, match="deliberate test panic"):
        try:
            _core._panic_for_tests()
        except ValueError:  # handling bad input must not swallow a bug
            pytest.fail("a Rust panic was caught as a ValueError")


def test_invalid_option_error_is_one_class_everywhere():
    assert devicemap.InvalidOptionError is devicemap.errors.InvalidOptionError is _core.InvalidOptionError


def test_an_unknown_strategy_from_the_core_is_an_invalid_option_naming_every_strategy(tree):
    with pytest.raises(devicemap.InvalidOptionError) as info:
        solve(tree, strategy="greedy")
    message = str(info.value)
    assert 'invalid strategy "greedy"' in message
    for name in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert f'"{name}"' in message
    assert "module" not in message


def test_a_device_given_twice_reaching_the_core_is_a_duplicate_device_error(tree):
    with pytest.raises(devicemap.errors.DuplicateDeviceError) as info:
        solve(tree, devices=[("0", 1 << 30), ("cuda:0", 1 << 30), ("cpu", 1 << 30)])
    assert isinstance(info.value, devicemap.UnknownDeviceError)
    assert "device 0 is given twice" in str(info.value) and "give each device once" in str(info.value)


def test_an_unbounded_gpu_reaching_the_core_is_an_invalid_size_naming_the_device(tree):
    with pytest.raises(devicemap.InvalidSizeError) as info:
        solve(tree, devices=[("1", None), ("cpu", 1 << 30)])
    message = str(info.value)
    assert "device 1 has no memory limit" in message and '"disk"' in message
    assert "unbounded" in message and "1: unbounded" not in message


# The binding parses balance names with the core's Balance::parse, so the error names the balance modes,
# not an unknown *module*.
def test_an_unknown_balance_from_the_core_is_an_invalid_option_naming_every_mode(tree):
    with pytest.raises(
        devicemap.InvalidOptionError, match='invalid balance "flops"; use "memory" or "compute"'
    ):
        solve(tree, balance="flops")


def test_the_cli_still_reports_a_rust_panic_as_a_bug_with_exit_3(capsys, monkeypatch):
    from devicemap.cli import command as cli

    monkeypatch.setattr(cli, "run_models", _core._panic_for_tests)
    assert cli.main(["models"]) == 3
    err = capsys.readouterr().err
    assert "deliberate test panic" in err and "please report" in err


def test_does_not_fit_says_what_is_short_as_numbers():
    # Callers can act on the shortfall (e.g. raise a GPU's budget by missing_bytes) without parsing text.
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    layer = 256 * 256 * 4 + 256 * 4
    with pytest.raises(devicemap.DoesNotFitError) as no_disk:
        devicemap.plan(model, {0: 3 * layer, 1: 3 * layer})
    assert no_disk.value.shortfall == "no_disk" and no_disk.value.device is None
    assert no_disk.value.missing_bytes == 2 * layer  # the two layers no GPU holds
    with pytest.raises(devicemap.DoesNotFitError) as staging:  # no CPU to run what GPU 0 cannot stage
        devicemap.plan(model, {0: layer // 2, "disk": 0})
    assert staging.value.shortfall == "staging" and staging.value.device == 0
    assert staging.value.missing_bytes == layer - layer // 2  # room to stage one layer
    assert devicemap.DoesNotFitError("raised from Python").missing_bytes is None
