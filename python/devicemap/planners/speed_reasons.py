"""Why a speed plan keeps each block on the CPU or disk, in the words a user can act on.

The speed program hands its choice to the core as pins, so the core would say "pinned" of every offloaded
block; and a staged plan the speed objective picked says only that the block did not fit. Here each
offloaded block's reason is rewritten from the speed model's own numbers (decode seconds of the block as
placed, resident on its fastest GPU, and run on the CPU):

- **pinned**: the user pinned it (the core's reason stays);
- **streamed**: stored on the CPU/disk and copied to a GPU for every pass; faster than running it on the
  CPU, or part of a plan that is faster as a whole;
- **runs faster on the CPU** than it would resident on any GPU (a host faster than the GPU's memory);
- **beside its neighbours**: a GPU had room, but handing hidden states over and back costs more than the
  GPU saves (a small block between blocks run on the CPU);
- **no room**: the GPUs are full of blocks that save more time per byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..cost.estimate import BlockCost, block_time, model_block_costs

if TYPE_CHECKING:
    import torch

    from ..cost.hardware import Hardware
    from ..plans import Plan
    from ..sizing.workload import Workload


def explain_offloads(
    plan: Plan,
    pins: Sequence[tuple[str, str]],
    workload: Workload,
    hardware: Hardware,
    model: torch.nn.Module,
    dtype: Any,
) -> None:
    """Rewrite ``plan.offloaded``'s reasons (module docstring); blocks under a user's pin keep theirs."""
    if not plan.offloaded:
        return
    costs, _, bits = model_block_costs(plan, workload, model, dtype=dtype)
    by_name = {cost.name: cost for cost in costs}
    gpus = [u.device for u in plan.usage if isinstance(u.device, int)]
    free = [u.capacity - u.used for u in plan.usage if isinstance(u.device, int) and u.capacity is not None]

    def seconds(cost: BlockCost, storage: int | str, execution: int | str) -> float:
        placed = replace(cost, storage=storage, execution=execution)
        return block_time(placed, workload, hardware, phase="decode", dtype_bits=bits)

    explained = []
    for offload in plan.offloaded:
        cost = by_name.get(offload.name)
        if cost is None or _pinned(offload.name, pins):
            explained.append(offload)
            continue
        here = seconds(cost, cost.storage, cost.execution)
        kv = int(cost.kv_bytes_per_token * workload.batch_size * workload.seq_len)  # it brings its KV cache
        on_cpu = seconds(cost, cost.storage, "cpu")
        resident = [(seconds(cost, gpu, gpu), gpu) for gpu in gpus]
        stored = "stored on disk" if cost.storage == "disk" else "stored on the CPU"
        if isinstance(cost.execution, int):
            times = f"{per_token(here)} per decoded token, {per_token(on_cpu)} run on the CPU"
            why = (
                "faster than running it on the CPU"
                if here <= on_cpu
                else "slower for this block, but the plan as a whole decodes faster than one running "
                "offloaded blocks on the CPU"
            )
            reason = f"{stored}: no room on the GPUs; streamed to GPU {cost.execution} for every pass, {why} ({times})"
        elif not resident:
            reason = f"{stored}, runs on the CPU: max_memory has no GPU"
        else:
            fastest, gpu = min(resident)
            times = f"{per_token(here)} per decoded token here, {per_token(fastest)} resident on GPU {gpu}"
            where = f"{stored}, runs on the CPU"
            if here < fastest:
                reason = f"{where} because it runs faster there ({times})"
            elif any(room >= offload.bytes + kv for room in free):
                reason = (
                    f"{where} beside its neighbours: handing hidden states to a GPU and back costs more than "
                    f"the GPU saves ({times})"
                )
            else:
                reason = f"{where}: no room left on the GPUs, which hold blocks that save more time ({times})"
        explained.append(replace(offload, reason=reason))
    plan.offloaded = explained


def _pinned(block: str, pins: Sequence[tuple[str, str]]) -> bool:
    """Whether a user's pin covers ``block`` (a pin on it or on a module holding it)."""
    return any(not pin or block == pin or block.startswith(pin + ".") for pin, _ in pins)


def per_token(seconds: float) -> str:
    """``1.47 ms``, ``114 us``: a block's share of one decoded token."""
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"
