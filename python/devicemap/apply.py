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

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import _core
from .errors import CheckpointError, PlacementError
from .memory import DeviceKey, Size
from .planning import Plan, device_for, plan
from .tree import DtypeLike, to_dtype
from .workload import Workload

PlanLike = Union[Plan, Mapping[str, DeviceKey]]
MANIFEST = "devicemap-offload.json"


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


def execution_map(plan_or_map: PlanLike, rehearse: bool = False) -> dict[str, Any]:
    """The device map to hand to accelerate: GPU indices as is, or a :class:`RehearsalDevice` (the
    CPU acting as that GPU) when rehearsing."""
    device_map = dict(plan_or_map.device_map if isinstance(plan_or_map, Plan) else plan_or_map)
    if rehearse:
        stand_in = RehearsalDevice()
        return {k: stand_in if isinstance(v, int) else v for k, v in device_map.items()}
    return device_map


def _main_device(plan_or_map: PlanLike, device_map: Mapping[str, Any]) -> Any:
    """The device that executes offloaded layers: GPU 0 of the plan (where devicemap reserved the staging
    room), else the lowest GPU in the map, else the CPU."""
    gpus: list[int] = []
    if isinstance(plan_or_map, Plan):
        gpus = [u.device for u in plan_or_map.usage if isinstance(u.device, int)]
    gpus = gpus or sorted(
        d
        for d in dict(plan_or_map.device_map if isinstance(plan_or_map, Plan) else plan_or_map).values()
        if isinstance(d, int)
    )
    if not gpus:
        return "cpu"
    stand_ins = [d for d in device_map.values() if isinstance(d, RehearsalDevice)]
    return stand_ins[0] if stand_ins else min(gpus)


def dispatch(
    model: torch.nn.Module,
    plan: PlanLike,
    offload_dir: Optional[Union[str, Path]] = None,
    main_device: Optional[Union[int, str, torch.device]] = None,
    rehearse: bool = False,
    offload_buffers: bool = False,
) -> torch.nn.Module:
    """Place a model that is already in memory according to ``plan`` through accelerate's
    ``dispatch_model`` hooks, so forward and ``generate`` run across GPUs, CPU and disk.

    >>> import torch, devicemap
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    >>> p = devicemap.plan(model, max_memory={0: "1KiB", 1: "1KiB", "cpu": "1MiB"})
    >>> out = devicemap.dispatch(model, p, rehearse=True)(torch.ones(1, 8))
    >>> tuple(out.shape)
    (1, 8)
    """
    from accelerate import dispatch_model

    device_map = execution_map(plan, rehearse)
    if "disk" in device_map.values() and offload_dir is None:
        raise PlacementError(
            "the plan offloads to disk: pass offload_dir= (a folder for the offloaded weights)"
        )
    return dispatch_model(
        model,
        device_map=device_map,
        main_device=main_device if main_device is not None else _main_device(plan, device_map),
        offload_dir=str(offload_dir) if offload_dir is not None else None,
        offload_buffers=offload_buffers,
    )


def _target(device: Any) -> Any:
    return f"cuda:{device}" if isinstance(device, int) else device


