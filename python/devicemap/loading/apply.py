"""Make a plan real: attach accelerate's hooks, load checkpoints straight to their planned devices,
load through transformers, and rehearse multi-GPU plans on the CPU.

    model = devicemap.dispatch(model, plan)                          # a model already in memory
    model = devicemap.load_checkpoint(empty_model, "ckpt/", plan, offload_dir="offload/")
    model = devicemap.from_pretrained("ckpt/", max_memory={0: "24GiB", 1: "24GiB", "cpu": "64GiB"})

**Rehearsal.** ``rehearse=True`` runs a plan that names GPUs on a machine without them: every GPU index
becomes the CPU, but layers keep the hooks they would have on GPUs (GPU-placed layers are resident,
CPU- and disk-offloaded layers are streamed in by offload hooks), so a 4-GPU plan can be checked end
to end before renting GPUs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _core
from ..errors import CheckpointError, InvalidOptionError, OffloadFolderError, UnknownDeviceError
from ..inputs.arguments import check_flag, check_path
from ..inputs.dtypes import DtypeLike, to_dtype
from ..inputs.memory import (
    DeviceKey,
    MaxMemory,
    absent_devices,
    accelerator_count,
    accelerator_type,
    check_devices_present,
    device_key,
)
from ..inputs.module_names import device_for
from ..inputs.options import Strategy
from ..planners.api import plan, plan_checkpoint
from ..plans import Plan
from ..sizing.quantization import check_quantizer_runs
from ..sizing.workload import Workload
from .checkpoint_conversion import (
    convert_groups,
    converted_writer,
    open_safetensors,
    transformers_conversion,
)
from .execution_hooks import attach_execution_hooks
from .offload_folder import (
    ConvertedWeights,
    content_key,
    owned_by_result,
    prepare,
    refuse_non_folder,
    session_folder,
)
from .offload_writer import write_offloaded
from .prefill_streaming import attach_prefill_streaming

PlanLike = Plan | Mapping[str, DeviceKey]

ABSENT_DEVICE_HINT = "run it where the GPUs are, or pass rehearse=True to run the plan on the CPU"
"""What :func:`dispatch`, :func:`load_checkpoint` and :func:`from_pretrained` suggest for a plan naming a GPU
this machine lacks."""


class RehearsalDevice(str):
    """The CPU standing in for a GPU during a rehearsal.

    accelerate decides what is offloaded by comparing device names with ``"cpu"``. This name *is*
    ``"cpu"`` to torch and safetensors (tensors really live on the CPU) but never equals ``"cpu"`` in
    those comparisons, so a layer planned on a GPU keeps the hooks it would have there (resident,
    executing in place) while CPU- and disk-offloaded layers keep their offload hooks.
    """

    def __new__(cls) -> RehearsalDevice:
        return super().__new__(cls, "cpu")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RehearsalDevice)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, RehearsalDevice)

    __hash__ = str.__hash__

    def __repr__(self) -> str:
        return "RehearsalDevice('cpu')"


def dispatch_map(plan_or_map: PlanLike, rehearse: bool = False) -> dict[str, Any]:
    """The device map to hand to accelerate's ``dispatch_model``: where each block is stored, GPU indices as
    is, or a :class:`RehearsalDevice` (the CPU acting as that GPU) when rehearsing. (Where each block
    computes is ``Plan.execution_map``.)

    >>> dispatch_map({"model.layers.0": "cuda:0", "lm_head": "cpu"}, rehearse=True)["lm_head"]
    'cpu'
    """
    check_flag("rehearse", rehearse)
    if isinstance(plan_or_map, Plan):
        if not rehearse:  # the devices that run offloaded blocks must exist too, not only those storing them
            check_devices_present(plan_or_map.execution_map, ABSENT_DEVICE_HINT)
        return dispatch_map(plan_or_map.device_map, rehearse)
    if not isinstance(plan_or_map, Mapping):
        raise InvalidOptionError(
            f"plan must be a devicemap.Plan or a device map like {{'model.layers.0': 0, ...}}, got {plan_or_map!r}"
        )
    device_map: dict[str, Any] = {}
    for name, device in plan_or_map.items():
        if not isinstance(name, str):
            raise InvalidOptionError(f"device map key {name!r} must be a module name string, e.g. 'lm_head'")
        device_map[name] = device_key(
            device
        )  # 0, "cuda:0", torch.device("cuda", 0) -> 0; or UnknownDeviceError
    _check_disjoint(device_map)
    if not rehearse:
        check_devices_present(device_map, ABSENT_DEVICE_HINT)
        return device_map
    stand_in = RehearsalDevice()
    return {k: stand_in if isinstance(v, int) or v == "mps" else v for k, v in device_map.items()}


def execution_map(plan_or_map: PlanLike, rehearse: bool = False) -> dict[str, Any]:
    """Deprecated name of :func:`dispatch_map` (it read like ``Plan.execution_map``, which says where each
    block computes, while this returns where each is stored, for accelerate)."""
    warnings.warn(
        "devicemap.execution_map() is now devicemap.dispatch_map(): the same storage map for accelerate "
        "(Plan.execution_map is where each block computes)",
        DeprecationWarning,
        stacklevel=2,
    )
    return dispatch_map(plan_or_map, rehearse)


def _check_disjoint(device_map: Mapping[str, Any]) -> None:
    """No key lies inside another: accelerate gives such nested entries inconsistent hooks."""
    for name in device_map:
        parts = name.split(".") if name else []
        for depth in range(len(parts)):
            outer = ".".join(parts[:depth])
            if outer in device_map:
                raise InvalidOptionError(
                    f"device map keys {outer!r} and {name!r} overlap ({name!r} lies inside {outer!r}): give "
                    "each module one device, e.g. the map of a devicemap plan"
                )


def _main_device(plan_or_map: PlanLike, device_map: Mapping[str, Any], rehearse: bool = False) -> Any:
    """The device that executes offloaded layers when one device runs them all: the plan's stager (GPU 0
    unless the planner chose another), else the lowest GPU in the map, else the CPU. In a rehearsal a
    GPU is the stand-in CPU device, also when the map itself names no GPU (every block offloaded)."""
    gpus: list[int] = []
    if isinstance(plan_or_map, Plan):
        stagers = _offloaded_executors(plan_or_map)
        if len(stagers) == 1 and isinstance(next(iter(stagers)), int):
            gpus = [next(iter(stagers))]
        else:
            gpus = [u.device for u in plan_or_map.usage if isinstance(u.device, int)]
    gpus = gpus or sorted(
        d
        for d in dict(plan_or_map.device_map if isinstance(plan_or_map, Plan) else plan_or_map).values()
        if isinstance(d, int)
    )
    if not gpus:
        return "cpu"
    stand_ins = [d for d in device_map.values() if isinstance(d, RehearsalDevice)]
    if stand_ins:
        return stand_ins[0]
    return RehearsalDevice() if rehearse else min(gpus)


def _with_prefill_streams(model: torch.nn.Module, plan: PlanLike, rehearse: bool) -> torch.nn.Module:
    """``model`` with the plan's CPU-run blocks streamed to their GPU for long passes (prefill)."""
    if isinstance(plan, Plan) and plan.prefill_streams:
        stand_in = RehearsalDevice()
        attach_prefill_streaming(
            model,
            plan.prefill_streams,
            lambda gpu: stand_in if rehearse else torch.device(accelerator_type(), gpu),
        )
    return model


