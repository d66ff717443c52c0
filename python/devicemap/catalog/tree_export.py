"""A bundled model's shape as data: what :mod:`devicemap.catalog.trees` loads without torch.

The command plans a catalog model from a small data file per model (``trees/<name>.json.gz``) instead of
building it with transformers on the meta device, which costs importing torch and transformers (seconds)
for a solve of milliseconds. This module writes those files from the models transformers builds (it needs
torch and transformers); ``scripts/export_catalog_trees.py`` runs it, and a test checks that the shipped
files are what it writes with the installed libraries.

A file holds, per node of the model's :class:`~devicemap.ModuleTree` (definition order): its local name,
parent, kind, class and whether it repeats a tensor met earlier, and per tensor its element count and dtype;
the tie groups; the float32 keeps of ``_keep_in_fp32_modules`` (per load dtype); the tree accelerate's port
sizes where its walk differs (``devicemap.compat``: ``named_children``, no declared ties, tie groups
ordered per process); and what planning a workload, balancing compute and exporting need of the model
(decoder layers, output head, config fields, FLOPs per module, declared no-split classes).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import _core
from ..inputs.dtypes import dtype_bits, memory_bits
from ..inputs.model_config import text_config
from ..sizing.compute import flops_per_token
from ..sizing.quantization import _keep_fp32_names
from ..sizing.tree import ModuleTree, declared_no_split_classes
from ..sizing.workload import decoder_layers, output_head
from . import build_meta_model, load_config
from .trees import FORMAT, STRUCTURE, full_names

if TYPE_CHECKING:
    import torch

CONFIG_FIELDS = (
    "num_attention_heads",
    "num_heads",
    "n_head",
    "num_key_value_heads",
    "num_kv_heads",
    "multi_query",
    "head_dim",
    "d_kv",
    "hidden_size",
    "d_model",
    "n_embd",
    "intermediate_size",
    "d_ff",
    "ffn_dim",
    "vocab_size",
    "is_encoder_decoder",
    "num_decoder_layers",
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "top_k",
)
"""The text-config fields the workload, compute and export formulas read (:mod:`devicemap.model_config`)."""


def shape_data(model: torch.nn.Module, config: Mapping[str, Any]) -> dict[str, Any]:
    """The data of ``model`` (a transformers model, on the meta device), built from the bundled ``config``."""
    import torch

    columns: dict[str, Any] = dict(
        zip(
            (*STRUCTURE[:5], "bits", "duplicate", "tie"),
            ModuleTree.from_module(model).core.columns(),
            strict=True,
        )
    )
    full = full_names(columns["names"], columns["parents"])
    tensors = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    dtypes: list[Any] = []
    numel, dtype_index = [], []
    for name, kind in zip(full, columns["kinds"], strict=True):
        if kind == _core.KIND_MODULE:
            numel.append(0)
            dtype_index.append(-1)
            continue
        tensor = tensors[name]
        if tensor.dtype not in dtypes:
            dtypes.append(tensor.dtype)
        numel.append(tensor.numel())
        dtype_index.append(dtypes.index(tensor.dtype))
    keep = {}
    for load in (torch.float16, torch.bfloat16):
        names = _keep_fp32_names(model, load)
        keep[_dtype_name(load)] = [i for i, name in enumerate(full) if name in names]

    # accelerate's port walks as named_children does and ties parameters only, in an order it builds per
    # process: keep its groups and parameter order, and its columns when the walk differs.
    walk = _core.ModuleWalk(model, lambda _dtype: 0, None, untie=False, like_named_children=True)
    groups, parameter_nodes = walk.parameter_groups(), walk.parameter_nodes()
    accelerate_columns: dict[str, Any] = dict(
        zip((*STRUCTURE[:5], "bits", "duplicate", "tie"), walk.build(groups).columns(), strict=True)
    )
    accelerate: dict[str, Any] = {"tie_groups": groups, "parameter_nodes": parameter_nodes}
    if any(accelerate_columns[key] != columns[key] for key in STRUCTURE):
        accelerate["nodes"] = {key: accelerate_columns[key] for key in STRUCTURE}

    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    text = text_config(model.config)
    fields = {}
    for field in CONFIG_FIELDS:
        value = getattr(text, field, None)
        if value is not None:
            if not isinstance(value, (bool, int, float, str)):
                raise TypeError(f"{type(model).__name__}'s config field {field} is {value!r}: not plain data")
            fields[field] = value
    return {
        "format": FORMAT,
        "source_config": dict(config),  # the file is used only with this config
        "model_class": type(model).__name__,
        "nodes": {key: columns[key] for key in STRUCTURE},
        "tie": columns["tie"],
        "numel": numel,
        "dtype": dtype_index,
        "dtypes": [
            {
                "name": _dtype_name(d),
                "dtype_bits": dtype_bits(d),
                "memory_bits": memory_bits(d),
                "itemsize": d.itemsize,
                "floating": d.is_floating_point,
            }
            for d in dtypes
        ],
        "keep_fp32": keep,
        "first_floating_dtype": None if floating is None else _dtype_name(floating),
        "accelerate": accelerate,
        "no_split_module_classes": declared_no_split_classes(model),
        "module_classes": sorted({type(m).__name__ for m in model.modules()}),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "decoder_layers": decoder_layers(model, model.config),
        "output_head": output_head(model),
        "config": fields,
        "flops": [list(pair) for pair in flops_per_token(model)],
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def versions() -> dict[str, str]:
    """The libraries that built the shapes (recorded in each file; not compared by the tests)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def encode(data: Mapping[str, Any]) -> bytes:
    """A data file's bytes: compact JSON, gzip without a timestamp (the same shape gives the same bytes)."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def decode(blob: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gzip.decompress(blob))
    return data


def build(name: str) -> dict[str, Any]:
    """The data of the bundled model ``name``, with the versions of the libraries that built it."""
    return {**shape_data(build_meta_model(name), load_config(name)), "generated_with": versions()}


def same_shape(one: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether two data files describe the same shape (the versions that made them aside)."""
    return {k: v for k, v in one.items() if k != "generated_with"} == {
        k: v for k, v in other.items() if k != "generated_with"
    }
