"""Pipeline stages: exact balance over hosts, tied weights, and real torch.distributed runs (gloo, CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import devicemap
from repo import REPO

EXAMPLE = REPO / "examples" / "pipeline_llama.py"


@pytest.mark.parametrize("processes", [2, 4])
def test_torchrun_pipeline_matches_the_single_process_model(processes):
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"pipeline of {processes} stages matches the single-process model: True" in out.stdout


def stack(sizes: list[int]) -> torch.nn.Sequential:
    return torch.nn.Sequential(*[torch.nn.Linear(1, s, bias=False) for s in sizes])


def test_stages_are_the_min_max_split_over_hosts():
    sizes = [5, 9, 2, 7, 7, 3, 8, 1]
    stages = devicemap.plan_stages(stack(sizes), hosts=[["1MiB", "1MiB"], ["1MiB"]])
    weights = [4 * s for s in sizes]
    best = min(
        max(sum(weights[:a]), sum(weights[a:b]), sum(weights[b:]))
        for a in range(len(weights) + 1)
        for b in range(a, len(weights) + 1)
    )
    assert max(s.bytes for s in stages.stages) == best
    assert [(s.host, s.local_gpu) for s in stages.stages] == [(0, 0), (0, 1), (1, 0)]
    blocks = [b for s in stages.stages for b in s.blocks]
    assert blocks == [str(i) for i in range(len(sizes))]  # contiguous, in order, each once


def test_tied_weights_are_copied_per_stage_or_refused():
    model = stack([64] * 6)
    model.append(torch.nn.Linear(64, 1, bias=False))
    model[6].weight = torch.nn.Parameter(model[0].weight.data.t().contiguous())
    model[5].weight = model[0].weight  # a tie from the first block to a late one
    copied = devicemap.plan_stages(model, hosts=[["1KiB", "1KiB", "1KiB"]])
    assert {s.rank for s in copied.stages} == {0, 1, 2}
    assert sum(s.bytes for s in copied.stages) == 7 * 64 * 4  # the tied weight counted on both stages
    with pytest.raises(devicemap.TiedPinConflictError, match="tied='copy'"):
        devicemap.plan_stages(model, hosts=[["1KiB", "1KiB", "1KiB"]], tied="error")


def test_bad_hosts():
    with pytest.raises(ValueError, match="list of GPU sizes"):
        devicemap.plan_stages(stack([1]), hosts=["80GiB"])
    with pytest.raises(ValueError, match="no GPU"):
        devicemap.plan_stages(stack([1]), hosts=[[]])
    with pytest.raises(devicemap.DoesNotFitError):
        devicemap.plan_stages(stack([1000]), hosts=[["1KiB"]])