def _offloaded_executors(plan: Plan) -> set[Any]:
    """The devices that run the plan's CPU- and disk-stored blocks."""
    return {plan.execution_map[b] for b, d in plan.assignments.items() if d in ("cpu", "disk")}


def _per_block_execution(
    plan_or_map: PlanLike, device_map: Mapping[str, Any], rehearse: bool
) -> dict[str, Any] | None:
    """Every block's execution device when accelerate's single ``main_device`` cannot express the plan
    (offloaded blocks run on the CPU, or on several GPUs), else None. In a rehearsal, GPUs are the
    stand-in CPU device, as in ``device_map``."""
    if not isinstance(plan_or_map, Plan):
        return None
    executors = _offloaded_executors(plan_or_map)
    has_gpu = any(isinstance(d, int) for d in plan_or_map.assignments.values()) or any(
        isinstance(d, int) for d in executors
    )
    # accelerate's dispatch_model attaches no hooks when every weight is on the CPU (it only moves the
    # model there): blocks the plan stages on a GPU need their own hooks then.
    all_on_cpu = all(type(d) is str and d == "cpu" for d in device_map.values())
    staged = any(isinstance(d, int) or d == "mps" for d in plan_or_map.execution_map.values())
    if len(executors) <= 1 and (not has_gpu or "cpu" not in executors) and not (all_on_cpu and staged):
        return None
    stand_ins = [d for d in device_map.values() if isinstance(d, RehearsalDevice)]
    stand_in = stand_ins[0] if stand_ins else RehearsalDevice()
    return {
        block: stand_in if rehearse and (isinstance(d, int) or d == "mps") else d
        for block, d in plan_or_map.execution_map.items()
    }


