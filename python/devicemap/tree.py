"""Module size trees: the input of every placement, exported from a torch model without allocating.

A :class:`ModuleTree` lists a model's modules, parameters and buffers in definition order with their
sizes (after an optional dtype conversion), which parameters are tied (one storage, several names),
and each module's class name (so ``no_split_module_classes`` can apply). It works on meta-device
models, so a 400B-parameter model can be planned on a laptop.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

from . import _core
from .errors import InvalidOptionError
from .quantization import QuantizedSizer, quantized_sizer, storage_bits

if TYPE_CHECKING:
    import torch

# Node kind codes of the tree columns, defined once in the core.
MODULE = _core.KIND_MODULE
PARAMETER = _core.KIND_PARAMETER
BUFFER = _core.KIND_BUFFER
NON_PERSISTENT_BUFFER = _core.KIND_NON_PERSISTENT_BUFFER
PARAMETER_ALIAS = _core.KIND_PARAMETER_ALIAS
DtypeLike = Union[str, "torch.dtype"]


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element: ``bool`` 1 bit (as accelerate counts it), sub-byte dtypes as torch stores them
    (``int4``, ``float4_e2m1fn_x2``: one element per byte), others their width.

    >>> import torch
    >>> dtype_bits(torch.bfloat16), dtype_bits(torch.bool), dtype_bits(torch.int4)
    (16, 1, 8)
    """
    return storage_bits(dtype)


def target_bits(dtype: DtypeLike, option: str = "dtype") -> int:
    """Bits per element of a dtype weights are sized *as* (``dtype=``, ``special_dtypes``): a dtype
    holding less than a byte per value is refused, since converting to it is a quantizer's job.

    >>> target_bits("bfloat16"), target_bits("float8_e4m3fn")
    (16, 8)
    """
    import torch

    resolved = to_dtype(dtype, option)
    width = re.search(r"\d+", str(resolved).removeprefix("torch."))
    if resolved != torch.bool and width is not None and int(width.group()) < 8:
        raise InvalidOptionError(
            f"{option} {dtype!r} packs values below a byte, which only a quantizer produces; size 4-bit "
            "weights with quantization_config= (bitsandbytes, torchao) or plan the quantized checkpoint"
        )
    return dtype_bits(resolved)


