"""plan(): decide where each module lives, and the Plan it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _core
from .arguments import check_flag
from .compute import flops_per_token
from .errors import (
    DoesNotFitError,
    InvalidOptionError,
    PlacementError,
    UnknownDeviceError,
)
from .formatting import format_bytes, shown_name, span_label
from .memory import (
    DeviceKey,
    MaxMemory,
    Size,
    bytes_to_bits,
    normalize_max_memory,
)
from .options import Balance, Objective, PlacementOptions, Strategy
from .quantization import OffloadRule
from .tree import DtypeLike, ModuleTree, target_bits
from .workload import RuntimeMemory, Workload, check_runtime_bits
from .workload import runtime_memory as workload_runtime

if TYPE_CHECKING:
    import torch

    from .estimate import Estimate
    from .hardware import Hardware


def closest_key(name: str, keys: Mapping[str, object]) -> str | None:
    """``name`` itself or its closest ancestor among ``keys`` (``""`` is the root), walking up the dotted
    path; None when none is there.

    >>> closest_key("model.layers.3.mlp.weight", {"model.layers": 0, "model.layers.3": 1, "lm_head": 1})
    'model.layers.3'
    """
    probe = name
    while probe not in keys:
        if not probe:
            return None
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return probe


def covering_key(name: str, device_map: Mapping[str, object]) -> str:
    """The key of ``device_map`` that places ``name``: itself or its closest mapped ancestor.

    >>> covering_key("model.layers.3.mlp.weight", {"model.layers": 0, "model.layers.3": 1, "lm_head": 1})
    'model.layers.3'
    """
    best = closest_key(name, device_map)
    if best is None:
        raise PlacementError(f"the device map gives no device for {name!r}; use the map made for this model")
    return best


def device_for(name: str, device_map: Mapping[str, Any]) -> Any:
    """Where a module or tensor ``name`` lands under ``device_map`` (accelerate's format).

    >>> device_for("model.layers.3.mlp.weight", {"model.layers": 0, "model.layers.3": 1, "lm_head": 1})
    1
    """
    return device_map[covering_key(name, device_map)]


def torch_module() -> type[torch.nn.Module]:
    import torch

    return torch.nn.Module


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
        ``hardware``, per device and in total, and what dominates (see :mod:`devicemap.estimate`)."""
        from .estimate import estimate

        return estimate(self, workload, hardware, model_or_config, dtype=dtype)

    def block_bytes(self, name: str) -> int:
        """Bytes of one placed block (needs the plan's tree)."""
        if self.tree is None:
            raise PlacementError("this plan carries no size tree; make it with devicemap.plan()")
        return self.tree.module_bytes(name)

    def table(self, limit: int | None = 10) -> str:
        """A readable per-device table; at most ``limit`` offloaded blocks listed (None: all)."""
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
                lines.append(f"  ... and {len(self.offloaded) - len(shown)} more (plan.explain() lists all)")
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


def plan(
    model_or_tree: torch.nn.Module | ModuleTree,
    max_memory: MaxMemory | None = None,
    *,
    strategy: Strategy = "auto",
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    pins: Mapping[str, object] | None = None,
    offload_buffers: bool = False,
    workload: Workload | None = None,
    balance: Balance = "memory",
    gpu0_reserve: Size | None = None,
    untie: bool = False,
    quantization_config: Any = None,
    execution_device: DeviceKey | None = None,
    objective: Objective = "memory",
    hardware: Hardware | None = None,
) -> Plan:
    """Decide where each module of a model lives.

    Args:
        model_or_tree: a ``torch.nn.Module`` (meta device is fine) or a :class:`ModuleTree`.
        max_memory: ``{device: size}`` with GPU indices, ``"cpu"`` and optionally ``"disk"`` (offload to
            disk is only used when ``"disk"`` is present). Sizes are bytes or strings like ``"20GiB"``.
            ``None`` reads the free memory of this machine's GPUs and CPU.
        strategy: ``"auto"`` (one GPU: sequential; several: balanced), ``"balanced"`` (contiguous runs
            with the smallest possible largest GPU load), ``"balanced_low_0"`` (GPU 0 as empty as
            possible, the rest balanced) or ``"sequential"`` (fill GPU 0, then 1, ...).
        no_split_module_classes: class names never split across devices. Defaults to the model's own
            ``_no_split_modules`` (transformers models declare them).
        dtype, special_dtypes: size floating weights as if loaded in this dtype (per-name overrides).
        pins: ``{module name: device}`` placements to keep, e.g. ``{"lm_head": 0}``.
        offload_buffers: offload buffers with their layers (default: buffers of offloaded layers stay on
            the execution device, and the plan reserves room for them there).
        workload: a :class:`Workload` (batch size, sequence length, KV dtype): each decoder layer's KV
            cache is planned on the device that runs it, activations on every computing device, logits
            with the output head. Needs a transformers model (its config).
        balance: ``"memory"`` (default) or ``"compute"``: what ``balanced`` strategies equalise. Compute
            is FLOPs per token (2 x parameters used per token; only routed experts' share for MoE).
        gpu0_reserve: bytes to keep free on GPU 0 on top of everything planned (e.g. for generate): GPU 0
            plans as if that much smaller; the balanced split does not count it as load.
        execution_device: where blocks on the CPU or disk execute: a GPU (``1``, ``"cuda:1"``: it keeps
            the room to stage them) or ``"cpu"`` (they compute on the CPU, no GPU room kept). ``None``
            (default): GPU 0 stages them when it has room (the plan accelerate would make); else the GPU
            keeping the most layers on the GPUs; else the blocks no GPU can stage (e.g. an embedding
            larger than any GPU) run on the CPU. ``plan.execution_map`` says where every block runs.
        untie: count a shared parameter once per user instead of keeping its users together (for
            pipeline stages, where each stage holds its own copy).
        quantization_config: the quantizer the model will load with (a transformers
            ``BitsAndBytesConfig``/``TorchAoConfig`` or its dict): each weight is sized as that quantizer
            stores it, quantization state included, and its offload rule is kept (bitsandbytes refuses
            CPU/disk beside GPUs unless ``llm_int8_enable_fp32_cpu_offload``: the plan then uses the GPUs
            only, or raises :class:`DoesNotFitError`).
        objective: ``"memory"`` (default: the plan of ``strategy``) or ``"speed"``: the placement with the
            least predicted time of one decoded token (``workload`` or ``Workload()``) on ``hardware``,
            within memory. Blocks are resident on a GPU or stored and run on the CPU (experts of
            mixture-of-experts layers are blocks of their own, so attention can stay on a GPU while the
            experts run on the CPU); an exact dynamic program over the block chain chooses
            (:mod:`devicemap.speed_objective`), compared with the staging plans of the memory objective.
            Needs the model (not a ModuleTree) and ``hardware``; takes no pins or quantization_config.
        hardware: a :class:`devicemap.Hardware` (``objective="speed"`` only): GPU ``i`` of
            ``max_memory`` is ``hardware.gpus[i]``.

    Raises:
        DoesNotFitError: the model does not fit (the message says how much and where).
        InvalidSizeError, UnknownDeviceError, UnknownModuleError, TiedPinConflictError: bad input.

    Example:
        >>> import torch, devicemap
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
        >>> p = devicemap.plan(model, max_memory={0: "10MiB", 1: "10MiB", "cpu": "1GiB"}, dtype="float16")
        >>> p.device_map
        {'0': 0, '1': 0, '2': 0, '3': 0, '4': 1, '5': 1, '6': 1, '7': 1}
    """
    # Every argument is checked before any work, so a wrong one is named instead of failing deep inside.
    options = PlacementOptions.parse(
        strategy=strategy,
        no_split_module_classes=no_split_module_classes,
        pins=pins,
        offload_buffers=offload_buffers,
        balance=balance,
        gpu0_reserve=gpu0_reserve,
        execution_device=execution_device,
        objective=objective,
    )
    check_flag("untie", untie)
    if options.objective == "speed":
        ignored = [
            f"{name}={value!r}"
            for name, value, default in (
                ("strategy", options.strategy, "auto"),
                ("balance", options.balance, "memory"),
                ("execution_device", options.execution_device, None),
            )
            if value != default
        ]
        if ignored:
            raise InvalidOptionError(
                f"objective='speed' chooses each block's device and where it runs itself, so {', '.join(ignored)} "
                "would be ignored: drop it, or use objective='memory' to plan with it"
            )
    if hardware is not None and options.objective != "speed":
        raise InvalidOptionError(
            "hardware= is used by objective='speed'; for the memory plan use plan.estimate()"
        )
    if workload is not None and not isinstance(workload, Workload):
        raise InvalidOptionError(
            f"workload must be a devicemap.Workload such as Workload(batch_size=1, seq_len=4096), got {workload!r}"
        )
    if dtype is not None:
        target_bits(dtype)
    model = None
    # A ModuleTree is planned without importing torch (a catalog shape's, a checkpoint's).
    if not isinstance(model_or_tree, ModuleTree) and isinstance(model_or_tree, torch_module()):
        model = model_or_tree
    if isinstance(model_or_tree, ModuleTree):
        if dtype is not None or special_dtypes is not None or quantization_config is not None:
            raise InvalidOptionError(
                "dtype/special_dtypes/quantization_config apply when sizing a model: pass them to "
                "ModuleTree.from_module()"
            )
        tree = model_or_tree
    elif model is not None:
        tree = ModuleTree.from_module(
            model,
            dtype=dtype,
            special_dtypes=special_dtypes,
            untie=untie,
            quantization_config=quantization_config,
        )
    else:
        raise InvalidOptionError(
            f"plan() needs a torch.nn.Module (on the meta device is fine) or a devicemap.ModuleTree, "
            f"got {type(model_or_tree).__name__}"
        )
    runtime = RuntimeMemory()
    if workload is not None:
        if model is None:
            raise InvalidOptionError("workload needs the model itself (its config), not a ModuleTree")
        runtime = workload_runtime(model, tree, workload, dtype)
    compute: list[tuple[str, int]] = []
    if options.balance == "compute":
        if model is None:
            raise InvalidOptionError("balance='compute' needs the model itself, not a ModuleTree")
        compute = flops_per_token(model)
    if options.objective == "speed":
        if model is None:
            raise InvalidOptionError(
                "objective='speed' needs the model itself (its config), not a ModuleTree"
            )
        if quantization_config is not None:
            raise InvalidOptionError(
                "objective='speed' does not plan quantized models yet; use objective='memory'"
            )
        from .speed_objective import plan_for_speed

        return plan_for_speed(
            model, tree, max_memory, options, runtime, workload or Workload(), hardware, dtype
        )
    if quantization_config is not None and model is not None:
        from .quantized_planning import plan_quantized  # it builds on solve_tree below

        def unquantized() -> ModuleTree:
            return ModuleTree.from_module(model, dtype=dtype, special_dtypes=special_dtypes, untie=untie)

        return plan_quantized(
            model, tree, max_memory, options, runtime, compute, quantization_config, dtype, unquantized
        )
    return solve_tree(tree, max_memory, options, runtime, compute)


def solve_tree(
    tree: ModuleTree,
    max_memory: MaxMemory | None,
    options: PlacementOptions,
    runtime: RuntimeMemory | None = None,
    compute: list[tuple[str, int]] | None = None,
    offload: OffloadRule | None = None,
) -> Plan:
    """Place a sized tree with checked options: what :func:`plan` and :func:`devicemap.plan_checkpoint`
    share once each has sized its input. ``offload``: a quantizer's rule on CPU/disk placement."""
    runtime = runtime or RuntimeMemory()
    memory = normalize_max_memory(max_memory)
    if set(memory) == {"disk"}:
        raise UnknownDeviceError(
            f"max_memory {dict(max_memory or {})!r} names only 'disk': weights can be stored there, but layers "
            "run on a GPU or the CPU; add 'cpu' (e.g. {'cpu': '64GiB', 'disk': 0}) or a GPU"
        )
    usable = offload.usable(memory) if offload is not None else memory
    if not usable:
        raise DoesNotFitError(
            f"{offload.reason if offload else ''}, and max_memory names no GPU; give it one"
        )
    try:
        return _solve_past_oversized_blocks(tree, usable, options, runtime, compute or [])
    except DoesNotFitError as err:
        if offload is None or usable == memory:
            raise
        left_out = " and ".join(repr(k) for k in memory if k not in usable)
        if err.missing_bytes is not None and err.shortfall == "no_disk":
            refused = DoesNotFitError(
                f"the quantized model does not fit on the GPUs given: {format_bytes(err.missing_bytes)} of its "
                f"weights find no room there. {offload.reason}, so {left_out} in max_memory cannot be used; "
                "give the GPUs that much more memory or add a GPU"
            )
            refused.shortfall, refused.missing_bytes = err.shortfall, err.missing_bytes
            raise refused from None
        raise DoesNotFitError(
            f"{err}. Note: {offload.reason}, so {left_out} in max_memory could not be used; the quantized "
            "model must fit on the GPUs given"
        ) from None


def _solve_past_oversized_blocks(
    tree: ModuleTree,
    memory: Mapping[DeviceKey, int | None],
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
) -> Plan:
    """The plan, or a better one when some block is larger than every GPU.

    The GPUs hold a run of blocks from the start of the chain, so a block no GPU can hold (a
    big-vocabulary embedding, first in the model) would send every block after it off the GPUs too. Such
    a block can never be on a GPU anyway: planned again with it pinned to the CPU (or disk), the blocks after
    it may fill the GPUs. The second plan is kept only when it puts more bytes on the GPUs (or the first
    was refused).
    """
    refusal: DoesNotFitError | None = None
    first: Plan | None = None
    first_result: _core.SolveResult | None = None
    try:
        first_result = core_solve(tree, memory, options, runtime, compute)
        first = plan_of_result(first_result, tree)
    except DoesNotFitError as err:
        refusal = err
    largest_gpu = max((cap or 0 for key, cap in memory.items() if isinstance(key, int)), default=None)
    home = "cpu" if "cpu" in memory else "disk" if "disk" in memory else None
    if largest_gpu is None or home is None:
        if first is None:
            raise refusal  # type: ignore[misc]
        return first
    pinned = {name for name, _ in options.pins}
    try:
        # the blocks as the core cuts them (from a plan with unbounded GPUs when the first was refused);
        # the core names the ones larger than every GPU, instead of a size lookup per block here
        cut = (
            first_result
            if first_result is not None
            else core_solve(
                tree,
                {k: (2**50 if isinstance(k, int) else v) for k, v in memory.items()},
                options,
                runtime,
                compute,
            )
        )
        oversized = [b for b in cut.blocks_over(largest_gpu) if not _touches(b, pinned)]
        if not oversized:
            raise LookupError
        moved = dataclasses.replace(options, pins=(*options.pins, *((b, home) for b in oversized)))
        second = solve_once(tree, memory, moved, runtime, compute)
    except (PlacementError, LookupError):
        if first is None:
            raise refusal from None  # type: ignore[misc]
        return first
    if first is not None and _gpu_bytes(second) <= _gpu_bytes(first):
        return first
    # Say why: the user pinned nothing there.
    why = {b: f"larger than every GPU ({format_bytes(tree.module_bytes(b))})" for b in oversized}
    second.offloaded = [
        dataclasses.replace(o, reason=o.reason.replace(f"pinned to {home}", why[o.name], 1))
        if o.name in why
        else o
        for o in second.offloaded
    ]
    return second


def _touches(block: str, pinned: set[str]) -> bool:
    """Whether a user's pin covers ``block``, lies inside it, or is it (those stay as the user said)."""
    return any(
        block == p or p == "" or block.startswith(p + ".") or block == "" or p.startswith(block + ".")
        for p in pinned
    )


def _gpu_bytes(plan: Plan) -> int:
    return sum(u.weights for u in plan.usage if isinstance(u.device, int))


def solve_once(
    tree: ModuleTree,
    memory: Mapping[DeviceKey, int | None],
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
) -> Plan:
    """One call into the core with checked options and canonical devices, as it is (no second attempt
    around blocks larger than every GPU, no quantizer rule): the building block of the planners."""
    return plan_of_result(core_solve(tree, memory, options, runtime, compute), tree)


def core_solve(
    tree: ModuleTree,
    memory: Mapping[DeviceKey, int | None],
    options: PlacementOptions,
    runtime: RuntimeMemory,
    compute: list[tuple[str, int]],
) -> _core.SolveResult:
    """The core's answer for :func:`solve_once`, before it becomes a :class:`Plan` (it makes Python
    objects only when asked)."""
    devices: list[tuple[str, int | None]] = [(str(k), bytes_to_bits(v)) for k, v in memory.items()]
    check_runtime_bits(runtime.per_module, runtime.activation_bits)
    return _core.solve(
        tree.core,
        devices,
        options.strategy,
        options.classes_for(tree.no_split_module_classes),
        list(options.pins),
        options.offload_buffers,
        list(runtime.per_module),
        runtime.activation_bits,
        compute,
        options.balance,
        options.gpu0_reserve_bits,
        options.execution_device,
    )


def plan_of_result(result: _core.SolveResult, tree: ModuleTree) -> Plan:
    """The :class:`Plan` of a core result. The core hands back bytes (rounded once, in Rust) and devices
    as accelerate's keys; the three maps come as dicts sharing one string per block name."""
    device_map, assignments, execution_map = result.maps()
    return Plan(
        strategy=result.strategy,
        device_map=device_map,
        assignments=assignments,
        usage=[
            DeviceUsage(
                device=u.device,
                capacity=u.capacity,
                weights=u.weights,
                runtime=u.runtime,
                reserve=u.reserve,
                compute=u.compute,
                blocks=tuple(u.blocks),
            )
            for u in result.usage
        ],
        offloaded=[Offload(*row) for row in result.offload_rows()],
        tree=tree,
        execution_map=execution_map,
    )
