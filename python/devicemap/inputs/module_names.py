"""Dotted module names: which key of a device map places a module or tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import PlacementError


def closest_key(name: str, keys: Mapping[str, object]) -> str | None:
    """``name`` itself or its closest ancestor among ``keys`` (``""`` is the root), walking up the dotted
    path; None when none is there.

    >>> closest_key("model.layers.3.mlp.weight", {"model.layers": 0, "model.layers.3": 1, "lm_head": 1})
    'model.layers.3'
    """
    probe = name
    while probe not in keys:
        if not probe:
            return None
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return probe


def covering_key(name: str, device_map: Mapping[str, object]) -> str:
    """The key of ``device_map`` that places ``name``: itself or its closest mapped ancestor.

    >>> covering_key("model.layers.3.mlp.weight", {"model.layers": 0, "model.layers.3": 1, "lm_head": 1})
    'model.layers.3'
    """
    best = closest_key(name, device_map)
    if best is None:
        raise PlacementError(f"the device map gives no device for {name!r}; use the map made for this model")
    return best


def device_for(name: str, device_map: Mapping[str, Any]) -> Any:
    """Where a module or tensor ``name`` lands under ``device_map`` (accelerate's format).

    >>> device_for("model.layers.3.mlp.weight", {"model.layers": 0, "model.layers.3": 1, "lm_head": 1})
    1
    """
    return device_map[covering_key(name, device_map)]
