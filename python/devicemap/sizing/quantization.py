"""Stored sizes of quantized models, and each quantizer's offload rules.

transformers sizes a quantized model with one flat element size per quantized weight (0.5 byte for
4-bit, 1 for 8-bit) and then keeps 10% of every device free to cover what that misses. This module
counts what each quantizer really stores instead, for every tensor of the model as
``from_pretrained`` builds it on the meta device, before the quantizer replaces its layers:

- **bitsandbytes 4-bit** (``nf4``/``fp4``, blocks of 64): the packed weight (two values a byte), one
  absmax per block (float32; with double quantization uint8 plus one float32 per 256 blocks and a
  256-entry float32 code), the 16-entry float32 quant map, and the JSON quant-state record
  ``state_dict`` carries (``weight.quant_state.bitsandbytes__nf4``);
- **bitsandbytes 8-bit** (LLM.int8): an int8 weight, one float32 scale per output row (``SCB``) and a
  one-byte ``weight_format``;
- **torchao**: whatever its tensor subclass holds (``qdata``, ``scale``, ``zero_point``, ...), found by
  quantizing a meta-device layer of the same shape with the same config, so every config torchao
  itself can apply is sized by torchao;
- modules a quantizer leaves alone (``modules_to_not_convert``, the output embeddings and tied weights
  by default, anything that is not a plain ``Linear``) keep their ordinary size, and
  ``_keep_in_fp32_modules`` tensors stay float32 when the model loads in float16
  (``_keep_in_fp32_modules_strict``: float16 or bfloat16), quantized or not.

The sizes are those of the quantized model's ``state_dict`` (what a saved checkpoint holds), and the
quantization state is counted with the weight it belongs to, since the unquantized model has no
tensor of its own for it. The tree exporter asks :meth:`QuantizedSizer.bits` per tensor; ``None`` means
"no quantizer rule: size it by the ordinary dtype rule".
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError
from ..inputs.dtypes import storage_bits, to_dtype
from .gguf import GGUF, gguf_bits

if TYPE_CHECKING:
    import torch

__all__ = [
    "OffloadRule",
    "QuantizedSizer",
    "check_quantizer_runs",
    "offload_rule",
    "quantized_sizer",
    "torchao_quantization",
]

# bitsandbytes' fixed layout constants (bitsandbytes 0.4x-0.50; transformers exposes no blocksize option).
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
BNB_4BIT_CODE_ENTRIES = 16  # the nf4/fp4 quant map
BNB_NESTED_CODE_ENTRIES = 256  # the dynamic 8-bit map of the double-quantized absmax
# ``nested_offset`` (a float's repr) inside the JSON record: its length depends on the value; this is
# the usual ``repr`` of a float32 mean (e.g. ``0.02983711287379265``), so the record is right to a byte or two.
_OFFSET_REPR = "0.0" + "1" * 16


@dataclass(frozen=True)
class OffloadRule:
    """Where a quantizer lets weights live besides accelerators (as transformers 5.24 validates maps).

    ``cpu`` / ``disk``: whether a device map may put some modules on the CPU / disk while others are on
    accelerators. ``cpu_only``: whether the whole model may load on the CPU (``{"": "cpu"}``).
    ``offloaded_quantized``: whether an offloaded module keeps its quantized size; when False it loads
    unquantized at the model's dtype (bitsandbytes with ``llm_int8_enable_fp32_cpu_offload``: the
    modules mapped to ``"cpu"``/``"disk"`` join ``modules_to_not_convert``), see
    :meth:`QuantizedSizer.offloaded_bits`. ``reason`` says why offload is refused (empty if it is not).

    >>> OffloadRule(cpu=False, disk=False).allows("disk")
    False
    """

    cpu: bool = True
    disk: bool = True
    cpu_only: bool = True
    offloaded_quantized: bool = True
    reason: str = ""

    def allows(self, device: str) -> bool:
        """Whether a map mixing accelerators with ``device`` (``"cpu"`` or ``"disk"``) is accepted."""
        return {"cpu": self.cpu, "disk": self.disk}.get(device, True)

    def usable(self, memory: Mapping[Any, int | None]) -> dict[Any, int | None]:
        """The devices of ``memory`` (accelerate's keys) a plan may use under this rule: beside
        accelerators, the CPU and disk only where allowed; with no accelerator, the CPU alone if the
        quantizer runs there (and no disk).

        >>> OffloadRule(cpu=False, disk=False).usable({0: 100, "cpu": 1000, "disk": 0})
        {0: 100}
        """
        if any(key not in ("cpu", "disk") for key in memory):
            return {k: v for k, v in memory.items() if k not in ("cpu", "disk") or self.allows(k)}
        if self.cpu_only:
            return {k: v for k, v in memory.items() if k == "cpu" or self.disk}
        return {}


_NO_OFFLOAD = "transformers refuses CPU/disk entries in the device map for this quantizer"


def offload_rule(quantization_config: Any, *, pre_quantized: bool = False) -> OffloadRule:
    """The offload rule of ``quantization_config`` (a transformers ``*Config`` or its dict form).

    ``pre_quantized``: the checkpoint is already quantized (some quantizers only refuse offload when
    they quantize on the fly). ``None`` (no quantizer) allows everything.

    >>> offload_rule({"quant_method": "bitsandbytes", "load_in_4bit": True}).cpu
    False
    >>> offload_rule({"quant_method": "bitsandbytes", "load_in_4bit": True,
    ...               "llm_int8_enable_fp32_cpu_offload": True}).offloaded_quantized
    False
    """
    if quantization_config is None:
        return OffloadRule()
    method = _method(quantization_config)
    get = _getter(quantization_config)
    if method in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        if get("llm_int8_enable_fp32_cpu_offload", False):
            return OffloadRule(offloaded_quantized=False)
        return OffloadRule(
            cpu=False,
            disk=False,
            reason="bitsandbytes refuses CPU/disk entries unless llm_int8_enable_fp32_cpu_offload=True "
            "(then those modules load unquantized); the whole model on the CPU is allowed",
        )
    if method == "torchao":
        if pre_quantized:
            return OffloadRule(disk=False, reason="torchao cannot disk-offload a pre-quantized checkpoint")
        # Quantized while loading, the weights are torchao tensor subclasses, which accelerate's disk-offload
        # hooks cannot re-create when they stream a layer back out (TypeError in set_module_tensor_to_device,
        # accelerate 1.16): a map with disk entries loads, then fails on the first forward.
        return OffloadRule(
            disk=False,
            reason="accelerate cannot stream torchao's quantized tensors from the disk (its offload hooks fail "
            "re-creating them on the first forward)",
        )
    if method in ("hqq", "higgs", "nvfp4"):
        return OffloadRule(cpu=False, disk=False, cpu_only=False, reason=_NO_OFFLOAD)
    if method in ("bitnet", "eetq", "quanto"):
        # transformers tests ``len(map) > 1 and "cpu" in map or "disk" in map``.
        return OffloadRule(cpu=False, disk=False, reason=_NO_OFFLOAD)
    if method == "fp_quant":
        if get("pseudoquantization", False):
            return OffloadRule(disk=False, reason=_NO_OFFLOAD)
        return OffloadRule(cpu=False, disk=False, reason=_NO_OFFLOAD)
    if method in ("fbgemm_fp8", "metal") and not pre_quantized:
        return OffloadRule(
            cpu=False, disk=False, cpu_only=False, reason=_NO_OFFLOAD + " when it quantizes on the fly"
        )
    if method == "fp8" and not pre_quantized:
        return OffloadRule(cpu=False, disk=False, reason=_NO_OFFLOAD + " when it quantizes on the fly")
    if method == "mxfp4" and not pre_quantized:
        return OffloadRule(disk=False, reason="mxfp4 refuses disk offload when it quantizes on the fly")
    if method == "gguf":
        # transformers refuses disk entries for GGUF files; llama.cpp maps the file and has no disk tier.
        return OffloadRule(disk=False, reason="gguf refuses disk offload")
    return OffloadRule()


class QuantizedSizer:
    """Sizes of a model's tensors once a quantizer has processed them. Build it with
    :func:`quantized_sizer`.

    :meth:`bits` gives a tensor's stored size in bits (quantization state included) where a quantizer
    or ``_keep_in_fp32_modules`` decides it, ``None`` where the ordinary dtype rule applies.
    :meth:`offloaded_bits` is the same for a tensor whose module is offloaded to the CPU or disk.
    ``needs_names`` is always True: names are full dotted names, as in ``model.named_parameters()``.
    """

    needs_names = True

    def __init__(
        self,
        method: str | None,
        offload: OffloadRule,
        parts: Mapping[str, Mapping[str, int]],
        keep_fp32: Iterable[str],
    ):
        self.method = method
        """The quant method (``"bitsandbytes_4bit"``, ``"bitsandbytes_8bit"``, ``"torchao"``, ...) or None."""
        self.offload = offload
        """The quantizer's :class:`OffloadRule`."""
        self._parts = {name: dict(p) for name, p in parts.items()}
        self._keep_fp32 = frozenset(keep_fp32)

    @property
    def quantized_names(self) -> frozenset[str]:
        """The names of the tensors the quantizer converts."""
        return frozenset(self._parts)

    @property
    def converted_modules(self) -> tuple[str, frozenset[str]] | None:
        """The quant method and the modules whose weights it converts (``None`` without a quantizer): what
        :attr:`devicemap.ModuleTree.quantized_modules` records for the speed model's kernel costs."""
        if self.method is None:
            return None
        return self.method, frozenset(name.rpartition(".")[0] for name in self._parts)

    @property
    def fp32_names(self) -> frozenset[str]:
        """The names of the tensors ``_keep_in_fp32_modules`` keeps in float32 (not quantized ones)."""
        return self._keep_fp32

    def parts(self, name: str) -> dict[str, int] | None:
        """The ``state_dict`` entries the tensor ``name`` becomes, in bits each (``None``: not quantized).

        For bitsandbytes 4-bit ``"x.weight"`` gives ``x.weight``, ``x.weight.absmax``,
        ``x.weight.quant_map``, ... as the quantized model's ``state_dict`` names them; for torchao the
        inner tensors of the subclass (``x.weight:qdata``, ``x.weight:scale``, ...).
        """
        found = self._parts.get(name)
        return dict(found) if found is not None else None

    def bits(self, name: str, tensor: torch.Tensor) -> int | None:
        """Stored bits of tensor ``name`` on an accelerator (or with the whole model on the CPU), or
        ``None`` to size it by the dtype rule.

        >>> import torch
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8))
        >>> sizer = quantized_sizer(model, {"quant_method": "bitsandbytes", "load_in_8bit": True}, "float16")
        >>> sizer.bits("0.weight", model[0].weight) // 8, sizer.bits("0.bias", model[0].bias)
        (66561, None)
        """
        found = self._parts.get(name)
        if found is not None:
            return sum(found.values())
        if name in self._keep_fp32 and tensor.is_floating_point():
            return tensor.numel() * 32
        return None

    def offloaded_bits(self, name: str, tensor: torch.Tensor) -> int | None:
        """Stored bits of tensor ``name`` when its module is offloaded to the CPU or disk alongside
        accelerators (``None``: the dtype rule). Quantizers whose offloaded modules load unquantized
        (bitsandbytes with fp32 CPU offload) give the dtype rule's size, except for float32 keeps."""
        if self.offload.offloaded_quantized:
            return self.bits(name, tensor)
        if name in self._keep_fp32 and tensor.is_floating_point():
            return tensor.numel() * 32
        return None


def quantized_sizer(
    model: torch.nn.Module,
    quantization_config: Any,
    dtype: Any = None,
    *,
    pre_quantized: bool = False,
) -> QuantizedSizer:
    """Size ``model``'s tensors as ``quantization_config`` will store them.

    ``model`` is the unquantized model as ``from_pretrained`` builds it (meta device is fine: nothing
    is allocated, only module types, shapes and names are read). ``quantization_config`` is a
    transformers config (``BitsAndBytesConfig``, ``TorchAoConfig``, ...), its ``to_dict()`` / the
    ``quantization_config`` of a ``config.json``, or ``None`` (then only ``_keep_in_fp32_modules`` apply).
    ``dtype`` is the dtype the model loads in (``torch.float16``, ``"bfloat16"``); ``None`` takes the
    model's own floating dtype. Quantizers sized exactly: bitsandbytes 4-bit and 8-bit, torchao (any
    config torchao can apply on the meta device). Any other quantizer raises
    :class:`devicemap.InvalidOptionError`; its pre-quantized checkpoints are sized exactly from their
    headers instead.

    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 8))
    >>> sizer = quantized_sizer(model, {"quant_method": "bitsandbytes", "load_in_4bit": True,
    ...                                 "bnb_4bit_quant_type": "nf4"}, torch.bfloat16)
    >>> {k: v // 8 for k, v in sizer.parts("0.weight").items() if "quant_state" not in k}
    {'0.weight': 32768, '0.weight.absmax': 4096, '0.weight.quant_map': 64}
    """
    import torch

    load_dtype = to_dtype(dtype) if dtype is not None else _model_dtype(model)
    keep_fp32 = _keep_fp32_names(model, load_dtype)
    if quantization_config is None:
        return QuantizedSizer(None, OffloadRule(), {}, keep_fp32)
    if isinstance(quantization_config, GGUF):  # the weights llama.cpp loads (sizing/gguf.py)
        stored = gguf_bits(model, quantization_config.file_type)
        rule = offload_rule(quantization_config)
        return QuantizedSizer("gguf", rule, {name: {name: bits} for name, bits in stored.items()}, ())
    config = _as_config(quantization_config)
    method = _method(config)
    rule = offload_rule(config, pre_quantized=pre_quantized)
    get = _getter(config)
    skip = _modules_to_not_convert(model, method, get)
    parts: dict[str, dict[str, int]] = {}
    if method in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        if method == "bitsandbytes_8bit" and get("llm_int8_has_fp16_weight", False):
            return QuantizedSizer(method, rule, {}, keep_fp32)  # weights stay in the model's dtype
        conv1d = _conv1d_type()
        for module_name, module in model.named_modules():
            if not _should_convert(module_name, skip):
                continue
            if type(module) is torch.nn.Linear:
                out_features, in_features = module.out_features, module.in_features
            elif conv1d is not None and isinstance(module, conv1d):
                in_features, out_features = module.weight.shape  # type: ignore[attr-defined]
            else:
                continue
            name = f"{module_name}.weight" if module_name else "weight"
            weight_dtype = torch.float32 if name in keep_fp32 else load_dtype
            if method == "bitsandbytes_4bit":
                parts[name] = _bnb_4bit_parts(name, out_features, in_features, weight_dtype, get)
            else:
                prefix = module_name + "." if module_name else ""
                parts[name] = {
                    name: out_features * in_features * 8,
                    f"{prefix}SCB": out_features * 32,
                    f"{prefix}weight_format": 8,
                }
        return QuantizedSizer(method, rule, parts, keep_fp32)
    if method == "torchao":
        torchao_quantization()
        sizes = _TorchAoSizes(config)
        embeddings = bool(get("include_input_output_embeddings", False))
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                kind = "linear"
            elif embeddings and isinstance(module, torch.nn.Embedding):
                kind = "embedding"
            else:
                continue
            weight = module._parameters.get("weight")
            if weight is None:
                continue
            name = f"{module_name}.weight" if module_name else "weight"
            if not _should_convert(name, skip):
                continue
            weight_dtype = torch.float32 if name in keep_fp32 else _float_dtype(weight.dtype, load_dtype)
            found = sizes.parts(name, kind, tuple(weight.shape), weight_dtype)
            if found is not None:
                parts[name] = found
        return QuantizedSizer(method, rule, parts, keep_fp32)
    raise InvalidOptionError(
        f"cannot size quantization method {method!r} from the unquantized model yet: sized exactly are "
        "bitsandbytes 4-bit/8-bit and torchao; plan a pre-quantized checkpoint from its safetensors headers"
    )


# ---------------------------------------------------------------------------------------------------
# bitsandbytes


def pre_quantized_modules(
    model: torch.nn.Module, quantization_config: Any
) -> tuple[str, frozenset[str]] | None:
    """The quant method of a pre-quantized checkpoint's ``quantization_config`` and the modules of ``model``
    (built from its config) that the quantizer converted, as :attr:`QuantizedSizer.converted_modules`;
    ``None`` for a quantizer devicemap cannot size from a model (its checkpoint's bytes come from the
    headers anyway)."""
    try:
        return quantized_sizer(model, quantization_config, pre_quantized=True).converted_modules
    except InvalidOptionError:
        return None


def _bnb_4bit_parts(
    name: str, out_features: int, in_features: int, weight_dtype: torch.dtype, get: Any
) -> dict[str, int]:
    """One Linear4bit weight as ``state_dict`` stores it, in bits per entry."""
    numel = out_features * in_features
    blocks = -(-numel // BNB_4BIT_BLOCKSIZE)
    quant_type = str(get("bnb_4bit_quant_type", "fp4"))
    nested = bool(get("bnb_4bit_use_double_quant", False))
    parts = {name: -(-numel // 2) * 8}  # two 4-bit codes a byte, whatever quant_storage views them as
    record: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": BNB_4BIT_BLOCKSIZE,
        "dtype": str(weight_dtype).strip("torch."),  # bitsandbytes' own spelling of the dtype
        "shape": [out_features, in_features],
    }
    if nested:
        parts[f"{name}.absmax"] = blocks * 8
        parts[f"{name}.quant_map"] = BNB_4BIT_CODE_ENTRIES * 32
        parts[f"{name}.nested_absmax"] = -(-blocks // BNB_NESTED_BLOCKSIZE) * 32
        parts[f"{name}.nested_quant_map"] = BNB_NESTED_CODE_ENTRIES * 32
        record.update(nested_blocksize=BNB_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.5)
    else:
        parts[f"{name}.absmax"] = blocks * 32
        parts[f"{name}.quant_map"] = BNB_4BIT_CODE_ENTRIES * 32
    text = json.dumps(record)
    if nested:
        text = text.replace("0.5}", _OFFSET_REPR + "}")
    parts[f"{name}.quant_state.bitsandbytes__{quant_type}"] = len(text.encode()) * 8
    return parts


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no model can hold its Conv1D
        return None
    return Conv1D


# ---------------------------------------------------------------------------------------------------
# torchao


def torchao_quantization(purpose: str = "a torchao quantization_config") -> ModuleType:
    """``torchao.quantization``, or :class:`devicemap.InvalidOptionError` saying why torchao cannot be
    used here: not installed, or installed but failing to import with this torch (each torchao release
    supports a few torch releases: torchao 0.13 uses ``torch.int1``, new in torch 2.6, and stops with an
    ``AttributeError`` on torch 2.4). ``purpose`` names what needed torchao in the message."""
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] == "torchao":
            raise InvalidOptionError(f"{purpose} needs torchao (pip install torchao)") from None
        problem: BaseException = error
    except Exception as error:  # torchao runs torch-version-specific code at import
        problem = error
    import torch

    torchao_version, torch_version = _installed_version("torchao"), torch.__version__
    missing = re.fullmatch(r"module 'torch' has no attribute '(\w+)'", str(problem))
    why = (
        f"it uses torch.{missing[1]}, which torch {torch_version} lacks"
        if isinstance(problem, AttributeError) and missing
        else f"{type(problem).__name__}: {problem}"
    )
    raise InvalidOptionError(
        f"{purpose} needs torchao, but torchao {torchao_version} cannot be imported with torch "
        f"{torch_version} ({why}); install the torchao release made for torch {torch_version}, or a newer "
        "torch"
    ) from problem


def check_quantizer_runs(quantization_config: Any, device_map: Mapping[str, Any]) -> None:
    """Raise :class:`devicemap.InvalidOptionError` when transformers cannot load a model with
    ``quantization_config`` and ``device_map`` on this torch, before anything is loaded: transformers 5
    swaps quantized layers in with ``torch.nn.Module.set_submodule``, which torch 2.4 lacks (a map that
    leaves every layer unquantized, bitsandbytes' fp32 offload of a model all on the CPU and disk, swaps
    none), and torchao must import (:func:`torchao_quantization`). Planning with such a config needs
    neither."""
    import torch

    config = _as_config(quantization_config)
    method = _method(config)
    if method == "torchao":
        torchao_quantization()
        return
    if not method.startswith("bitsandbytes") or hasattr(torch.nn.Module, "set_submodule"):
        return
    on_accelerators = any(device not in ("cpu", "disk") for device in device_map.values())
    if not on_accelerators and not offload_rule(config).offloaded_quantized:
        return  # every layer loads unquantized: none is swapped
    import transformers

    raise InvalidOptionError(
        f"transformers {transformers.__version__} loads with a {method} quantization_config by swapping "
        f"layers in with torch.nn.Module.set_submodule, which torch {torch.__version__} lacks; upgrade "
        "torch to load it (devicemap.plan sizes it on this torch too)"
    )


def _installed_version(distribution: str) -> str:
    import importlib.metadata  # here: it costs the command's start-up ~15 ms

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


class _TorchAoSizes:
    """What torchao stores for a weight of a given shape and dtype, found by quantizing a meta-device
    layer with the same config (cached per config, kind, shape and dtype)."""

    def __init__(self, config: Any):
        self.config = config
        self.cache: dict[tuple[int, str, tuple[int, ...], torch.dtype], dict[str, int] | None] = {}

    def parts(
        self, name: str, kind: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> dict[str, int] | None:
        ao_config = self._config_for(name, kind)
        if ao_config is None:
            return None
        key = (id(ao_config), kind, shape, dtype)
        if key not in self.cache:
            self.cache[key] = _torchao_inner_bits(ao_config, kind, shape, dtype)
        found = self.cache[key]
        if found is None:
            return None
        return {f"{name}:{inner}" if inner else name: bits for inner, bits in found.items()}

    def _config_for(self, name: str, kind: str) -> Any:
        """The torchao config applied to parameter ``name`` (FqnToConfig resolves per name)."""
        ao_config = self.config.get_apply_tensor_subclass()
        table = getattr(ao_config, "fqn_to_config", None)
        if table is None:
            return ao_config
        module = name.rsplit(".", 1)[0]
        for key in (name, module):
            if key in table:
                return table[key]
        for pattern, found in table.items():
            if pattern.startswith("re:") and (
                re.fullmatch(pattern[3:], name) or re.fullmatch(pattern[3:], module)
            ):
                return found
        return table.get("_default")


def _torchao_inner_bits(
    ao_config: Any, kind: str, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, int] | None:
    import torch

    quantize_ = torchao_quantization().quantize_
    config = ao_config
    if dataclasses.is_dataclass(config) and any(
        f.name == "set_inductor_config" for f in dataclasses.fields(config)
    ):
        # Sizing must not retune torch's inductor globally, as applying the config would.
        config = dataclasses.replace(copy.copy(config), set_inductor_config=False)  # type: ignore[type-var]
    with torch.device("meta"):
        if kind == "embedding":
            layer: torch.nn.Module = torch.nn.Embedding(shape[0], shape[1], dtype=dtype)
        else:
            layer = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
    quantize_(layer, config)  # torchao's own default filter: a config may leave embeddings alone
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        return None
    if type(weight) is torch.nn.Parameter and weight.dtype == dtype:
        return None  # the config leaves this weight as it was
    return _inner_bits(weight)


def _inner_bits(tensor: torch.Tensor, prefix: str = "") -> dict[str, int]:
    """Bits of the plain tensors a (possibly nested) tensor subclass is made of."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor).__name__ in ("Parameter", "Tensor"):
        return {prefix: tensor.numel() * storage_bits(tensor.dtype)}
    names, _ = flatten()
    out: dict[str, int] = {}
    for inner in names:
        value = getattr(tensor, inner)
        if value is not None:
            out.update(_inner_bits(value, f"{prefix}.{inner}" if prefix else inner))
    return out


# ---------------------------------------------------------------------------------------------------
# transformers' rules: configs, modules_to_not_convert, _keep_in_fp32_modules


def _as_config(quantization_config: Any) -> Any:
    """A transformers quantization config object from one or its dict form."""
    if isinstance(quantization_config, Mapping):
        if quantization_config.get("quant_method") == "torchao":
            torchao_quantization()  # transformers' TorchAoConfig imports it: say first when it cannot
        try:
            from transformers.quantizers.auto import AutoQuantizationConfig
        except ImportError:
            return dict(quantization_config)
        try:
            return AutoQuantizationConfig.from_dict(dict(quantization_config))
        # transformers validates these dicts with KeyError and assert too ({'quant_method': 'torchao'}
        # without quant_type; a quant_type string where a dict is expected)
        except (ValueError, TypeError, KeyError, AssertionError, AttributeError) as error:
            shown = repr(dict(quantization_config))
            shown = shown if len(shown) <= 200 else shown[:199] + "…"
            raise InvalidOptionError(
                f"bad quantization_config {shown}: {type(error).__name__}: {str(error)[:300]}"
            ) from None
    if not hasattr(quantization_config, "quant_method"):
        raise InvalidOptionError(
            f"quantization_config must be a transformers quantization config or its dict form with "
            f"'quant_method', got {quantization_config!r}"
        )
    return quantization_config


def _getter(config: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get
    return lambda key, default=None: getattr(config, key, default)


def _method(config: Any) -> str:
    """The quant method name, bitsandbytes split into ``bitsandbytes_4bit`` / ``_8bit`` as transformers does."""
    get = _getter(config)
    method = get("quant_method")
    method = getattr(method, "value", method)
    if get("load_in_4bit", False):
        return "bitsandbytes_4bit"
    if get("load_in_8bit", False):
        return "bitsandbytes_8bit"
    if method is None:
        raise InvalidOptionError(f"quantization_config {config!r} has no 'quant_method'")
    return str(method)


def _modules_to_not_convert(model: torch.nn.Module, method: str, get: Any) -> list[str]:
    """The skip patterns transformers' quantizer builds: its own default skips (tied weights, the last
    parameter, the output embeddings) unless the config names modules, plus ``_keep_in_fp32_modules``."""
    key = "llm_int8_skip_modules" if method.startswith("bitsandbytes") else "modules_to_not_convert"
    named = get(key)
    if named is not None and (
        isinstance(named, str)
        or not isinstance(named, (list, tuple, set, frozenset))
        or not all(isinstance(n, str) for n in named)
    ):
        raise InvalidOptionError(
            f"quantization_config {key} must be a list of module names such as ['lm_head'], got {str(named)[:200]}"
        )
    skip: list[str] = list(named) if named is not None else _default_skips(model)
    if method == "torchao" and get("include_input_output_embeddings", False):
        embeddings = {id(m) for m in _embedding_modules(model)}
        names = {name for name, m in model.named_modules() if id(m) in embeddings}
        skip = [s for s in skip if s not in names]
    skip.extend(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skip))


def _embedding_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is not None:
            found.append(module)
    return found


def _default_skips(model: torch.nn.Module) -> list[str]:
    keys: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys.update(tied.keys())
    keys.update(tied.values())
    names = [name for name, _ in model.named_parameters()]
    if names:
        keys.add(names[-1])
    try:
        output = model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        output = None
    if output is not None:
        keys.update(name for name, module in model.named_modules() if module is output)
    return sorted({key.removesuffix(".weight") for key in keys})


def _should_convert(name: str, patterns: list[str]) -> bool:
    """transformers' skip test: a pattern matches from the start up to a module boundary (also as a
    regex), or as a suffix of the name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return False
        except re.error:
            pass
        if name.endswith(key):
            return False
    return True


def _keep_fp32_names(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Floating tensors transformers loads in float32 whatever ``dtype`` says (its dtype plan: a regex
    search of each ``_keep_in_fp32_modules`` pattern in the tensor name)."""
    import torch

    patterns: list[str] = []
    if dtype == torch.float16:
        patterns.extend(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns.extend(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return set()
    search = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(set(patterns)))).search
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    return {name for name in names if search(name)}


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    import torch

    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _float_dtype(own: torch.dtype, load: torch.dtype) -> torch.dtype:
    return load if own.is_floating_point else own