def dispatch(
    model: torch.nn.Module,
    plan: PlanLike,
    *,
    offload_dir: str | Path | None = None,
    main_device: int | str | torch.device | None = None,
    rehearse: bool = False,
    offload_buffers: bool = False,
) -> torch.nn.Module:
    """Place a model that is already in memory according to ``plan`` through accelerate's
    ``dispatch_model`` hooks, so forward and ``generate`` run across GPUs, CPU and disk.

    Disk-offloaded weights are written to a folder of this model's own inside ``offload_dir``
    (``devicemap-dispatch-<pid>-<random>/``), removed when the model is garbage-collected: a user's
    files there and other models' weights are never touched (see :mod:`devicemap.loading.offload_folder`).

    >>> import torch, devicemap
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> p = devicemap.plan(model, max_memory={0: "1KiB", 1: "1KiB", "cpu": "1MiB"})
    >>> out = devicemap.dispatch(model, p, rehearse=True)(torch.ones(1, 8))
    >>> tuple(out.shape)
    (1, 8)
    """
    from accelerate.utils import extract_submodules_state_dict

    _check_model(model)
    check_flag("offload_buffers", offload_buffers)
    device_map = dispatch_map(plan, rehearse)
    _check_covers(model, device_map)
    if main_device is not None:
        main_device = _main_device_arg(main_device, device_map, rehearse)
    folder = refuse_non_folder(_folder_arg(offload_dir)) if offload_dir is not None else None
    if "disk" not in device_map.values():
        folder = None
    elif folder is None:
        raise OffloadFolderError(
            "the plan offloads to disk: pass offload_dir= (a folder for the offloaded weights)"
        )
    else:
        # accelerate writes index.json and one file per weight straight into the folder it is given:
        # give it one of devicemap's own, so a user's files and other models' weights are never touched.
        folder = session_folder(folder, "dispatch")
    per_block = None if main_device is not None else _per_block_execution(plan, device_map, rehearse)
    if per_block is not None:  # some offloaded blocks run on the CPU, or on different GPUs
        return owned_by_result(
            folder,
            lambda: _with_prefill_streams(
                attach_execution_hooks(
                    model,
                    _without_disk_root(model, device_map),
                    per_block,
                    offload_dir=str(folder) if folder is not None else None,
                    offload_buffers=offload_buffers,
                ),
                plan,
                rehearse,
            ),
        )

    def place() -> torch.nn.Module:
        placed_map = _without_disk_root(model, device_map)
        if folder is not None:
            # Written here, not by accelerate (np.memmap: SIGBUS on a full disk); it reads index.json.
            on_disk = [name for name, device in placed_map.items() if device == "disk"]
            write_offloaded(folder, extract_submodules_state_dict(model.state_dict(), on_disk))
        return _dispatch_model(
            model,
            device_map=placed_map,
            main_device=main_device if main_device is not None else _main_device(plan, device_map, rehearse),
            offload_dir=str(folder) if folder is not None else None,
            offload_buffers=offload_buffers,
        )

    return owned_by_result(folder, place)


def _main_device_arg(main_device: object, device_map: Mapping[str, Any], rehearse: bool) -> Any:
    """``dispatch``'s ``main_device``: a device this machine has, or in a rehearsal the CPU standing in."""
    key = device_key(main_device)
    if rehearse and (isinstance(key, int) or key == "mps"):
        stand_ins = [d for d in device_map.values() if isinstance(d, RehearsalDevice)]
        return stand_ins[0] if stand_ins else RehearsalDevice()
    if absent_devices([key]):
        raise UnknownDeviceError(
            f"main_device={main_device!r} names a device this machine lacks (it has {accelerator_count()} "
            f"GPU(s)); {ABSENT_DEVICE_HINT}"
        )
    return main_device


