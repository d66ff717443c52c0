"""Checkpoints whose tensor names transformers converts while loading (MoE experts and the like).

transformers 5 keeps some weights in a different layout in the module than in the checkpoint: Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and many more hold each layer's experts as fused tensors
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) but save and load the per-expert names of the
published checkpoints (``block_sparse_moe.experts.0.w1.weight``, ``mlp.experts.0.gate_proj.weight``, ...),
converting on load and back on save. The tables that say how live in transformers
(``transformers.conversion_mapping.get_model_conversion_mapping``: renamings, plus converters that
stack and concatenate per-expert tensors); this module reuses them, so every model transformers knows
loads the way transformers loads it:

- a tensor that is only **renamed** (Mixtral's ``block_sparse_moe.gate`` is the module's ``mlp.gate``)
  is read as stored, so a disk-offloaded one is still streamed in place from the checkpoint's file;
- tensors a **converter** combines (the experts of one layer) are read, converted with transformers'
  own operations, and go to their planned device; on the disk they cannot be read in place, so they
  are written once into devicemap's own converted-weights folder (see :mod:`devicemap.loading.offload_folder`).

:func:`devicemap.load_checkpoint` uses this when a ``transformers.PreTrainedModel`` meets checkpoint names
it does not have; models whose names match load as stored, with no conversion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import CheckpointError, OffloadFolderError
from .offload_folder import ConvertedWeights, content_key, prepare

# (name, stored dtype, shape, file, begin, end), as devicemap._core.checkpoint_tensors gives them.
TensorEntry = tuple[str, str, list[int], str, int, int]

TRANSFORMERS_NEEDED = "5.0"


@dataclass
class FusedGroup:
    """Checkpoint tensors one transformers converter turns into one or more of the model's tensors."""

    transform: Any  # a fresh transformers WeightConverter for this group
    first: str  # the model name transformers converts the group under
    targets: tuple[str, ...]  # the model names the conversion produces
    sources: list[tuple[str, str, str]] = field(default_factory=list)  # (checkpoint name, pattern, file)


@dataclass
class Conversion:
    """How a checkpoint's tensors become a model's tensors.

    ``renamed`` maps each checkpoint name loaded as stored to its model name (often itself); ``fused``
    lists the groups a converter combines; ``unexpected`` the checkpoint names that become nothing the
    model has.
    """

    renamed: dict[str, str]
    fused: list[FusedGroup]
    unexpected: list[str]

    def model_entries(self, tensors: list[TensorEntry]) -> list[TensorEntry]:
        """The checkpoint's entries under the model's names: renamed tensors, every converted target
        (with its first source's dtype and file, shape unknown until converted), unexpected names as they
        are. For the name checks done before reading any tensor."""
        by_name = {entry[0]: entry for entry in tensors}
        entries: list[TensorEntry] = []
        for key, name in self.renamed.items():
            _, stored, shape, file, begin, end = by_name[key]
            entries.append((name, stored, shape, file, begin, end))
        for group in self.fused:
            _, stored, _, file, _, _ = by_name[group.sources[0][0]]
            entries += [(target, stored, [], file, 0, 0) for target in group.targets]
        entries += [by_name[key] for key in self.unexpected]
        return entries

    def fused_names(self) -> set[str]:
        return {target for group in self.fused for target in group.targets}


def transformers_conversion(model: torch.nn.Module, tensors: list[TensorEntry]) -> Conversion | None:
    """transformers' own conversion of ``tensors`` into ``model``'s names, or ``None`` when nothing
    needs converting (every checkpoint name is a model name) or ``model`` is not a transformers model.

    Raises :class:`CheckpointError` when the names differ and the installed transformers has no
    conversion API (transformers < 5), or names two checkpoint tensors as one model tensor.
    """
    state = model.state_dict()
    if all(name in state for name, *_ in tensors):
        return None
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    api = _conversion_api([name for name, *_ in tensors if name not in state])
    weight_mapping = api["get_model_conversion_mapping"](model)
    renamings = [entry for entry in weight_mapping if isinstance(entry, api["WeightRenaming"])]
    converters = [entry for entry in weight_mapping if isinstance(entry, api["WeightConverter"])]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    rename = api["rename_source_key"]
    prefix = model.base_model_prefix

    renamed: dict[str, str] = {}
    groups: dict[str, FusedGroup] = {}
    unexpected: list[str] = []
    for key, _stored, _shape, file, _begin, _end in sorted(
        tensors, key=lambda t: api["dot_natural_key"](t[0])
    ):
        # As transformers' convert_and_load_state_dict_in_model: renamings, then at most one converter,
        # then the base-model prefix added or removed; a name the model has is kept if renaming loses it.
        name, pattern = rename(key, renamings, converters, prefix, state)
        if name not in state and key in state:
            name, pattern = rename(key, [], [], prefix, state)  # positional: 5.0 names it prefix
        if name not in state:
            unexpected.append(key)
        elif pattern is None:
            renamed[key] = name
        else:
            group = groups.get(name)
            if group is None:
                transform = deepcopy(by_pattern[pattern])
                first_target = transform.target_patterns[0]
                targets = tuple(name.replace(first_target, t) for t in transform.target_patterns)
                group = groups[name] = FusedGroup(transform, name, targets)
            group.sources.append((key, pattern, file))
    produced: dict[str, list[str]] = {}
    for key, name in renamed.items():
        produced.setdefault(name, []).append(key)
    for group in groups.values():
        for target in group.targets:
            produced.setdefault(target, []).append(group.sources[0][0])
    twice = {name: keys for name, keys in produced.items() if len(keys) > 1}
    if twice:
        name, keys = sorted(twice.items())[0]
        raise CheckpointError(
            f"bad checkpoint: {len(twice)} of the model's tensors are given by several checkpoint tensors "
            f"after transformers' renaming (e.g. {name!r} by {sorted(keys)}); load a checkpoint saved from "
            "this model"
        )
    return Conversion(renamed, list(groups.values()), unexpected)


