"""An independent check of whether a device map runs, and a small search for one that does.

Written from the model's tensors and a plan's ``device_map`` / execution map alone: nothing here reads
devicemap's byte counts, so it can judge devicemap's plans (``tests/planners/test_architecture_sweep.py``,
``benches/bench_architecture_sweep.py``).

What a plan needs on each device, as accelerate's hooks place tensors (``offload_buffers=False``):

* **resident weights**: every parameter stored on the device (a shared tensor once);
* **buffers of offloaded blocks**: a block stored on the CPU or disk keeps its buffers (persistent or not)
  on the device that executes it; buffers of a GPU-stored block live with it on the GPU;
* **staging**: a block that is streamed to its execution device (stored on disk, or stored on the CPU
  and run on a GPU) is loaded there one block at a time, with every parameter it uses, tied ones
  included (accelerate's hook fetches a tied weight under the block's own name, wherever the shared
  tensor is counted): the device needs room for the largest such block. A CPU-stored block that runs on
  the CPU is not streamed.

The model is judged as its loader holds it, whichever transformers built it: the ties transformers declares
between meta tensors made (5.0 builds them untied and ties them after loading, later 5.x at construction),
and the no-split classes its loader gathers from every sub-model (:meth:`ModelTensors.of`).

Blocks are the units accelerate and devicemap reserve staging room for: a module whose class is in
``no_split_module_classes`` or that has no child module, and, for a module with both children and
tensors of its own, each of its own tensors.

:func:`find_runnable` searches a few simple plans (accelerate's own map, everything on the CPU, a
first-fit placement in model order with staging room kept on one GPU or none) with every simple choice
of execution device, and returns one that runs, if any; :func:`weights_exceed_everything` is a proof that
none exists without a disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

OFFLOADED = ("cpu", "disk")


@dataclass
class Tensor:
    key: int  # identity: shared tensors (tied weights) have one
    bytes: int
    buffer: bool


@dataclass
class ModelTensors:
    """Every tensor of a model under every name, and its module structure."""

    tensors: dict[str, Tensor]
    # module name -> (class name, child module names, own tensor names)
    modules: dict[str, tuple[str, list[str], list[str]]]
    no_split: frozenset[str]
    order: list[str] = field(default_factory=list)  # tensor names in definition order
    _under: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: torch.nn.Module, no_split: Iterable[str] | None = None) -> ModelTensors:
        """The tensors of ``model`` as its loader holds them: a meta-device model with the ties transformers
        declares made (:func:`declared_ties`), split as transformers' loader splits it (:func:`loader_no_split`)
        unless ``no_split`` says otherwise."""
        if no_split is None:
            no_split = loader_no_split(model)
        tensors: dict[str, Tensor] = {}
        modules: dict[str, tuple[str, list[str], list[str]]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{name}." if name else ""
            own = []
            for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                for tensor_name, tensor in table.items():
                    if tensor is None:
                        continue
                    full = prefix + tensor_name
                    tensors[full] = Tensor(
                        id(tensor), tensor.numel() * tensor.element_size(), kind == "buffer"
                    )
                    own.append(full)
            children = [prefix + c for c, child in module._modules.items() if child is not None]
            modules[name] = (type(module).__name__, children, own)
        for tied, source in declared_ties(model).items():
            if tied in tensors and source in tensors and tensors[tied].key != tensors[source].key:
                untied = tensors[tied].key
                for name, tensor in tensors.items():  # every name the tied tensor has
                    if tensor.key == untied:
                        tensors[name] = Tensor(
                            tensors[source].key, tensors[source].bytes, tensors[source].buffer
                        )
        return cls(tensors, modules, frozenset(no_split), list(tensors))

    def total(self) -> int:
        """Bytes of every tensor, each shared one once."""
        return sum({t.key: t.bytes for t in self.tensors.values()}.values())

    def largest(self) -> int:
        return max((t.bytes for t in self.tensors.values()), default=0)

    def under(self, key: str) -> list[str]:
        """Tensor names inside a map key (a module or a tensor name; ``""`` is the root). Names come
        from a depth-first walk, so those under one module name are consecutive."""
        if key in self.tensors:
            return [key]
        if not key:
            return self.order
        found = self._under.get(key)
        if found is None:
            prefix = key + "."
            start = next((i for i, n in enumerate(self.order) if n.startswith(prefix)), len(self.order))
            end = start
            while end < len(self.order) and self.order[end].startswith(prefix):
                end += 1
            found = self._under[key] = self.order[start:end]
        return found

    def blocks(self, key: str) -> list[str]:
        """The staging blocks inside a map key."""
        if key in self.tensors or key not in self.modules:
            return [key]
        cls, children, own = self.modules[key]
        if cls in self.no_split or not children:
            return [key]
        found = list(own)
        for child in children:
            found.extend(self.blocks(child))
        return [b for b in found if self.under(b)]

    def staged_bytes(self, block: str) -> int:
        """What streaming the block loads at once: every parameter it uses, each shared one once."""
        return sum({t.key: t.bytes for n in self.under(block) if not (t := self.tensors[n]).buffer}.values())


def declared_ties(model: torch.nn.Module) -> dict[str, str]:
    """``{tied name: source name}`` of the ties transformers declares (``all_tied_weights_keys``) between
    meta-device tensors, which the model that runs has: transformers 5.0 builds a model with them not made
    (``from_pretrained`` makes them with ``tie_weights`` after loading), later 5.x make them at
    construction. A materialized model runs as it is in memory: no tie is added to it."""
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    found = {}
    for tied, source in dict(declared).items():
        try:
            tensors = [model.get_parameter(tied), model.get_parameter(source)]
        except AttributeError:  # a name this model (or its config) does not have
            continue
        if all(t.is_meta for t in tensors):
            found[str(tied)] = str(source)
    return found


def loader_no_split(model: torch.nn.Module) -> list[str]:
    """The module classes transformers' loader keeps whole under a ``device_map`` strategy: transformers 5.0
    gathers every sub-model's ``_no_split_modules`` in ``_get_no_split_modules`` when it plans
    (BertForMaskedLM declares none itself, its BertModel declares BertLayer), later 5.x into the model's own
    ``_no_split_modules`` at construction."""
    gather = getattr(model, "_get_no_split_modules", None)
    if callable(gather):
        try:
            return sorted(gather("auto"))
        except ValueError:  # a sub-model declares nothing: transformers refuses device maps for it
            pass
    return sorted(getattr(model, "_no_split_modules", None) or [])


def covering(name: str, device_map: Mapping[str, Any]) -> str | None:
    """The longest key of ``device_map`` that covers ``name``."""
    while True:
        if name in device_map:
            return name
        if not name:
            return None
        name = name.rpartition(".")[0]


def _same_device(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b)


def _is_gpu(device: Any) -> bool:
    return device not in OFFLOADED


@dataclass
class Loads:
    """Bytes per device by kind, and what does not fit."""

    weights: dict[Any, int]
    kept_buffers: dict[Any, int]
    staging: dict[Any, int]
    problems: list[str]

    def used(self, device: Any) -> int:
        return self.weights.get(device, 0) + self.kept_buffers.get(device, 0) + self.staging.get(device, 0)


@dataclass
class Placed:
    """A storage map laid over the tensors, ready to be judged with any execution map naming the same
    blocks: per block, where it is stored, its parameters and buffers (by identity), what it stages."""

    blocks: dict[str, tuple[Any, dict[int, int], dict[int, int]]]  # block -> (stored, params, buffers)
    weights: dict[Any, int]  # parameter bytes per storage device
    main: Any  # accelerate's main device: the first GPU in the map, or the CPU
    problems: list[str]


def place(mt: ModelTensors, device_map: Mapping[str, Any], named: Iterable[str], memory) -> Placed:
    """Each tensor under its key of ``device_map``, grouped by the block of ``named`` holding it (a
    plan's execution map names its blocks), else by the block of :meth:`ModelTensors.blocks`."""
    named = named if isinstance(named, Mapping) else dict.fromkeys(named)
    problems: list[str] = []
    blocks: dict[str, tuple[Any, dict[int, int], dict[int, int]]] = {}
    stored_on: dict[int, Any] = {}
    weights: dict[Any, dict[int, int]] = {}
    own_blocks: dict[str, dict[str, None]] = {}
    for name in mt.order:
        key = covering(name, device_map)
        if key is None:
            problems.append(f"{name} is in no key of the map")
            continue
        stored = device_map[key]
        if stored not in memory:
            problems.append(f"{key} is stored on {stored!r}, which max_memory lacks")
        block = covering(name, named)
        if block is None or not (key == "" or block == key or block.startswith(key + ".")):
            own = own_blocks.setdefault(key, dict.fromkeys(mt.blocks(key)))
            block = covering(name, own) or key
        record = blocks.setdefault(block, (stored, {}, {}))
        t = mt.tensors[name]
        (record[2] if t.buffer else record[1])[t.key] = t.bytes
        if not t.buffer:
            if stored_on.setdefault(t.key, stored) != stored:
                problems.append(f"tied tensor {name} is stored on {stored!r} and {stored_on[t.key]!r}")
            weights.setdefault(stored, {})[t.key] = t.bytes
    main = next((d for d in device_map.values() if _is_gpu(d)), "cpu")
    return Placed(blocks, {d: sum(v.values()) for d, v in weights.items()}, main, problems)


def evaluate(placed: Placed, execution: Mapping[str, Any], memory: Mapping[Any, int]) -> Loads:
    """What the placed plan keeps on each device with these execution devices, and every way it breaks
    ``memory`` (``disk`` is unbounded)."""
    problems = list(placed.problems)
    kept: dict[Any, dict[int, int]] = {}
    staging: dict[Any, int] = {}
    for block, (stored, params, buffers) in placed.blocks.items():
        runs = execution.get(block)
        if runs is None:
            runs = stored if _is_gpu(stored) else placed.main
        if _is_gpu(stored) and not _same_device(runs, stored):
            problems.append(f"{block} is stored on GPU {stored} but runs on {runs!r}")
        if runs == "disk" or runs not in memory:
            problems.append(f"{block} runs on {runs!r}, which cannot compute or max_memory lacks")
        # accelerate's hooks keep the buffers of offloaded blocks on the execution device
        kept.setdefault(runs if stored in OFFLOADED else stored, {}).update(buffers)
        if stored == "disk" or (stored == "cpu" and runs != "cpu"):
            # streamed: loaded where it runs, every parameter it uses (tied ones included) at once
            staging[runs] = max(staging.get(runs, 0), sum(params.values()))
    result = Loads(dict(placed.weights), {d: sum(v.values()) for d, v in kept.items()}, staging, [])
    for device, capacity in memory.items():
        if device != "disk" and result.used(device) > capacity:
            problems.append(
                f"{device!r} needs {result.used(device)} B (weights {result.weights.get(device, 0)}, buffers "
                f"{result.kept_buffers.get(device, 0)}, staging {result.staging.get(device, 0)}) but has {capacity}"
            )
    result.problems = list(dict.fromkeys(problems))
    return result


def loads(
    mt: ModelTensors,
    device_map: Mapping[str, Any],
    execution: Mapping[str, Any],
    memory: Mapping[Any, int],
) -> Loads:
    """What the plan keeps on each device, and every way it breaks ``memory`` (``disk`` is unbounded).

    ``execution`` maps blocks to where they compute (a plan's execution map: its keys are then the
    staging blocks). A block it does not name computes on the device storing it if that is a GPU, else
    on accelerate's main device (the first GPU in the map, or the CPU). ``kept_buffers`` are all the
    buffers each device holds: those of its own blocks and of the offloaded blocks it runs.
    """
    return evaluate(place(mt, device_map, execution, memory), execution, memory)


def runs_within(
    mt: ModelTensors, device_map: Mapping[str, Any], execution: Mapping[str, Any], memory
) -> bool:
    return not loads(mt, device_map, execution, memory).problems


# --- the search for a runnable plan -----------------------------------------------------------------


def weights_exceed_everything(mt: ModelTensors, memory: Mapping[Any, int]) -> bool:
    """Without a disk, whether the tensors exceed every device together: no plan can exist."""
    return "disk" not in memory and mt.total() > sum(memory.values())


def _streamed_blocks(mt: ModelTensors, device_map: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(block, key, staged bytes) of every block stored on the CPU or disk."""
    found = []
    for key, stored in device_map.items():
        if stored in OFFLOADED:
            found.extend((b, key, mt.staged_bytes(b)) for b in mt.blocks(key))
    return found


def execution_choices(mt: ModelTensors, device_map: Mapping[str, Any], memory) -> Iterable[dict[str, Any]]:
    """Simple execution maps for a storage map: one device runs every offloaded block (each GPU, the
    CPU), or one GPU stages the blocks up to a size and the larger ones run on the CPU."""
    blocks = _streamed_blocks(mt, device_map)
    gpus = [d for d in memory if _is_gpu(d)]
    executors = [*gpus, "cpu"] if "cpu" in memory else gpus
    for device in executors:
        yield {b: device for b, _, _ in blocks}
    if "cpu" in memory:
        for gpu in gpus:
            for limit in sorted({s for _, _, s in blocks})[:-1]:
                yield {b: gpu if s <= limit else "cpu" for b, _, s in blocks}


def _units_in_order(mt: ModelTensors) -> list[list[str]]:
    """Blocks of the whole model in order, blocks sharing a parameter joined at the first one."""
    blocks = mt.blocks("")
    unit_of: dict[int, int] = {}
    units: list[list[str]] = []
    for block in blocks:
        keys = {mt.tensors[n].key for n in mt.under(block) if not mt.tensors[n].buffer}
        joined = {unit_of[k] for k in keys if k in unit_of}
        if joined:
            target = min(joined)
            for other in sorted(joined - {target}, reverse=True):
                units[target].extend(units[other])
                units[other] = []
                for k, u in unit_of.items():
                    if u == other:
                        unit_of[k] = target
        else:
            target = len(units)
            units.append([])
        units[target].append(block)
        for k in keys:
            unit_of[k] = target
    return [u for u in units if u]


def _unit_bytes(mt: ModelTensors, unit: list[str]) -> int:
    return sum({mt.tensors[n].key: mt.tensors[n].bytes for b in unit for n in mt.under(b)}.values())


def in_order(
    mt: ModelTensors, memory: Mapping[Any, int], kept_free: Mapping[Any, int]
) -> dict[str, Any] | None:
    """The units in model order over the GPUs, then the CPU, then the disk, each device taking the
    longest run that fits (keeping ``kept_free`` bytes free): the largest prefix any model-order plan
    puts on each device, as accelerate and devicemap place layers."""
    devices = [d for d in memory if _is_gpu(d)] + [d for d in ("cpu",) if d in memory]
    room = {d: memory[d] - kept_free.get(d, 0) for d in devices}
    placed: dict[str, Any] = {}
    at = 0
    for unit in _units_in_order(mt):
        size = _unit_bytes(mt, unit)
        while at < len(devices) and room[devices[at]] < size:
            at += 1
        if at == len(devices) and "disk" not in memory:
            return None
        device = devices[at] if at < len(devices) else "disk"
        if device != "disk":
            room[device] -= size
        placed.update(dict.fromkeys(unit, device))
    return placed


def first_fit(
    mt: ModelTensors, memory: Mapping[Any, int], kept_free: Mapping[Any, int]
) -> dict[str, Any] | None:
    """Each unit (in model order) on the first GPU, then the CPU, then the disk with room for it, each
    device keeping ``kept_free`` bytes free: out of model order, packing tighter than any strategy."""
    devices = [d for d in memory if _is_gpu(d)] + [d for d in ("cpu",) if d in memory]
    room = {d: memory[d] - kept_free.get(d, 0) for d in devices}
    placed: dict[str, Any] = {}
    for unit in _units_in_order(mt):
        size = _unit_bytes(mt, unit)
        device = next((d for d in devices if room[d] >= size), "disk" if "disk" in memory else None)
        if device is None:
            return None
        if device != "disk":
            room[device] -= size
        placed.update(dict.fromkeys(unit, device))
    return placed


def candidate_maps(
    mt: ModelTensors,
    memory: Mapping[Any, int],
    accelerate_map: Mapping[str, Any] | None,
    model_order: bool = True,
):
    """Simple storage maps: accelerate's, everything on the CPU, and the model-order fill with staging
    room kept on one device (or, ``model_order=False``, the out-of-order first fit instead)."""
    if model_order:
        if accelerate_map:
            yield "accelerate's map", dict(accelerate_map)
        if "cpu" in memory:
            yield "everything on the CPU", {"": "cpu"}
    fill = in_order if model_order else first_fit
    gpus = [d for d in memory if _is_gpu(d)]
    stages = sorted({mt.staged_bytes(b) for b in mt.blocks("")}, reverse=True)[:4]
    for device in [*gpus, "cpu"]:
        for reserve in [0, *stages]:
            found = fill(mt, memory, {device: reserve})
            if found is not None:
                yield f"{fill.__name__.replace('_', ' ')} fill, {reserve} B kept free on {device!r}", found


def find_runnable(
    mt: ModelTensors,
    memory: Mapping[Any, int],
    accelerate_map: Mapping[str, Any] | None = None,
    model_order: bool = True,
) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """A runnable (name, device_map, execution) among the simple candidates, or ``None``."""
    for name, device_map in candidate_maps(mt, memory, accelerate_map, model_order):
        choices = list(execution_choices(mt, device_map, memory))
        placed = place(mt, device_map, choices[0] if choices else {}, memory)
        if placed.problems or any(w > memory.get(d, 0) for d, w in placed.weights.items() if d != "disk"):
            continue  # the weights alone do not fit: no execution device helps
        for execution in choices:
            if not evaluate(placed, execution, memory).problems:
                return name, device_map, execution
    return None


def accelerate_map(model: torch.nn.Module, memory: Mapping[Any, int], strategy: str) -> dict[str, Any] | None:
    """What accelerate's ``infer_auto_device_map`` returns for the strategy (``get_balanced_memory``
    first for the balanced ones, as transformers does), or ``None`` if it raises."""
    import logging

    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = loader_no_split(model)
    gpus = [d for d in memory if _is_gpu(d)]
    budget = dict(memory)
    quiet = logging.getLogger("accelerate.utils.modeling")  # "Device 0 is not available" on this machine
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if strategy in ("balanced", "balanced_low_0") or (strategy == "auto" and len(gpus) > 1):
                budget = get_balanced_memory(
                    model,
                    max_memory=dict(memory),
                    no_split_module_classes=no_split,
                    low_zero=strategy == "balanced_low_0",
                )
            return infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    except Exception:
        return None
    finally:
        quiet.setLevel(level)
