"""Sizes of a model's tensors as llama.cpp stores them in a GGUF file of one quantization type.

Plans exported to llama.cpp (``devicemap export --to llama.cpp``) place the weights llama.cpp loads, not the
bf16 ones transformers would: a Q4_K_M Mixtral-8x7B is 26 GB, not 93. ``GGUF("Q4_K_M")`` passed as
``quantization_config`` sizes every tensor of the (meta-device) transformers model as llama.cpp's quantizer
stores it, with the rules of its type selection (``src/llama-quant.cpp``), read for the categories
transformers models map to:

- quantized are 2-D tensors named ``*weight`` and 3-D expert tensors, except norms and the MoE router
  (``ffn_gate_inp``);
  1-D tensors (norms, biases) are float32, other unquantized ones 16-bit, as ``convert_hf_to_gguf`` writes;
- the output head (and a token embedding tied to it) is Q6_K (Q8_0 where its row length is not a multiple
  of 256, and for Q8_0 / MXFP4_MOE files);
- Q4_K_M / Q5_K_M give ``attn_v`` and ``ffn_down`` Q6_K in the layers of ``use_more_bits`` (the first and
  last eighth and every third layer between), and fused QKV Q5_K / Q6_K; models with 8 experts get
  ``attn_v``/``attn_k`` at Q8_0 and (Q4_K_M) ``attn_output`` at Q5_K; 80-layer Llamas (70B) ``attn_v``
  Q5_K where it would be Q4_K;
- MXFP4_MOE stores routed experts (3-D) in MXFP4 and every other quantized tensor in Q8_0;
- a row length a K-quant cannot hold (not a multiple of 256) falls back as llama.cpp does (Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0), and to F16 when that cannot either.

Bytes per block of each type are ggml's (``ggml/src/ggml-common.h``): a tensor of ``n`` elements in rows of
``k`` takes ``n / block x bytes``. Not modelled: ``--tensor-type`` overrides, importance matrices (they
change the type only for IQ and Q2/Q3 mixes, not for the types here), and architectures whose tensors
llama.cpp names outside these categories (their weights take the file's base type).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    import torch

BLOCKS: dict[str, tuple[int, int]] = {
    # type: (elements per block, bytes per block), from ggml's block structs
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "MXFP4": (32, 17),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
FILE_TYPES: dict[str, str] = {
    # file type: the base type of its quantized tensors
    "Q8_0": "Q8_0",
    "Q4_0": "Q4_0",
    "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "MXFP4_MOE": "Q8_0",
}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class GGUF:
    """A llama.cpp file type (``"Q4_K_M"``, ``"Q8_0"``, ``"MXFP4_MOE"``, ...): pass it as
    ``quantization_config`` to plan the weights llama.cpp loads.

    >>> GGUF("q4_k_m").file_type
    'Q4_K_M'
    """

    file_type: str

    def __post_init__(self) -> None:
        name = str(self.file_type).upper().replace("-", "_")
        if name not in FILE_TYPES:
            raise InvalidOptionError(
                f"unknown GGUF file type {self.file_type!r}: use one of {', '.join(sorted(FILE_TYPES))}"
            )
        object.__setattr__(self, "file_type", name)

    @property
    def quant_method(self) -> str:
        return "gguf"


def tensor_bytes(type_name: str, elements: int) -> int:
    """Bytes of ``elements`` values stored as ``type_name``.

    >>> tensor_bytes("Q4_K", 4096 * 4096), tensor_bytes("Q8_0", 64)
    (9437184, 68)
    """
    per_block, size = BLOCKS[type_name]
    return -(-elements // per_block) * size


def gguf_types(model: torch.nn.Module, file_type: str) -> dict[str, str]:
    """The GGUF type of each parameter of ``model`` (by its full name) in a file of ``file_type``."""
    base = FILE_TYPES[file_type]
    config = getattr(model, "config", None)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    experts = int(
        getattr(config, "num_local_experts", 0)
        or getattr(config, "num_experts", 0)
        or getattr(config, "n_routed_experts", 0)
        or 0
    )
    seventy_b = layers == 80 and getattr(config, "model_type", "") == "llama"
    output = _output_weight(model)
    tied = output is not None and _embedding_is_output(model, output)
    types: dict[str, str] = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        # transformers 5 names fused expert tensors without ".weight" (gate_up_proj, down_proj); llama.cpp
        # calls them ffn_*_exps.weight and quantizes them like any weight.
        weight = name.endswith("weight") or len(shape) == 3
        if len(shape) < 2 or not weight or "norm" in name or _is_router(name, shape, experts):
            types[name] = "F32" if len(shape) < 2 else "F16"
            continue
        if param is output or (tied and "embed" in name):
            chosen = "Q8_0" if file_type in ("Q8_0", "MXFP4_MOE") or shape[-1] % 256 else "Q6_K"
        elif file_type == "MXFP4_MOE":
            chosen = "MXFP4" if len(shape) == 3 else "Q8_0"
        else:
            chosen = _mixed(name, base, file_type, _layer(name), layers, experts, seventy_b)
        types[name] = _fit_rows(chosen, shape[-1])
    return types


def gguf_bits(model: torch.nn.Module, file_type: str) -> dict[str, int]:
    """Stored bits of every parameter of ``model`` in a GGUF file of ``file_type``."""
    sizes = {}
    shapes = dict(model.named_parameters())
    for name, type_name in gguf_types(model, file_type).items():
        sizes[name] = tensor_bytes(type_name, shapes[name].numel()) * 8
    return sizes


def _mixed(
    name: str, base: str, file_type: str, layer: int, layers: int, experts: int, seventy_b: bool
) -> str:
    """llama.cpp's choice for a tensor of a K-quant mix (or the base type of a uniform file)."""
    more_bits = layers > 0 and _use_more_bits(layer, layers)
    mix = file_type in ("Q4_K_M", "Q5_K_M")
    if re.search(r"(v_proj|qkv|kv_b)", name):  # attn_v-like
        if "qkv" in name and mix:
            return "Q5_K" if file_type == "Q4_K_M" else "Q6_K"
        chosen = "Q6_K" if mix and more_bits else base
        if seventy_b and chosen == "Q4_K":
            chosen = "Q5_K"
        return "Q8_0" if experts == 8 else chosen
    if "k_proj" in name:
        return "Q8_0" if experts == 8 else base
    if re.search(r"(down_proj|w2\b|\.w2\.)", name):
        return "Q6_K" if mix and more_bits else base
    if re.search(r"(o_proj|out_proj|dense\b)", name) and experts == 8 and file_type == "Q4_K_M":
        return "Q5_K"
    return base


