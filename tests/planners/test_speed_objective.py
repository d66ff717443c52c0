"""plan(..., objective="speed"): the exact program equals brute force on small chains, and on a small
mixture-of-experts model it keeps attention on the GPU and runs the routed experts on the CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import replace

import pytest
import torch
from accelerate.utils import check_device_map
from hypothesis import given, settings
from hypothesis import strategies as st

import devicemap
from devicemap.cost.hardware import Hardware
from devicemap.errors import InvalidOptionError
from devicemap.planners.speed_program import (
    Chain,
    ChainBlock,
    Mode,
    evaluate,
    solve_chain,
    solve_chain_counted,
)

transformers = pytest.importorskip("transformers")

HARDWARE = Hardware.preset("rtx-4090", host="desktop-ddr5")
SPLIT_HARDWARE = Hardware.preset("rtx-4090", host="desktop-ddr5", engine="llama.cpp")
"""llama.cpp's fitted hop (31 us) keeps splitting a layer worth it on the small test MoE models; with
accelerate's 100 us per GPU<->CPU hop, running whole layers on the CPU costs them less than the hand-offs."""
IDEAL_HARDWARE = Hardware.preset("rtx-4090", host="desktop-ddr5", engine="ideal")
"""The formulas alone (10 us per hop, no per-pass overhead): on a model 64 wide, any calibrated engine streams
the experts that do not fit rather than run them on the CPU, and the rehearsal check needs a CPU-run block."""


def brute_force(chain: Chain) -> float | None:
    """The least :func:`evaluate` over every assignment of blocks to modes."""
    modes: list[Mode] = [*range(len(chain.gpu_capacity)), "cpu", "disk"]
    values = [evaluate(chain, list(choice)) for choice in itertools.product(modes, repeat=len(chain.blocks))]
    feasible = [v for v in values if v is not None]
    return min(feasible) if feasible else None


@st.composite
def chains(draw: st.DrawFn) -> Chain:
    gpus = draw(st.integers(1, 2))
    disk = draw(st.booleans())
    blocks = []
    for i in range(draw(st.integers(1, 7 if gpus == 1 else 6))):
        cost: dict[Mode, float] = {g: float(draw(st.integers(1, 20))) for g in range(gpus)}
        cost["cpu"] = float(draw(st.integers(1, 60)))
        if disk:
            cost["disk"] = cost["cpu"] + draw(st.integers(0, 40))
        blocks.append(ChainBlock(f"b{i}", draw(st.integers(1, 30)), draw(st.integers(0, 5)), cost))
    penalty = {
        pair: float(draw(st.integers(0, 9))) for pair in itertools.product([*range(gpus), "cpu"], repeat=2)
    }
    return Chain(
        blocks=tuple(blocks),
        gpu_capacity=tuple(draw(st.integers(0, 80)) for _ in range(gpus)),
        cpu_capacity=draw(st.one_of(st.none(), st.integers(0, 120))),
        activation=draw(st.integers(0, 6)),
        switch=lambda a, b: penalty[(a, b)],
    )


@settings(max_examples=200, deadline=None)
@given(chains())
def test_the_program_equals_brute_force_on_small_chains(chain: Chain) -> None:
    expected = brute_force(chain)
    found = solve_chain(chain, unit=1)
    if expected is None:
        assert found is None
        return
    assert found is not None
    seconds, modes = found
    assert seconds == pytest.approx(expected)
    assert evaluate(chain, modes) == pytest.approx(seconds)  # the placement returned reaches it


def test_coarse_units_only_ever_return_placements_that_fit() -> None:
    blocks = tuple(ChainBlock(f"b{i}", 10, 0, {0: 1.0, "cpu": 5.0}) for i in range(4))
    chain = Chain(blocks, gpu_capacity=(35,), cpu_capacity=None)
    assert solve_chain(chain, unit=1) == (3 * 1.0 + 5.0, [0, 0, 0, "cpu"])
    seconds, modes = solve_chain(chain, unit=16) or (0.0, [])  # merged states: still within capacity
    assert evaluate(chain, modes) == seconds