def _dispatch_model(model: torch.nn.Module, device_map: dict[str, Any], **options: Any) -> torch.nn.Module:
    """accelerate's ``dispatch_model``. A map that is all disk needs hooks, which accelerate attaches
    for any map naming "disk" only from 1.15 (before, a single-device map raises "use the disk_offload
    function"): forced here."""
    from accelerate import dispatch_model

    if set(device_map.values()) == {"disk"}:
        options["force_hooks"] = True
    return dispatch_model(model, device_map=device_map, **options)


def _without_disk_root(model: torch.nn.Module, device_map: dict[str, Any]) -> dict[str, Any]:
    """accelerate collects a disk module's weights by the prefix ``"<name>."``, which finds nothing for
    the root ``""``: a map putting the whole model on disk names its top-level modules and tensors."""
    if device_map.get("") != "disk":
        return device_map
    names = [name for name, _ in model.named_children()]
    names += [name for name, t in [*model._parameters.items(), *model._buffers.items()] if t is not None]
    return {name: "disk" for name in names}


def _load_dtype(dtype: DtypeLike | None) -> torch.dtype | None:
    """The dtype floating weights are loaded in: a floating dtype (weights as integers need a quantizer)."""
    if dtype is None:
        return None
    target = to_dtype(dtype)
    if not target.is_floating_point:
        raise InvalidOptionError(
            f"dtype {dtype!r}: weights load in a floating dtype (e.g. 'bfloat16', 'float16', 'float32'); "
            "integer weights need a quantizer (quantization_config in transformers)"
        )
    return target


def _check_model(model: object) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_covers(model: torch.nn.Module, device_map: Mapping[str, Any]) -> None:
    """Every weight of ``model`` has a device in ``device_map`` (else accelerate fails midway)."""
    from accelerate.utils import check_device_map

    try:
        check_device_map(model, device_map)
    except ValueError as err:
        raise InvalidOptionError(f"{err}; use the plan made for this model") from None


def _folder_arg(offload_dir: object) -> Path:
    return Path(check_path("offload_dir", offload_dir))


def _target(device: Any) -> Any:
    return f"{accelerator_type()}:{device}" if isinstance(device, int) else device


