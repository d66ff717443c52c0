"""Bundled model shapes as data: a catalog model's size tree and what planning needs of it, without torch.

``devicemap plan llama-3-70b ...`` needs the model's module tree with sizes, not the model: each bundled
model ships as a small data file (``trees/<name>.json.gz``, written by ``scripts/export_catalog_trees.py``,
see :mod:`devicemap.catalog.tree_export`) from which :class:`CatalogShape` builds the same
:class:`~devicemap.ModuleTree` that ``ModuleTree.from_module(build_meta_model(name), dtype=...)`` exports,
in a few milliseconds and without importing torch or transformers::

    >>> from devicemap.catalog import trees
    >>> shape = trees.shape("llama-3.2-1b")
    >>> shape.tree("bfloat16").total_bytes
    2471628928
    >>> shape.decoder_layer_names[:2], shape.output_head
    (['model.layers.0', 'model.layers.1'], 'lm_head')

Sizes follow :meth:`ModuleTree.from_module`'s rules: floating tensors as if converted to ``dtype`` (never
growing), integer and bool tensors at their own width, a bool at a byte, ``_keep_in_fp32_modules`` in
float32 under float16 (``_keep_in_fp32_modules_strict`` under float16 and bfloat16), ties counted once.
:meth:`CatalogShape.accelerate_tree` sizes as accelerate does, for :mod:`devicemap.compat`'s port.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .. import _core
from ..errors import InvalidOptionError
from ..inputs import dtype_names
from ..inputs.dtypes import DtypeLike, dtype_bits, target_bits, to_dtype
from ..sizing.tree import ModuleTree, _accelerate_group_order
from ..sizing.workload import layer_runtime
from .configs import _configs

if TYPE_CHECKING:
    from ..compat.versions import AccelerateRelease
    from ..sizing.workload import RuntimeMemory, Workload

__all__ = ["CatalogShape", "available", "shape"]

FORMAT = 1
"""The layout of the data files (:mod:`devicemap.catalog.tree_export` writes it); any other is not read."""
STRUCTURE = ("names", "parents", "kinds", "classes", "class_names", "duplicate")
"""The tree columns that do not depend on a dtype (in ``_core.Tree``'s argument order; bits and ties apart)."""


class CatalogShape:
    """A bundled model as data: its size tree for any dtype, and what planning reads of the model.

    It stands in for the model where the command needs no module object: :func:`devicemap.plan`'s sizes
    (:meth:`tree`), a workload's runtime memory (:meth:`runtime`), ``balance="compute"``'s FLOPs
    (:attr:`flops`), the exports' decoder layers (:attr:`decoder_layer_names`), accelerate's map
    (:meth:`accelerate_tree`).
    """

    def __init__(self, name: str, data: dict[str, Any]):
        self.name = name
        self._data = data
        self.model_class: str = data["model_class"]
        """The transformers class the shape was exported from (``LlamaForCausalLM``)."""
        self.no_split_module_classes: list[str] = list(data["no_split_module_classes"])
        """The classes the model declares unsplittable (``declared_no_split_classes``)."""
        self.module_class_names: list[str] = list(data["module_classes"])
        """The class names of the model's modules, sorted."""
        self.parameter_count: int = data["parameter_count"]
        """Parameters, each tied storage once."""
        self.decoder_layer_names: list[str] = list(data["decoder_layers"])
        """The layers holding a KV cache (:func:`devicemap.workload.decoder_layers`)."""
        self.output_head: str | None = data["output_head"]
        """The module producing logits (:func:`devicemap.workload.output_head`)."""
        self.config = SimpleNamespace(**data["config"])
        """The fields of the model's text config the workload and export formulas read."""
        self.flops: list[tuple[str, int]] = [(name, flops) for name, flops in data["flops"]]
        """FLOPs per token of each module holding parameters (:func:`devicemap.compute.flops_per_token`)."""
        self.first_floating_dtype: str | None = data["first_floating_dtype"]
        """The dtype of the model's first floating parameter: what the weights load as by default."""
        self._accelerate_index: tuple[dict[str, int], list[int]] | None = None

    def __repr__(self) -> str:
        return f"CatalogShape({self.name!r}, {self.model_class})"

    def tree(self, dtype: DtypeLike | None = None) -> ModuleTree:
        """The size tree ``ModuleTree.from_module(build_meta_model(name), dtype=dtype)`` gives."""
        data = self._data
        target = _target(dtype)
        load = _info(dtype) if dtype is not None else _info(self.first_floating_dtype or "float32")
        keep = frozenset(data["keep_fp32"].get(load.name, ()))
        per_dtype = [_element_bits(d["memory_bits"], d["name"], target) for d in data["dtypes"]]
        floating = [d["floating"] for d in data["dtypes"]]
        nodes = data["nodes"]
        bits = []
        for i, (count, index, repeat) in enumerate(
            zip(data["numel"], data["dtype"], nodes["duplicate"], strict=True)
        ):
            if index < 0 or repeat:
                bits.append(0)
            elif i in keep and floating[index]:
                bits.append(count * 32)  # transformers keeps it in float32 whatever the dtype
            else:
                bits.append(count * per_dtype[index])
        core = _tree(nodes, bits, data["tie"])
        return ModuleTree(core, no_split_module_classes=self.no_split_module_classes)

    def accelerate_tree(self, dtype: DtypeLike | None, release: AccelerateRelease) -> ModuleTree:
        """The size tree :mod:`devicemap.compat` builds for accelerate ``release``: ``ModuleTree.from_module(
        model, dtype=dtype, accelerate_tie_order=True, element_bits=release.element_bits)``."""
        data = self._data
        accelerate = data["accelerate"]
        nodes = accelerate.get("nodes", data["nodes"])
        target = None
        if dtype is not None:
            target_bits(dtype)  # refuses what from_module refuses
            info = _info(dtype)
            target = release.element_bits_of(info.name, info.itemsize)
        per_dtype = [
            _element_bits(release.element_bits_of(d["name"], d["itemsize"]), d["name"], target)
            for d in data["dtypes"]
        ]
        bits = [
            0 if index < 0 or repeat else count * per_dtype[index]
            for count, index, repeat in zip(data["numel"], data["dtype"], nodes["duplicate"], strict=True)
        ]
        groups: list[list[int]] = accelerate["tie_groups"]
        if len(groups) > 1:  # accelerate orders them by string hashing: as it would in this process
            full = full_names(nodes["names"], nodes["parents"])
            members = {n: full[n] for g in groups for n in g}
            groups = _accelerate_group_order(
                groups, members, [full[n] for n in accelerate["parameter_nodes"]]
            )
        tie = [-1] * len(bits)
        for number, group in enumerate(groups):
            for node in group:
                tie[node] = number
        core = _tree(nodes, bits, tie)
        return ModuleTree(core, no_split_module_classes=self.no_split_module_classes)

    def accelerate_buffer_bytes(
        self, modules: Sequence[str], dtype: DtypeLike | None, release: AccelerateRelease
    ) -> int | float:
        """The buffers of ``modules`` in bytes as accelerate sums them for its warning about the buffers of
        offloaded modules (``devicemap.compat_warnings._buffer_bytes``): per buffer, its elements times its
        bytes per element, a float once a bool's eighth of a byte is in."""
        data = self._data
        nodes = data["accelerate"].get("nodes", data["nodes"])
        target = None
        if dtype is not None:
            info = _info(dtype)
            target = release.element_bits_of(info.name, info.itemsize)
        if self._accelerate_index is None:
            full = full_names(nodes["names"], nodes["parents"])
            self._accelerate_index = (
                {name: i for i, name in enumerate(full)},
                _subtree_ends(nodes["parents"]),
            )
        index, ends = self._accelerate_index
        buffers = (_core.KIND_BUFFER, _core.KIND_NON_PERSISTENT_BUFFER)
        total: int | float = 0
        for module in modules:
            node = index.get(module)
            if node is None:
                continue
            for i in range(node, ends[node]):
                if nodes["kinds"][i] not in buffers:
                    continue
                d = data["dtypes"][data["dtype"][i]]
                own = release.element_bits_of(d["name"], d["itemsize"])
                bits = _element_bits(own, d["name"], target)
                total += data["numel"][i] * (bits // 8 if bits % 8 == 0 else bits / 8)
        return total

    def runtime(self, workload: Workload, tree: ModuleTree, dtype: DtypeLike | None) -> RuntimeMemory:
        """What :func:`devicemap.workload.runtime_memory` gives for the model: KV cache per decoder layer,
        logits with the head, activations."""
        if dtype is None:
            dtype = self.first_floating_dtype
        if not self.decoder_layer_names:
            raise InvalidOptionError(
                f"could not find the decoder layers of {self.model_class} (a ModuleList with one entry per "
                "layer); pass a transformers model or leave workload=None"
            )
        return layer_runtime(workload, self.config, self.decoder_layer_names, self.output_head, dtype, dtype)


def _tree(nodes: Mapping[str, Any], bits: list[int], tie: list[int]) -> _core.Tree:
    names, parents, kinds, classes, class_names = (nodes[key] for key in STRUCTURE[:5])
    return _core.Tree(names, parents, kinds, classes, class_names, bits, nodes["duplicate"], tie)


def _info(dtype: DtypeLike) -> dtype_names.DtypeInfo:
    """A dtype's name, width and kind: from the table for common names, else from torch."""
    named = dtype_names.known(dtype)
    if named is not None:
        return named
    resolved = to_dtype(dtype)
    return dtype_names.DtypeInfo(
        str(resolved).removeprefix("torch."), dtype_bits(resolved), resolved.is_floating_point
    )


def _target(dtype: DtypeLike | None) -> int | None:
    """Bits per element in memory of the dtype floating weights are sized as (``None``: their own)."""
    if dtype is None:
        return None
    target_bits(dtype)  # refuses sub-byte targets, as from_module does
    return _info(dtype).memory_bits


def _subtree_ends(parents: Sequence[int]) -> list[int]:
    """Per node of a pre-order tree, the end (exclusive) of its subtree's range."""
    ends = list(range(1, len(parents) + 1))
    for i in range(len(parents) - 1, 0, -1):
        ends[parents[i]] = max(ends[parents[i]], ends[i])
    return ends


def _element_bits(own: int, name: str, target: int | None) -> int:
    """``_Sizer.element_bits``: a tensor's bits per element, shrunk to ``target`` unless it keeps its width."""
    keeps_width = name.startswith(("uint", "int", "bool"))
    return own if target is None or keeps_width else min(target, own)


def full_names(names: Sequence[str], parents: Sequence[int]) -> list[str]:
    """Full dotted names from the local names and parents of a tree's columns."""
    full: list[str] = []
    for local, parent in zip(names, parents, strict=True):
        full.append(local if parent <= 0 else f"{full[parent]}.{local}")
    return full


def _folder() -> Any:
    return resources.files(__package__ or "devicemap.catalog") / "trees"


@functools.cache
def _load(name: str) -> dict[str, Any] | None:
    entry = _folder() / f"{name}.json.gz"
    if not entry.is_file():
        return None
    data: dict[str, Any] = json.loads(gzip.decompress(entry.read_bytes()))
    return data if data.get("format") == FORMAT else None


def available(name: str) -> bool:
    """Whether ``name`` is a bundled model whose shape ships as data matching its bundled config."""
    return shape(name) is not None


@functools.cache
def shape(name: str) -> CatalogShape | None:
    """The :class:`CatalogShape` of bundled model ``name``, or ``None`` when it has no data file, or one
    made from another config than the bundled one (then build it: :func:`devicemap.catalog.build_meta_model`)."""
    data = _load(name)
    config = _configs().get(name)
    if data is None or config is None or data.get("source_config") != config:
        return None
    return CatalogShape(name, data)
