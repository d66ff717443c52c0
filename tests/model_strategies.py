"""Hypothesis strategies for random nested torch modules: widths, depths, dtypes, buffers (persistent
or not), tied parameters and no-split classes. Shared by the compatibility and invariant tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

CLASS_NAMES = ("Block", "Attention", "MLP", "Wrapper", "Norm")
_CLASSES = {name: type(name, (torch.nn.Module,), {}) for name in CLASS_NAMES}
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BUFFER_DTYPES = (torch.float32, torch.int64, torch.bool, torch.float16)


@dataclass
class ModuleSpec:
    cls: str
    params: list[tuple[int, torch.dtype]] = field(default_factory=list)
    buffers: list[tuple[int, torch.dtype, bool]] = field(default_factory=list)
    children: list[tuple[str, ModuleSpec]] = field(default_factory=list)


@st.composite
def module_specs(draw: st.DrawFn, depth: int = 0, max_depth: int = 3) -> ModuleSpec:
    spec = ModuleSpec(cls=draw(st.sampled_from(CLASS_NAMES)))
    for _ in range(draw(st.integers(0, 2))):
        spec.params.append((draw(st.integers(0, 300)), draw(st.sampled_from(PARAM_DTYPES))))
    for _ in range(draw(st.integers(0, 1 if depth else 2))):
        spec.buffers.append(
            (draw(st.integers(0, 100)), draw(st.sampled_from(BUFFER_DTYPES)), draw(st.booleans()))
        )
    if depth < max_depth:
        numeric = draw(st.booleans())  # ModuleList-style names exercise accelerate's substring matching
        count = draw(st.integers(0, 4 if depth else 5))
        for i in range(count):
            name = str(i) if numeric else f"layer{i}"
            spec.children.append((name, draw(module_specs(depth=depth + 1, max_depth=max_depth))))
    return spec


def build(spec: ModuleSpec) -> torch.nn.Module:
    module = _CLASSES[spec.cls]()
    for i, (numel, dtype) in enumerate(spec.params):
        module.register_parameter(
            f"w{i}", torch.nn.Parameter(torch.zeros(numel, dtype=dtype), requires_grad=False)
        )
    for i, (numel, dtype, persistent) in enumerate(spec.buffers):
        module.register_buffer(f"buf{i}", torch.zeros(numel, dtype=dtype), persistent=persistent)
    for name, child in spec.children:
        module.add_module(name, build(child))
    return module


@st.composite
def models(draw: st.DrawFn, max_ties: int = 2) -> torch.nn.Module:
    """A random model; some parameters tied to earlier ones (one storage under two names)."""
    model = build(draw(module_specs()))
    slots = [
        (owner, name)
        for owner in model.modules()
        for name in list(owner._parameters)
        if owner._parameters[name] is not None
    ]
    if len(slots) >= 2:
        for _ in range(draw(st.integers(0, max_ties))):
            src = draw(st.integers(0, len(slots) - 1))
            dst = draw(st.integers(0, len(slots) - 1))
            (src_owner, src_name), (dst_owner, dst_name) = slots[src], slots[dst]
            if src_owner is dst_owner:
                continue
            setattr(dst_owner, dst_name, src_owner._parameters[src_name])
    return model


def model_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@st.composite
def max_memories(draw: st.DrawFn, model: torch.nn.Module, allow_disk: bool = True) -> dict:
    """GPUs sized around the model (from far too small to roomy), maybe a CPU, maybe disk."""
    total = max(model_bytes(model), 1)
    memory: dict = {}
    gpus = draw(st.integers(0, 4))
    for g in range(gpus):
        memory[g] = draw(st.integers(0, int(total * 1.3 / max(gpus, 1)) + 8))
    if draw(st.booleans()) or not gpus:
        memory["cpu"] = draw(st.integers(0, int(total * 1.2) + 8))
    if allow_disk and draw(st.booleans()):
        memory["disk"] = 0
    return memory


no_split_classes = st.lists(st.sampled_from(CLASS_NAMES), max_size=2, unique=True)


def describe(model: torch.nn.Module) -> str:
    """Every tensor name (tied ones repeated) with shape, dtype and storage identity, for failure reports."""
    lines = [
        f"param {n} {tuple(p.shape)} {p.dtype} id={id(p)}"
        for n, p in model.named_parameters(remove_duplicate=False)
    ]
    lines += [
        f"buffer {n} {tuple(b.shape)} {b.dtype}" for n, b in model.named_buffers(remove_duplicate=False)
    ]
    return "\n".join(lines)