def load_checkpoint(
    model: torch.nn.Module,
    checkpoint: str | Path,
    plan: PlanLike,
    *,
    offload_dir: str | Path | None = None,
    dtype: DtypeLike | None = None,
    rehearse: bool = False,
    progress: bool = True,
    offload_buffers: bool = False,
) -> torch.nn.Module:
    """Load a safetensors checkpoint (file, sharded index, or folder) into ``model`` (best created
    under ``accelerate.init_empty_weights()``) with every weight going straight to its planned device,
    then attach the hooks. Disk-offloaded weights are read in place from the checkpoint's own files
    (memory-mapped, never rewritten); only those needing a dtype conversion are written, to
    ``offload_dir/devicemap-converted-<key>/``, a folder named by a hash of its content: later loads of
    the same checkpoint and dtype reuse it, concurrent ones share it, other checkpoints get their own.
    devicemap never deletes, renames or overwrites anything in ``offload_dir`` it did not create; it
    removes the staging folders of killed loads (see :mod:`devicemap.loading.offload_folder`).

    Checkpoints whose names transformers 5 converts while loading (per-expert MoE weights that a
    Mixtral, Qwen2/3-MoE or DeepSeek-V3 module holds fused as ``experts.gate_up_proj``, and the like) are
    converted with transformers' own tables for the model (see :mod:`devicemap.loading.checkpoint_conversion`):
    renamed tensors still stream in place from the checkpoint; tensors combined by a conversion go to
    their planned device, or, planned on the disk, are written once to the ``devicemap-converted-<key>/``
    folder (so they need ``offload_dir``).

    Everything that can be checked from the checkpoint's headers is checked before any tensor is read:
    tensors the model lacks or the checkpoint lacks (:class:`CheckpointError`), and an ``offload_dir``
    missing, a file, or not writable when conversions need it (:class:`OffloadFolderError`).

    Example::

        model = devicemap.load_checkpoint(empty_model, "ckpt/", plan, offload_dir="offload/", dtype="bfloat16")
    """
    from tqdm.auto import tqdm

    _check_model(model)
    check_flag("progress", progress)
    check_flag("offload_buffers", offload_buffers)
    checkpoint = check_path("checkpoint", checkpoint)
    device_map = dispatch_map(plan, rehearse)
    target = _load_dtype(dtype)
    folder = refuse_non_folder(_folder_arg(offload_dir)) if offload_dir is not None else None
    tensors = _core.checkpoint_tensors(checkpoint)
    tie_groups = _tie_groups(model)
    # Names transformers converts while loading (e.g. per-expert MoE weights into fused experts).
    conversion = transformers_conversion(model, tensors)
    _check_names(model, checkpoint, conversion.model_entries(tensors) if conversion else tensors, tie_groups)
    source = conversion.renamed if conversion else {name: name for name, *_ in tensors}
    direct = [
        _Direct(source[key], stored, shape, file, key)
        for key, stored, shape, file, _b, _e in tensors
        if key in source
    ]
    fused = conversion.fused if conversion else []
    load = _Load(model, device_map, target)
    load.cast = {t.name for t in direct if target is not None and _floating(t.stored)}
    target_name = _safetensors_name(target) if target is not None else None
    converting = {
        t.name
        for t in direct
        if t.name in load.cast and load.device(t.name) == "disk" and t.stored != target_name
    }
    fused_disk = {name for group in fused for name in group.targets if load.device(name) == "disk"}
    if fused_disk:
        load.writer = converted_writer(
            folder, checkpoint, tensors, target, converting | fused_disk, fused_disk
        )
    else:
        load.writer = _converted_weights(folder, checkpoint, tensors, target, converting)
    load.ready = (
        load.writer.complete() if load.writer is not None else None
    )  # written by an earlier load: reuse
    try:
        with tqdm(total=len(tensors), desc="Loading weights", disable=not progress, unit="tensor") as bar:
            load.direct_tensors(direct, converting, bar.update)
            load.fused_tensors(fused, fused_disk, bar.update)
        load.commit()
    except BaseException:
        if load.writer is not None:
            load.writer.abort()
        raise
    _retie(model, tie_groups, load.index)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # type: ignore[operator]  # torch types Module.__getattr__ as Tensor | Module
    per_block = _per_block_execution(plan, device_map, rehearse)
    if per_block is not None:  # some offloaded blocks run on the CPU, or on different GPUs
        hooked = attach_execution_hooks(
            model, device_map, per_block, offload_index=load.index or None, offload_buffers=offload_buffers
        )
        return _with_prefill_streams(hooked, plan, rehearse)
    return _dispatch_model(
        model,
        device_map=device_map,
        main_device=_main_device(plan, device_map, rehearse),
        offload_index=load.index or None,
        offload_buffers=offload_buffers,
    )


@dataclass(frozen=True)
class _Direct:
    """A checkpoint tensor loaded as it is stored (perhaps renamed): the model's name, the stored dtype
    (safetensors' name), its shape, its file and its key in that file."""

    name: str
    stored: str
    shape: list[int]
    file: str
    key: str


