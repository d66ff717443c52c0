"""A speed model: the predicted time of one prefill and of one decoded token for a plan on some hardware.

Pure functions of a plan, a :class:`~devicemap.Workload`, a :class:`~devicemap.cost.hardware.Hardware` and the
model's shape. Each block (the finest placed piece, ``plan.assignments``) runs on its execution device
(``plan.execution_map``: its own GPU, the GPU that stages it, or the CPU). Per block and phase (``b`` batch, ``s`` seq_len,
``T`` tokens processed: ``b*s`` for prefill, ``b`` for one decoded token):

- **weights read**: the block's weights (and, in decode, its KV cache of ``s`` positions; in prefill the
  KV cache it writes) read from the execution device's memory at its achievable bandwidth. Routed experts
  of a mixture-of-experts layer count only the share ``1 - (1 - k/E)^T`` that ``T`` tokens touch, an
  embedding table (not tied to the output head) only the ``T`` rows looked up;
- **compute**: ``T x 2 x parameters used per token`` (:func:`devicemap.sizing.compute.flops_per_token`) plus
  attention scores over the context (``4 x heads x head_dim`` FLOPs per query-key pair; causal prefill
  pairs ``s(s+1)/2``), at the device's achievable FLOP/s for the compute dtype;
- a block costs ``max(weights read, compute)`` (roofline: reads and arithmetic overlap), plus, not
  overlapped (accelerate's hooks copy synchronously before the block runs):
- **weights moved**: a block stored on CPU/disk and executed on a GPU copies *all* its weights
  host->device on every forward pass (``bytes / (host_to_device x engine stream efficiency)``);
- **disk read**: a block stored on disk is read from it on every pass (``bytes / disk_read``; the page
  cache may hold it when RAM is free, so this is the cold-read upper bound);
- **activations moved**: where consecutive blocks execute on different devices, the hidden states
  (``T x hidden_size x bytes``) cross the link (the slower GPU's host link) plus a fixed latency
  (``link_latency``, and the engine's ``hop_seconds`` where one side is the CPU);
- **overhead**: the engine's fixed time per forward pass (``token_overhead_seconds``), once per phase.

A block run on the CPU that the plan streams to a GPU for long passes (``plan.prefill_streams``: stored on
the CPU, copied to the GPU for a pass of at least its threshold of tokens) is costed on that GPU, with its
weights moved, in such a pass (a prefill), and on the CPU otherwise.


The engine (``hardware.engine``, :mod:`devicemap.cost.engine`) scales the hardware's rates: GPU reads by
``gpu_read_efficiency``; CPU reads of routed experts by ``cpu_expert_efficiency``, of everything else by
``cpu_dense_efficiency``; GPU FLOP/s in prefill by ``prefill_efficiency``; streamed copies by its stream
efficiency (pageable or pinned). Its presets are fitted on published measurements (``benches/calibrate.py``).

Blocks run one after another, so a phase takes the sum over blocks plus the overhead. Not modelled: overlap
of copies with compute (accelerate has none), GPU-to-GPU NVLink (copies are charged at PCIe speed),
tensor-parallel or pipelined execution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ..errors import InvalidOptionError
from ..inputs.dtypes import dtype_bits, to_dtype
from ..inputs.memory import device_key
from ..inputs.model_config import config_count, config_value, meta_model_from_config, text_config
from ..inputs.module_names import closest_key
from ..sizing.compute import expert_share, flops_per_token, is_routed_experts
from ..sizing.tree import ModuleTree
from ..sizing.workload import Workload, compute_dtype, decoder_layers
from .hardware import Hardware

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Placement(Protocol):
    """What the speed model reads of a plan (a :class:`devicemap.Plan` is one): the speed model sits below
    the Plan, which offers it as ``Plan.estimate``."""

    @property
    def assignments(self) -> Mapping[str, Any]:
        """Every block and the device storing it, in model order."""

    @property
    def execution_map(self) -> Mapping[str, Any]:
        """Every block and the device computing it."""

    @property
    def tree(self) -> ModuleTree | None:
        """The size tree the plan was made from."""

    def block_bytes(self, name: str) -> int: ...


Phase = Literal["prefill", "decode"]
ExecutionDevice = int | str
"""A GPU index or ``"cpu"``."""
TERMS = ("weights read", "compute", "weights moved", "disk read", "activations moved", "overhead")
"""The terms a phase's time is split into, in table order."""


