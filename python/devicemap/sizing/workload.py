"""Workload-aware memory: the KV cache, activations and logits that running a model needs.

A layer's KV cache lives on the device that runs the layer (for an offloaded layer: the execution
device, GPU 0), so devicemap plans it there instead of discovering it as an out-of-memory error during
``generate``. Formulas (bytes; ``b`` batch size, ``s`` sequence length):

- KV cache per decoder layer: ``2 * b * s * num_key_value_heads * head_dim * bytes(kv_dtype)``
  (twice that for encoder-decoder models, whose decoder layers also cache cross-attention keys/values);
- activations, once per computing device: ``b * s * (4 * hidden_size + 2 * intermediate_size) *
  bytes(dtype)`` (the residual stream, attention input/output and the MLP's widest tensors of one layer,
  with fused attention that never materialises the ``s x s`` scores);
- logits, on the device of the output head: ``b * logits_tokens * vocab_size * 4`` (float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError, InvalidSizeError
from ..inputs import dtype_names
from ..inputs.dtypes import DtypeLike, dtype_bits, to_dtype
from ..inputs.memory import MAX_SIZE
from ..inputs.model_config import config_count, config_value, text_config
from .tree import ModuleTree

if TYPE_CHECKING:
    import torch


def _element_bits(dtype: DtypeLike, option: str = "dtype") -> int:
    """:func:`dtype_bits` of a dtype or its name (common names without importing torch)."""
    named = dtype_names.known(dtype)
    return named.bits if named is not None else dtype_bits(to_dtype(dtype, option))


def compute_dtype(dtype: DtypeLike | None) -> DtypeLike | None:
    """The dtype activations and the KV cache are computed in when weights are sized as ``dtype``:
    itself when it is a floating dtype of 16 bits or more; ``None`` (the default, float16) for int8/fp8
    weight sizes, which quantized models still compute in 16 bits."""
    if dtype is None:
        return None
    named = dtype_names.known(dtype)
    if named is not None:  # a name: answered without torch, as the name
        return named.name if named.floating and named.bits >= 16 else None
    resolved = to_dtype(dtype)
    return resolved if resolved.is_floating_point and dtype_bits(resolved) >= 16 else None


@dataclass(frozen=True)
class Workload:
    """How the model will be run, so the plan leaves room for it.

    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
    ...                      num_hidden_layers=32, intermediate_size=14336, vocab_size=128256)
    >>> Workload(batch_size=1, seq_len=8192, kv_dtype="bfloat16").kv_cache_bytes_per_layer(config)
    33554432
    """

    batch_size: int = 1
    seq_len: int = 2048
    kv_dtype: DtypeLike | None = None
    """Dtype of the KV cache; default: the planning dtype, else float16."""
    logits_tokens: int | None = 1
    """Positions whose logits exist at once: 1 for ``generate`` (it keeps only the last position's);
    ``None`` means ``seq_len``, for full forward passes such as evaluation."""
    new_tokens: int | None = None
    """Tokens generated per request after the prefill of ``seq_len`` tokens. Given, ``objective="speed"``
    minimises a request's time (prefill + ``new_tokens`` x one decoded token) and may keep room on a GPU
    to stream CPU-run blocks there for the prefill; ``None``: it minimises one decoded token's time."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"Workload.{name} must be a positive int, got {value!r}")
        new = self.new_tokens
        if new is not None and (not isinstance(new, int) or isinstance(new, bool) or new < 0):
            raise InvalidOptionError(f"Workload.new_tokens must be a non-negative int or None, got {new!r}")
        tokens = self.logits_tokens
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
            raise InvalidOptionError(
                f"Workload.logits_tokens must be a non-negative int or None, got {tokens!r}"
            )
        if self.kv_dtype is not None:
            _element_bits(self.kv_dtype, "Workload.kv_dtype")

    def _bytes_per(self, dtype: DtypeLike | None, fallback: DtypeLike | None) -> int:
        chosen = dtype if dtype is not None else fallback if fallback is not None else "float16"
        return _element_bits(chosen) // 8

    def kv_cache_bytes_per_layer(self, config: Any, dtype: DtypeLike | None = None) -> int:
        """KV cache of one decoder layer, from the model config (transformers naming, T5 naming)."""
        c = text_config(config)
        heads = config_count(c, "num_attention_heads", "num_heads", "n_head")
        kv_heads = config_count(c, "num_key_value_heads", "num_kv_heads", default=heads)
        if getattr(c, "multi_query", False):  # Falcon-style multi-query attention
            kv_heads = 1
        if config_value(c, "head_dim", "d_kv") is not None:
            head_dim = config_count(c, "head_dim", "d_kv")
        else:
            head_dim = config_count(c, "hidden_size", "d_model") // heads
        per = 2 * self.batch_size * self.seq_len * kv_heads * head_dim
        per *= self._bytes_per(self.kv_dtype, compute_dtype(dtype))
        return per * (2 if getattr(c, "is_encoder_decoder", False) else 1)

    def activation_bytes(self, config: Any, dtype: DtypeLike | None = None) -> int:
        c = text_config(config)
        hidden = config_count(c, "hidden_size", "d_model")
        inner = config_count(c, "intermediate_size", "d_ff", "ffn_dim", default=4 * hidden)
        return (
            self.batch_size
            * self.seq_len
            * (4 * hidden + 2 * inner)
            * self._bytes_per(compute_dtype(dtype), None)
        )

    def logits_bytes(self, config: Any) -> int:
        tokens = self.seq_len if self.logits_tokens is None else self.logits_tokens
        return self.batch_size * tokens * config_count(text_config(config), "vocab_size") * 4


def decoder_layers(model: torch.nn.Module, config: Any) -> list[str]:
    """Names of the layers that hold a KV cache: the ModuleList with one entry per decoder layer."""
    import torch

    c = text_config(config)
    count = config_value(c, "num_decoder_layers", "num_hidden_layers", "num_layers", "n_layer")
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    ]
    if not candidates:
        return []
    decoders = [c for c in candidates if "decoder" in c[0]]
    name, layers = (decoders or candidates)[0]
    return [f"{name}.{i}" if name else str(i) for i in range(len(layers))]