@settings(max_examples=150, deadline=None)
@given(chains(), st.integers(1, 12), st.integers(1, 12))
def test_coarse_units_fit_and_beat_every_placement_of_the_reduced_capacities(
    chain: Chain, unit: int, cpu_unit: int
) -> None:
    """The guarantee of the module docstring: with units ``u`` and ``u_cpu`` the answer fits, and no
    placement of the GPU capacities reduced by ``n x u`` and the CPU by ``(n + 1) x u_cpu`` is faster."""
    found, work = solve_chain_counted(chain, unit, cpu_unit)
    assert work.largest <= work.bound
    if found is not None:
        assert evaluate(chain, found[1]) == pytest.approx(found[0])
    n = len(chain.blocks)
    reduced = replace(
        chain,
        gpu_capacity=tuple(max(0, c - n * unit) for c in chain.gpu_capacity),
        cpu_capacity=None if chain.cpu_capacity is None else max(0, chain.cpu_capacity - (n + 1) * cpu_unit),
    )
    slowest_allowed = brute_force(reduced)
    if slowest_allowed is not None:
        assert found is not None
        assert found[0] <= slowest_allowed + 1e-9


def expert_chain(layers: int, gpus: int, cpu_capacity: int) -> Chain:
    """Attention (small, far faster on a GPU) and experts (large) per layer, CPU tight, disk allowed."""
    blocks = []
    for layer in range(layers):
        attention: dict[Mode, float] = {**dict.fromkeys(range(gpus), 1.0), "cpu": 12.0, "disk": 12.1}
        experts: dict[Mode, float] = {**dict.fromkeys(range(gpus), 8.0), "cpu": 100.0, "disk": 128.0}
        blocks += [ChainBlock(f"a{layer}", 90, 8, attention), ChainBlock(f"e{layer}", 2800, 0, experts)]
    return Chain(
        tuple(blocks),
        gpu_capacity=(24_000,) * gpus,
        cpu_capacity=cpu_capacity,
        activation=4,
        switch=lambda a, b: 0.01,
    )


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_the_labels_kept_stay_within_the_stated_bound(gpus: int) -> None:
    """Work, not time: after each block at most one label per key and (GPU unit, CPU unit) cell."""
    chain = expert_chain(32, gpus, cpu_capacity=16_000)
    unit, cpu_unit = 24_000 // 64, 16_000 // 32
    found, work = solve_chain_counted(chain, unit, cpu_unit)
    assert found is not None and evaluate(chain, found[1]) == pytest.approx(found[0])
    levels = 3  # read room: none, an attention block, an experts block (rounded up to CPU units)
    keys_and_gpu_cells = (1 + gpus * (24_000 // unit + 1)) * 3 * levels
    assert work.bound == keys_and_gpu_cells * (16_000 // cpu_unit + 1)
    assert 0 < work.largest <= work.bound
    assert work.labels <= work.bound * len(chain.blocks)
    roomy = solve_chain_counted(replace(chain, cpu_capacity=10**9), unit, cpu_unit)[1]
    assert roomy.bound == (1 + gpus * (24_000 // unit + 1)) * 3  # the CPU untracked: one cell, one level


def test_bad_units_name_themselves() -> None:
    chain = expert_chain(1, 1, cpu_capacity=100)
    with pytest.raises(InvalidOptionError, match="units"):
        solve_chain(chain, unit=0)


def small_moe(**overrides: object) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        **{
            "hidden_size": 1024,
            "intermediate_size": 2048,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "vocab_size": 1000,
            **overrides,
        }
    )
    return transformers.Qwen3MoeForCausalLM(config)


def test_speed_keeps_attention_on_the_gpu_and_runs_experts_on_the_cpu() -> None:
    with torch.device("meta"):
        model = small_moe().to(torch.bfloat16)
    memory = {0: "40MiB", "cpu": "1GiB"}  # attention of all layers fits; no layer's experts (48 MiB) do
    hardware = SPLIT_HARDWARE
    short = devicemap.Workload(batch_size=1, seq_len=128)  # its KV cache fits beside the attention
    speed = devicemap.plan(model, memory, objective="speed", hardware=hardware, workload=short)
    fast = speed.estimate(short, hardware, model)
    slow = devicemap.plan(model, memory, workload=short).estimate(short, hardware, model)
    check_device_map(model, speed.device_map)
    for layer in range(4):
        assert speed.execution_map[f"model.layers.{layer}.self_attn"] == 0
        assert speed.device_map[f"model.layers.{layer}.mlp.experts"] == "cpu"
        assert speed.execution_map[f"model.layers.{layer}.mlp.experts"] == "cpu"
    assert fast.tokens_per_second / slow.tokens_per_second > 1
    assert speed.usage[0].runtime > 0 and speed.usage[0].used <= 40 * 2**20


def test_speed_rehearsal_gives_the_unsplit_logits() -> None:
    torch.manual_seed(0)
    model = small_moe(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    ).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if "experts" in n)
    total = sum(p.numel() * 4 for p in model.parameters())
    # Without a fixed cost per hop the GPU is worth its activation hops even for blocks this small; GPU 0
    # holds the runtime memory of the workload (KV cache, logits, activations) and all but half the experts.
    no_latency = dataclasses.replace(IDEAL_HARDWARE, link_latency=0.0)
    workload = devicemap.Workload(batch_size=1, seq_len=16)
    runtime = devicemap.plan(model, {0: 8 * total}, workload=workload).usage[0].runtime
    plan = devicemap.plan(
        model,
        {0: total - experts // 2 + runtime, "cpu": 4 * total},
        objective="speed",
        hardware=no_latency,
        workload=workload,
    )
    assert "cpu" in plan.execution_map.values() and 0 in plan.execution_map.values()
    check_device_map(model, plan.device_map)
    with torch.no_grad():
        got = devicemap.dispatch(model, plan, rehearse=True)(ids).logits
    torch.testing.assert_close(got, expected)


def test_speed_needs_hardware_and_a_model() -> None:
    with torch.device("meta"):
        model = small_moe()
    with pytest.raises(InvalidOptionError, match="hardware"):
        devicemap.plan(model, {0: "1GiB", "cpu": "1GiB"}, objective="speed")
    with pytest.raises(InvalidOptionError, match="objective"):
        devicemap.plan(model, {0: "1GiB", "cpu": "1GiB"}, objective="fast")  # type: ignore[arg-type]
    tree = devicemap.ModuleTree.from_module(model)
    with pytest.raises(InvalidOptionError, match="ModuleTree"):
        devicemap.plan(tree, {0: "1GiB", "cpu": "1GiB"}, objective="speed", hardware=HARDWARE)


def test_cli_plans_for_speed_and_names_the_missing_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    from devicemap import cli

    args = ["plan", "qwen3-30b-a3b", "--max-memory", "0=24GiB,cpu=128GiB", "--dtype", "bf16"]
    assert cli.main([*args, "--objective", "speed"]) == 2
    assert "--hardware" in capsys.readouterr().err
    tokens = {}
    for objective in ("memory", "speed"):
        code = cli.main([*args, "--objective", objective, "--hardware", "rtx-4090,desktop-ddr5", "--json"])
        printed = json.loads(capsys.readouterr().out)
        assert code == 0
        tokens[objective] = printed["estimate"]["tokens_per_second"]
    assert printed["strategy"] == "speed"
    assert tokens["speed"] > 10 * tokens["memory"]  # 23.6 vs 0.7 tokens/s: experts run on the CPU
