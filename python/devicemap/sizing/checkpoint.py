"""The size tree of a safetensors checkpoint from its headers alone: no model, no tensor data
(:func:`devicemap.plan_checkpoint` plans it).

    plan = devicemap.plan_checkpoint("path/to/model", max_memory={0: "80GiB", 1: "80GiB"},
                                     dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained("path/to/model", device_map=plan.device_map)

``path`` is a ``.safetensors`` file, a ``model.safetensors.index.json`` (every shard is read; shard
names are relative paths inside the index's folder) or a folder holding either. With a ``config.json``
beside it, the numbered layers become unsplittable blocks and tied embeddings are tied; without one,
pass ``block_pattern`` (e.g. ``"model.layers.*"``).

Which layers are kept whole: every entry of each outermost numbered list (``model.layers.N``,
``encoder.block.N``, ...; lists nested inside a layer, such as experts, are part of it) holding at least
as many entries as the config's smallest layer count (``num_hidden_layers``, ``num_decoder_layers``, ...).
Extra entries past that count, such as DeepSeek-V3's multi-token-prediction layer
``model.layers.61``, are in the checkpoint and are placed like the others (transformers skips them on
load; engines running speculative decoding use them). When no list is that long (a truncated
checkpoint or a single shard of a sharded one) the longest list is kept whole and a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _core
from ..errors import CheckpointError, InvalidOptionError
from ..inputs.arguments import check_mapping, check_path, check_strings
from ..inputs.dtypes import DtypeLike, target_bits
from ..inputs.files import read_json_object, regular_file_status
from ..inputs.model_config import meta_model_from_config
from .tree import ModuleTree
from .workload import RuntimeMemory, Workload, compute_dtype, layer_runtime

if TYPE_CHECKING:
    import torch

BLOCK_CLASS = _core.BLOCK_CLASS
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")


def find_config(path: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` next to a checkpoint file/index, or inside a checkpoint folder."""
    path = Path(path)
    candidate = (path if path.is_dir() else path.parent) / "config.json"
    if regular_file_status(candidate, CheckpointError) is None:
        return None
    return read_json_object(candidate, CheckpointError)


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")
# The decoder's own count first, as devicemap.sizing.workload.decoder_layers reads it.
_DECODER_COUNT_KEYS = ("num_decoder_layers", "num_hidden_layers", "num_layers", "n_layer")


def layer_counts(config: Mapping[str, Any]) -> list[int]:
    c = _text_config(config)
    return sorted({int(c[k]) for k in _LAYER_COUNT_KEYS if _is_count(c.get(k))})


def _is_count(value: Any) -> bool:
    # The core counts in 64 bits: a larger "count" describes no layer list and is ignored like a negative one.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _decoder_count(config: Mapping[str, Any]) -> tuple[str, int] | None:
    c = _text_config(config)
    return next(((k, int(c[k])) for k in _DECODER_COUNT_KEYS if _is_count(c.get(k))), None)


def decoder_layers(tree: ModuleTree, config: Mapping[str, Any]) -> list[str]:
    """The blocks that run as decoder layers (and so hold a KV cache): the entries of the layer list
    with at least the config's decoder layer count and the fewest entries among those (the text
    stack of a vision-language model, not a longer vision stack), extra entries such as
    multi-token-prediction layers included; the longest list when none is that long. Only lists
    under ``decoder`` count for an encoder-decoder model."""
    stacks: dict[str, list[str]] = {}
    for name in tree.core.modules_of_class(BLOCK_CLASS):
        parent, _, last = name.rpartition(".")
        if last.isdigit():
            stacks.setdefault(parent, []).append(name)
    if config.get("is_encoder_decoder"):
        stacks = {k: v for k, v in stacks.items() if "decoder" in k.split(".")}
    if not stacks:
        return []
    expected = _decoder_count(config)
    long_enough = [v for v in stacks.values() if expected is None or len(v) >= expected[1]]
    if long_enough:
        return min(long_enough, key=len)
    return max(stacks.values(), key=len)


def _warn_if_truncated(tree: ModuleTree, config: Mapping[str, Any]) -> None:
    expected = _decoder_count(config)
    layers = decoder_layers(tree, config)
    if expected is None or not layers or len(layers) >= expected[1]:
        return
    key, count = expected
    stack = layers[0].rpartition(".")[0]
    warnings.warn(
        f"config.json says {key}={count} but the checkpoint's {stack} holds {len(layers)} layers: "
        "planning the layers present. Pass the checkpoint folder or its index (not one shard), "
        "or ignore this if the model shares its layers.",
        UserWarning,
        stacklevel=3,
    )