@dataclass(frozen=True)
class BlockCost:
    """What the speed model needs of one block (all per sequence; the workload multiplies by batch).

    >>> BlockCost("layers.0", storage="cpu", execution=0, weight_bytes=2**20, flops_per_token=2**20)
    BlockCost(name='layers.0', storage='cpu', execution=0, weight_bytes=1048576, flops_per_token=1048576, ...)
    """

    name: str
    storage: int | str
    """Where the weights live: a GPU index, ``"cpu"`` or ``"disk"``."""
    execution: ExecutionDevice
    """Where the block computes: a GPU index or ``"cpu"``."""
    weight_bytes: int
    flops_per_token: float
    """FLOPs of the block's weights per token (2 x parameters a token uses)."""
    attention_flops: float = 0.0
    """FLOPs per query-key pair of the block's attention (``4 x heads x head_dim``; 0: no attention)."""
    kv_bytes_per_token: float = 0.0
    """KV-cache bytes per cached position of one sequence held by this block."""
    expert_bytes: int = 0
    """Bytes of routed experts inside the block (a token reads only ``expert_share`` of them)."""
    expert_share: float = 1.0
    """Experts per token / experts (``k/E``)."""
    lookup_bytes: int = 0
    """Bytes of embedding tables inside the block: a token reads one row of each, not the table."""
    lookup_rows: int = 1
    """Rows of those tables (a pass of ``T`` tokens reads at most ``min(T, rows)`` of them)."""
    prefill_execution: ExecutionDevice | None = None
    """Where the block computes a pass of at least ``prefill_min_tokens`` tokens, when not ``execution``
    (a CPU-run block streamed to a GPU for prefill: :attr:`devicemap.Plan.prefill_streams`)."""
    prefill_min_tokens: int = 0
    quantized_calls: int = 0
    """Modules of the block whose weights a quantizer converted: each call of their kernel costs the
    engine's fixed ``quantized_call_seconds`` for ``kernel`` on a GPU, on top of the bytes read."""
    kernel: str | None = None
    """The quant method of those modules (``"bitsandbytes_4bit"``, ...)."""

    def for_tokens(self, tokens: int) -> BlockCost:
        """The block as it runs a pass of ``tokens`` tokens (streamed to its prefill GPU above the threshold)."""
        if self.prefill_execution is None or tokens < self.prefill_min_tokens:
            return self
        return replace(self, execution=self.prefill_execution, prefill_execution=None)

    def __repr__(self) -> str:  # the doctest above shows the leading fields only
        shown = ", ".join(
            f"{k}={getattr(self, k)!r}"
            for k in ("name", "storage", "execution", "weight_bytes", "flops_per_token")
        )
        return f"BlockCost({shown}, ...)"


@dataclass(frozen=True)
class DeviceTime:
    """One execution device's share of a phase: seconds per term, and its total.

    ``total`` is not the sum of the terms: per block, reads and compute overlap (the larger counts).
    """

    device: ExecutionDevice
    blocks: int
    weights_read: float
    compute: float
    weights_moved: float
    disk_read: float
    activations_moved: float
    total: float
    overhead: float = 0.0
    """Always 0: the engine's per-pass overhead belongs to the phase (:attr:`PhaseEstimate.overhead`)."""

    def term(self, name: str) -> float:
        """Seconds of one of :data:`TERMS`."""
        return float(getattr(self, name.replace(" ", "_")))


