"""plan() through the public API on real torch and transformers models."""

from __future__ import annotations

import psutil
import pytest
import torch
from accelerate.utils import get_balanced_memory, infer_auto_device_map

import devicemap

from plan_checks import check_plan, device_of


def stack(n: int, width: int = 256) -> torch.nn.Sequential:
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)])


def test_accelerate_offloads_where_devicemap_keeps_everything_on_gpus():
    model = stack(8)
    layer = devicemap.ModuleTree.from_module(model).module_bytes("0")
    memory = {0: 4 * layer + 16, 1: 4 * layer + 16, "cpu": "1GiB"}
    theirs = infer_auto_device_map(model, max_memory=dict(memory))
    assert "cpu" in theirs.values()  # accelerate keeps a layer-sized reserve on GPU 0 and spills
    ours = devicemap.plan(model, max_memory=memory)
    check_plan(model, ours)
    assert set(ours.device_map.values()) == {0, 1}
    assert not ours.offloaded
    for usage in ours.usage:
        assert usage.weights <= usage.capacity


def test_balanced_beats_accelerates_budget_on_uneven_layers(tiny_llama):
    memory = {0: "600KiB", 1: "600KiB", 2: "600KiB", "cpu": "1GiB"}
    no_split = tiny_llama._no_split_modules
    budget = get_balanced_memory(tiny_llama, max_memory=dict(memory), no_split_module_classes=no_split)
    theirs = infer_auto_device_map(tiny_llama, max_memory=budget, no_split_module_classes=no_split)
    tree = devicemap.ModuleTree.from_module(tiny_llama)
    loads = {g: 0 for g in range(3)}
    for name, device in theirs.items():
        if isinstance(device, int):
            loads[device] += tree.module_bytes(name)
    ours = devicemap.plan(tiny_llama, max_memory=memory, strategy="balanced")
    check_plan(tiny_llama, ours)
    assert max(ours.device_bytes[g] for g in range(3)) <= max(loads.values())


def test_plans_are_valid_accelerate_device_maps(tiny_llama):
    for strategy in devicemap.STRATEGIES:
        memory = {0: "400KiB", 1: "300KiB", "cpu": "200KiB", "disk": 0}
        result = devicemap.plan(tiny_llama, max_memory=memory, strategy=strategy)
        assert {"disk", 0, 1} <= set(result.device_map.values())
        check_plan(tiny_llama, result)
        assert device_of("lm_head.weight", result.device_map) == device_of(
            "model.embed_tokens.weight", result.device_map
        ), strategy


def test_default_max_memory_reads_this_machine():
    model = stack(2)
    result = devicemap.plan(model)  # no GPU here: everything on the CPU, sized from psutil
    expected_gpus = torch.cuda.device_count()
    assert len([u for u in result.usage if isinstance(u.device, int)]) == expected_gpus
    cpu = next(u for u in result.usage if u.device == "cpu")
    assert 0 < cpu.capacity <= psutil.virtual_memory().total


def test_dtype_halves_the_footprint():
    model = stack(4)
    full = devicemap.plan(model, max_memory={"cpu": "1GiB"})
    half = devicemap.plan(model, max_memory={"cpu": "1GiB"}, dtype="float16")
    assert half.device_bytes["cpu"] * 2 == full.device_bytes["cpu"]


def test_plan_accepts_a_tree_and_explains_offloads():
    tree = devicemap.ModuleTree.from_module(stack(6))
    layer = tree.module_bytes("0")
    result = devicemap.plan(tree, max_memory={0: 3 * layer, "cpu": "1GiB"}, strategy="sequential")
    assert result.device_map == {"0": 0, "1": 0, "2": "cpu", "3": "cpu", "4": "cpu", "5": "cpu"}
    assert result.reserve_bytes == {0: layer}
    assert [o.name for o in result.offloaded] == ["2", "3", "4", "5"]
    assert all("did not fit on the GPUs" in o.reason for o in result.offloaded)
    text = str(result)
    assert "sequential" in text and "cpu" in text and "offloaded (4 blocks)" in text


class _CountingMemory(dict):
    """A max_memory that counts how often it is read."""

    reads = 0

    def items(self):  # type: ignore[override]
        type(self).reads += 1
        return super().items()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
        {"strategy": "balanced", "gpu0_reserve": "1KiB"},
    ],
    ids=["memory", "quantized", "balanced"],
)
def test_max_memory_is_read_once_whichever_planner_runs(tiny_llama, options):
    """The front door checks max_memory once into a budget the planners share (the quantized planner
    no longer normalises it again, turning the disk's unbounded None into 0 and back)."""
    _CountingMemory.reads = 0
    memory = _CountingMemory({0: "40MiB", 1: "40MiB", "cpu": "1GiB", "disk": "0"})
    devicemap.plan(tiny_llama, memory, **options)
    assert _CountingMemory.reads == 1
