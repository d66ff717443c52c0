"""The public functions take their inputs positionally and every option by keyword (so options can be
added or reordered without silently changing a caller's meaning), and expose no internal hooks."""

from __future__ import annotations

import inspect

import pytest

import devicemap

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
