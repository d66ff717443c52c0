"""Reading the JSON files a user points devicemap at (a model's ``config.json``), bounded and typed.

A path that is not a regular file (a FIFO would block the read until a writer comes, a device can be read
forever), a file above the size limit, and JSON that Python's parser cannot hold (nested deeper than its
recursion limit, an integer of more digits than ``int`` converts) raise the caller's error class with a
message naming the file, never a bare ``RecursionError`` or ``ValueError``.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "config.json"
    >>> _ = path.write_text('{"model_type": "llama"}')
    >>> read_json_object(path, ValueError)
    {'model_type': 'llama'}
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

CONFIG_LIMIT = 64 * 2**20
"""The largest config.json read: real ones are kilobytes; a file this big is not a config."""


def regular_file_status(path: Path, error: type[Exception]) -> os.stat_result | None:
    """``path``'s status if it is a regular file (symlinks followed), None if it does not exist; anything
    else raises ``error`` naming what it is."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise error(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(status.st_mode):
        raise error(f"{str(path)!r} is {_kind(status.st_mode)}, not a regular file: give a config.json file")
    return status


def read_json_object(path: Path, error: type[Exception], limit: int = CONFIG_LIMIT) -> dict[str, Any]:
    """The JSON object in the regular file ``path``, read only if it is at most ``limit`` bytes."""
    status = regular_file_status(path, error)
    if status is None:
        raise error(f"cannot read {str(path)!r}: no such file")
    if status.st_size > limit:
        raise error(f"{str(path)!r} is {status.st_size} bytes, above the {limit}-byte limit of a config.json")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise error(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    if len(data) > limit:
        raise error(f"{str(path)!r} grew above the {limit}-byte limit of a config.json while read")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{str(path)!r} is not a UTF-8 text file: give a transformers config.json") from None
    except json.JSONDecodeError as err:
        raise error(
            f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "give a transformers config.json"
        ) from None
    except RecursionError:
        raise error(f"{str(path)!r} nests JSON deeper than Python can parse: not a config.json") from None
    except ValueError as err:  # e.g. an integer longer than int() converts
        raise error(f"{str(path)!r} holds a value Python cannot read ({str(err)[:200]})") from None
    if not isinstance(value, dict):
        raise error(
            f"{str(path)!r} holds a JSON {type(value).__name__}, not an object: a transformers config.json "
            'looks like {"model_type": "llama", ...}'
        )
    return value


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"