@dataclass
class _Load:
    """One load_checkpoint in progress: weights go to their planned devices; disk weights are read in place
    from the checkpoint (``index``) or, when converted, from the ``writer``'s folder."""

    model: torch.nn.Module
    device_map: dict[str, Any]
    target: torch.dtype | None
    cast: set[str] = field(default_factory=set)
    """Floating weights converted to ``target`` on load."""
    writer: ConvertedWeights | None = None
    ready: dict[str, Path] | None = None
    """Converted weights an earlier load already wrote (reused as they are)."""
    index: dict[str, dict[str, str]] = field(default_factory=dict)
    """accelerate's offload index: where each disk weight is read from."""

    def device(self, name: str) -> Any:
        return device_for(name, self.device_map)

    def place(self, name: str, device: Any, value: torch.Tensor, cast: bool) -> None:
        from accelerate.utils import set_module_tensor_to_device

        dtype = self.target if cast else None
        set_module_tensor_to_device(self.model, name, _target(device), value=value, dtype=dtype)

    def leave_on_disk(self, name: str, shape: Sequence[int], cast: bool) -> None:
        """The model keeps a meta placeholder; the hooks cast streamed weights to its dtype, so a weight
        converted on load gets the target's."""
        if cast:
            from accelerate.utils import set_module_tensor_to_device

            placeholder = torch.empty(list(shape), dtype=self.target, device="meta")
            set_module_tensor_to_device(self.model, name, "meta", value=placeholder, dtype=self.target)

    def read_converted(self, name: str) -> None:
        assert self.ready is not None
        self.index[name] = {"safetensors_file": str(self.ready[name]), "weight_name": name}

    def write(self, batch: dict[str, torch.Tensor]) -> None:
        if batch:
            assert self.writer is not None
            self.writer.write(batch)

    def direct_tensors(
        self, direct: list[_Direct], converting: set[str], advance: Callable[[int], object]
    ) -> None:
        """Every tensor loaded as stored, one checkpoint file at a time."""
        by_file: dict[str, list[_Direct]] = {}
        for tensor in direct:
            by_file.setdefault(tensor.file, []).append(tensor)
        for file, tensors in by_file.items():
            batch: dict[str, torch.Tensor] = {}
            with open_safetensors(file) as handle:
                for t in tensors:
                    device, cast = self.device(t.name), t.name in self.cast
                    if device != "disk":
                        self.place(t.name, device, handle.get_tensor(t.key), cast)
                    elif t.name not in converting:
                        self.index[t.name] = {"safetensors_file": file, "weight_name": t.key}
                    elif self.ready is not None:
                        self.read_converted(t.name)
                    else:
                        batch[t.name] = handle.get_tensor(t.key).to(self.target)
                    if device == "disk":
                        self.leave_on_disk(t.name, t.shape, cast)
                    advance(1)
            self.write(batch)

    def fused_tensors(self, fused: list, fused_disk: set[str], advance: Callable[[int], object]) -> None:
        """Tensors transformers' conversions combine from several checkpoint tensors (fused experts)."""
        on_disk = set(self.ready or {}) & fused_disk
        for group, values in convert_groups(fused, self.model, skip=on_disk):
            batch: dict[str, torch.Tensor] = {}
            for name in group.targets:
                device = self.device(name)
                meta = _model_tensor(self.model, name)
                cast = self.target is not None and meta.is_floating_point()
                if device != "disk":
                    self.place(name, device, values[name], cast)
                    continue
                if name in on_disk:
                    self.read_converted(name)
                else:
                    batch[name] = (values[name].to(self.target) if cast else values[name]).contiguous()
                self.leave_on_disk(name, meta.shape, cast)
            self.write(batch)
            advance(len(group.sources))

    def commit(self) -> None:
        """The converted weights written by this load, renamed into place and indexed."""
        if self.writer is not None and self.ready is None:
            for name, path in self.writer.commit().items():
                self.index[name] = {"safetensors_file": str(path), "weight_name": name}


def _model_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model`` (still on the meta device before loading)."""
    owner, _, leaf = name.rpartition(".")
    tensor = getattr(model.get_submodule(owner), leaf)
    assert isinstance(tensor, torch.Tensor), name
    return tensor


def _floating(stored: str) -> bool:
    return stored.startswith("F") or stored == "BF16"


def _converted_weights(
    folder: Path | None,
    checkpoint: str | Path,
    tensors: list[tuple[str, str, list[int], str, int, int]],
    target: torch.dtype | None,
    converting: set[str],
) -> ConvertedWeights | None:
    """Where this load's converted disk weights go, checked before any tensor is read."""
    if not converting:
        return None
    if folder is None:
        raise OffloadFolderError(
            f"{len(converting)} disk-offloaded tensors of {checkpoint} need a dtype conversion to "
            f"{target} (e.g. {sorted(converting)[:3]}): pass offload_dir= (a folder to store them in), "
            "or load without dtype= to stream them from the checkpoint as stored"
        )
    folder = prepare(folder)
    files = {file for *_, file, _begin, _end in tensors}
    key = content_key(checkpoint, files, str(target), converting)
    return ConvertedWeights(folder, key, converting)


