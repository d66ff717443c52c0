"""Which CPU-run blocks of a plan compute long passes (prefill) on a GPU instead, and from how many tokens.

Decoding one token, a block stored and run on the CPU reads its weights once at host bandwidth, which beats
copying them to a GPU. A prefill of thousands of tokens is compute-bound: the CPU's FLOP/s, not its memory,
set the time, and copying the weights over PCIe once and computing on the GPU is several times faster
(llama.cpp does this for CPU-stored experts at batches of 32 tokens and more). So, per block stored and run
on the CPU, this finds the smallest pass (in tokens, up to the workload's prefill) from which streaming it
to a GPU, with its hidden states handed over and back, is predicted faster than computing in place, and
keeps it when:

- the block holds no KV cache (its cache lives on the CPU, where attention writes it): routed experts, the
  MLP parts of a layer the speed objective opened;
- the GPU with the most free room left by the plan holds the block's weights and the pass's hidden
  states (four times ``tokens x hidden_size`` of the compute dtype) on top of everything planned there,
  so streaming never takes memory the plan gave to something else.

A plan fastest at decoding fills its GPUs, so it leaves no such room. With ``Workload(new_tokens=N)`` the
speed objective weighs both: per GPU it also plans decode with that GPU narrowed by the room to stream the
largest such block (:func:`prefill_rooms`), and keeps whichever plan is predicted to serve a request
(prefill + ``N`` decoded tokens) faster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..cost.estimate import BlockCost, activation_time, block_time, model_block_costs
from ..plans import PrefillStream
from ..sizing.workload import Workload

if TYPE_CHECKING:
    import torch

    from ..cost.hardware import Hardware
    from ..inputs.memory import DeviceKey
    from ..plans import Plan

HIDDEN_COPIES = 4
"""Hidden-state buffers of a streamed pass kept room for on the GPU (input, output, two intermediates)."""


def prefill_streams(
    plan: Plan, workload: Workload, hardware: Hardware, model: torch.nn.Module, dtype: Any
) -> dict[str, PrefillStream]:
    """The blocks of ``plan`` to stream to a GPU for passes of at least their threshold (module docstring)."""
    free = {
        u.device: u.capacity - u.used
        for u in plan.usage
        if isinstance(u.device, int) and u.capacity is not None
    }
    if not free:
        return {}
    gpu = max(free, key=lambda d: (free[d], -d))
    wanted = streamable(plan, workload, hardware, model, dtype, gpu)
    room = free[gpu] - buffer_bytes(plan, workload, model, dtype)
    return {name: PrefillStream(gpu, threshold) for name, (size, threshold) in wanted.items() if size <= room}


def streamable(
    plan: Plan, workload: Workload, hardware: Hardware, model: torch.nn.Module, dtype: Any, gpu: int
) -> dict[str, tuple[int, int]]:
    """Blocks of ``plan`` a prefill would compute faster streamed to ``gpu``, room aside: their bytes and
    the fewest tokens from which streaming pays."""
    tokens = workload.batch_size * workload.seq_len
    costs, hidden_bytes, bits = model_block_costs(plan, workload, model, dtype=dtype)
    found = {}
    for cost in costs:
        if cost.storage != "cpu" or cost.execution != "cpu" or cost.kv_bytes_per_token:
            continue
        threshold = _crossover(cost, gpu, tokens, hardware, hidden_bytes, bits)
        if threshold is not None:
            found[cost.name] = (cost.weight_bytes, threshold)
    return found


def buffer_bytes(plan: Plan, workload: Workload, model: torch.nn.Module, dtype: Any) -> int:
    """GPU bytes a streamed pass's hidden states take (:data:`HIDDEN_COPIES` of the prefill's)."""
    _, hidden_bytes, _ = model_block_costs(plan, workload, model, dtype=dtype)
    return int(HIDDEN_COPIES * workload.batch_size * workload.seq_len * hidden_bytes)


def _crossover(
    cost: BlockCost, gpu: int, most: int, hardware: Hardware, hidden_bytes: float, bits: int
) -> int | None:
    """The fewest tokens (up to ``most``) from which the block computes a pass faster streamed to ``gpu``
    than on the CPU; None when it never does within ``most``. Streaming costs a fixed copy and saves a
    share of compute that grows with the tokens, so the first power of two that wins is narrowed down by
    bisection to the exact count."""
    streamed = replace(cost, execution=gpu)

    def streaming_wins(tokens: int) -> bool:
        one_pass = Workload(batch_size=1, seq_len=tokens)
        here = block_time(cost, one_pass, hardware, phase="prefill", dtype_bits=bits)
        hops = 2 * activation_time(hardware, "cpu", gpu, tokens * hidden_bytes)
        return block_time(streamed, one_pass, hardware, phase="prefill", dtype_bits=bits) + hops < here

    steps = sorted({*(2**k for k in range(most.bit_length()) if 2**k <= most), most})
    low = 0  # streaming does not win at low (or low is 0)
    for high in steps:
        if streaming_wins(high):
            while high - low > 1:
                middle = (low + high) // 2
                if streaming_wins(middle):
                    high = middle
                else:
                    low = middle
            return high
        low = high
    return None


def with_prefill_streams(
    plan: Plan, workload: Workload, hardware: Hardware, model: torch.nn.Module, dtype: Any
) -> Plan:
    """``plan`` with its :func:`prefill_streams`, each named in its block's reason."""
    plan.prefill_streams = prefill_streams(plan, workload, hardware, model, dtype)
    plan.offloaded = [
        replace(o, reason=f"{o.reason}; a prefill of {s.min_tokens}+ tokens streams it to GPU {s.device}")
        if (s := plan.prefill_streams.get(o.name)) is not None
        else o
        for o in plan.offloaded
    ]
    return plan


def prefill_rooms(
    plan: Plan,
    memory: Mapping[DeviceKey, int | None],
    workload: Workload,
    hardware: Hardware,
    model: torch.nn.Module,
    dtype: Any,
) -> dict[int, int]:
    """Per GPU, the smaller capacity that keeps room to stream the largest block ``plan`` would stream for
    prefill if it could (and the pass's hidden states); GPUs with no such block or no such room are left out."""
    rooms = {}
    for gpu, capacity in memory.items():
        if not isinstance(gpu, int) or capacity is None:
            continue
        wanted = streamable(plan, workload, hardware, model, dtype, gpu)
        if not wanted or set(wanted) <= set(plan.prefill_streams):
            continue
        need = max(size for size, _ in wanted.values()) + buffer_bytes(plan, workload, model, dtype)
        if need < capacity:
            rooms[gpu] = capacity - need
    return rooms


def with_capacities(plan: Plan, memory: Mapping[DeviceKey, int | None]) -> Plan:
    """``plan`` with the capacities of ``memory`` (a plan made on less, whose room left is free)."""
    plan.usage = [replace(u, capacity=memory[u.device]) if u.device in memory else u for u in plan.usage]
    return plan
