"""One source for option names and one error per fault, whichever layer finds it: the core parses the
strategy and balance names, Python's types and checks follow it, and both word a bad value alike."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import torch

import devicemap
from devicemap import _core
from devicemap.inputs.options import Balance, Strategy


def test_the_typed_names_are_the_names_the_core_parses() -> None:
    assert get_args(Strategy) == tuple(_core.STRATEGIES) == devicemap.STRATEGIES
    assert get_args(Balance) == tuple(_core.BALANCES)


def core_message(**options: object) -> str:
    tree = devicemap.ModuleTree.from_module(torch.nn.Linear(4, 4))
    args = dict(strategy="auto", balance="memory")
    args.update(options)  # type: ignore[arg-type]
    with pytest.raises(devicemap.InvalidOptionError) as caught:
        _core.solve(
            tree.core,
            [("cpu", 8 * 2**20)],
            args["strategy"],
            [],
            [],
            False,
            [],
            0,
            [],
            args["balance"],
            0,
            None,
        )
    return str(caught.value)


@pytest.mark.parametrize("option", ["strategy", "balance"])
def test_a_bad_name_reads_the_same_from_python_and_from_the_core(option: str) -> None:
    model = torch.nn.Linear(4, 4)
    with pytest.raises(devicemap.InvalidOptionError) as caught:
        devicemap.plan(model, {"cpu": "1GiB"}, **{option: "greedy"})  # type: ignore[arg-type]
    assert str(caught.value) == core_message(**{option: "greedy"})
    assert re.fullmatch(rf'invalid {option} "greedy"; use .+', str(caught.value))


def test_a_device_given_twice_is_a_duplicate_device_error_in_every_layer() -> None:
    model = torch.nn.Linear(4, 4)
    with pytest.raises(devicemap.DuplicateDeviceError, match="appears twice"):
        devicemap.plan(model, {0: "1GiB", "cuda:0": "1GiB", "cpu": "1GiB"})
    with pytest.raises(devicemap.DuplicateDeviceError):
        devicemap.normalize_max_memory({1: "1GiB", "cuda:1": "1GiB"})
    tree = devicemap.ModuleTree.from_module(model)
    with pytest.raises(devicemap.DuplicateDeviceError):
        _core.solve(
            tree.core, [("0", 2**33), ("0", 2**33)], "auto", [], [], False, [], 0, [], "memory", 0, None
        )
