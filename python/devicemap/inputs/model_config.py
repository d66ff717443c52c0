"""Reading a transformers config whatever the architecture calls its fields (``hidden_size`` or
``d_model``, ``num_experts`` or ``n_routed_experts``, ...), for the workload and compute formulas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    import torch


def text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) transformers config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config sets (architectures spell one field several ways), or ``default``."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def config_count(config: Any, *names: str, default: int | None = None) -> int:
    """A positive integer field of the config (the first of ``names`` present), or ``default``; a
    missing or malformed field is an error naming it, not a TypeError inside a formula."""
    value = config_value(config, *names, default=default)
    if value is None:
        raise InvalidOptionError(
            f"the model config has no {' / '.join(names)}, which the workload needs to size the KV cache and "
            "activations; give a complete config.json or plan without a workload"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(
            f"the model config's {' / '.join(names)} is {value!r}: the workload needs a positive integer"
        )
    return value


def meta_model_from_config(config: Any, what: str, fix: str) -> torch.nn.Module:
    """The model a transformers config describes, on the meta device (a causal LM, else the bare model);
    ``what`` names the config and ``fix`` the way out in the error when transformers cannot build it."""
    import torch
    import transformers

    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)  # type: ignore[no-any-return]
        except Exception as err:  # noqa: BLE001 - any failure means: try the next auto class
            errors.append(f"{auto.__name__}: {err}")
    raise InvalidOptionError(
        f"transformers cannot build a model from {what} on the meta device ({'; '.join(errors)}); {fix}"
    )
