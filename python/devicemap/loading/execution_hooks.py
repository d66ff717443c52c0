"""accelerate's hooks with an execution device per block.

accelerate's ``dispatch_model`` runs every CPU- or disk-stored module on one ``main_device``. A devicemap
plan may run offloaded blocks elsewhere: staged on a GPU other than 0 (where the planner kept the staging
room), or on the CPU itself (a block no GPU can stage, or one that is faster there): then its weights stay
in CPU memory, are not streamed anywhere, and only activations move. This module attaches accelerate's
own ``AlignDevicesHook``s (through ``attach_align_device_hook_on_blocks``) with those per-block execution
devices and offload flags; the weights map, tied-parameter map and re-tying follow ``dispatch_model``.

The device map is first refined so that every key has a single execution device: a key covering blocks
that run on different devices is replaced by its blocks (each with the key's storage device).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..inputs.memory import accelerator_type
from .offload_writer import write_offloaded

if TYPE_CHECKING:
    import torch

_OFFLOADED = ("cpu", "disk")


def by_execution(
    device_map: Mapping[str, Any], execution: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``device_map`` refined so each key has one execution device, and that device per key.

    ``execution`` maps every block (the finest placed piece) to the device that computes it.

    >>> by_execution({"layers": "cpu", "head": 0}, {"layers.0": 0, "layers.1": "cpu", "head": 0})
    ({'layers.0': 'cpu', 'layers.1': 'cpu', 'head': 0}, {'layers.0': 0, 'layers.1': 'cpu', 'head': 0})
    """
    refined: dict[str, Any] = {}
    runs_on: dict[str, Any] = {}
    for key, stored in device_map.items():
        inside = [b for b in execution if key == "" or b == key or b.startswith(key + ".")]
        devices = {_same(execution[b]) for b in inside}
        if len(devices) <= 1:
            refined[key] = stored
            runs_on[key] = execution[inside[0]] if inside else stored
        else:
            for block in inside:
                refined[block] = stored
                runs_on[block] = execution[block]
    return refined, runs_on


def _same(device: Any) -> Any:
    return ("stand-in", str(device)) if type(device) is not str and isinstance(device, str) else device


def attach_execution_hooks(
    model: torch.nn.Module,
    device_map: Mapping[str, Any],
    execution: Mapping[str, Any],
    *,
    offload_dir: str | None = None,
    offload_index: dict[str, Any] | None = None,
    offload_buffers: bool = False,
) -> torch.nn.Module:
    """Place ``model`` by ``device_map`` (storage) with each block computing on ``execution[block]``.

    A block stored on the CPU that also runs there keeps its weights in memory (no offload hook); one
    stored on the CPU or disk that runs on a GPU streams its weights there per forward, as accelerate
    does; one stored on disk that runs on the CPU streams them into CPU memory.
    """
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import (
        OffloadedWeightsLoader,
        find_tied_parameters,
        retie_parameters,
    )

    refined, runs_on = by_execution(device_map, execution)
    # Streamed per forward: disk-stored blocks, and CPU-stored ones that run on a GPU.
    offload = {
        key: stored == "disk" or (stored == "cpu" and not _is_cpu(runs_on[key]))
        for key, stored in refined.items()
    }
    streamed_from_cpu = [key for key, stored in refined.items() if stored == "cpu" and offload[key]]
    on_disk = [key for key, stored in refined.items() if stored == "disk"]
    state_dict = _tensors_under(model.state_dict(), streamed_from_cpu) if streamed_from_cpu else None
    if on_disk and offload_index is None:
        if offload_dir is None:
            raise ValueError("disk-stored blocks need an offload folder")  # callers check this first
        write_offloaded(Path(offload_dir), _tensors_under(model.state_dict(), on_disk))
    weights_map = None
    if state_dict is not None or on_disk:
        weights_map = OffloadedWeightsLoader(
            state_dict=state_dict,
            save_folder=offload_dir if offload_index is None else None,
            index=offload_index,
        )
    tied = find_tied_parameters(model)
    tied_map: dict[int, dict[Any, Any]] = {}
    for group in tied:
        for name in group:
            tensor = model.get_parameter(name)
            if tensor.device.type != "meta":
                tied_map[tensor.data_ptr()] = {}
    execution_device = {key: _torch_device(device) for key, device in runs_on.items()}
    execution_device.setdefault("", next(iter(execution_device.values()), "cpu"))
    attach_align_device_hook_on_blocks(
        model,
        execution_device=execution_device,
        offload=offload,
        offload_buffers=offload_buffers,
        weights_map=weights_map,
        tied_params_map=tied_map,
    )
    retie_parameters(model, tied)
    model.hf_device_map = dict(device_map)  # type: ignore[assignment]
    return model


def _tensors_under(state_dict: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` inside any of ``keys`` (accelerate's ``extract_submodules_state_dict``
    finds nothing for the root key ``""``, which a plan storing every block on one device has)."""
    return {
        name: tensor
        for name, tensor in state_dict.items()
        if any(key == "" or name == key or name.startswith(key + ".") for key in keys)
    }


def _is_cpu(device: Any) -> bool:
    """Whether a block runs on the CPU itself (a stand-in GPU of a rehearsal is not the CPU)."""
    return type(device) is str and device == "cpu"


def _torch_device(device: Any) -> Any:
    if isinstance(device, int):
        return f"{accelerator_type()}:{device}"
    return device
