"""Pipeline stages across hosts: the same contiguous min-max split, one level up.

``plan_stages`` lays a model's blocks over every GPU of every host (rank = host-major GPU index) with
the core's exact balanced solver; ``pipeline`` builds the calling rank's stage with
``torch.distributed.pipelining`` from the plan's split points, ready for a schedule such as
``ScheduleGPipe`` or ``Schedule1F1B``.

Tied weights (an input embedding shared with the LM head) cannot span pipeline stages in
``torch.distributed.pipelining``, which gives each stage its own parameters: with ``tied="copy"`` (the
default, right for inference) every stage that uses a tied weight holds its own copy and the plan counts
it on each; ``tied="error"`` refuses plans in which a tie would cross stages, naming the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError, InvalidSizeError, TiedPinConflictError, UnknownDeviceError
from ..formatting import format_bytes
from ..inputs.arguments import check_choice
from ..inputs.dtypes import DtypeLike
from ..inputs.memory import Size, absent_devices, accelerator_count, parse_size
from ..inputs.module_names import covering_key
from ..inputs.options import Balance
from ..plans import Plan
from ..sizing.tree import ModuleTree
from .api import plan

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: the rank that runs it and the blocks it holds."""

    index: int
    rank: int
    host: int
    local_gpu: int
    blocks: tuple[str, ...]
    bytes: int
    compute: int


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    plan: Plan
    """The underlying plan (one device per rank)."""

    @property
    def split_points(self) -> list[str]:
        """The first block of every stage after the first (``SplitPoint.BEGINNING`` there)."""
        return [stage.blocks[0] for stage in self.stages[1:]]

    def __str__(self) -> str:
        lines = ["stage  rank  host/gpu  weights     blocks"]
        for s in self.stages:
            span = s.blocks[0] if len(s.blocks) == 1 else f"{s.blocks[0]} .. {s.blocks[-1]} ({len(s.blocks)})"
            lines.append(
                f"{s.index:<6} {s.rank:<5} {f'{s.host}/{s.local_gpu}':<9} {format_bytes(s.bytes):<11} {span}"
            )
        return "\n".join(lines)


def host_ranks(hosts: Sequence[Sequence[Size]]) -> list[tuple[int, int, int]]:
    """(host, local GPU, capacity in bytes) for every rank, host-major."""
    example = "[['80GiB'] * 8, ['80GiB'] * 8]"
    if not isinstance(hosts, Sequence) or isinstance(hosts, (str, bytes)):
        raise InvalidOptionError(
            f"hosts must be a list of hosts, each a list of GPU sizes, e.g. {example}; got {hosts!r}"
        )
    ranks = []
    for h, gpus in enumerate(hosts):
        if not isinstance(gpus, Sequence) or isinstance(gpus, (str, bytes)):
            raise InvalidOptionError(
                f"hosts[{h}] must be a list of GPU sizes such as ['80GiB', '80GiB'], got {gpus!r}"
            )
        for g, size in enumerate(gpus):
            try:
                ranks.append((h, g, parse_size(size)))
            except InvalidSizeError as err:
                raise InvalidSizeError(f"hosts[{h}][{g}]: {err}") from None
    if not ranks:
        raise InvalidOptionError(f"hosts holds no GPU: give e.g. hosts={example}")
    return ranks