def output_head(model: torch.nn.Module) -> str | None:
    """The module producing logits (transformers' output embeddings)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


@dataclass(frozen=True)
class RuntimeMemory:
    """Memory a workload needs besides the weights, in bits: per module (a decoder layer's KV cache, the
    head's logits) and once on every computing device (activations)."""

    per_module: list[tuple[str, int]] = field(default_factory=list)
    activation_bits: int = 0


def runtime_memory(
    model: torch.nn.Module, tree: ModuleTree, workload: Workload, dtype: DtypeLike | None
) -> RuntimeMemory:
    """The runtime memory of ``workload`` on a transformers model (its config, decoder layers and head)."""
    config = getattr(model, "config", None)
    if config is None:
        raise InvalidOptionError(
            "workload needs the model's config (model.config, as transformers models have) to size the "
            "KV cache; plan a transformers model or leave workload=None"
        )
    if dtype is None:  # the dtype the weights will have: else the model's own floating dtype
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    layers = decoder_layers(model, config)
    if not layers:
        raise InvalidOptionError(
            f"could not find the decoder layers of {type(model).__name__} (a ModuleList with one entry per "
            "layer); pass a transformers model or leave workload=None"
        )
    return layer_runtime(workload, config, layers, output_head(model), dtype, dtype)


def layer_runtime(
    workload: Workload,
    config: Any,
    layers: list[str],
    head: str | None,
    kv_dtype: DtypeLike | None,
    activation_dtype: DtypeLike | None,
) -> RuntimeMemory:
    """KV cache on each decoder layer, logits with the head, activations on every computing device."""
    per_layer = workload.kv_cache_bytes_per_layer(config, kv_dtype) * 8
    per_module = [(name, per_layer) for name in layers]
    if head is not None:
        per_module.append((head, workload.logits_bytes(config) * 8))
    return RuntimeMemory(per_module, workload.activation_bytes(config, activation_dtype) * 8)


def check_runtime_bits(runtime: list[tuple[str, int]], activation_bits: int) -> None:
    """The core counts bits in 64-bit integers: a workload needing more than any machine has (2 EiB on one
    layer) is refused here, naming the fix, rather than overflowing."""
    largest = max([activation_bits, *(bits for _, bits in runtime)])
    if largest > MAX_SIZE * 8:
        raise InvalidSizeError(
            f"the workload needs {largest // 8} bytes on one device, more than the {MAX_SIZE} bytes (2 EiB) "
            "devicemap can plan with; use a realistic batch_size and seq_len"
        )
