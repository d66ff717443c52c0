"""What the core hands to Python: named records in bytes, with devices as accelerate's keys."""

from __future__ import annotations

import math

import pytest
import torch

import devicemap
from devicemap import _core

# Linear(4, 4) holds 20 float32 values (640 bits); a 3-element bool mask adds 3 bits in accelerate's
# sizing (1 bit each, kept by the accelerate port's trees), which gives the odd bit sizes these tests round.
LAYER_BITS = 20 * 32 + 3


def masked_stack(n: int) -> torch.nn.Sequential:
    layers = []
    for _ in range(n):
        layer = torch.nn.Linear(4, 4)
        layer.register_buffer("mask", torch.zeros(3, dtype=torch.bool))
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def odd_bits(model: torch.nn.Module) -> devicemap.ModuleTree:
    """The tree with accelerate's sizes: bool tensors at a bit per element (devicemap's own: a byte)."""
    return devicemap.ModuleTree.from_module(model, accelerate_tie_order=True)


def solve(model: torch.nn.Module, devices: list[tuple[str, int]]) -> _core.SolveResult:
    tree = odd_bits(model)
    return _core.solve(tree.core, [(key, 8 * size) for key, size in devices], "sequential", [], [], False)


def test_solve_returns_named_records_with_typed_fields():
    result = solve(masked_stack(4), [("0", 100), ("1", 170), ("cpu", 1000)])
    assert isinstance(result, _core.SolveResult)
    assert isinstance(result.strategy, str)
    assert all(isinstance(name, str) for name, _ in result.device_map + result.assignments)
    usage = result.usage
    assert [type(u) for u in usage] == [_core.DeviceUsageRecord] * 3
    fields = ("device", "capacity", "weights", "runtime", "reserve", "compute")
    for u in usage:
        assert all(isinstance(getattr(u, f), int) for f in fields[1:])
        assert isinstance(u.blocks, list) and all(isinstance(b, str) for b in u.blocks)
    assert [u.device for u in usage] == [0, 1, "cpu"]
    assert [type(u.device) for u in usage] == [int, int, str]
    assert result.offloaded and all(isinstance(o, _core.OffloadRecord) for o in result.offloaded)
    for o in result.offloaded:
        assert (type(o.name), type(o.device), type(o.bytes), type(o.reason)) == (str, str, int, str)
    with pytest.raises(AttributeError):
        usage[0].weights = 0  # frozen: a record is a value, not a place to write


def test_devices_are_python_values_in_every_map():
    result = solve(masked_stack(4), [("0", 170), ("cuda:1", 170), ("disk", 0), ("cpu", 100)])
    devices = {device for _, device in result.device_map + result.assignments}
    assert devices <= {0, 1, "cpu", "disk"}
    assert {type(d) for d in devices if d not in ("cpu", "disk")} == {int}


def test_unbounded_disk_has_no_capacity():
    tree = odd_bits(masked_stack(2))
    result = _core.solve(
        tree.core, [("0", 8 * 100), ("cpu", 8 * 10), ("disk", None)], "sequential", [], [], False
    )
    disk = result.usage[-1]
    assert (disk.device, disk.capacity) == ("disk", None)


def test_records_hold_the_plans_bytes():
    model = masked_stack(5)
    memory = {0: 170, 1: 100, "cpu": 1000}
    plan = devicemap.plan(odd_bits(model), max_memory=memory, strategy="sequential")
    result = solve(model, [(str(k), v) for k, v in memory.items()])
    assert dict(result.device_map) == plan.device_map
    assert dict(result.assignments) == plan.assignments
    for record, usage in zip(result.usage, plan.usage, strict=True):
        assert (record.device, record.capacity, record.weights, record.runtime, record.reserve) == (
            usage.device,
            usage.capacity,
            usage.weights,
            usage.runtime,
            usage.reserve,
        )
        assert tuple(record.blocks) == usage.blocks
    assert [(o.name, o.device, o.bytes, o.reason) for o in result.offloaded] == [
        (o.name, o.device, o.bytes, o.reason) for o in plan.offloaded
    ]


def test_odd_bit_sizes_round_up_once_per_device():
    # Two 643-bit layers are 1286 bits: 161 bytes, not 2 * 81 (rounding each layer first would say 162).
    plan = devicemap.plan(
        odd_bits(masked_stack(4)), max_memory={0: 170, 1: 170, "cpu": 1000}, strategy="sequential"
    )
    assert [u.weights for u in plan.usage] == [math.ceil(2 * LAYER_BITS / 8)] * 2 + [0]
    assert [u.weights for u in plan.usage][:2] == [161, 161]


def test_offloaded_odd_sizes_round_up_per_block():
    plan = devicemap.plan(odd_bits(masked_stack(3)), max_memory={0: 170, "cpu": 1000}, strategy="sequential")
    by_device = {u.device: u for u in plan.usage}
    on_cpu = [o for o in plan.offloaded if o.device == "cpu"]
    assert on_cpu and all(o.bytes == math.ceil(LAYER_BITS / 8) == 81 for o in on_cpu)
    # Buffers of offloaded layers stay on the GPU that runs them (offload_buffers=False): the CPU holds
    # only their 640-bit weights.
    assert by_device["cpu"].weights == math.ceil(len(on_cpu) * (LAYER_BITS - 3) / 8)
    gpu_blocks = len(by_device[0].blocks)
    assert by_device[0].weights == math.ceil(gpu_blocks * LAYER_BITS / 8)
    assert by_device[0].reserve >= math.ceil(LAYER_BITS / 8)  # room to stage an offloaded layer