def _conversion_api(foreign: list[str]) -> dict[str, Any]:
    """transformers' conversion functions, or :class:`CheckpointError` naming the version needed
    (``foreign``: the checkpoint names the model lacks, for the message)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        import transformers

        raise CheckpointError(
            f"{len(foreign)} of this checkpoint's tensor names are not the model's (e.g. {sorted(foreign)[:3]}): "
            "transformers converts such names while loading "
            f"(e.g. per-expert MoE weights into fused experts), which devicemap.load_checkpoint does with "
            f"transformers' own conversion tables: it needs transformers >= {TRANSFORMERS_NEEDED} "
            f"(installed: {transformers.__version__}); upgrade transformers "
            "(pip install -U 'transformers>=5')"
        ) from None
    return {
        "get_model_conversion_mapping": get_model_conversion_mapping,
        "WeightConverter": WeightConverter,
        "WeightRenaming": WeightRenaming,
        "dot_natural_key": dot_natural_key,
        "rename_source_key": rename_source_key,
    }


def converted_writer(
    folder: Path | None,
    checkpoint: str | Path,
    tensors: list[TensorEntry],
    target: torch.dtype | None,
    converting: set[str],
    fused_on_disk: set[str],
) -> ConvertedWeights:
    """The folder for this load's written disk weights (converted by transformers' tables, and any cast
    to ``target``), checked before any tensor is read. Its name hashes the checkpoint, the dtype, the
    written tensors and the transformers version, so a load of other content never reuses it."""
    import transformers

    if folder is None:
        raise OffloadFolderError(
            f"{len(fused_on_disk)} disk-offloaded tensors of {checkpoint} are converted from the "
            f"checkpoint's layout by transformers (e.g. {sorted(fused_on_disk)[:3]}) and cannot be "
            "streamed from its files: pass offload_dir= (devicemap writes them once to a folder of its own "
            "there), or plan them on a GPU or the CPU"
        )
    folder = prepare(folder)
    files = {entry[3] for entry in tensors}
    recipe = f"{target}; converted by transformers {transformers.__version__}"
    return ConvertedWeights(folder, content_key(checkpoint, files, recipe, converting), converting)


def open_safetensors(file: str) -> AbstractContextManager[Any]:
    """``safetensors.safe_open(file)`` reading tensors to the CPU, as the context manager it is at run
    time in every supported safetensors; the type stubs of safetensors 0.4 do not declare it one."""
    from safetensors import safe_open

    return cast("AbstractContextManager[Any]", safe_open(file, framework="pt", device="cpu"))


def convert_groups(
    groups: list[FusedGroup], model: torch.nn.Module, skip: set[str]
) -> Iterator[tuple[FusedGroup, dict[str, torch.Tensor]]]:
    """Read and convert each group not wholly in ``skip`` (model names already available), yielding
    ``(group, {model name: tensor})`` on the CPU, one group at a time."""
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        for group in groups:
            if set(group.targets) <= skip:
                yield group, {}
                continue
            for key, pattern, file in group.sources:
                if file not in handles:
                    handles[file] = stack.enter_context(open_safetensors(file))
                group.transform.add_tensor(group.first, key, pattern, handles[file].get_tensor(key))
            try:
                values = group.transform.convert(
                    group.first, model=model, config=getattr(model, "config", None)
                )
                if isinstance(values, tuple):
                    # transformers 5.0 returns (tensors, conversion errors); the errors are None unless a
                    # dict to collect them is passed in: without one, a failing conversion raises.
                    values = values[0]
            except Exception as error:
                raise CheckpointError(
                    f"bad checkpoint: transformers' conversion of {len(group.sources)} tensors "
                    f"(e.g. {group.sources[0][0]!r}) into {group.first!r} failed: {error}"
                ) from error
            yield group, _checked(group, values)


def _checked(group: FusedGroup, values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    result = {name: value[0] if isinstance(value, list) else value for name, value in values.items()}
    if set(result) != set(group.targets):
        raise CheckpointError(
            f"bad checkpoint: transformers converted {group.first!r} into {sorted(result)}, "
            f"not the expected {sorted(group.targets)}"
        )
    return result
