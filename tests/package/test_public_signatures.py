"""The public functions take their inputs positionally and every option by keyword (so options can be
added or reordered without silently changing a caller's meaning), and expose no internal hooks."""

from __future__ import annotations

import inspect

import pytest
import torch

import devicemap
from devicemap import _core

POSITIONAL = {
    devicemap.plan: ["model_or_tree", "max_memory"],
    devicemap.plan_checkpoint: ["path", "max_memory"],
    devicemap.checkpoint_tree: ["path"],
    devicemap.plan_stages: ["model", "hosts"],
    devicemap.dispatch: ["model", "plan"],
    devicemap.load_checkpoint: ["model", "checkpoint", "plan"],
    devicemap.from_pretrained: ["path"],
}


@pytest.mark.parametrize("function", list(POSITIONAL), ids=lambda f: f.__name__)
def test_options_are_keyword_only(function):
    parameters = inspect.signature(function).parameters.values()
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == POSITIONAL[function]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in parameters if p.name not in positional)


def test_plan_has_no_internal_hooks():
    assert "runtime_memory" not in inspect.signature(devicemap.plan).parameters
    with pytest.raises(TypeError):
        devicemap.plan(None, None, "balanced")  # a strategy given by position is refused, not misread


def test_strategy_and_balance_literals_name_exactly_what_the_core_accepts():
    # The Literal types are the documented surface; the Rust core parses the same names. A name added on
    # one side only fails here.
    from typing import get_args

    tree = devicemap.ModuleTree.from_module(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    for strategy in get_args(devicemap.Strategy):
        _core.solve(tree.core, [("cpu", 8 * 2**20)], strategy, [], [], False, [], 0, [], "memory", 0)
    for balance in get_args(devicemap.Balance):
        _core.solve(tree.core, [("cpu", 8 * 2**20)], "auto", [], [], False, [], 0, [], balance, 0)
    for wrong in ("Balanced", "greedy", ""):
        with pytest.raises(devicemap.InvalidOptionError, match=f'"{wrong}"') as err:
            _core.solve(tree.core, [("cpu", 8 * 2**20)], wrong, [], [], False, [], 0, [], "memory", 0)
        assert all(s in str(err.value) for s in devicemap.STRATEGIES)
    assert get_args(devicemap.Strategy) == devicemap.STRATEGIES


def test_plan_checkpoint_names_a_wrong_option_before_reading_any_file(tmp_path):
    # Options are parsed first: a typo is named even when the checkpoint would also fail.
    with pytest.raises(devicemap.InvalidOptionError, match='invalid strategy "balance"'):
        devicemap.plan_checkpoint(tmp_path / "missing", {0: "1GiB"}, strategy="balance")
