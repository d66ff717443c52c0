"""A plan's split in other engines' terms: vLLM pipeline partitions, llama.cpp's tensor split,
DeepSpeed pipeline stage boundaries, torch.distributed.pipelining split points.

Each exporter counts the model's decoder layers on every GPU, in order (GPU i is pipeline stage i).

    >>> from devicemap import catalog, plan
    >>> model = catalog.build_meta_model("llama-3-8b")
    >>> p = plan(model, max_memory={0: "8GiB", 1: "8GiB"}, dtype="bfloat16")
    >>> print(to_vllm(p, model))
    export VLLM_PP_LAYER_PARTITION="16,16"
    vllm serve <model> --pipeline-parallel-size 2
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..catalog.trees import CatalogShape
from ..errors import PlacementError
from ..inputs.memory import DeviceKey
from ..inputs.module_names import device_for
from ..plans import Plan
from ..sizing.workload import decoder_layers

if TYPE_CHECKING:
    import torch

TARGETS = ("vllm", "llama.cpp", "deepspeed", "pipelining")


def _decoder_layers(model: torch.nn.Module) -> list[str]:
    if isinstance(model, CatalogShape):  # a bundled model as data: its layers are listed
        return list(model.decoder_layer_names)
    return decoder_layers(model, getattr(model, "config", None) or _no_config(model))


def layer_devices(plan: Plan, model: torch.nn.Module) -> list[tuple[str, DeviceKey]]:
    """Every decoder layer and the device it is planned on, in model order."""
    layers = _decoder_layers(model)
    if not layers:
        raise PlacementError(f"cannot find the decoder layers of {type(model).__name__} to export a split")
    return [(name, _layer_device(name, plan.device_map)) for name in layers]


def _keys_inside(name: str, device_map: dict[str, DeviceKey]) -> list[str]:
    return [key for key in device_map if key.startswith(name + ".")]


def _is_expert_key(key: str) -> bool:
    """A routed-experts block (the speed objective opens MoE layers so experts are blocks of their own)."""
    parts = key.split(".")
    return any("expert" in p.lower() and "shared" not in p.lower() for p in parts)


def _layer_device(name: str, device_map: dict[str, DeviceKey]) -> DeviceKey:
    """Where a decoder layer runs: its own entry, or, for a layer split into parts (attention and routed
    experts apart), the device of its parts other than the routed experts."""
    inside = _keys_inside(name, device_map)
    if not inside:
        return device_for(name, device_map)
    dense = [key for key in inside if not _is_expert_key(key)] or inside
    return device_map[dense[0]]


def cpu_expert_layers(plan: Plan, model: torch.nn.Module) -> list[int]:
    """Indices of the decoder layers whose routed experts the plan keeps off the GPUs."""
    layers = _decoder_layers(model)
    found = []
    for index, name in enumerate(layers):
        experts = [key for key in _keys_inside(name, plan.device_map) if _is_expert_key(key)]
        if experts and all(not isinstance(plan.device_map[key], int) for key in experts):
            found.append(index)
    return found


def _no_config(model: torch.nn.Module) -> object:
    raise PlacementError(f"{type(model).__name__} has no config; exports need a transformers model")


def gpu_stages(
    plan: Plan, model: torch.nn.Module, allow_offload: bool = False
) -> list[tuple[DeviceKey, list[str]]]:
    """Consecutive decoder layers per GPU, in GPU order. Raises if layers sit on CPU/disk (unless allowed)."""
    stages: dict[DeviceKey, list[str]] = {u.device: [] for u in plan.usage if isinstance(u.device, int)}
    offloaded = []
    for name, device in layer_devices(plan, model):
        if isinstance(device, int):
            stages[device].append(name)
        else:
            offloaded.append(name)
    if not allow_offload and cpu_expert_layers(plan, model):
        raise PlacementError(
            f"the plan keeps the routed experts of {len(cpu_expert_layers(plan, model))} layers on the CPU "
            "(objective='speed'); pipeline engines need every layer whole on a GPU: export to llama.cpp "
            "(--n-cpu-moe / -ot), or plan with objective='memory'"
        )
    if offloaded and not allow_offload:
        raise PlacementError(
            f"the plan keeps {len(offloaded)} decoder layers off the GPUs (from {offloaded[0]}); pipeline "
            "engines need every layer on a GPU: add GPUs or memory, or export to llama.cpp"
        )
    _check_one_run_per_gpu(plan, model)
    return [(device, layers) for device, layers in stages.items() if layers]


def _check_one_run_per_gpu(plan: Plan, model: torch.nn.Module) -> None:
    """Engines give stage i the next run of layers: each GPU's layers must be one run, in GPU order (a pin
    can put a layer on another GPU between them, which no layer-count export can express)."""
    order = [u.device for u in plan.usage if isinstance(u.device, int)]
    previous: tuple[int, str] | None = None
    for name, device in layer_devices(plan, model):
        if not isinstance(device, int):
            continue
        if previous is not None and order.index(device) < order.index(previous[0]):
            raise PlacementError(
                f"{name} is on GPU {device} but comes after {previous[1]} on GPU {previous[0]}: engines run "
                "each GPU's layers as one stage in GPU order, so this split (made by pins or ties) cannot be "
                "exported; drop the pins that break the layer order, or export to another target"
            )
        previous = (device, name)


def to_vllm(plan: Plan, model: torch.nn.Module) -> str:
    """vLLM's uneven pipeline partition (``VLLM_PP_LAYER_PARTITION``) and the matching serve flag."""
    counts = [len(layers) for _, layers in gpu_stages(plan, model)]
    return (
        f'export VLLM_PP_LAYER_PARTITION="{",".join(map(str, counts))}"\n'
        f"vllm serve <model> --pipeline-parallel-size {len(counts)}"
    )


