"""Properties every plan() result has, on random models, devices, strategies and pins."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import devicemap

from model_strategies import describe, max_memories, model_bytes, models, no_split_classes
from plan_checks import check_plan, device_of, tensor_names

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
strategies = st.sampled_from(devicemap.STRATEGIES)


@SETTINGS
@given(
    data=st.data(),
    model=models(),
    no_split=no_split_classes,
    strategy=strategies,
    offload_buffers=st.booleans(),
)
def test_plans_place_everything_once_within_capacity(data, model, no_split, strategy, offload_buffers):
    memory = data.draw(max_memories(model))
    note(describe(model))
    try:
        plan = devicemap.plan(
            model,
            max_memory=memory,
            strategy=strategy,
            no_split_module_classes=no_split,
            offload_buffers=offload_buffers,
        )
    except devicemap.DoesNotFitError as err:
        # Either no disk to spill to, or the execution device cannot stage an offloaded layer; never when
        # one device could hold the whole model twice over (weights plus any staging).
        assert ("disk" not in memory and 'add "disk"' in str(err)) or "stage" in str(err)
        return
    check_plan(model, plan)
    again = devicemap.plan(
        model,
        max_memory=copy.deepcopy(memory),
        strategy=strategy,
        no_split_module_classes=no_split,
        offload_buffers=offload_buffers,
    )
    assert again.device_map == plan.device_map  # deterministic


@SETTINGS
@given(model=models(), strategy=strategies, gpus=st.integers(1, 4), no_split=no_split_classes)
def test_a_roomy_gpu_holds_everything_without_reserve(model, strategy, gpus, no_split):
    roomy = model_bytes(model) + 8
    plan = devicemap.plan(
        model,
        max_memory={g: roomy for g in range(gpus)} | {"cpu": 0},
        strategy=strategy,
        no_split_module_classes=no_split,
    )
    check_plan(model, plan)
    assert not plan.offloaded and not plan.reserve_bytes
    assert plan.device_bytes["cpu"] == 0


@SETTINGS
@given(data=st.data(), model=models(), strategy=strategies)
def test_pins_are_honoured(data, model, strategy):
    memory = data.draw(max_memories(model))
    memory["disk"] = 0
    names = [n for n, _ in model.named_modules() if n]
    if not names:
        return
    pinned = data.draw(st.sampled_from(names))
    device = data.draw(st.sampled_from(list(memory)))
    try:
        plan = devicemap.plan(model, max_memory=memory, strategy=strategy, pins={pinned: device})
    except devicemap.TiedPinConflictError:
        return  # a tie reaches outside the pinned module: asserted separately
    except devicemap.DoesNotFitError:
        return  # the pinned module alone exceeds that GPU
    check_plan(model, plan, pins={pinned: device})


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=7),
    gpus=st.lists(st.integers(0, 200), min_size=1, max_size=3),
)
def test_balanced_is_the_min_max_optimum(sizes, gpus):
    """Brute force over every contiguous split is the oracle; capacities are large enough to hold all."""
    import torch

    model = torch.nn.Sequential(*[torch.nn.Linear(1, s, bias=False) for s in sizes])  # s * 4 bytes each
    weights = [4 * s for s in sizes]
    roomy = sum(weights)
    memory = {g: roomy + extra for g, extra in enumerate(gpus)}
    plan = devicemap.plan(model, max_memory=memory, strategy="balanced")
    check_plan(model, plan)
    peak = max(plan.device_bytes[g] for g in range(len(gpus)))
    assert peak == brute_force_min_max(weights, len(gpus))
    assert not plan.offloaded and not plan.reserve_bytes


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=7),
    capacities=st.lists(st.integers(0, 400), min_size=1, max_size=3),
)
def test_balanced_is_optimal_under_tight_different_capacities(sizes, capacities):
    """GPUs of different sizes, often too small: devicemap keeps everything on the GPUs exactly when some
    contiguous split fits, and then reaches the brute-force min-max."""
    import torch

    model = torch.nn.Sequential(*[torch.nn.Linear(1, s, bias=False) for s in sizes])
    weights = [4 * s for s in sizes]
    memory = {**dict(enumerate(capacities)), "cpu": 10 * sum(weights)}
    best = brute_force_capped(weights, capacities)
    try:
        plan = devicemap.plan(model, max_memory=memory, strategy="balanced")
    except devicemap.DoesNotFitError as err:
        assert best is None and "stage" in str(err)  # GPU 0 cannot even stage an offloaded layer
        return
    check_plan(model, plan)
    if best is None:
        assert plan.offloaded
    else:
        assert not plan.offloaded
        assert max(plan.device_bytes[g] for g in range(len(capacities))) == best


def brute_force_capped(weights: list[int], capacities: list[int]):
    """Smallest largest load over contiguous splits within capacities (None: no split fits)."""
    if len(capacities) == 1:
        return sum(weights) if sum(weights) <= capacities[0] else None
    options = []
    for k in range(len(weights) + 1):
        if sum(weights[:k]) > capacities[0]:
            break
        rest = brute_force_capped(weights[k:], capacities[1:])
        if rest is not None:
            options.append(max(sum(weights[:k]), rest))
    return min(options) if options else None


def brute_force_min_max(weights: list[int], lanes: int) -> int:
    if lanes == 1:
        return sum(weights)
    return min(
        max(sum(weights[:k]), brute_force_min_max(weights[k:], lanes - 1)) for k in range(len(weights) + 1)
    )


def test_names_of_every_tensor_are_covered_on_a_transformers_model(tiny_llama):
    plan = devicemap.plan(tiny_llama, max_memory={0: "300KiB", 1: "300KiB", "cpu": "1GiB", "disk": 0})
    check_plan(tiny_llama, plan)
    assert {device_of(n, plan.device_map) for n in tensor_names(tiny_llama)} >= {0, 1}
