"""Run a small Llama-style model as a pipeline over processes, split by a devicemap stage plan.

    torchrun --nproc-per-node 2 examples/pipeline_llama.py    # or 4; CPU, gloo backend

Every rank builds the same model (same seed), devicemap plans the stages over one host whose "GPUs" are
the processes, torch.distributed.pipelining builds this rank's stage, and a GPipe schedule runs a batch
in micro-batches. The last stage checks the pipeline's output against the whole model run in one
process and exits non-zero if they differ.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import devicemap

VOCAB, WIDTH, HEADS, LAYERS = 256, 64, 4, 8


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.out = nn.Linear(WIDTH, WIDTH, bias=False)
        self.mlp_norm = RMSNorm(WIDTH)
        self.gate = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, HEADS, WIDTH // HEADS).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, WIDTH))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(LAYERS))
        self.norm = RMSNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def main() -> int:
    from torch.distributed.pipelining import ScheduleGPipe

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyLlama().eval()
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    microbatches = 4

    layer_bytes = devicemap.ModuleTree.from_module(model).module_bytes("layers.0")
    per_rank = f"{int(layer_bytes * (LAYERS / world + 1.5))}B"
    stages = devicemap.plan_stages(
        model, hosts=[[per_rank] * world], no_split_module_classes=["DecoderLayer"]
    )
    if rank == 0:
        print(stages, flush=True)
    stage = devicemap.pipeline(model, stages, (ids.chunk(microbatches)[0],), rank=rank)
    schedule = ScheduleGPipe(stage, n_microbatches=microbatches)
    with torch.no_grad():
        output = schedule.step(ids) if rank == 0 else schedule.step()
    status = 0
    if rank == stages.stages[-1].rank:
        with torch.no_grad():
            expected = model(ids)
        diff = (output - expected).abs().max().item()
        ok = torch.allclose(output, expected, atol=1e-5, rtol=1e-5)
        print(
            f"pipeline of {len(stages.stages)} stages matches the single-process model: {ok} (max |diff| {diff:.2e})"
        )
        status = 0 if ok else 1
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
