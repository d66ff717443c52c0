"""The core's SolveResult makes its Python objects on demand: every view of it tells the same plan."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap import _core


def stack(sizes: list[int]) -> torch.nn.Sequential:
    """Linear layers of different widths, so blocks differ in size."""
    return torch.nn.Sequential(*[torch.nn.Linear(n, n) for n in sizes])


def solve(tree: devicemap.ModuleTree, devices: list[tuple[str, int | None]]) -> _core.SolveResult:
    return _core.solve(
        tree.core, [(k, None if v is None else 8 * v) for k, v in devices], "auto", [], [], False
    )


SPECS = [
    [("0", 4000), ("1", 4000), ("cpu", 100_000)],
    [("0", 1500), ("cpu", 3000), ("disk", None)],
    [("cpu", 100_000)],
]


@pytest.mark.parametrize("devices", SPECS)
def test_maps_are_the_pair_lists_as_dicts(devices):
    tree = devicemap.ModuleTree.from_module(stack([8, 16, 4, 24, 12, 8]))
    result = solve(tree, devices)
    device_map, assignments, execution_map = result.maps()
    for got, pairs in (
        (device_map, result.device_map),
        (assignments, result.assignments),
        (execution_map, result.execution_map),
    ):
        assert list(got.items()) == pairs  # same keys, same order, same values and value types
        assert [type(v) for v in got.values()] == [type(d) for _, d in pairs]


@pytest.mark.parametrize("devices", SPECS)
def test_usage_deals_every_block_to_its_device_in_model_order(devices):
    tree = devicemap.ModuleTree.from_module(stack([8, 16, 4, 24, 12, 8]))
    result = solve(tree, devices)
    assignments = result.assignments
    for record in result.usage:
        assert record.blocks == [name for name, d in assignments if d == record.device]
    assert sorted(b for r in result.usage for b in r.blocks) == sorted(name for name, _ in assignments)
    # each access is a fresh list: changing one leaves the result as it was
    first = result.usage[0].blocks
    first.append("not a block")
    assert result.usage[0].blocks == first[:-1]


def test_blocks_over_names_the_blocks_larger_than_a_limit():
    tree = devicemap.ModuleTree.from_module(stack([8, 16, 4, 24, 12, 8]))
    result = solve(tree, SPECS[0])
    names = [name for name, _ in result.assignments]
    sizes = sorted({tree.module_bytes(n) for n in names})
    for limit in [0, *sizes, sizes[-1] + 1, *(s - 1 for s in sizes)]:
        assert result.blocks_over(limit) == [n for n in names if tree.module_bytes(n) > limit]


def test_plan_is_built_from_the_same_result():
    model = stack([8, 16, 4, 24, 12, 8])
    memory = {0: 1500, "cpu": 3000, "disk": 0}
    plan = devicemap.plan(model, max_memory=memory)
    result = solve(devicemap.ModuleTree.from_module(model), [(str(k), v) for k, v in memory.items()])
    device_map, assignments, execution_map = result.maps()
    assert (plan.device_map, plan.assignments, plan.execution_map) == (device_map, assignments, execution_map)
    assert [u.blocks for u in plan.usage] == [tuple(r.blocks) for r in result.usage]
    assert [(o.name, o.device, o.bytes, o.reason) for o in plan.offloaded] == [
        (o.name, o.device, o.bytes, o.reason) for o in result.offloaded
    ]


@pytest.mark.parametrize("devices", SPECS)
def test_offload_rows_are_the_offload_records(devices):
    tree = devicemap.ModuleTree.from_module(stack([8, 16, 4, 24, 12, 8]))
    result = solve(tree, devices)
    rows = result.offload_rows()
    assert rows == [(o.name, o.device, o.bytes, o.reason) for o in result.offloaded]
    assert [type(r[1]) for r in rows] == [type(o.device) for o in result.offloaded]