def _tie_groups(model: torch.nn.Module) -> list[set[str]]:
    """Names that share one parameter: the same object under several names, or declared tied by
    transformers (``all_tied_weights_keys``, filled by ``tie_weights()``)."""
    by_identity: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(parameter), set()).add(name)
    groups = [names for names in by_identity.values() if len(names) > 1]
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    for tied, source in dict(declared).items():
        joined = {tied, source}.union(*[g for g in groups if tied in g or source in g])
        groups = [g for g in groups if not (tied in g or source in g)] + [joined]
    return groups


def _check_names(
    model: torch.nn.Module,
    checkpoint: str | Path,
    tensors: list[tuple[str, str, list[int], str, int, int]],
    tie_groups: list[set[str]],
) -> None:
    """Refuse, before reading any tensor, a checkpoint with tensors the model lacks or lacking tensors
    the model needs (not those a tied partner fills, nor buffers that already hold values)."""
    state = model.state_dict(keep_vars=True)
    present = {name for name, *_ in tensors}
    unexpected = [name for name in present if name not in state]
    if unexpected:
        raise CheckpointError(
            f"bad checkpoint {checkpoint}: {len(unexpected)} tensors the model does not have "
            f"(e.g. {sorted(unexpected)[:3]}); load it into the model it was saved from (names transformers "
            "renames or fuses while loading, such as per-expert MoE weights, are already converted with its tables)"
        )
    filled = set().union(*[group for group in tie_groups if group & present])
    missing = [
        name
        for name, tensor in state.items()
        if name not in present and name not in filled and tensor.device.type == "meta"
    ]
    if missing:
        raise CheckpointError(
            f"bad checkpoint {checkpoint}: it lacks {len(missing)} of the model's {len(state)} tensors "
            f"(e.g. {missing[:3]}); load the complete checkpoint saved from this model, or give those "
            "tensors values before loading (they are neither stored nor tied to a stored tensor)"
        )


def _retie(model: torch.nn.Module, tie_groups: list[set[str]], index: dict[str, dict[str, str]]) -> None:
    """Loading replaces parameters one name at a time, which unties shared ones: point every name of a
    tied group at the loaded parameter (or, for disk weights, at the loaded entry of the index)."""
    for group in tie_groups:
        names = sorted(group)
        on_disk = [name for name in names if name in index]
        if on_disk:
            for name in names:
                index.setdefault(name, index[on_disk[0]])
            continue
        real = [name for name in names if model.get_parameter(name).device.type != "meta"]
        if not real:
            continue
        value = model.get_parameter(real[0])
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            current = module._parameters[leaf]  # a tie group names parameters, never None entries
            if current is not None and current.device.type == "meta":
                module._parameters[leaf] = value


def _safetensors_name(dtype: torch.dtype) -> str:
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return names.get(dtype, str(dtype))