def to_dtype(dtype: DtypeLike, option: str = "dtype") -> torch.dtype:
    """Accept ``torch.float16``, ``"float16"`` or ``"torch.float16"``; ``option`` names the argument in
    the error raised for anything else."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(found, torch.dtype):
            return found
    raise InvalidOptionError(
        f"unknown {option} {dtype!r}: use a torch.dtype or its name, e.g. 'float16' or 'bfloat16'"
    )


class _Sizer:
    """Tensor size in bits under accelerate's dtype rules: integer and bool tensors keep their width,
    floating tensors shrink to ``dtype`` (never grow), ``special_dtypes`` override by name. A
    ``loaded`` sizer (quantizer and float32 keeps) decides first for the tensors it knows."""

    def __init__(
        self,
        dtype: DtypeLike | None,
        special_dtypes: Mapping[str, DtypeLike] | None,
        loaded: QuantizedSizer | None = None,
    ):
        self.target = target_bits(dtype) if dtype is not None else None
        self.special = {
            k: target_bits(v, f"special_dtypes[{k!r}]") for k, v in (special_dtypes or {}).items()
        }
        self.loaded = loaded
        self.needs_names = bool(self.special) or loaded is not None
        self.cache: dict[object, int] = {}

    def bits(self, name: str, tensor: torch.Tensor) -> int:
        if self.special and name in self.special:
            return tensor.numel() * self.special[name]
        if self.loaded is not None:
            decided = self.loaded.bits(name, tensor)
            if decided is not None:
                return decided
        per = self.cache.get(tensor.dtype)
        if per is None:
            own = dtype_bits(tensor.dtype)
            keeps_width = str(tensor.dtype).startswith(("torch.uint", "torch.int", "torch.bool"))
            per = own if self.target is None or keeps_width else min(self.target, own)
            self.cache[tensor.dtype] = per
        return tensor.numel() * per


# How a module is walked: its first time (everything), a copy of its first walk under another parent,
# or its own tensors only (a module met again inside a copy).
_FIRST, _COPY, _OWN = 0, 1, 2


class _Walk:
    """One pre-order pass over a module tree: a module, its parameters, its buffers, then its child
    modules' subtrees, as torch's ``named_parameters`` / ``named_buffers`` / ``named_children`` list them.
    Full dotted names are only built when needed (special dtypes, tie ordering).

    Module graphs need not be trees. A module met again under another parent (T5's
    ``encoder.embed_tokens`` is ``shared``) is listed there too, as accelerate and ``state_dict`` list it,
    with its tensors as tied aliases; but only the subtree of its first walk is copied there (through the
    edges it was first reached by), and a module met again inside such a copy contributes its own tensors
    only. Naive re-walking is exponential for nested sharing; this is at most one copy per extra edge. A
    module that is its own ancestor (a cycle) is never entered again, as in ``named_modules``.
    """

    def __init__(self, sizer: _Sizer, untie: bool = False, like_named_children: bool = False):
        self.sizer = sizer
        self.untie = untie
        # accelerate walks named_children(), which lists a module held twice by one parent once; state_dict
        # lists both names, and a device map must cover both (so only accelerate's port skips the repeat).
        self.like_named_children = like_named_children
        self.names: list[str] = []
        self.parents: list[int] = []
        self.kinds: list[int] = []
        self.classes: list[int] = []
        self.bits: list[int] = []
        self.duplicate: list[bool] = []
        self.class_ids: dict[str, int] = {}
        self.param_nodes: dict[int, list[int]] = {}  # id(parameter) -> its nodes, first name first
        self.buffer_nodes: dict[int, list[int]] = {}  # id(buffer) -> its nodes, first name first
        # every parameter node, in named_parameters(remove_duplicate=False) order
        self.param_order: list[int] = []
        self.type_ids: dict[type, int] = {}

    def full_names(self) -> list[str]:
        full = [""] * len(self.names)
        for i in range(1, len(self.names)):
            parent = self.parents[i]
            full[i] = f"{full[parent]}.{self.names[i]}" if parent else self.names[i]
        return full

    def run(self, model: torch.nn.Module) -> None:
        # One tuple per node (name, parent, kind, class, bits, duplicate), transposed at the end: the
        # walk is pure Python, so every attribute lookup and call per node counts on 100k-node trees.
        # Module rows carry id(module) as a 7th field (for the cycle and copy checks); zip() keeps the
        # six columns every row has, so it is dropped there for free.
        rows: list[tuple] = []
        add = rows.append
        param_nodes, param_order = self.param_nodes, self.param_order
        class_of, sizer, untie = self.class_of_type, self.sizer, self.untie
        type_id = self.type_ids.get
        named, tensor_bits = sizer.needs_names, sizer.bits
        bits_per = sizer.cache.get  # bits per element by dtype, once sizer.bits has seen the dtype
        buffer_nodes = self.buffer_nodes
        first_row: dict[int, int] = {}  # id(module) -> the row of its first walk
        stack: list[tuple[torch.nn.Module, int, str, int]] = [(model, -1, "", _FIRST)]
        pop, push = stack.pop, stack.extend
        while stack:
            module, parent, local, mode = pop()
            node = len(rows)
            key = id(module)
            if mode == _FIRST and key not in first_row:
                first_row[key] = node
            else:
                if self._is_ancestor(rows, parent, key):
                    continue  # a cycle: torch's named_modules never re-enters it either
                if mode == _FIRST:
                    mode = _COPY
            cls = type(module)
            cid = type_id(cls, -1)
            add((local, parent, MODULE, cid if cid >= 0 else class_of(cls), 0, False, key))
            params = module._parameters
            if params:
                seen_here: set[int] = set()
                for name, param in params.items():
                    if param is None:
                        continue
                    key = id(param)
                    index = len(rows)
                    # A parameter held twice by one module: torch lists the second name only when asked
                    # for duplicates, so it is an alias (tied, counted once, never placed on its own).
                    kind = PARAMETER_ALIAS if key in seen_here else PARAMETER
                    seen_here.add(key)
                    param_order.append(index)
                    if untie and kind == PARAMETER:
                        key = index  # every name is its own storage (aliases inside one module stay one)
                    param_cls = type(param)
                    cid = type_id(param_cls, -1)
                    if cid < 0:
                        cid = class_of(param_cls)
                    nodes = param_nodes.get(key)
                    if nodes is not None:
                        nodes.append(index)
                        add((name, node, kind, cid, 0, True))
                        continue
                    param_nodes[key] = [index]
                    per = None if named else bits_per(param.dtype)
                    if per is not None:
                        size = param.numel() * per
                    else:
                        size = tensor_bits(self._full_name(rows, node, name) if named else name, param)
                    add((name, node, kind, cid, size, False))
            buffers = module._buffers
            if buffers:
                non_persistent = module._non_persistent_buffers_set
                for name, buf in buffers.items():
                    if buf is None:
                        continue
                    kind = NON_PERSISTENT_BUFFER if name in non_persistent else BUFFER
                    holders = buffer_nodes.get(id(buf))
                    if holders is not None:
                        holders.append(len(rows))
                        add((name, node, kind, class_of(type(buf)), 0, True))
                    else:
                        buffer_nodes[id(buf)] = [len(rows)]
                        size = tensor_bits(self._full_name(rows, node, name) if named else name, buf)
                        add((name, node, kind, class_of(type(buf)), size, False))
            children = module._modules
            if children and mode != _OWN:
                if mode == _FIRST and len(children) == 1:
                    ((name, child),) = children.items()
                    if child is not None:
                        push(((child, node, name, _FIRST),))
                    continue
                seen_children: set[int] = set()
                skip_repeats = self.like_named_children
                found = []
                for name, child in children.items():
                    if child is None or (skip_repeats and id(child) in seen_children):
                        continue
                    seen_children.add(id(child))
                    if mode == _COPY:
                        # Inside a copy, only the edges of the first walk are followed again.
                        first = first_row.get(id(child))
                        tree_edge = (
                            first is not None and rows[first][0] == name and rows[rows[first][1]][6] == key
                        )
                        child_mode = _COPY if tree_edge else _OWN
                    else:
                        child_mode = _FIRST
                    found.append((child, node, name, child_mode))
                found.reverse()
                push(found)
        columns = list(zip(*rows, strict=False))[:6]  # (a tree of modules only still has the 7th column)
        self.names, self.parents, self.kinds, self.classes, self.bits, self.duplicate = (
            list(c) for c in columns
        )

    def class_of_type(self, cls: type) -> int:
        found = self.type_ids.get(cls)
        if found is None:
            found = self.type_ids[cls] = self.class_id_by_name(cls.__name__)
        return found

    def class_id_by_name(self, name: str) -> int:
        # accelerate compares class *names*, so two classes with one name share an id.
        found = self.class_ids.get(name)
        if found is None:
            found = self.class_ids[name] = len(self.class_ids)
        return found

    @staticmethod
    def _is_ancestor(rows: list[tuple], row: int, key: int) -> bool:
        """Whether the module ``key`` is the module at ``row`` or one of its ancestors."""
        while row >= 0:
            if rows[row][6] == key:
                return True
            row = rows[row][1]
        return False

    @staticmethod
    def _full_name(rows: list[tuple], parent: int, local: str) -> str:
        """Full dotted name of a tensor ``local`` of the module at row ``parent``."""
        parts = [local]
        while parent > 0:
            parts.append(rows[parent][0])
            parent = rows[parent][1]
        return ".".join(reversed(parts))


class ModuleTree:
    """A model's module/tensor tree with sizes, ready for :func:`devicemap.plan`.

    >>> import torch
    >>> tree = ModuleTree.from_module(torch.nn.Linear(4, 2))
    >>> tree.total_bytes
    40
    """

    def __init__(self, core: _core.Tree, no_split_module_classes: Iterable[str] = ()):
        self._core = core
        self.no_split_module_classes: list[str] = list(no_split_module_classes)
        """Classes the model itself declares unsplittable (transformers' ``_no_split_modules``)."""
        self.module_types: frozenset[type] = frozenset()
        """The Python types of the exported modules and parameters (empty for checkpoint trees)."""

    @classmethod
    def from_module(
        cls,
        model: torch.nn.Module,
        dtype: DtypeLike | None = None,
        special_dtypes: Mapping[str, DtypeLike] | None = None,
        *,
        quantization_config: Any = None,
        accelerate_tie_order: bool = False,
        untie: bool = False,
    ) -> ModuleTree:
        """Export ``model`` (any device, including ``meta``: nothing is allocated).

        ``untie=True`` counts a shared parameter under every name (each user keeps its own copy, as
        pipeline stages must). ``accelerate_tie_order=True`` walks and orders ties exactly as accelerate
        does (``named_children`` skips a module one parent holds twice; buffers are never tied), for the
        :mod:`devicemap.compat` port.

        ``dtype`` sizes floating tensors as if converted to it (as accelerate does: integer and bool
        tensors keep their width, nothing grows); ``special_dtypes`` overrides it per tensor name.
        As transformers loads them, ``_keep_in_fp32_modules`` stay float32 under ``dtype=float16`` and
        ``quantization_config`` (bitsandbytes 4/8-bit, torchao) sizes each weight as the quantizer stores
        it, quantization state included (see :mod:`devicemap.quantization`).
        Buffers count whether persistent or not. Tensors reachable under several names (tied
        weights, shared modules) are counted once, under their first name, and recorded as tied.

        >>> import torch
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU())
        >>> ModuleTree.from_module(model, dtype="float16").total_bytes
        2099200
        """
        import torch

        if not isinstance(model, torch.nn.Module):
            raise InvalidOptionError(
                f"ModuleTree.from_module expects a torch.nn.Module, got {type(model).__name__}"
            )
        if dtype is not None:
            target_bits(dtype)
        if special_dtypes is not None:
            if not isinstance(special_dtypes, Mapping):
                raise InvalidOptionError(
                    f"special_dtypes must be a dict like {{'lm_head.weight': 'float32'}}, got {special_dtypes!r}"
                )
            for name, special in special_dtypes.items():
                target_bits(special, f"special_dtypes[{name!r}]")
        loaded = None
        if not accelerate_tie_order:  # accelerate's port sizes by dtype alone, as accelerate does
            loaded = quantized_sizer(model, quantization_config, dtype)
            if loaded.method is None and not loaded.fp32_names:
                loaded = None  # nothing to decide: keep the fast walk that builds no names
        sizer = _Sizer(dtype, special_dtypes, loaded)
        walk = _Walk(sizer, untie=untie, like_named_children=accelerate_tie_order)
        # The walk allocates a tuple per node and frees nothing: the cyclic collector would only rescan
        # the growing heap again and again (a large share of the time on 100k-node trees).
        collecting = gc.isenabled()
        gc.disable()
        try:
            walk.run(model)
        finally:
            if collecting:
                gc.enable()
        names, parents, kinds, classes, bits, duplicate = (
            walk.names,
            walk.parents,
            walk.kinds,
            walk.classes,
            walk.bits,
            walk.duplicate,
        )
        class_ids = walk.class_ids
        tie = [-1] * len(names)
        groups = [nodes for nodes in walk.param_nodes.values() if len(nodes) > 1]
        if accelerate_tie_order and len(groups) > 1:
            full_names = walk.full_names()
            param_names = [full_names[i] for i in walk.param_order]
            groups = _accelerate_group_order(groups, full_names, param_names)
        if not accelerate_tie_order and not untie:
            # A buffer held by several modules (a shared module's) stays with its first holder, so every
            # name state_dict lists is placed; accelerate ties parameters only, so its port does not.
            groups += [nodes for nodes in walk.buffer_nodes.values() if len(nodes) > 1]
        for number, nodes in enumerate(groups):
            for n in nodes:
                tie[n] = number

        if sum(bits) > 2**64 - 1:  # the core counts bits in 64-bit integers
            from .errors import InvalidSizeError

            raise InvalidSizeError(
                f"{type(model).__name__} holds {sum(bits) // 8} bytes of weights, more than the 2 EiB devicemap "
                "can plan with; check the model's shapes"
            )
        core = _core.Tree(names, parents, kinds, classes, list(class_ids), bits, duplicate, tie)
        no_split = getattr(model, "_no_split_modules", None) or []
        tree = cls(core, no_split_module_classes=[str(c) for c in no_split])
        tree.module_types = frozenset(walk.type_ids)
        return tree

    # -- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of nodes (modules, parameters and buffers, the root included)."""
        return len(self._core)

    def __repr__(self) -> str:
        return f"ModuleTree({len(self)} nodes, {self.total_bytes / 2**30:.2f} GiB)"

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors, each storage counted once (rounded up to whole bytes)."""
        return -(-self._core.subtree_bits(0) // 8)

    def module_bytes(self, name: str) -> int:
        """Bytes under a module or tensor name (``""`` is the whole model).

        >>> import torch
        >>> ModuleTree.from_module(torch.nn.Sequential(torch.nn.Linear(2, 2))).module_bytes("0.bias")
        8
        """
        node = self._core.find(name)
        if node is None:
            from .errors import UnknownModuleError

            close = self._core.suggest(name)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModuleError(f"unknown module {name!r} in this tree{hint}")
        return -(-self._core.subtree_bits(node) // 8)

    @property
    def tied_groups(self) -> list[list[str]]:
        """Tied tensor names (parameters, and buffers of shared modules), one sorted list per storage."""
        return self._core.tie_groups()

    @property
    def core(self) -> _core.Tree:
        """The Rust tree (for the binding functions)."""
        return self._core


def _accelerate_group_order(
    groups: list[list[int]], full_names: list[str], param_names: list[str]
) -> list[list[int]]:
    """Order tie groups as accelerate's ``find_tied_parameters`` does in this process.

    accelerate walks a ``set`` of the duplicate names, so its group order follows string hashing. With
    two or more groups that order can change which tied module it splits first; building the same sets
    from the same names in the same order reproduces it (within one process, like accelerate itself).
    """
    later_names = {full_names[n] for g in groups for n in g[1:]}
    all_names = dict.fromkeys(param_names)
    first_names = dict.fromkeys(n for n in param_names if n not in later_names)
    by_name = {full_names[n]: g for g in groups for n in g}
    order: dict[int, list[int]] = {}
    for name in set(all_names.keys()) - set(first_names.keys()):
        group = by_name[name]
        order.setdefault(id(group), group)
    return list(order.values())
