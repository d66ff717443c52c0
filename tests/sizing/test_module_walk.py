"""The export walk (``_core.ModuleWalk``, behind ``ModuleTree.from_module``) against torch's own listings.

On tree-shaped models every name torch lists (``named_modules`` / ``named_parameters`` / ``named_buffers``
with duplicates) is a node, in pre-order (a module, its parameters, its buffers, then its children), each
storage counted once; sizes past the core's 64-bit counters are refused, not wrapped.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import devicemap
from devicemap import _core
from devicemap.inputs.dtypes import dtype_bits

from model_strategies import models

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def torch_preorder(module: torch.nn.Module, prefix: str = "") -> list[str]:
    """Names in the walk's order, from torch's per-module listings."""
    dotted = f"{prefix}." if prefix else ""
    names = [prefix]
    names += [dotted + n for n, _ in module.named_parameters(recurse=False, remove_duplicate=False)]
    names += [dotted + n for n, _ in module.named_buffers(recurse=False, remove_duplicate=False)]
    for name, child in module.named_children():
        names += torch_preorder(child, dotted + name)
    return names


@SETTINGS
@given(model=models(max_ties=3))
def test_the_walk_lists_what_torch_lists_in_preorder_and_counts_each_storage_once(model):
    tree = devicemap.ModuleTree.from_module(model)
    core = tree.core
    assert [core.name(i) for i in range(len(core))] == torch_preorder(model)
    modules = [core.name(i) for i in range(len(core)) if core.kind(i) == "module"]
    assert modules == [n for n, _ in model.named_modules(remove_duplicate=False)]
    storages = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    # a bool takes a byte in memory (dtype_bits says a bit: accelerate's count)
    bits = sum(t.numel() * (8 if t.dtype == torch.bool else dtype_bits(t.dtype)) for t in storages.values())
    assert core.subtree_bits(0) == bits
    assert tree.module_types >= {type(m) for m in model.modules()}


def test_sizes_beyond_64_bits_are_refused():
    with torch.device("meta"):
        huge = torch.nn.Module()
        huge.register_parameter("w", torch.nn.Parameter(torch.empty(2**60)))  # 2^65 bits alone
        pair = torch.nn.Module()
        pair.a = torch.nn.Linear(1, 1)
        pair.b = torch.nn.Linear(1, 1)
        pair.a.weight = torch.nn.Parameter(
            torch.empty(2**60, dtype=torch.int8), requires_grad=False
        )  # 2^63 bits each
        pair.b.weight = torch.nn.Parameter(torch.empty(2**60, dtype=torch.int8), requires_grad=False)
    for model in (huge, pair):
        with pytest.raises(devicemap.InvalidSizeError, match="2 EiB"):
            devicemap.ModuleTree.from_module(model)


def test_a_walk_builds_one_tree():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight = model[0].weight
    walk = _core.ModuleWalk(model, devicemap.sizing.tree.dtype_bits)
    assert walk.parameter_groups() == [[2, 5]]
    assert walk.full_names(walk.parameter_nodes()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert walk.total_bits == (4 + 2 + 2) * 32
    tree = walk.build(walk.parameter_groups())
    assert tree.tie_groups() == [["0.weight", "1.weight"]]
    with pytest.raises(TypeError, match="already built"):
        walk.build([])
    with pytest.raises(TypeError, match="already built"):
        walk.parameter_nodes()


def test_untie_keeps_a_parameter_held_twice_by_one_module_as_one():
    shared = torch.nn.Parameter(torch.zeros(4))
    model = torch.nn.Sequential(torch.nn.Module(), torch.nn.Module())
    for holder in model:
        holder.register_parameter("w", shared)
        holder.register_parameter("w_alias", shared)
    tree = devicemap.ModuleTree.from_module(model, untie=True)
    assert tree.total_bytes == 2 * 16  # one copy per module, the alias counted with its first name
    assert tree.tied_groups == [["0.w", "0.w_alias"], ["1.w", "1.w_alias"]]
    assert devicemap.ModuleTree.from_module(model).tied_groups == [["0.w", "0.w_alias", "1.w", "1.w_alias"]]


class _Holder(torch.nn.Module):
    """A module with a parameter of its own and a child subtree (what a shared module copy must keep)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))
        self.inner = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.Linear(3, 2)))


class _Sharing(torch.nn.Module):
    """``b.s`` and ``c.t.s`` are ``a``: the same module under three names, one of them nested."""

    def __init__(self):
        super().__init__()
        self.a = _Holder()
        self.b = torch.nn.Module()
        self.b.s = self.a
        self.c = torch.nn.Module()
        self.c.t = torch.nn.Module()
        self.c.t.s = self.a


def test_a_shared_module_with_its_own_parameters_is_listed_whole_under_every_name():
    # A copy of a shared module follows its first walk's child edges whether or not the module holds
    # parameters itself, so every name state_dict lists is a node a device map can place.
    model = _Sharing()
    tree = devicemap.ModuleTree.from_module(model)
    names = {tree.core.name(i) for i in range(len(tree.core))}
    assert [k for k in model.state_dict() if k not in names] == []
    assert tree.core.subtree_bits(0) == sum(p.numel() * 32 for p in model.parameters())
    plan = devicemap.plan(model, max_memory={"cpu": "1GiB"})
    assert set(plan.device_map) == {""}