@dataclass(frozen=True)
class PhaseEstimate:
    """Predicted time of one phase (``"prefill"`` of ``seq_len`` tokens, or one ``"decode"`` step)."""

    phase: Phase
    tokens: int
    """Tokens processed (all sequences of the batch)."""
    seconds: float
    devices: tuple[DeviceTime, ...]
    bottlenecks: tuple[tuple[str, float], ...]
    """Seconds each term adds to ``seconds`` (per block, the larger of reads and compute counts as that
    term); they sum to ``seconds``. Largest first."""
    overhead: float = 0.0
    """The engine's fixed seconds per forward pass, outside every device's total: ``seconds`` is the sum of
    the devices' totals plus this."""

    @property
    def dominant(self) -> str:
        """The term adding the most time."""
        return self.bottlenecks[0][0]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """E.g. ``decode: 41.2 ms (24.3 tokens/s); weights moved 38.0 ms (92%), weights read 3.2 ms (8%)``."""
        parts = [
            f"{term} {_ms(seconds)} ({100 * seconds / self.seconds:.0f}%)"
            for term, seconds in self.bottlenecks
            if self.seconds > 0 and seconds / self.seconds >= 0.005
        ]
        return (
            f"{self.phase}: {_ms(self.seconds)} ({self.tokens_per_second:.1f} tokens/s); "
            f"dominated by {', '.join(parts) or 'nothing'}"
        )