def tie_groups(config: Mapping[str, Any]) -> list[list[str]]:
    """Tied weights as transformers ties them: the input embedding with ``lm_head`` when
    ``tie_word_embeddings`` (transformers' default), encoder/decoder embeddings with ``shared``.
    ``*suffix`` names are resolved by the core against the checkpoint (the first name ending so).
    Without a config nothing is assumed tied."""
    if not config:
        return []
    tie_words = _text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    if config.get("is_encoder_decoder"):
        group = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        return [group + (["lm_head.weight"] if tie_words else [])]
    if not tie_words:
        return []
    return [[f"*{suffix}" for suffix in _EMBEDDING_SUFFIXES] + ["lm_head.weight"]]


def checkpoint_tree(
    path: str | Path,
    *,
    dtype: DtypeLike | None = None,
    block_pattern: str | Iterable[str] | None = None,
    config: Mapping[str, Any] | None = None,
    layer_blocks: bool = True,
) -> ModuleTree:
    """The size tree of a checkpoint, from its headers (see the module docs). A pre-quantized checkpoint
    (its ``config.json`` has a ``quantization_config``) is sized exactly as stored: ``dtype`` is not applied.
    ``layer_blocks=False``: the decoder layers are not blocks by themselves, only what ``block_pattern``
    names is (the speed objective cuts layers into attention and experts)."""
    path = Path(check_path("checkpoint path", path))
    if not path.exists():
        raise CheckpointError(f"bad checkpoint {path}: no such file or folder")
    check_mapping("config", config, "{'num_hidden_layers': 32, ...} (a parsed config.json)")
    config = dict(config) if config is not None else find_config(path) or {}
    patterns = check_block_patterns(block_pattern)
    bits = target_bits(dtype) if dtype is not None else None
    if config.get("quantization_config"):
        # Pre-quantized: the headers hold the stored sizes, quantization state (float32 scales) included,
        # which a dtype must not shrink; the floating weights are saved in the dtype they load in.
        bits = None
    counts = layer_counts(config) if layer_blocks else []
    core = _core.tree_from_checkpoint(str(path), patterns, counts, tie_groups(config), bits)
    tree = ModuleTree(core, no_split_module_classes=[BLOCK_CLASS])
    _warn_if_truncated(tree, config)
    return tree


def check_block_patterns(block_pattern: str | Iterable[str] | None) -> list[str]:
    """``block_pattern`` as a list of module name globs (``*``: one name component)."""
    return check_strings("block_pattern", block_pattern, "module name patterns", "'model.layers.*'") or []


def checkpoint_meta_model(config: Mapping[str, Any], path: str | Path) -> torch.nn.Module:
    """The model a checkpoint's ``config.json`` describes, on the meta device: what the speed objective
    costs its blocks' compute with (the bytes come from the headers)."""
    if not config:
        raise CheckpointError(
            f"objective='speed' costs the checkpoint's modules, and {path} has no config.json beside it: "
            "pass config= (the parsed config.json) or model= (the model on the meta device)"
        )
    fields = {k: v for k, v in config.items() if k != "quantization_config"}  # sizes come from the headers
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointError(f"the config.json of {path} has no model_type: pass model= (the model on meta)")
    try:
        import transformers
    except ImportError:
        raise InvalidOptionError(
            "objective='speed' on a checkpoint builds its model from config.json with transformers "
            "(pip install transformers), or pass model="
        ) from None
    try:
        described = transformers.AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # noqa: BLE001 - whatever transformers refuses is the config's fault
        raise InvalidOptionError(
            f"transformers cannot read the config.json of {path} (model_type {model_type!r}): {err}; "
            "pass model= (the model on the meta device)"
        ) from None
    return meta_model_from_config(described, f"the config.json of {path}", "pass model=")


def checkpoint_runtime_memory(
    tree: ModuleTree, config: Mapping[str, Any], workload: Workload, dtype: DtypeLike | None
) -> RuntimeMemory:
    """KV cache per decoder block, logits with ``lm_head``, activations: from the config alone."""
    if not config:
        raise CheckpointError("a workload needs the checkpoint's config.json (layer count, heads, sizes)")
    view = _ConfigView(config)
    layers = decoder_layers(tree, config)
    if not layers:
        warnings.warn(
            "the checkpoint has no numbered layer list (such as model.layers.N), so the workload's KV "
            "cache is not planned; the plan counts activations and logits only",
            UserWarning,
            stacklevel=3,
        )
    head = "lm_head" if tree.core.find("lm_head") is not None else None
    activation_dtype = compute_dtype(dtype) or view.get("torch_dtype") or view.get("dtype")
    return layer_runtime(workload, view, layers, head, dtype, activation_dtype)


class _ConfigView:
    """Attribute access over a config.json dict (what the workload formulas read)."""

    def __init__(self, config: Mapping[str, Any]):
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return self._config.get(name)

    def get(self, name: str) -> Any:
        return self._config.get(name)

    def get_text_config(self) -> Any:
        text = self._config.get("text_config")
        return _ConfigView(text) if text else self
