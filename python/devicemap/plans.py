"""The Plan: where every block of a model lives and runs, bytes per device, what was offloaded and why.

Every planner returns one (``devicemap.plan``, ``plan_checkpoint``, the speed and quantized planners); the
loaders, exports and pictures read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cost.estimate import Estimate, estimate
from .cost.hardware import Hardware
from .errors import PlacementError
from .formatting import format_bytes, shown_name, span_label
from .inputs.dtypes import DtypeLike
from .inputs.memory import DeviceKey
from .sizing.tree import ModuleTree
from .sizing.workload import Workload


@dataclass(frozen=True)
class DeviceUsage:
    """What one device holds in a plan."""

    device: DeviceKey
    capacity: int | None
    """Bytes the plan may use (``None``: unbounded disk)."""
    weights: int
    """Bytes of parameters and buffers placed here."""
    runtime: int
    """Bytes of runtime memory here: KV cache and logits of the layers computed here, activations."""
    reserve: int
    """Bytes kept free: staging of offloaded blocks (0 unless something is offloaded), gpu0_reserve."""
    compute: int
    """FLOPs per token of the layers held here (only with ``balance="compute"``)."""
    blocks: tuple[str, ...]
    """The finest placed pieces (layers) on this device, in model order."""

    @property
    def used(self) -> int:
        """Everything planned on this device: weights + runtime + reserve."""
        return self.weights + self.runtime + self.reserve


@dataclass(frozen=True)
class Offload:
    """A block placed on CPU or disk, and why it is not on a GPU."""

    name: str
    device: DeviceKey
    bytes: int
    reason: str


@dataclass(frozen=True)
class PrefillStream:
    """A block stored and run on the CPU that is copied to a GPU to compute a long pass (a prefill), where
    moving its weights over the link takes less time than computing the pass on the CPU."""

    device: int
    """The GPU it computes long passes on."""
    min_tokens: int
    """Tokens of a pass (batch x sequence) from which it is streamed; shorter passes (decode) run on the CPU."""


class Plan:
    """Where every module of a model lives.

    ``plan.device_map`` is accelerate's format: pass it to ``from_pretrained(device_map=...)``,
    ``accelerate.dispatch_model`` or ``load_checkpoint_and_dispatch``.
    """

    def __init__(
        self,
        strategy: str,
        device_map: dict[str, DeviceKey],
        assignments: dict[str, DeviceKey],
        usage: list[DeviceUsage],
        offloaded: list[Offload],
        tree: ModuleTree | None = None,
        execution_map: dict[str, DeviceKey] | None = None,
    ):
        self.strategy = strategy
        self.tree = tree
        """The size tree the plan was made from (block sizes for pictures and exports)."""
        self.device_map = device_map
        self.assignments = assignments
        """Every block (the finest placed piece) and its device, in model order."""
        self.usage = usage
        self.offloaded = offloaded
        if execution_map is None:
            # Without the core's answer: blocks on a GPU run there, offloaded ones on the first GPU.
            gpus = [u.device for u in usage if u.device not in ("cpu", "disk")]
            stager: DeviceKey = gpus[0] if gpus else "cpu"
            execution_map = {
                name: device if device not in ("cpu", "disk") else stager
                for name, device in assignments.items()
            }
        self.execution_map = execution_map
        self.prefill_streams: dict[str, PrefillStream] = {}
        """Blocks run on the CPU that compute long passes (prefill) on a GPU instead, streamed there for
        each such pass (``objective="speed"`` chooses them; the hooks of :func:`devicemap.dispatch` and
        :func:`devicemap.load_checkpoint` do it)."""
        """Every block and the device that computes it, in model order: its own GPU; for a block on the
        CPU or disk, the GPU that stages it (GPU 0 unless it has no room: see ``plan()``) or ``"cpu"``.
        ``device_map`` stays accelerate's format; hooks read this for the execution devices."""

    @property
    def device_bytes(self) -> dict[DeviceKey, int]:
        """Bytes of weights on each device (reserve not included), devices in placement order."""
        return {u.device: u.weights for u in self.usage}

    @property
    def reserve_bytes(self) -> dict[DeviceKey, int]:
        """Staging reserve per device (only non-zero when something is offloaded)."""
        return {u.device: u.reserve for u in self.usage if u.reserve}

    def __repr__(self) -> str:
        return f"Plan(strategy={self.strategy!r}, devices={self.device_bytes})"

    def __str__(self) -> str:
        return self.table()

    def explain(self) -> str:
        """Per-device table (weights, runtime memory, reserve, capacity, layers held) and, for every
        block on CPU or disk, why it is not on a GPU.

        >>> import torch, devicemap
        >>> model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
        >>> print(devicemap.plan(model, max_memory={0: "40KiB", "cpu": "1MiB"}).explain())  # doctest: +ELLIPSIS
        devicemap plan (sequential)
        device  weights    runtime  reserve    capacity   use                          blocks
        0       16.25 KiB  0 B      16.25 KiB  40.00 KiB  81%  [████████░░░░░░░░····]  0
        cpu     48.75 KiB  0 B      0 B        1.00 MiB   5%   [█···················]  1–3 (3)
        offloaded (3 blocks):
          1 -> cpu (16.25 KiB): did not fit on the GPUs after the blocks before it
        ...
        """
        return self.table(limit=None)

    def estimate(
        self,
        workload: Workload | None,
        hardware: Hardware,
        model_or_config: Any,
        *,
        dtype: DtypeLike | None = None,
    ) -> Estimate:
        """Predicted time of one prefill of ``workload.seq_len`` tokens and of one decoded token on
        ``hardware``, per device and in total, and what dominates (see :mod:`devicemap.cost.estimate`)."""

        return estimate(self, workload, hardware, model_or_config, dtype=dtype)

    def block_bytes(self, name: str) -> int:
        """Bytes of one placed block (needs the plan's tree)."""
        if self.tree is None:
            raise PlacementError("this plan carries no size tree; make it with devicemap.plan()")
        return self.tree.module_bytes(name)

    def table(self, limit: int | None = 10, more: str = "plan.explain() lists all") -> str:
        """A readable per-device table; at most ``limit`` offloaded blocks listed (None: all), and then
        ``more``: how the reader gets the rest."""
        rows = [("device", "weights", "runtime", "reserve", "capacity", "use", "", "blocks")]
        for u in self.usage:
            cap = "unbounded" if u.capacity is None else format_bytes(u.capacity)
            pct = "" if not u.capacity else f"{100 * u.used / u.capacity:.0f}%"
            rows.append(
                (
                    str(u.device),
                    format_bytes(u.weights),
                    format_bytes(u.runtime),
                    format_bytes(u.reserve),
                    cap,
                    pct,
                    _bar(u),
                    span_label(u.blocks),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"devicemap plan ({self.strategy})"]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
        if self.offloaded:
            lines.append(f"offloaded ({len(self.offloaded)} blocks):")
            shown = self.offloaded if limit is None else self.offloaded[:limit]
            for o in shown:
                lines.append(
                    f"  {shown_name(o.name)} -> {o.device} ({format_bytes(o.bytes)}): {shown_name(o.reason, 400)}"
                )
            if len(shown) < len(self.offloaded):
                lines.append(f"  ... and {len(self.offloaded) - len(shown)} more ({more})")
        return "\n".join(lines)


def _bar(usage: DeviceUsage, width: int = 20) -> str:
    """``[████▒▒░░····]``: weights, runtime memory, reserve, free; empty for unbounded disk."""
    if not usage.capacity:
        return ""
    cells = []
    for part, mark in ((usage.weights, "█"), (usage.runtime, "▒"), (usage.reserve, "░")):
        cells.append(mark * round(width * part / usage.capacity))
    used = "".join(cells)[:width]
    return f"[{used}{'·' * (width - len(used))}]"
