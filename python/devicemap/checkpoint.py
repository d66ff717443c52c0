"""Plan a safetensors checkpoint from its headers alone: no model, no tensor data.

    plan = devicemap.plan_checkpoint("path/to/model", max_memory={0: "80GiB", 1: "80GiB"},
                                     dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained("path/to/model", device_map=plan.device_map)

``path`` is a ``.safetensors`` file, a ``model.safetensors.index.json`` (every shard is read) or a
folder holding either. With a ``config.json`` beside it, the numbered decoder layers become unsplittable
blocks and tied embeddings are tied; without one, pass ``block_pattern`` (e.g. ``"model.layers.*"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from . import _core
from .errors import CheckpointError
from .memory import Size
from .planning import Plan, plan
from .tree import DtypeLike, ModuleTree, dtype_bits, to_dtype
from .workload import Workload

BLOCK_CLASS = "CheckpointBlock"
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")


def find_config(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The ``config.json`` next to a checkpoint file/index, or inside a checkpoint folder."""
    path = Path(path)
    candidate = (path if path.is_dir() else path.parent) / "config.json"
    if not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"bad checkpoint {candidate}: malformed config.json ({err})") from None


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def layer_counts(config: Mapping[str, Any]) -> list[int]:
    c = _text_config(config)
    keys = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")
    return sorted({int(c[k]) for k in keys if isinstance(c.get(k), int)})


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
    path: Union[str, Path],
    dtype: Optional[DtypeLike] = None,
    block_pattern: Optional[Union[str, Iterable[str]]] = None,
    config: Optional[Mapping[str, Any]] = None,
) -> ModuleTree:
    """The size tree of a checkpoint, from its headers (see the module docs)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"bad checkpoint {path}: no such file or folder")
    config = dict(config) if config is not None else find_config(path) or {}
    patterns = [block_pattern] if isinstance(block_pattern, str) else list(block_pattern or [])
    bits = dtype_bits(to_dtype(dtype)) if dtype is not None else None
    core = _core.tree_from_checkpoint(str(path), patterns, layer_counts(config), tie_groups(config), bits)
    return ModuleTree(core, no_split_module_classes=[BLOCK_CLASS])


def plan_checkpoint(
    path: Union[str, Path],
    max_memory: Optional[Mapping[object, Size]] = None,
    strategy: str = "auto",
    dtype: Optional[DtypeLike] = None,
    pins: Optional[Mapping[str, object]] = None,
    offload_buffers: bool = False,
    block_pattern: Optional[Union[str, Iterable[str]]] = None,
    config: Optional[Mapping[str, Any]] = None,
    gpu0_reserve: Optional[Size] = None,
    workload: Optional[Workload] = None,
) -> Plan:
    """Plan a checkpoint too big to instantiate, reading only its safetensors headers (in Rust).

    Headers are validated: a truncated file, a header length past the end, malformed JSON, unknown
    dtypes, offsets out of range or overlapping, sizes not matching shapes, and shards listed in the
    index but missing each raise :class:`devicemap.CheckpointError` naming the file and the fault.

    A ``workload`` plans each decoder layer's KV cache with it (as :func:`devicemap.plan` does), sized
    from the ``config.json``; it needs one.

    >>> import devicemap, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({f"layers.{i}.weight": torch.zeros(256, 256) for i in range(4)}, f"{folder}/model.safetensors")
    >>> devicemap.plan_checkpoint(folder, max_memory={0: "600KiB", 1: "600KiB"}, block_pattern="layers.*").device_map
    {'layers.0': 0, 'layers.1': 0, 'layers.2': 1, 'layers.3': 1}
    """
    config = dict(config) if config is not None else find_config(path) or {}
    tree = checkpoint_tree(path, dtype=dtype, block_pattern=block_pattern, config=config)
    runtime = _workload_memory(tree, config, workload, dtype) if workload is not None else None
    return plan(
        tree,
        max_memory=max_memory,
        strategy=strategy,
        pins=pins,
        offload_buffers=offload_buffers,
        gpu0_reserve=gpu0_reserve,
        runtime_memory=runtime,
    )


def _workload_memory(
    tree: ModuleTree, config: Mapping[str, Any], workload: Workload, dtype: Optional[DtypeLike]
) -> tuple[list[tuple[str, int]], int]:
    """KV cache per decoder block, logits with ``lm_head``, activations: from the config alone."""
    if not config:
        raise CheckpointError("a workload needs the checkpoint's config.json (layer count, heads, sizes)")
    view = _ConfigView(config)
    layers = tree.core.modules_of_class(BLOCK_CLASS)
    if view.get("is_encoder_decoder"):
        layers = [name for name in layers if name.startswith("decoder.")]
    per_layer = workload.kv_cache_bytes_per_layer(view, dtype) * 8
    runtime = [(name, per_layer) for name in layers]
    if tree.core.find("lm_head") is not None:
        runtime.append(("lm_head", workload.logits_bytes(view) * 8))
    return runtime, workload.activation_bytes(view, dtype or view.get("torch_dtype") or view.get("dtype")) * 8


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
