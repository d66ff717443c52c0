"""Module graphs that are not trees: cycles and modules shared by several parents.

torch lets a module be registered under several parents (T5's ``encoder.embed_tokens`` *is* ``shared``)
and even under its own descendant. The export must finish on both, in time linear in the graph (not in
the number of paths through it), and still list shared modules where accelerate and ``state_dict`` do.
"""

from __future__ import annotations

import torch
from accelerate.utils import check_device_map

import devicemap


class Embed(torch.nn.Module):
    """An embedding with a norm: a shared module that has children of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(10, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.table(ids))


class SharedEmbedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = Embed()
        self.encoder = torch.nn.Module()
        self.encoder.embed = self.shared
        self.encoder.proj = torch.nn.Linear(8, 8)
        self.decoder = torch.nn.Module()
        self.decoder.embed = self.shared
        self.decoder.proj = torch.nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.proj(self.encoder.embed(ids))
        return self.decoder.proj(hidden) + self.decoder.embed(ids)


def test_a_cycle_is_not_entered_again():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    model[1]._modules["back"] = model  # torch accepts this; named_modules skips the back edge
    tree = devicemap.ModuleTree.from_module(model)
    assert tree.total_bytes == 2 * (16 + 4) * 4
    plan = devicemap.plan(model, max_memory={0: 100, 1: 100})
    assert set(plan.device_map.values()) == {0, 1}
    # A cycle through a child (not the root) too.
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inner._modules["loop"] = inner
    outer = torch.nn.Sequential(torch.nn.Linear(4, 4), inner)
    assert devicemap.ModuleTree.from_module(outer).total_bytes == 2 * (16 + 4) * 4


def test_nested_sharing_is_walked_in_linear_size():
    # Every level reaches the level below twice (directly and through a wrapper): 2**depth paths to the
    # leaf, two modules per level.
    depth = 18
    level: torch.nn.Module = torch.nn.Linear(4, 4)
    for _ in range(depth):
        parent = torch.nn.Module()
        parent.direct = level
        parent.wrapped = torch.nn.Sequential(level)
        level = parent
    tree = devicemap.ModuleTree.from_module(level)
    assert len(tree) < 20 * depth * depth  # naive re-walking lists 2**18 copies of the leaf
    assert tree.total_bytes == (16 + 4) * 4
    plan = devicemap.plan(level, max_memory={0: "1KiB"})
    assert set(plan.device_map.values()) == {0}


def test_a_shared_module_is_listed_under_every_parent_and_tied():
    model = SharedEmbedding()
    tree = devicemap.ModuleTree.from_module(model)
    groups = [sorted(g) for g in tree.tied_groups]
    assert ["decoder.embed.table.weight", "encoder.embed.table.weight", "shared.table.weight"] in groups
    assert ["decoder.embed.norm.bias", "encoder.embed.norm.bias", "shared.norm.bias"] in groups
    # The shared storage counts once.
    unique = {id(p) for p in model.parameters()}
    assert tree.total_bytes == sum(p.numel() * 4 for p in model.parameters() if id(p) in unique)
    plan = devicemap.plan(model, max_memory={0: 700, 1: 700, "cpu": "1MiB"})
    check_device_map(model, plan.device_map)  # every state_dict name, shared ones included, is covered
    assert plan.device_map.get("encoder.embed") == plan.device_map.get("shared")
    ids = torch.tensor([[1, 2, 3]])
    expected = model(ids)
    out = devicemap.dispatch(model, plan, rehearse=True)(ids)
    torch.testing.assert_close(out, expected)


def test_a_module_held_twice_by_one_parent_is_covered_with_its_buffers():
    # named_children() lists it once, state_dict() under both names: the map must cover both.
    layer = torch.nn.BatchNorm1d(4)  # parameters and buffers
    model = torch.nn.Module()
    model.first = layer
    model.again = layer
    model.head = torch.nn.Linear(4, 4)
    plan = devicemap.plan(model, max_memory={0: 200, 1: 200, "cpu": "1MiB"})
    check_device_map(model, plan.device_map)
    # weight, bias, running mean and var (4 floats each), the step counter (int64), the Linear: once each
    assert devicemap.ModuleTree.from_module(model).total_bytes == 4 * 4 * 4 + 8 + (16 + 4) * 4
    assert ["again.running_mean", "first.running_mean"] in devicemap.ModuleTree.from_module(model).tied_groups