def from_pretrained(
    path: str | Path,
    *,
    model_class: Any = None,
    strategy: Strategy = "auto",
    max_memory: MaxMemory | None = None,
    workload: Workload | None = None,
    dtype: DtypeLike | None = None,
    offload_dir: str | Path | None = None,
    pins: Mapping[str, object] | None = None,
    rehearse: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Plan with devicemap, then load through transformers' ``from_pretrained(device_map=...)``.

    The plan is made on a meta-device instance built from the folder's ``config.json`` (nothing
    allocated); it is kept on the returned model as ``model.devicemap_plan``. Any other keyword goes
    to transformers; a ``quantization_config=`` keyword also sizes the plan, as :func:`devicemap.plan` does
    with it, and a pre-quantized checkpoint (its ``config.json`` names one) is planned from its safetensors
    headers, which hold the exact stored sizes, as :func:`devicemap.plan_checkpoint` does. Weights
    transformers re-saves for the disk go to a folder of this model's own inside ``offload_dir``
    (``devicemap-transformers-<pid>-<random>/``), removed with the model; an explicit ``offload_folder=``
    keyword goes to transformers unchanged.

    transformers runs every offloaded layer on one device. When the plan runs some on the CPU (or stages
    them on another GPU), or with ``rehearse=True`` (the CPU plays the GPUs), the weights are loaded by
    :func:`load_checkpoint` instead, which attaches hooks with each block's execution device; that path
    takes no other transformers keyword (quantizers included). Doing it yourself is two lines::

        plan = devicemap.plan(meta_model, max_memory=..., dtype="bfloat16")
        model = AutoModelForCausalLM.from_pretrained(path, device_map=plan.device_map, dtype=torch.bfloat16)
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_path("path", path)
    check_flag("rehearse", rehearse)
    if "device_map" in kwargs:  # transformers would get it twice (a TypeError)
        raise InvalidOptionError(
            f"device_map={kwargs['device_map']!r}: devicemap.from_pretrained makes the device map itself; pass "
            "strategy= and max_memory= (or call transformers' from_pretrained with your own map)"
        )
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(
            f"bad checkpoint {path}: no config.json in this folder; devicemap.from_pretrained loads a local "
            "model folder (fetch one first, e.g. with huggingface_hub.snapshot_download)"
        )
    folder = refuse_non_folder(_folder_arg(offload_dir)) if offload_dir is not None else None
    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        meta = model_class.from_config(config)
    if hasattr(meta, "tie_weights"):
        meta.tie_weights()
    if getattr(config, "quantization_config", None) is not None and "quantization_config" not in kwargs:
        # Pre-quantized: the headers hold the exact stored sizes (packed weights, scales) and names.
        result = plan_checkpoint(
            path, max_memory=max_memory, strategy=strategy, dtype=dtype, workload=workload, pins=pins
        )
    else:  # a quantizer given here quantizes while loading: sized by devicemap.sizing.quantization
        result = plan(
            meta,
            max_memory=max_memory,
            strategy=strategy,
            dtype=dtype,
            workload=workload,
            pins=pins,
            quantization_config=kwargs.get("quantization_config"),
        )
    # The check dispatch and load_checkpoint make, before any weight is read: a GPU this machine lacks raises
    # UnknownDeviceError (suggesting rehearse=True) instead of torch's "Found no NVIDIA driver" mid-load.
    dispatch_map(result, rehearse)
    quantized = "quantization_config" in kwargs or getattr(config, "quantization_config", None) is not None
    quantizer = kwargs.get("quantization_config", getattr(config, "quantization_config", None))
    if quantizer is not None:
        check_quantizer_runs(quantizer, result.device_map)
    per_block = _per_block_execution(result, result.device_map, rehearse=False) is not None
    if rehearse or (per_block and not quantized and not set(kwargs) - {"dtype"}):
        if quantized or set(kwargs) - {"dtype"}:
            raise InvalidOptionError(
                f"rehearse=True loads through devicemap.load_checkpoint, which takes no transformers keywords "
                f"({', '.join(sorted(kwargs))}); drop them or rehearse without them"
            )
        with init_empty_weights():  # weights on meta; buffers (e.g. rotary tables) computed for real
            empty = model_class.from_config(config)
        loaded: Any = load_checkpoint(
            empty,
            path,
            result,
            offload_dir=offload_dir,
            dtype=dtype or kwargs.get("dtype"),
            rehearse=rehearse,
        )
        loaded.devicemap_plan = result
        return loaded
    if per_block:
        warnings.warn(
            "the plan runs some offloaded layers on the CPU or another GPU, but transformers' loader runs them "
            f"all on one device (kept for the keywords {', '.join(sorted(kwargs))}); load with "
            "devicemap.load_checkpoint to follow the plan",
            UserWarning,
            stacklevel=2,
        )
    if "disk" in result.device_map.values() and "offload_folder" not in kwargs:
        if folder is None:
            raise OffloadFolderError(
                "the plan offloads to disk: pass offload_dir= (a folder for offloaded weights)"
            )
        # transformers re-saves some weights as <name>.safetensors in the folder it is given: give it
        # one of devicemap's own, so a user's files and other models' weights are never touched.
        folder = session_folder(folder, "transformers")
        kwargs["offload_folder"] = str(folder)
    else:
        folder = None
    if dtype is not None:
        kwargs.setdefault("dtype", _load_dtype(dtype))
    model = owned_by_result(
        folder, lambda: model_class.from_pretrained(str(path), device_map=result.device_map, **kwargs)
    )
    model.devicemap_plan = result
    return model