def to_llama_cpp(plan: Plan, model: torch.nn.Module) -> str:
    r"""llama.cpp flags: layers on GPUs (``--n-gpu-layers``), their proportions (``--tensor-split``), and
    routed experts kept and run on the CPU while the rest of their layer is on a GPU (what
    ``objective="speed"`` chooses for MoE models): ``--n-cpu-moe N`` when they are the first N layers'
    experts, else an ``-ot`` override naming the layers (llama.cpp's ``blk.N.ffn_*_exps`` tensors).

    llama.cpp keeps the *first* layers on the CPU when only part fits; the counts carry over. In a plan
    that splits layers (experts apart), whole layers off the GPUs other than the first ones (a speed plan
    may keep a layer's attention on the CPU to leave room for experts that save more) are named by an
    ``-ot "blk\.(i|j)\.=CPU"`` override, with every layer counted on the GPUs."""
    stages = gpu_stages(plan, model, allow_offload=True)
    counts = [len(layers) for _, layers in stages]
    on_cpu = cpu_expert_layers(plan, model)
    layers = layer_devices(plan, model)
    off_gpu = [i for i, (_, device) in enumerate(layers) if not isinstance(device, int)]
    named = bool(on_cpu) and off_gpu != list(range(len(off_gpu)))
    flags = f"--n-gpu-layers {len(layers) if named else sum(counts)}"
    if len(counts) > 1:
        flags += f" --split-mode layer --tensor-split {','.join(map(str, counts))}"
    if named:
        flags += f' -ot "blk\\.({"|".join(map(str, off_gpu))})\\.=CPU"'

    if on_cpu and on_cpu == list(range(len(on_cpu))):
        flags += f" --n-cpu-moe {len(on_cpu)}"
    elif on_cpu:
        flags += f' -ot "blk\\.({"|".join(map(str, on_cpu))})\\.ffn_.*_exps\\.=CPU"'
    return flags


def to_deepspeed(plan: Plan, model: torch.nn.Module) -> str:
    """DeepSpeed pipeline stage boundaries (``PipelineModule.parts`` convention: stage i holds layers
    ``parts[i]`` to ``parts[i+1] - 1``)."""
    counts = [len(layers) for _, layers in gpu_stages(plan, model)]
    parts = [0]
    for c in counts:
        parts.append(parts[-1] + c)
    return (
        f"num_stages = {len(counts)}\n"
        f"parts = {parts}  # stage i runs decoder layers parts[i] .. parts[i+1]-1 "
        "(set PipelineModule.parts / override _partition_layers)"
    )


def to_pipelining(plan: Plan, model: torch.nn.Module) -> str:
    """``torch.distributed.pipelining`` split points: a stage begins at the first layer of each GPU."""
    stages = gpu_stages(plan, model)
    lines = ["from torch.distributed.pipelining import SplitPoint, pipeline", "", "split_spec = {"]
    for _, layers in stages[1:]:
        lines.append(f'    "{layers[0]}": SplitPoint.BEGINNING,')
    lines.append("}")
    return "\n".join(lines)


EXPORTERS: dict[str, Callable[[Plan, torch.nn.Module], str]] = {
    "vllm": to_vllm,
    "llama.cpp": to_llama_cpp,
    "deepspeed": to_deepspeed,
    "pipelining": to_pipelining,
}


def export(plan: Plan, model: torch.nn.Module, target: str) -> str:
    """The split for ``target`` (one of :data:`TARGETS`)."""
    if target not in EXPORTERS:
        raise PlacementError(f"unknown export target {target!r}: use one of {', '.join(TARGETS)}")
    return EXPORTERS[target](plan, model)