def plan_stages(
    model: torch.nn.Module | ModuleTree,
    hosts: Sequence[Sequence[Size]],
    *,
    dtype: DtypeLike | None = None,
    no_split_module_classes: list[str] | None = None,
    balance: Balance = "memory",
    tied: str = "copy",
) -> StagePlan:
    """Contiguous pipeline stages over ``hosts`` (each a list of its GPUs' sizes), balanced exactly.

    >>> import torch
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    >>> plan_stages(model, hosts=[["40KiB", "40KiB"], ["40KiB", "40KiB"]]).split_points
    ['2', '4', '6']
    """
    check_choice("tied", tied, ("copy", "error"))  # copy: each stage keeps its own copy of a tied weight
    ranks = host_ranks(hosts)
    memory = {rank: capacity for rank, (_, _, capacity) in enumerate(ranks)}
    options: dict[str, Any] = dict(
        strategy="balanced", no_split_module_classes=no_split_module_classes, dtype=dtype, balance=balance
    )
    if isinstance(model, ModuleTree):
        if tied == "copy" and model.tied_groups:
            # A tree's ties are fixed when it is exported; copying them needs the model (or an untied tree).
            raise InvalidOptionError(
                f"tied='copy' cannot untie a ModuleTree ({len(model.tied_groups)} tied groups): pass the model, "
                "export the tree with ModuleTree.from_module(model, untie=True), or pass tied='error'"
            )
        # dtype and balance='compute' need the model; plan() names them if given with a tree.
        result = plan(model, max_memory=memory, **options)
    else:
        result = plan(model, max_memory=memory, untie=tied == "copy", **options)
    if tied == "error":
        _refuse_crossing_ties(model, result)
    stages: list[Stage] = []
    for rank, (host, gpu, _) in enumerate(ranks):
        usage = next(u for u in result.usage if u.device == rank)
        if usage.blocks:
            stages.append(Stage(len(stages), rank, host, gpu, usage.blocks, usage.weights, usage.compute))
    return StagePlan(tuple(stages), result)


def _refuse_crossing_ties(model: torch.nn.Module | ModuleTree, result: Plan) -> None:
    """With ties kept, tied blocks share their first user's device; a pipeline can only run that if
    every block between them is on the same stage too."""
    tree = model if isinstance(model, ModuleTree) else ModuleTree.from_module(model)
    order = list(result.assignments)
    for group in tree.tied_groups:
        positions = sorted(order.index(covering_key(name, result.assignments)) for name in group)
        if len({result.assignments[key] for key in order[positions[0] : positions[-1] + 1]}) > 1:
            raise TiedPinConflictError(
                f"tied parameters {group} would be shared by several pipeline stages, which "
                "torch.distributed.pipelining cannot do; pass tied='copy' (each stage keeps a copy, fine for "
                "inference) or untie them in the model"
            )


def pipeline(
    model: torch.nn.Module,
    stages: StagePlan,
    example_args: tuple[Any, ...],
    rank: int,
    device: str | torch.device | None = None,
    group: Any = None,
) -> Any:
    """Build ``rank``'s stage of ``model`` with ``torch.distributed.pipelining`` (traced with
    ``example_args``, one micro-batch), split where ``stages`` says. Returns the ``PipelineStage`` to
    hand to a schedule (``ScheduleGPipe(stage, n_microbatches)``)."""
    from torch.distributed.pipelining import SplitPoint
    from torch.distributed.pipelining import pipeline as trace_pipeline

    stage_device = _stage_device(device)  # before tracing: a device this machine lacks fails fast
    split_spec = {name: SplitPoint.BEGINNING for name in stages.split_points}
    pipe = trace_pipeline(model, mb_args=example_args, split_spec=split_spec)
    if pipe.num_stages != len(stages.stages):
        raise InvalidOptionError(
            f"tracing produced {pipe.num_stages} stages for a plan of {len(stages.stages)}: the split points "
            f"{stages.split_points} must be modules called in order by the model's forward"
        )
    index = next((s.index for s in stages.stages if s.rank == rank), None)
    if index is None:
        raise InvalidOptionError(
            f"rank {rank} runs no stage of this plan (ranks: {[s.rank for s in stages.stages]})"
        )
    return pipe.build_stage(index, device=stage_device, group=group)


def _stage_device(device: object) -> torch.device:
    """The device ``pipeline`` builds a stage on: one this machine has, or :class:`UnknownDeviceError` (never
    torch's own error when the stage's weights move there)."""
    import torch

    try:
        found = torch.device(device or "cpu")  # type: ignore[call-overload]  # checked here, not by the types
    except (RuntimeError, TypeError):
        raise UnknownDeviceError(
            f"device={device!r} is not a device torch knows: pass e.g. 'cuda:0', torch.device('xpu', 1) or 'cpu'"
        ) from None
    if absent_devices([found]):
        raise UnknownDeviceError(
            f"device={device!r}: this machine lacks it (it has {accelerator_count()} GPU(s)); build each stage "
            "on the host that has its GPU (rank -> device), or on 'cpu'"
        )
    return found