@dataclass(frozen=True)
class Estimate:
    """Predicted prefill and decode times of a plan (see :func:`estimate`)."""

    prefill: PhaseEstimate
    decode: PhaseEstimate
    workload: Workload
    hardware: Hardware

    @property
    def tokens_per_second(self) -> float:
        """Decoded tokens per second (all sequences of the batch)."""
        return self.decode.tokens_per_second

    @property
    def dominant(self) -> str:
        """What dominates decode (the term adding the most time to one decoded token)."""
        return self.decode.dominant

    def summary(self) -> str:
        """Two lines: what dominates prefill and decode, with the numbers."""
        return f"{self.prefill.summary()}\n{self.decode.summary()}"

    def table(self) -> str:
        """Per execution device and phase: seconds of each term and the device's total."""
        header = ("phase", "device", "blocks", *TERMS, "total")
        rows: list[tuple[str, ...]] = [header]
        for phase in (self.prefill, self.decode):
            for d in phase.devices:
                label = f"GPU {d.device}" if isinstance(d.device, int) else str(d.device)
                rows.append(
                    (phase.phase, label, str(d.blocks), *(_ms(d.term(t)) for t in TERMS), _ms(d.total))
                )
            rows.append(
                (
                    phase.phase,
                    "all",
                    "",
                    *[_ms(phase.overhead) if t == "overhead" else "" for t in TERMS],
                    _ms(phase.seconds),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            f"devicemap speed estimate (batch {self.workload.batch_size}, seq_len {self.workload.seq_len})"
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"


def _ms(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 10:
        return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"
    return f"{seconds:.1f} s"


# ---------------------------------------------------------------------------------------------------------
# The formulas, on hand-made blocks


def estimate_blocks(
    blocks: Sequence[BlockCost],
    workload: Workload,
    hardware: Hardware,
    *,
    hidden_bytes_per_token: float = 0.0,
    dtype_bits: int = 16,
) -> Estimate:
    """The speed model on explicit blocks (in execution order).

    ``hidden_bytes_per_token``: bytes of one token's hidden state crossing a device boundary
    (``hidden_size x bytes``); ``dtype_bits``: compute width (32 uses fp32 FLOP/s, else bf16/fp16).

    A GPU-only decode reads every weight once per token:

    >>> from devicemap.cost.hardware import Hardware
    >>> hw = Hardware.preset("a100-80gb-sxm", engine="ideal")  # the formulas alone, no software loss
    >>> block = BlockCost("model", storage=0, execution=0, weight_bytes=14 * 10**9, flops_per_token=14e9)
    >>> e = estimate_blocks([block], Workload(batch_size=1, seq_len=1), hw)
    >>> round(e.decode.seconds, 5) == round(14e9 / (2039e9 * 0.8), 5), e.dominant
    (True, 'weights read')
    """
    if not isinstance(workload, Workload):
        raise InvalidOptionError(f"workload must be a devicemap.Workload, got {workload!r}")
    if not isinstance(hardware, Hardware):
        raise InvalidOptionError(
            f"hardware must be a devicemap.Hardware such as Hardware.preset('rtx-4090'), got {hardware!r}"
        )
    for block in blocks:
        if isinstance(block.execution, int):
            hardware.gpu(block.execution)  # names the missing GPU
        elif block.execution != "cpu":
            raise InvalidOptionError(
                f"block {block.name!r} executes on {block.execution!r}; the speed model knows GPU "
                "indices and 'cpu'"
            )
    b, s = workload.batch_size, workload.seq_len
    prefill = _phase("prefill", blocks, hardware, b, s, b * s, hidden_bytes_per_token, dtype_bits)
    decode = _phase("decode", blocks, hardware, b, s, b, hidden_bytes_per_token, dtype_bits)
    return Estimate(prefill, decode, workload, hardware)


def _phase(
    phase: Phase,
    blocks: Sequence[BlockCost],
    hw: Hardware,
    batch: int,
    seq_len: int,
    tokens: int,
    hidden_bytes: float,
    bits: int,
) -> PhaseEstimate:
    per_device: dict[ExecutionDevice, dict[str, float]] = {}
    bottleneck = dict.fromkeys(TERMS, 0.0)
    previous: ExecutionDevice | None = None
    for block in (b.for_tokens(tokens) for b in blocks):
        device = block.execution
        read, compute, moved, disk = _block_terms(block, hw, phase, batch, seq_len, tokens, bits)
        activations = 0.0
        if previous is not None and previous != device:
            activations = activation_time(hw, previous, device, tokens * hidden_bytes)
        previous = device
        terms = per_device.setdefault(device, dict.fromkeys((*TERMS, "total", "blocks"), 0.0))
        for name, value in (
            ("weights read", read),
            ("compute", compute),
            ("weights moved", moved),
            ("disk read", disk),
            ("activations moved", activations),
        ):
            terms[name] += value
        terms["blocks"] += 1
        terms["total"] += max(read, compute) + moved + disk + activations
        bottleneck["compute" if compute > read else "weights read"] += max(read, compute)
        bottleneck["weights moved"] += moved
        bottleneck["disk read"] += disk
        bottleneck["activations moved"] += activations
    overhead = hw.engine.token_overhead_seconds
    bottleneck["overhead"] = overhead
    devices = tuple(
        DeviceTime(
            device=device,
            blocks=int(t["blocks"]),
            weights_read=t["weights read"],
            compute=t["compute"],
            weights_moved=t["weights moved"],
            disk_read=t["disk read"],
            activations_moved=t["activations moved"],
            total=t["total"],
        )
        for device, t in sorted(per_device.items(), key=lambda item: _device_order(item[0]))
    )
    ranked = tuple(sorted(bottleneck.items(), key=lambda item: -item[1]))
    seconds = sum(d.total for d in devices) + overhead
    return PhaseEstimate(phase, tokens, seconds, devices, ranked, overhead)


def _block_terms(
    block: BlockCost, hw: Hardware, phase: Phase, batch: int, seq_len: int, tokens: int, bits: int
) -> tuple[float, float, float, float]:
    """Seconds of one block's weights read, compute, weights moved and disk read in a phase."""
    device = block.execution
    engine = hw.engine
    touched = 1.0 - (1.0 - block.expert_share) ** tokens if block.expert_bytes else 1.0
    expert_read = block.expert_bytes * touched
    read_bytes = float(block.weight_bytes - block.expert_bytes)
    if block.lookup_bytes:
        read_bytes -= block.lookup_bytes * (1.0 - min(1.0, tokens / max(1, block.lookup_rows)))
    # KV cache: decode reads s cached positions per sequence; prefill writes s of them.
    read_bytes += batch * seq_len * block.kv_bytes_per_token
    # Query-key pairs: a causal prefill's query i sees i keys; a decoded token sees all s.
    pairs = batch * seq_len * (seq_len + 1) / 2 if phase == "prefill" else batch * seq_len
    flops = tokens * block.flops_per_token + pairs * block.attention_flops
    if isinstance(device, int):
        gpu = hw.gpu(device)
        rate = gpu.read_rate(bits) * engine.gpu_read_efficiency
        read = (read_bytes + expert_read) / rate
        if block.quantized_calls:  # a quantized kernel's fixed time per call, once per pass
            read += block.quantized_calls * engine.call_seconds(block.kernel)
        flop_rate = gpu.flop_rate(bits) * (engine.prefill_efficiency if phase == "prefill" else 1.0)
    else:
        rate = hw.host.read_rate(bits)
        read = read_bytes / (rate * engine.cpu_dense_efficiency)
        read += expert_read / (rate * engine.cpu_expert_efficiency)
        flop_rate = hw.host.flop_rate(bits)
    moved = disk = 0.0
    if block.storage != device:
        if block.storage == "disk":
            disk = block.weight_bytes / hw.host.disk_read
        link = _link(hw, block.storage, device)
        if link is not None:
            moved = block.weight_bytes / (link * engine.stream_efficiency)
    return read, flops / flop_rate, moved, disk


def block_time(
    block: BlockCost,
    workload: Workload,
    hardware: Hardware,
    *,
    phase: Phase = "decode",
    dtype_bits: int = 16,
) -> float:
    """Seconds one block adds to a phase where it is stored and executed (``max(weights read, compute)``
    + weights moved + disk read), activation moves aside (:func:`activation_time`): the per-block term
    :func:`estimate_blocks` sums, for planners comparing where a block could live.

    >>> from devicemap.cost.hardware import Hardware
    >>> hw = Hardware.preset("a100-80gb-sxm")
    >>> block = BlockCost("model", storage=0, execution=0, weight_bytes=14 * 10**9, flops_per_token=14e9)
    >>> w = Workload(batch_size=1, seq_len=1)
    >>> overhead = hw.engine.token_overhead_seconds  # once per pass, in no block
    >>> block_time(block, w, hw) + overhead == estimate_blocks([block], w, hw).decode.seconds
    True
    """
    b, s = workload.batch_size, workload.seq_len
    tokens = b if phase == "decode" else b * s
    read, compute, moved, disk = _block_terms(
        block.for_tokens(tokens), hardware, phase, b, s, tokens, dtype_bits
    )
    return max(read, compute) + moved + disk


def activation_time(
    hardware: Hardware, previous: ExecutionDevice, device: ExecutionDevice, activation_bytes: float
) -> float:
    """Seconds to hand ``activation_bytes`` of hidden states from a block executed on ``previous`` to one
    on ``device`` (0 on the same device): the link's latency (plus the engine's ``hop_seconds`` between a GPU
    and the CPU) and the bytes over the slower host link."""
    if previous == device:
        return 0.0
    link = _link(hardware, previous, device)
    hop = hardware.engine.hop_seconds if "cpu" in (previous, device) else 0.0
    return hardware.link_latency + hop + (activation_bytes / link if link else 0.0)


def _device_order(device: ExecutionDevice) -> tuple[int, int]:
    return (0, device) if isinstance(device, int) else (1, 0)


def _link(hw: Hardware, source: int | str, target: int | str) -> float | None:
    """Bytes/s between two devices: a GPU's host link (the slower one between two GPUs); None on the host."""
    rates = [hw.gpu(d).host_to_device for d in (source, target) if isinstance(d, int)]
    return min(rates) if rates else None


# ---------------------------------------------------------------------------------------------------------
# From a plan and a model


def execution_devices(plan: Placement) -> dict[str, ExecutionDevice]:
    """Every block's execution device, as a GPU index or ``"cpu"``."""
    return {name: _execution_key(device, name) for name, device in plan.execution_map.items()}


def _execution_key(device: Any, name: str) -> ExecutionDevice:
    key = device_key(device)
    if isinstance(key, int) or key == "cpu":
        return key
    raise InvalidOptionError(f"block {name!r} executes on {device!r}; expected a GPU index or 'cpu'")


def _model_of(model_or_config: Any) -> torch.nn.Module:
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - transformers is a test dependency
        raise InvalidOptionError("estimating from a config needs transformers; pass the model") from error
    if not isinstance(model_or_config, transformers.PretrainedConfig):
        raise InvalidOptionError(
            f"model_or_config must be a torch.nn.Module (meta device is fine) or a transformers config, "
            f"got {type(model_or_config).__name__}"
        )
    return meta_model_from_config(model_or_config, "this config", "pass the model")


def _compute_bits(model: torch.nn.Module, plan: Placement, dtype: Any) -> int:
    """Bits of the compute dtype: ``dtype``'s; else the width the plan sized the weights at (a model built
    in float32 on the meta device and planned with ``dtype="bfloat16"`` computes in 16 bits), which is
    the model's own floating dtype unless ``plan(dtype=...)`` said otherwise."""
    if dtype is not None:
        resolved = compute_dtype(dtype)
        return dtype_bits(to_dtype(resolved)) if resolved is not None else 16
    params = sum(p.numel() for p in model.parameters())
    if params and plan.tree is not None:
        planned = sum(plan.block_bytes(name) for name in plan.assignments)
        return 32 if planned / params > 3.0 else 16  # 4 bytes per parameter: float32; else 16 bits or less
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    resolved = compute_dtype(floating)
    return dtype_bits(to_dtype(resolved)) if resolved is not None else 16


def block_costs(
    plan: Placement, model: torch.nn.Module, workload: Workload, dtype: Any = None
) -> list[BlockCost]:
    """The :class:`BlockCost` of every block of ``plan`` (in ``plan.assignments`` order) for ``model``."""
    import torch

    assignments = plan.assignments
    execution = execution_devices(plan)
    flops = dict.fromkeys(assignments, 0.0)
    matched = 0
    for name, value in flops_per_token(model):
        block = closest_key(name, assignments)
        if block is not None:
            flops[block] += value
            matched += 1
    if assignments and not matched and any(True for _ in model.parameters()):
        raise InvalidOptionError(
            "none of the model's modules is a block of the plan: pass the model the plan was made for"
        )
    attention = dict.fromkeys(assignments, 0.0)
    kv = dict.fromkeys(assignments, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        c = text_config(config)
        heads = config_value(c, "num_attention_heads", "num_heads", "n_head")
        if heads:
            if config_value(c, "head_dim", "d_kv") is not None:
                head_dim = config_count(c, "head_dim", "d_kv")
            else:
                head_dim = config_count(c, "hidden_size", "d_model") // int(heads)
            per_token = Workload(batch_size=1, seq_len=1, kv_dtype=workload.kv_dtype)
            kv_bytes = per_token.kv_cache_bytes_per_layer(config, compute_dtype(dtype))
            for layer in decoder_layers(model, config):
                block = closest_key(layer, assignments) or next(
                    (n for n in assignments if n.startswith(layer + ".") and "attn" in n),
                    next((n for n in assignments if n.startswith(layer + ".")), None),
                )
                if block is not None:
                    attention[block] += 4.0 * int(heads) * head_dim
                    kv[block] += kv_bytes
    experts = dict.fromkeys(assignments, 0)
    lookups = dict.fromkeys(assignments, 0)
    rows = dict.fromkeys(assignments, 1)
    count, share = expert_share(config)
    streams = getattr(plan, "prefill_streams", None) or {}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    head_weight = getattr(head, "weight", None)
    quantized = plan.tree.quantized_modules if plan.tree is not None else None
    kernel, converted = quantized if quantized is not None else (None, frozenset[str]())
    calls = dict.fromkeys(assignments, 0)
    for name, module in model.named_modules():
        block = closest_key(name, assignments)
        if block is None or plan.tree is None:
            continue
        if name in converted:
            calls[block] += 1
        if count and is_routed_experts(name.rsplit(".", 1)[-1], module, count):
            experts[block] += plan.tree.module_bytes(name)
        elif isinstance(module, torch.nn.Embedding) and module.weight is not head_weight:
            # a tied table is also the output head's matrix, which reads all of it
            lookups[block] += plan.tree.module_bytes(name)
            rows[block] = max(rows[block], module.num_embeddings)
    return [
        BlockCost(
            name=name,
            storage=storage,
            execution=execution[name],
            weight_bytes=plan.block_bytes(name),
            flops_per_token=flops[name],
            attention_flops=attention[name],
            kv_bytes_per_token=kv[name],
            expert_bytes=min(experts[name], plan.block_bytes(name)),
            expert_share=share if experts[name] else 1.0,
            lookup_bytes=min(lookups[name], plan.block_bytes(name)),
            lookup_rows=rows[name],
            prefill_execution=streams[name].device if name in streams else None,
            prefill_min_tokens=streams[name].min_tokens if name in streams else 0,
            quantized_calls=calls[name],
            kernel=kernel if calls[name] else None,
        )
        for name, storage in assignments.items()
    ]


def estimate(
    plan: Placement,
    workload: Workload | None,
    hardware: Hardware,
    model_or_config: Any,
    *,
    dtype: Any = None,
) -> Estimate:
    """Predict the time of one prefill of ``workload.seq_len`` tokens and of one decoded token for ``plan``
    on ``hardware``, per execution device and in total, and what dominates (formulas: module docstring).

    Args:
        plan: a :class:`~devicemap.Plan` (made with its size tree, as :func:`devicemap.plan` does).
        workload: batch size and sequence length (``None``: ``Workload()``, batch 1 and 2048 tokens).
        hardware: GPU ``i`` of the plan is ``hardware.gpus[i]``; CPU and disk are ``hardware.host``.
        model_or_config: the model the plan was made for (meta device is fine) or its transformers config
            (the model is then built on the meta device). Its config gives attention, KV cache and hidden
            sizes; its parameters give FLOPs per token.
        dtype: compute dtype; default: the width the plan sized the weights at (float32 when ~4 bytes per
            parameter, else 16 bits: quantized weights compute in 16 bits). float32 uses fp32 FLOP/s.

    Example:
        >>> import torch, devicemap
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from devicemap.cost.hardware import Hardware
        >>> config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
        ...                      num_attention_heads=8, vocab_size=32000)
        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(config).to(torch.bfloat16)
        >>> plan = devicemap.plan(model, max_memory={0: "200MiB", "cpu": "8GiB"})
        >>> e = estimate(plan, devicemap.Workload(seq_len=512), Hardware.preset("rtx-4090"), model)
        >>> e.dominant, e.tokens_per_second < 1000
        ('weights moved', True)
    """
    if not isinstance(plan, Placement):
        raise InvalidOptionError(
            f"plan must be a devicemap.Plan (from devicemap.plan()), got {type(plan).__name__}"
        )
    if workload is None:
        workload = Workload()
    if not isinstance(workload, Workload):
        raise InvalidOptionError(
            f"workload must be a devicemap.Workload such as Workload(batch_size=1, seq_len=2048), got "
            f"{type(workload).__name__}"
        )
    if not isinstance(hardware, Hardware):
        raise InvalidOptionError(
            f"hardware must be a devicemap.Hardware such as Hardware.preset('rtx-4090'), got {type(hardware).__name__}"
        )
    blocks, hidden_bytes, bits = model_block_costs(plan, workload, model_or_config, dtype=dtype)
    return estimate_blocks(blocks, workload, hardware, hidden_bytes_per_token=hidden_bytes, dtype_bits=bits)


def model_block_costs(
    plan: Placement, workload: Workload, model_or_config: Any, *, dtype: Any = None
) -> tuple[list[BlockCost], float, int]:
    """What :func:`estimate` feeds :func:`estimate_blocks`: the plan's :class:`BlockCost` list, the bytes
    of one token's hidden state crossing a device boundary, and the compute width in bits."""
    model = _model_of(model_or_config)
    bits = _compute_bits(model, plan, dtype)
    if dtype is None:
        dtype = "float32" if bits >= 32 else "bfloat16"
    blocks = block_costs(plan, model, workload, dtype)
    hidden_bytes = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        hidden = config_value(text_config(config), "hidden_size", "d_model", "n_embd")
        if hidden:
            hidden_bytes = float(hidden) * bits / 8
    return blocks, hidden_bytes, bits
