"""The bundled ``config.json`` files: which models the catalog has, and each one's config."""

from __future__ import annotations

import copy
import difflib
import functools
import json
from importlib import resources
from typing import Any

from ..errors import UnknownModuleError


@functools.cache
def _configs() -> dict[str, dict[str, Any]]:
    folder = resources.files(__package__) / "configs"
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
