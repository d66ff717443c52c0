"""Checks for the options of the public functions: a wrong value raises a devicemap error naming the
option, the value and what is accepted, instead of a TypeError deep inside (or a wrong plan)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ..errors import InvalidOptionError

Choice = TypeVar("Choice", bound=str)


def check_flag(option: str, value: object) -> bool:
    """``value`` must be ``True`` or ``False`` (a string such as ``"yes"`` is truthy and hides mistakes)."""
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{option} must be True or False, got {value!r}")
    return value


def check_choice(option: str, value: object, choices: Iterable[Choice]) -> Choice:
    """``value`` must be one of the strings ``choices`` (typed as the matching ``Literal``)."""
    choices = tuple(choices)
    for choice in choices:
        if isinstance(value, str) and value == choice:
            return choice
    raise InvalidOptionError(f"invalid {option} {_quoted(value)}; use {one_of(choices)}")


def one_of(choices: Iterable[str]) -> str:
    """``"a", "b" or "c"``: the wording of the core's message for an option value it does not know."""
    quoted = [_quoted(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _quoted(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def check_class_names(option: str, value: object) -> list[str] | None:
    """``None``, one class name, or an iterable of class names (strings, as accelerate compares names)."""
    return check_strings(option, value, "class names", "['LlamaDecoderLayer']")


def check_strings(option: str, value: object, what: str, example: str) -> list[str] | None:
    """``None``, one string, or an iterable of strings (``what`` and ``example`` word the message)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (Mapping, bytes)) or not isinstance(value, Iterable):
        raise InvalidOptionError(f"{option} must be a list of {what} such as {example}, got {value!r}")
    names = list(value)
    for name in names:
        if not isinstance(name, str):
            hint = f" (the class name is {name.__name__!r})" if isinstance(name, type) else ""
            raise InvalidOptionError(
                f"{option} must hold {what} (strings), got {name!r}{hint}; e.g. {example}"
            )
    return names


def check_path(option: str, value: object) -> str:
    """A file or folder path: a ``str`` or ``os.PathLike`` (not bytes, not a number)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise InvalidOptionError(f"{option} must be a file or folder path (str or Path), got {value!r}")
    return value


def check_mapping(option: str, value: object, example: str) -> Mapping[Any, Any] | None:
    """``None`` or a mapping (a dict); ``example`` shows the expected shape in the message."""
    if value is not None and not isinstance(value, Mapping):
        raise InvalidOptionError(f"{option} must be a dict like {example}, got {value!r}")
    return value
