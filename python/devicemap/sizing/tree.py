"""Module size trees: the input of every placement, exported from a torch model without allocating.

A :class:`ModuleTree` lists a model's modules, parameters and buffers in definition order with their
sizes (after an optional dtype conversion), which parameters are tied (one storage, several names),
and each module's class name (so ``no_split_module_classes`` can apply). It works on meta-device
models, so a 400B-parameter model can be planned on a laptop.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .. import _core
from ..errors import InvalidOptionError, InvalidSizeError, UnknownModuleError
from ..inputs.dtypes import DtypeLike, dtype_bits, memory_bits, target_bits, to_dtype
from .quantization import QuantizedSizer, quantized_sizer

if TYPE_CHECKING:
    import torch

# Node kind codes of the tree columns, defined once in the core.
MODULE = _core.KIND_MODULE
PARAMETER = _core.KIND_PARAMETER
BUFFER = _core.KIND_BUFFER
NON_PERSISTENT_BUFFER = _core.KIND_NON_PERSISTENT_BUFFER
PARAMETER_ALIAS = _core.KIND_PARAMETER_ALIAS


class _Sizer:
    """Tensor size in bits under accelerate's dtype rules: integer and bool tensors keep their width,
    floating tensors shrink to ``dtype`` (never grow), ``special_dtypes`` override by name. A
    ``loaded`` sizer (quantizer and float32 keeps) decides first for the tensors it knows.

    A bool tensor takes a byte per element in memory, as torch stores it; ``bool_bits=1`` counts it as
    accelerate does (a bit), for the port of accelerate's planner, which must return accelerate's maps."""

    def __init__(
        self,
        dtype: DtypeLike | None,
        special_dtypes: Mapping[str, DtypeLike] | None,
        loaded: QuantizedSizer | None = None,
        rule: Callable[[torch.dtype], int] = memory_bits,
    ):
        self.rule = rule

        def bits_as(d: DtypeLike, option: str) -> int:
            target_bits(d, option)  # refuses sub-byte targets whatever the rule
            return rule(to_dtype(d, option))

        self.target = bits_as(dtype, "dtype") if dtype is not None else None
        self.special = {k: bits_as(v, f"special_dtypes[{k!r}]") for k, v in (special_dtypes or {}).items()}
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
        return tensor.numel() * self.element_bits(tensor.dtype)

    def element_bits(self, dtype: torch.dtype) -> int:
        """Bits per element of a tensor of ``dtype`` that no name rule decides."""
        per = self.cache.get(dtype)
        if per is None:
            own = self.rule(dtype)
            keeps_width = str(dtype).startswith(("torch.uint", "torch.int", "torch.bool"))
            per = own if self.target is None or keeps_width else min(self.target, own)
            self.cache[dtype] = per
        return per


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
        self.quantized_modules: tuple[str, frozenset[str]] | None = None
        """The quant method and the modules whose weights it converts (sized with a ``quantization_config``;
        ``None`` otherwise): the speed model charges their kernels' fixed cost per call."""

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
        element_bits: Callable[[torch.dtype], int] | None = None,
    ) -> ModuleTree:
        """Export ``model`` (any device, including ``meta``: nothing is allocated).

        ``untie=True`` counts a shared parameter under every name (each user keeps its own copy, as
        pipeline stages must). ``accelerate_tie_order=True`` walks and orders ties exactly as accelerate
        does (``named_children`` skips a module one parent holds twice; buffers are never tied), for the
        :mod:`devicemap.compat` port, which also passes ``element_bits``: the bits per element of each
        dtype (for tensors, ``dtype`` and ``special_dtypes``) as the installed accelerate counts them,
        instead of :func:`dtype_bits`.

        ``dtype`` sizes floating tensors as if converted to it (as accelerate does: integer and bool
        tensors keep their width, nothing grows); ``special_dtypes`` overrides it per tensor name. A
        bool tensor (an attention mask buffer) counts a byte per element, what it takes in memory
        (accelerate counts a bit; ``accelerate_tie_order=True`` does too).
        As transformers loads them, ``_keep_in_fp32_modules`` stay float32 under ``dtype=float16`` and
        ``quantization_config`` (bitsandbytes 4/8-bit, torchao) sizes each weight as the quantizer stores
        it, quantization state included (see :mod:`devicemap.sizing.quantization`).
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
        # accelerate's port sizes as the installed accelerate does (a bool at a bit); devicemap's own plans
        # as memory holds it (a bool at a byte).
        rule = element_bits or (dtype_bits if accelerate_tie_order else memory_bits)
        sizer = _Sizer(dtype, special_dtypes, loaded, rule)
        # The walk (in the binding: it reads every module's dicts and fills the tree's columns, see
        # _core.ModuleWalk for the rules) asks Python only per dtype, or per tensor when names decide.
        # The walk's temporaries (bound methods, ints) would start cyclic collections that rescan the
        # model's millions of objects for nothing (~10% of the walk on 100k-module models).
        collecting = gc.isenabled()
        gc.disable()
        try:
            # accelerate's port ties by identity alone, as accelerate does; untie counts every name anyway
            with _declared_ties_applied(model, not accelerate_tie_order and not untie):
                walk = _core.ModuleWalk(
                    model,
                    sizer.element_bits,
                    sizer.bits if sizer.needs_names else None,
                    untie=untie,
                    like_named_children=accelerate_tie_order,
                )
        finally:
            if collecting:
                gc.enable()
        groups = walk.parameter_groups()
        if accelerate_tie_order and len(groups) > 1:
            members = [n for g in groups for n in g]
            param_nodes = walk.parameter_nodes()
            full_names = dict(zip(members, walk.full_names(members), strict=True))
            groups = _accelerate_group_order(groups, full_names, walk.full_names(param_nodes))
        if not accelerate_tie_order and not untie:
            # A buffer held by several modules (a shared module's) stays with its first holder, so every
            # name state_dict lists is placed; accelerate ties parameters only, so its port does not.
            groups += walk.buffer_groups()
        if walk.total_bits > 2**64 - 1:  # the core counts bits in 64-bit integers
            raise InvalidSizeError(
                f"{type(model).__name__} holds {walk.total_bits // 8} bytes of weights, more than the 2 EiB "
                "devicemap can plan with; check the model's shapes"
            )
        core = walk.build(groups)
        tree = cls(core, no_split_module_classes=declared_no_split_classes(model))
        tree.module_types = frozenset(walk.types())
        if loaded is not None:
            tree.quantized_modules = loaded.converted_modules
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


def declared_no_split_classes(model: Any) -> list[str]:
    """The module classes ``model`` declares unsplittable, sorted: what transformers and diffusers keep
    whole under ``device_map="auto"``. Later transformers 5.x gather every sub-model's
    ``_no_split_modules`` into the model's own at construction; transformers 5.0 and diffusers gather
    them in ``_get_no_split_modules(device_map)`` (BertForMaskedLM declares none itself, its BertModel
    declares BertLayer), which raises when a sub-model does not support device maps: then the model's own.

    >>> import torch
    >>> declared_no_split_classes(torch.nn.Linear(2, 2))
    []
    """
    gather = getattr(model, "_get_no_split_modules", None)
    if callable(gather):
        try:
            return sorted(str(c) for c in gather("auto"))
        except ValueError:
            pass
    return sorted(str(c) for c in getattr(model, "_no_split_modules", None) or [])


@contextlib.contextmanager
def _declared_ties_applied(model: torch.nn.Module, apply: bool) -> Iterator[None]:
    """While the walk reads ``model``, the ties transformers declares (``all_tied_weights_keys``:
    ``{tied name: source name}``) between meta-device parameters that are not tied yet are made:
    transformers 5.0 builds a model untied (ties are made by ``from_pretrained`` and every loader,
    after planning), later 5.x tie at construction. Real tensors stay as they are in memory; the model is
    restored afterwards."""
    declared = getattr(model, "all_tied_weights_keys", None) if apply else None
    replaced: list[tuple[torch.nn.Module, str, Any]] = []
    try:
        for tied, source in dict(declared or {}).items():
            try:
                tied_tensor, source_tensor = model.get_parameter(tied), model.get_parameter(source)
            except AttributeError:  # a name this model (or its config) does not have
                continue
            if tied_tensor is source_tensor or not (tied_tensor.is_meta and source_tensor.is_meta):
                continue
            owner_name, _, leaf = tied.rpartition(".")
            owner = model.get_submodule(owner_name)
            replaced.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = source_tensor
        yield
    finally:
        for owner, leaf, original in reversed(replaced):
            owner._parameters[leaf] = original


def _accelerate_group_order(
    groups: list[list[int]], full_names: Mapping[int, str], param_names: list[str]
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
