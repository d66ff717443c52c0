"""The front door: :func:`plan` and :func:`plan_checkpoint` check every argument once, size the input and
pick the planner (memory, quantized, speed). The only module that knows every planner."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cost.hardware import Hardware
from ..errors import InvalidOptionError
from ..inputs.arguments import check_flag, check_mapping, check_path
from ..inputs.dtypes import DtypeLike, target_bits
from ..inputs.memory import Budget, DeviceKey, MaxMemory, Size, normalize_max_memory
from ..inputs.options import Balance, Objective, PlacementOptions, Strategy
from ..plans import Plan
from ..sizing.checkpoint import (
    check_block_patterns,
    checkpoint_meta_model,
    checkpoint_runtime_memory,
    checkpoint_tree,
    find_config,
)
from ..sizing.compute import flops_per_token
from ..sizing.quantization import offload_rule, pre_quantized_modules
from ..sizing.tree import ModuleTree
from ..sizing.workload import RuntimeMemory, Workload
from ..sizing.workload import runtime_memory as workload_runtime
from .quantized import Planner, plan_quantized
from .solve import plan_tree
from .speed import plan_for_speed, speed_block_patterns

if TYPE_CHECKING:
    import torch


def _torch_module() -> type[torch.nn.Module]:
    # torch loads only when a module (not a ModuleTree) is planned
    import torch

    return torch.nn.Module


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
            within memory that keeps that workload's KV cache, activations and logits as ``workload=``
            does. Blocks are resident on a GPU or stored and run on the CPU (experts of
            mixture-of-experts layers are blocks of their own, so attention can stay on a GPU while the
            experts run on the CPU); an exact dynamic program over the block chain chooses
            (:mod:`devicemap.planners.speed`), compared with the staging plans of the memory objective.
            Needs the model (not a ModuleTree) and ``hardware``; pins hold whole blocks. With
            ``quantization_config`` blocks are sized and read as the quantizer stores them, with its
            offload rule and load headroom, as for the memory objective (bitsandbytes'
            ``llm_int8_enable_fp32_cpu_offload``: CPU blocks are counted at their unquantized size; their
            decode time is still predicted from the quantized bytes). Each offloaded block's reason says
            why: runs faster on the CPU, no room on the GPUs, streamed to a GPU, or pinned.
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
    budget = normalize_max_memory(max_memory)
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
    model, tree = _sized(model_or_tree, dtype, special_dtypes, untie, quantization_config)
    needs_model = [
        what
        for what, asked in (
            ("workload", workload is not None),
            ("balance='compute'", options.balance == "compute"),
            ("objective='speed'", options.objective == "speed"),
        )
        if asked
    ]
    if model is None and needs_model:
        raise InvalidOptionError(f"{needs_model[0]} needs the model itself (its config), not a ModuleTree")
    if options.objective == "speed" and workload is None:
        # The speed objective predicts a workload's decode, so it keeps that workload's memory too.
        workload = Workload()
    runtime = RuntimeMemory()
    if model is not None and workload is not None:
        runtime = workload_runtime(model, tree, workload, dtype)
    compute = flops_per_token(model) if model is not None and options.balance == "compute" else []
    planner: Planner | None = None
    if options.objective == "speed":
        assert model is not None and workload is not None
        speed_model, speed_workload = model, workload

        def planner(sized: ModuleTree, room: Budget) -> Plan:
            return plan_for_speed(speed_model, sized, room, options, runtime, speed_workload, hardware, dtype)

    if quantization_config is not None and model is not None:
        quantized = model

        def unquantized() -> ModuleTree:
            return ModuleTree.from_module(quantized, dtype=dtype, special_dtypes=special_dtypes, untie=untie)

        return plan_quantized(
            model, tree, budget, options, runtime, compute, quantization_config, dtype, unquantized, planner
        )
    if planner is not None:
        return planner(tree, budget)
    return plan_tree(tree, budget, options, runtime, compute)


def _sized(
    model_or_tree: Any,
    dtype: DtypeLike | None,
    special_dtypes: Mapping[str, DtypeLike] | None,
    untie: bool,
    quantization_config: Any,
) -> tuple[torch.nn.Module | None, ModuleTree]:
    """The model (None for a ModuleTree) and its size tree. A ModuleTree is planned without importing torch
    (a catalog shape's, a checkpoint's)."""
    if isinstance(model_or_tree, ModuleTree):
        if dtype is not None or special_dtypes is not None or quantization_config is not None:
            raise InvalidOptionError(
                "dtype/special_dtypes/quantization_config apply when sizing a model: pass them to "
                "ModuleTree.from_module()"
            )
        return None, model_or_tree
    if not isinstance(model_or_tree, _torch_module()):
        raise InvalidOptionError(
            f"plan() needs a torch.nn.Module (on the meta device is fine) or a devicemap.ModuleTree, "
            f"got {type(model_or_tree).__name__}"
        )
    tree = ModuleTree.from_module(
        model_or_tree,
        dtype=dtype,
        special_dtypes=special_dtypes,
        untie=untie,
        quantization_config=quantization_config,
    )
    return model_or_tree, tree


def plan_checkpoint(
    path: str | Path,
    max_memory: MaxMemory | None = None,
    *,
    strategy: Strategy = "auto",
    dtype: DtypeLike | None = None,
    pins: Mapping[str, object] | None = None,
    offload_buffers: bool = False,
    block_pattern: str | Iterable[str] | None = None,
    config: Mapping[str, Any] | None = None,
    gpu0_reserve: Size | None = None,
    workload: Workload | None = None,
    objective: Objective = "memory",
    hardware: Hardware | None = None,
    model: torch.nn.Module | None = None,
) -> Plan:
    """Plan a checkpoint too big to instantiate, reading only its safetensors headers (in Rust).

    Headers are validated as the safetensors library validates them before loading: a truncated
    file, a header length of 0, past the end or over 100 MB, a header that is not UTF-8 or not a JSON
    object, a ``__metadata__`` that is not a string-to-string map, unknown dtypes, offsets that are not
    non-negative integers, shapes overflowing 64 bits, sizes not matching shapes, tensors that overlap
    or leave a gap or unused bytes in the data section, a tensor listed twice with different entries,
    tensor names that cannot be module paths (``"a..b"``, ``".a"``, ``""``), index shards that are
    missing or outside the index's folder (absolute, or ``..`` leaving it) each raise
    :class:`devicemap.CheckpointError` naming the file and the fault.

    A ``workload`` plans each decoder layer's KV cache with it (as :func:`devicemap.plan` does), sized
    from the ``config.json``; it needs one. Every entry of the decoder layer list gets one, extra
    layers past ``num_hidden_layers`` included (so the plan also holds for engines that run them).

    >>> import devicemap, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({f"layers.{i}.weight": torch.zeros(256, 256) for i in range(4)}, f"{folder}/model.safetensors")
    >>> devicemap.plan_checkpoint(folder, max_memory={0: "600KiB", 1: "600KiB"}, block_pattern="layers.*").device_map
    {'layers.0': 0, 'layers.1': 0, 'layers.2': 1, 'layers.3': 1}

    ``objective="speed"`` with ``hardware`` plans for the least predicted decode time as
    :func:`devicemap.plan` does, with every block's bytes as the headers store them, so a pre-quantized
    checkpoint (GPTQ, AWQ, FP8, bitsandbytes, ...) is read, streamed and placed at its stored width. The
    compute of each block comes from ``model`` (default: built on the meta device from the
    ``config.json``, which needs transformers); the headers are cut into the speed objective's blocks
    (a mixture-of-experts layer's routed experts apart from its attention) by the model's module names.
    """
    options = PlacementOptions.parse(
        strategy=strategy,
        pins=pins,
        offload_buffers=offload_buffers,
        gpu0_reserve=gpu0_reserve,
        objective=objective,
    )
    path = check_path("checkpoint path", path)
    budget = normalize_max_memory(max_memory)
    check_mapping("config", config, "{'num_hidden_layers': 32, ...} (a parsed config.json)")
    if workload is not None and not isinstance(workload, Workload):
        raise InvalidOptionError(f"workload must be a devicemap.Workload, got {workload!r}")
    if options.objective != "speed" and (hardware is not None or model is not None):
        raise InvalidOptionError(
            "hardware= and model= are used by objective='speed'; for the memory plan use plan.estimate()"
        )
    config = dict(config) if config is not None else find_config(path) or {}
    # A pre-quantized checkpoint keeps its quantizer's offload rule (bitsandbytes: no CPU/disk beside GPUs).
    quantization = config.get("quantization_config")
    rule = offload_rule(quantization, pre_quantized=True) if isinstance(quantization, Mapping) else None
    if options.objective == "speed":
        if model is None:
            model = checkpoint_meta_model(config, path)
        elif not isinstance(model, _torch_module()):
            raise InvalidOptionError(
                f"model= must be the checkpoint's torch.nn.Module (meta device is fine), got {type(model).__name__}"
            )
        patterns = [*check_block_patterns(block_pattern), *speed_block_patterns(model)]
        tree = checkpoint_tree(path, dtype=dtype, block_pattern=patterns, config=config, layer_blocks=False)
        if isinstance(quantization, Mapping):  # its kernels' fixed cost per call (the bytes are the headers')
            tree.quantized_modules = pre_quantized_modules(model, quantization)
        workload = workload if workload is not None else Workload()
        # the model's layers carry the KV cache: they are the checkpoint's names
        speed_runtime = workload_runtime(model, tree, workload, dtype)
        room = rule.usable(budget) if rule is not None else budget
        return plan_for_speed(model, tree, room, options, speed_runtime, workload, hardware, dtype)
    tree = checkpoint_tree(path, dtype=dtype, block_pattern=block_pattern, config=config)
    runtime = checkpoint_runtime_memory(tree, config, workload, dtype) if workload is not None else None
    return plan_tree(tree, budget, options, runtime, offload=rule)
