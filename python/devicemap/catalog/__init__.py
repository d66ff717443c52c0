"""Bundled model shapes: transformers ``config.json`` files of public models (no weights).

Build any of them on the meta device to plan it without downloading anything::

    >>> from devicemap import catalog
    >>> "llama-3-70b" in catalog.names()
    True
    >>> model = catalog.build_meta_model("llama-3.2-1b")
    >>> next(model.parameters()).device.type
    'meta'
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from importlib import resources
from typing import Any, Optional, Union

from ..errors import UnknownModuleError

__all__ = ["build_meta_model", "load_config", "names", "parameter_count"]


@functools.cache
def _configs() -> dict[str, dict[str, Any]]:
    folder = resources.files(__name__) / "configs"
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            found[entry.name[: -len(".json")]] = json.loads(entry.read_text())
    return found


def names() -> list[str]:
    """The bundled model names, sorted."""
    return sorted(_configs())


def load_config(name: str) -> dict[str, Any]:
    """The config dict of a bundled model (a copy).

    Raises :class:`devicemap.UnknownModuleError` naming close matches for an unknown name.
    """
    configs = _configs()
    if name not in configs:
        close = difflib.get_close_matches(name, list(configs), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(names())}"
        raise UnknownModuleError(f"unknown model {name!r} in the devicemap catalog{hint}")
    return copy.deepcopy(configs[name])


def build_meta_model(name_or_config: Union[str, dict[str, Any]], num_hidden_layers: Optional[int] = None):
    """The transformers model of a bundled name or a config dict, on the meta device (no memory).

    ``num_hidden_layers`` overrides the depth (handy for quick tests). Tied embeddings are tied.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config_dict = load_config(name_or_config) if isinstance(name_or_config, str) else dict(name_or_config)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise UnknownModuleError("the config has no 'model_type'; pass a transformers config.json")
    if num_hidden_layers is not None:
        for key in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
            if key in config_dict:
                config_dict[key] = num_hidden_layers
    config = AutoConfig.for_model(model_type, **config_dict)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    model.tie_weights()
    return model


@functools.cache
def parameter_count(name: str) -> int:
    """Parameters of a bundled model (each tied storage counted once)."""
    return sum(p.numel() for p in build_meta_model(name).parameters())
