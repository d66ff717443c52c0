"""Helpers that check a Plan against its model (used by several test files)."""

from __future__ import annotations

import warnings

import torch
from accelerate.utils import check_device_map

import devicemap
from devicemap.inputs.module_names import device_for as device_of
from devicemap.loading.apply import RehearsalDevice
from devicemap.loading.execution_hooks import by_execution


def covering_keys(name: str, device_map: dict) -> list[str]:
    return [k for k in device_map if k == "" or k == name or name.startswith(k + ".")]


def tensor_names(model: torch.nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return names + [n for n, _ in model.named_buffers(remove_duplicate=False)]


def check_plan(model: torch.nn.Module, plan: devicemap.Plan, pins: dict | None = None) -> None:
    """Every invariant a plan must satisfy."""
    with warnings.catch_warnings():  # tensor-level keys (as accelerate itself emits) draw a warning only
        warnings.simplefilter("ignore", UserWarning)
        check_device_map(model, plan.device_map)  # accelerate accepts it: every weight covered
    tree = devicemap.ModuleTree.from_module(model)
    for mapping in (plan.device_map, plan.assignments):
        # Every tensor is placed exactly once (by one key of the finest map; maybe nested keys in none).
        for name in tensor_names(model):
            keys = covering_keys(name, plan.assignments)
            assert len(keys) == 1, f"{name} covered by {keys}"
            assert device_of(name, mapping) == device_of(name, plan.assignments)
    # Capacities respected, bytes add up.
    for usage in plan.usage:
        if usage.capacity is not None:
            assert usage.weights + usage.reserve <= usage.capacity + 1, usage
    placed = sum(u.weights for u in plan.usage)
    buffers_kept = sum(u.reserve for u in plan.usage)
    assert placed <= tree.total_bytes + len(plan.usage)
    assert placed + buffers_kept >= tree.total_bytes - len(plan.usage)
    # Tied parameters share a device.
    for group in tree.tied_groups:
        devices = {device_of(n, plan.device_map) for n in group}
        assert len(devices) == 1, (group, devices)
    # Pins honoured.
    for name, device in (pins or {}).items():
        for tensor in tensor_names(model):
            if tensor == name or tensor.startswith(name + "."):
                assert device_of(tensor, plan.device_map) == device


def check_hooks_follow_the_plan(model: torch.nn.Module, plan: devicemap.Plan) -> None:
    """Each key's accelerate hook computes where the plan says: the CPU itself for CPU-executed blocks,
    the rehearsal's stand-in for a GPU otherwise (in a rehearsal equal logits alone cannot tell)."""
    _, runs_on = by_execution(plan.device_map, plan.execution_map)
    modules = dict(model.named_modules(remove_duplicate=False))
    for key, device in runs_on.items():
        if key not in modules:  # a tensor-level key (final_logits_bias, a buffer): no hook of its own
            continue
        # the key's module, or (offloaded) each of its modules holding tensors, carries the hook
        hooks = [
            hook
            for module in modules[key].modules()
            for hook in getattr(
                getattr(module, "_hf_hook", None), "hooks", [getattr(module, "_hf_hook", None)]
            )
            if getattr(hook, "execution_device", None) is not None
        ]
        assert hooks, key
        for hook in hooks:
            actual = hook.execution_device
            if device == "cpu":
                assert type(actual) is str and actual == "cpu", (key, actual)
            else:
                assert isinstance(actual, RehearsalDevice), (key, actual)