class _ConvertedWriter:
    """Disk-offloaded weights that need a dtype conversion, written once into ``offload_dir``.

    Everything goes to a private temporary folder first; only when complete (manifest included) does
    it replace ``offload_dir``, so an interrupted load never leaves a folder a later load would trust.
    """

    def __init__(self, offload_dir: Optional[Union[str, Path]]):
        self.final = Path(offload_dir) if offload_dir is not None else None
        self.staging: Optional[Path] = None
        self.files: list[str] = []

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        if self.final is None:
            raise PlacementError(
                "disk-offloaded weights need a dtype conversion: pass offload_dir= to store them"
            )
        if self.staging is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.staging = self.final.parent / f".{self.final.name}.partial-{uuid.uuid4().hex[:8]}"
            self.staging.mkdir()
        name = f"converted-{len(self.files):05d}.safetensors"
        save_file(tensors, self.staging / name)
        self.files.append(name)
        return self.final / name

    def commit(self, checkpoint: str, dtype: Optional[torch.dtype]) -> None:
        if self.staging is None:
            return
        manifest = {"checkpoint": checkpoint, "dtype": str(dtype), "files": self.files}
        (self.staging / MANIFEST).write_text(json.dumps(manifest))
        assert self.final is not None
        old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def load_checkpoint(
    model: torch.nn.Module,
    checkpoint: Union[str, Path],
    plan: PlanLike,
    offload_dir: Optional[Union[str, Path]] = None,
    dtype: Optional[DtypeLike] = None,
    rehearse: bool = False,
    progress: bool = True,
    offload_buffers: bool = False,
) -> torch.nn.Module:
    """Load a safetensors checkpoint (file, sharded index, or folder) into ``model`` (best created
    under ``accelerate.init_empty_weights()``) with every weight going straight to its planned device,
    then attach the hooks. Disk-offloaded weights are read in place from the checkpoint's own files
    (memory-mapped, never rewritten); only those needing a dtype conversion are written, atomically,
    to ``offload_dir``.
    """
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from tqdm.auto import tqdm

    device_map = execution_map(plan, rehearse)
    target = to_dtype(dtype) if dtype is not None else None
    tensors = _core.checkpoint_tensors(str(checkpoint))
    expected = set(model.state_dict())
    unexpected = [name for name, *_ in tensors if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"bad checkpoint {checkpoint}: {len(unexpected)} tensors the model does not have "
            f"(e.g. {unexpected[:3]}); load it into the model it was saved from (checkpoints whose names "
            "transformers converts while loading, such as legacy MoE layouts, go through devicemap.from_pretrained)"
        )
    index: dict[str, dict[str, str]] = {}
    writer = _ConvertedWriter(offload_dir)
    by_file: dict[str, list[tuple[str, str, list[int]]]] = {}
    for name, stored, shape, file, _begin, _end in tensors:
        by_file.setdefault(file, []).append((name, stored, shape))
    try:
        with tqdm(total=len(tensors), desc="Loading weights", disable=not progress, unit="tensor") as bar:
            for file, names in by_file.items():
                converted: dict[str, torch.Tensor] = {}
                with safe_open(file, framework="pt", device="cpu") as handle:
                    for name, stored, shape in names:
                        device = device_for(name, device_map)
                        floating = stored.startswith("F") or stored == "BF16"
                        convert = target is not None and floating
                        if device == "disk":
                            if convert and handle.get_slice(name).get_dtype() != _safetensors_name(target):
                                converted[name] = handle.get_tensor(name).to(target)
                            else:
                                index[name] = {"safetensors_file": file, "weight_name": name}
                            if convert:
                                # The hooks cast streamed weights to the placeholder's dtype: make it the target.
                                placeholder = torch.empty(shape, dtype=target, device="meta")
                                set_module_tensor_to_device(
                                    model, name, "meta", value=placeholder, dtype=target
                                )
                        else:
                            value = handle.get_tensor(name)
                            set_module_tensor_to_device(
                                model, name, _target(device), value=value, dtype=target if convert else None
                            )
                        bar.update(1)
                if converted:
                    written = writer.write(converted)
                    for name in converted:
                        index[name] = {"safetensors_file": str(written), "weight_name": name}
        writer.commit(str(checkpoint), target)
    except BaseException:
        writer.abort()
        raise
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return dispatch_model(
        model,
        device_map=device_map,
        main_device=_main_device(plan, device_map),
        offload_index=index or None,
        offload_buffers=offload_buffers,
    )


def _safetensors_name(dtype: torch.dtype) -> str:
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return names.get(dtype, str(dtype))


def from_pretrained(
    path: Union[str, Path],
    model_class: Any = None,
    strategy: str = "auto",
    max_memory: Optional[Mapping[object, Size]] = None,
    workload: Optional[Workload] = None,
    dtype: Optional[DtypeLike] = None,
    offload_dir: Optional[Union[str, Path]] = None,
    pins: Optional[Mapping[str, object]] = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Plan with devicemap, then load through transformers' ``from_pretrained(device_map=...)``.

    The plan is made on a meta-device instance built from the folder's ``config.json`` (nothing
    allocated); it is kept on the returned model as ``model.devicemap_plan``. Any other keyword goes
    to transformers. Doing it yourself is two lines::

        plan = devicemap.plan(meta_model, max_memory=..., dtype="bfloat16")
        model = AutoModelForCausalLM.from_pretrained(path, device_map=plan.device_map, dtype=torch.bfloat16)
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(path))
    with init_empty_weights():
        meta = model_class.from_config(config)
    if hasattr(meta, "tie_weights"):
        meta.tie_weights()
    result = plan(meta, max_memory=max_memory, strategy=strategy, dtype=dtype, workload=workload, pins=pins)
    if "disk" in result.device_map.values():
        if offload_dir is None:
            raise PlacementError(
                "the plan offloads to disk: pass offload_dir= (a folder for offloaded weights)"
            )
        kwargs.setdefault("offload_folder", str(offload_dir))
    if dtype is not None:
        kwargs.setdefault("dtype", to_dtype(dtype))
    model = model_class.from_pretrained(str(path), device_map=result.device_map, **kwargs)
    model.devicemap_plan = result
    return model
