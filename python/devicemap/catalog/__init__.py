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

import difflib
import functools
import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidOptionError, UnknownModuleError
from . import trees
from .configs import load_config, names

__all__ = ["MAX_LAYERS", "build_meta_model", "load_config", "names", "parameter_count"]

LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer")
MAX_LAYERS = 10_000
"""The deepest config devicemap builds: far beyond any published model (a few hundred layers), while a
typo such as 10**12 would otherwise keep transformers building layers for hours."""


def build_meta_model(name_or_config: str | Mapping[str, Any], num_hidden_layers: int | None = None):
    """The transformers model of a bundled name or a config dict, on the meta device (no memory).

    ``num_hidden_layers`` overrides the depth (handy for quick tests). Tied embeddings are tied.
    A config transformers cannot build raises :class:`devicemap.UnknownModuleError` (an unknown
    ``model_type``) or :class:`devicemap.InvalidOptionError` (a malformed config or field), naming the
    field and the fix.

    >>> build_meta_model("llama-3.2-1b", num_hidden_layers=2).config.num_hidden_layers
    2
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if isinstance(name_or_config, str):
        config_dict = load_config(name_or_config)
    elif isinstance(name_or_config, Mapping):
        config_dict = dict(name_or_config)
    else:
        raise InvalidOptionError(
            f"a model config must be a dict (a transformers config.json object), got "
            f"{type(name_or_config).__name__}: {_short(name_or_config)}"
        )
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise UnknownModuleError("the config has no 'model_type'; pass a transformers config.json")
    if not isinstance(model_type, str):
        raise UnknownModuleError(
            f"the config's model_type is {_short(model_type)}: it must be a string such as 'llama'"
        )
    if num_hidden_layers is not None:
        _check_layer_count("num_hidden_layers", num_hidden_layers)
        for key in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
            if key in config_dict:
                config_dict[key] = num_hidden_layers
    _check_layer_counts(config_dict)
    config = _transformers_config(AutoConfig, model_type, config_dict)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    # Whatever transformers raises while building a model from a user's config comes from the config's
    # values: report it as bad input, naming the model type, not as a traceback.
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as err:  # noqa: BLE001 - see the comment above
        suspects = "".join(f"; {field}" for field in _not_numbers(config, config_dict))
        raise InvalidOptionError(
            f"transformers cannot build a {model_type!r} language model from this config: {_gist(err)}"
            f"{suspects}; check the config's values (devicemap builds causal-LM and seq2seq models)"
        ) from None
    model.tie_weights()
    return model


def _transformers_config(auto_config: Any, model_type: str, config_dict: dict[str, Any]) -> Any:
    """``AutoConfig.for_model`` with an unknown model type and bad field values as devicemap errors."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        import transformers

        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "check the spelling"
        raise UnknownModuleError(
            f"unknown model_type {model_type!r}: transformers {transformers.__version__} has no such model; "
            f"{hint} (or upgrade transformers if the model is newer)"
        )
    try:
        return auto_config.for_model(model_type, **config_dict)
    except Exception as err:  # noqa: BLE001 - a config field transformers refuses is bad input
        raise InvalidOptionError(
            f"transformers refuses this {model_type!r} config: {_gist(err)}; fix that value in the config"
        ) from None


def _not_numbers(config: Any, config_dict: Mapping[str, Any]) -> list[str]:
    """The fields of ``config_dict`` whose default in the config class is a number but that hold
    something else, named for the message of a model transformers could not build: transformers 5.0
    takes ``hidden_size="wide"`` into the config and fails in torch without naming the field (later
    5.x refuse it in the config)."""
    try:
        defaults = inspect.signature(type(config).__init__).parameters
    except (TypeError, ValueError):
        return []

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    found = []
    for key, value in config_dict.items():
        default = defaults[key].default if key in defaults else None
        if number(default) and not number(value):
            found.append(f"{key!r} is {_short(value)}, not a number like its default {default!r}")
    return found


def _check_layer_counts(config: Mapping[str, Any]) -> None:
    """The language model's layer counts (top level and ``text_config``) are plausible ints. Other
    sub-configs (vision towers, ...) are left to transformers: their fields may mean other things."""
    for prefix, part in (("", config), ("text_config.", config.get("text_config"))):
        if isinstance(part, Mapping):
            for key in LAYER_COUNT_KEYS:
                if part.get(key) is not None:
                    _check_layer_count(prefix + key, part[key])


def _check_layer_count(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LAYERS:
        raise InvalidOptionError(
            f"{key}={_short(value)} in the config is not a layer count: use a whole number from 1 to "
            f"{MAX_LAYERS}"
        )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _gist(err: BaseException) -> str:
    """An exception's message on one line, cut short (transformers may list hundreds of names)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    text = text if len(text) <= 300 else text[:297] + "..."
    return text.rstrip(".:")


@functools.cache
def parameter_count(name: str) -> int:
    """Parameters of a bundled model (each tied storage counted once)."""
    shape = trees.shape(name)  # recorded with its shape: no model to build
    if shape is not None:
        return shape.parameter_count
    return sum(p.numel() for p in build_meta_model(name).parameters())