def _use_more_bits(layer: int, layers: int) -> bool:
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


def _fit_rows(type_name: str, row: int) -> str:
    """A type whose blocks fit rows of ``row`` values: llama.cpp's fallback for K-quants, else F16."""
    if row % BLOCKS[type_name][0] == 0:
        return type_name
    fallback = _FALLBACK.get(type_name)
    if fallback is not None and row % BLOCKS[fallback][0] == 0:
        return fallback
    return "F16"


def _layer(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else 0


def _is_router(name: str, shape: tuple[int, ...], experts: int) -> bool:
    """The MoE router (llama.cpp's ``ffn_gate_inp``): a ``[experts, hidden]`` gate, kept unquantized."""
    return (
        experts > 1
        and len(shape) == 2
        and shape[0] == experts
        and re.search(r"\.(gate|router)\b", name) is not None
    )


def _embedding_is_output(model: torch.nn.Module, output: torch.Tensor) -> bool:
    """Whether a token embedding is the output head's matrix: the same tensor, or a tie transformers
    declares (``all_tied_weights_keys``; transformers 5.0 builds a model untied and ties it when loading)."""
    named = list(model.named_parameters(remove_duplicate=False))
    if any(p is output for n, p in named if "embed" in n):
        return True
    heads = {n for n, p in named if p is output}
    declared = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return any((a in heads and "embed" in b) or (b in heads and "embed" in a) for a, b in declared.items())


def _output_weight(model: torch.nn.Module) -> torch.Tensor | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    return weight if weight is not None else None
