"""Offload folders shared with their users: devicemap writes only into subfolders it creates and owns,
and never deletes, renames or overwrites anything it did not create.

Inside a user's ``offload_dir`` (``D``) devicemap makes three kinds of folder:

- ``D/devicemap-converted-<key>/``: dtype-converted disk weights of one load, named by a hash of what
  determines their content (checkpoint path, each shard's size and mtime, target dtype, the converted
  tensors). Complete by construction: written elsewhere and renamed into place with its manifest
  (``devicemap-offload.json``) last, so any later load of the same content reuses it, and concurrent
  loads of the same content share it. Different content gets a different folder.
- ``D/.devicemap-partial-<key>-<pid>-<random>/``: where such a folder is written before the rename,
  private to one process, with an owner marker (``.devicemap-owner.json``: host, pid, process start).
- ``D/devicemap-dispatch-<pid>-<random>/`` and ``D/devicemap-transformers-<pid>-<random>/``: one per
  model, for the files accelerate's ``dispatch_model`` or transformers write themselves, with an owner
  marker; removed when the model is garbage-collected or the process exits.

**Stale folders.** A load killed mid-way (SIGKILL, power loss) leaves its private folder behind. Every
use of ``D`` first removes those whose marker names a process on this host that is no longer running
(a staging folder whose marker was never written is removed once it is over an hour old). Nothing
else is removed: not complete ``devicemap-converted-*`` folders (delete them yourself when no load uses
them), not folders of other hosts, not anything without devicemap's name and marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

from .errors import OffloadFolderError

T = TypeVar("T")

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST = "devicemap-offload.json"
OWNER_MARKER = ".devicemap-owner.json"
CONVERTED_PREFIX = "devicemap-converted-"
STAGING_PREFIX = ".devicemap-partial-"
SESSION_KINDS = ("dispatch", "transformers")
FORMAT_VERSION = 1
UNMARKED_STAGING_GRACE_SECONDS = 3600

_STAGING_NAME = re.compile(r"^\.devicemap-partial-[0-9a-f]+-\d+-[0-9a-f]+$")
_SESSION_NAME = re.compile(r"^devicemap-(?:dispatch|transformers)-\d+-[0-9a-f]+$")


def refuse_non_folder(offload_dir: PathLike) -> Path:
    """``offload_dir`` as a path, or :class:`OffloadFolderError` if it exists and is not a folder.

    Checked whenever an ``offload_dir`` is passed, needed or not, so a wrong path is reported at once.
    """
    folder = Path(offload_dir)
    if folder.exists() and not folder.is_dir():
        raise OffloadFolderError(
            f'offload_dir "{folder}" is an existing file, not a folder: pass a folder path '
            "(devicemap keeps its files in a subfolder it creates there and leaves the file untouched)"
        )
    return folder


def prepare(offload_dir: PathLike) -> Path:
    """Create ``offload_dir`` if needed, check devicemap can write there, and remove the stale folders a
    killed devicemap process left in it (see the module docstring). Raises :class:`OffloadFolderError`
    for a file, or a folder that cannot be created or written."""
    folder = refuse_non_folder(offload_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OffloadFolderError(
            f'offload_dir "{folder}" cannot be created ({error.strerror or error}): pass a folder '
            "devicemap may create, or create it yourself with write permission"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OffloadFolderError(
            f'offload_dir "{folder}" is not writable: pass a folder you can write to '
            "(devicemap writes its offloaded weights into a subfolder there)"
        )
    remove_stale(folder)
    return folder


def remove_stale(folder: Path) -> list[Path]:
    """Remove the staging and per-model folders of devicemap processes that are gone; return them."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        staging = _STAGING_NAME.match(entry.name) is not None
        if not (staging or _SESSION_NAME.match(entry.name)):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = _read_json(entry / OWNER_MARKER)
        if owner is None:
            # Killed between creating the folder and writing its marker: only staging folders, only late.
            if not staging or time.time() - _mtime(entry) < UNMARKED_STAGING_GRACE_SECONDS:
                continue
        elif _owner_running(owner):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def session_folder(offload_dir: PathLike, kind: str) -> Path:
    """A fresh folder in ``offload_dir`` for the files of one model that another library writes itself
    (``kind``: "dispatch" or "transformers"). Tie its lifetime to the model with :func:`remove_with`;
    a killed process leaves it to the next :func:`prepare`."""
    assert kind in SESSION_KINDS, kind
    parent = prepare(offload_dir)
    folder = parent / f"devicemap-{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    _write_marker(folder)
    return folder


def remove_with(owner: Any, folder: Path) -> None:
    """Remove ``folder`` when ``owner`` is garbage-collected, or at interpreter exit."""
    weakref.finalize(owner, shutil.rmtree, str(folder), True)


def owned_by_result(folder: Path | None, build: Callable[[], T]) -> T:
    """Run ``build`` (which writes into the session ``folder``); the folder goes when the result is
    garbage-collected, or at once if ``build`` fails."""
    try:
        result = build()
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if folder is not None:
        remove_with(result, folder)
    return result


def content_key(checkpoint: PathLike, files: Iterable[str], dtype: str, tensors: Iterable[str]) -> str:
    """A hash of everything that determines the converted weights of a load: a different checkpoint,
    a rewritten shard, another dtype or another set of disk tensors gives another folder."""
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}\0{Path(checkpoint).resolve()}\0{dtype}\0".encode())
    for file in sorted(set(files)):
        stat = os.stat(file)
        digest.update(f"{Path(file).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    for name in sorted(tensors):
        digest.update(f"{name}\0".encode())
    return digest.hexdigest()[:32]


class ConvertedWeights:
    """The dtype-converted disk weights of one load in ``D/devicemap-converted-<key>/``.

    ``complete()`` returns them if a finished folder exists (another load made it); otherwise
    ``write()`` stores batches in a private staging folder and ``commit()`` renames it into place,
    manifest written last and everything fsync'd, or adopts a folder a concurrent load finished first.
    ``abort()`` removes the staging folder only.
    """

    def __init__(self, folder: Path, key: str, tensors: Iterable[str]):
        self.folder = folder
        self.key = key
        self.tensors = frozenset(tensors)
        self.final = folder / f"{CONVERTED_PREFIX}{key}"
        self.staging: Path | None = None
        self.written: dict[str, str] = {}  # tensor name -> file name inside the folder

    def complete(self) -> dict[str, Path] | None:
        """``{tensor name: file}`` of a finished folder for this content, or ``None``."""
        manifest = _read_json(self.final / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            return None
        if manifest.get("key") != self.key:
            return None
        tensors, sizes = manifest.get("tensors"), manifest.get("files")
        if not isinstance(tensors, dict) or not isinstance(sizes, dict):
            return None
        if set(tensors) != self.tensors or not set(tensors.values()) <= set(sizes):
            return None
        for name, size in sizes.items():
            path = self.final / name
            if Path(name).name != name or not path.is_file() or path.stat().st_size != size:
                return None
        return {tensor: self.final / name for tensor, name in tensors.items()}

    def write(self, tensors: Mapping[str, Any]) -> None:
        from safetensors.torch import save_file

        if self.staging is None:
            name = f"{STAGING_PREFIX}{self.key}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.staging = self.folder / name
            self.staging.mkdir()
            _write_marker(self.staging)
        file = f"converted-{len(set(self.written.values())):05d}.safetensors"
        save_file(dict(tensors), self.staging / file)
        _fsync(self.staging / file)
        self.written.update(dict.fromkeys(tensors, file))

    def commit(self) -> dict[str, Path]:
        """Move the written weights into place (or adopt an identical finished folder); return
        ``{tensor name: file}`` in the final folder."""
        if self.staging is None:
            raise AssertionError("commit() before any write()")
        files = sorted(set(self.written.values()))
        manifest = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "tensors": self.written,
            "files": {name: (self.staging / name).stat().st_size for name in files},
        }
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(self.staging / MANIFEST)
        _fsync(self.staging)
        try:
            os.rename(self.staging, self.final)  # atomic; fails if the final folder exists
        except OSError:
            found = self.complete()
            if found is None:
                raise OffloadFolderError(
                    f'"{self.final}" exists but is not a complete devicemap offload folder for this '
                    "load: delete it (or pass another offload_dir) and load again"
                ) from None
            self.abort()  # a concurrent load of the same content finished first: use its files
            return found
        self.staging = None
        _fsync(self.folder)
        return {tensor: self.final / name for tensor, name in self.written.items()}

    def abort(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def _write_marker(folder: Path) -> None:
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "created": time.time(),
    }
    (folder / OWNER_MARKER).write_text(json.dumps(owner))


def _owner_running(owner: Any) -> bool:
    """Whether the process a marker names may still be using its folder (when unsure: yes)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return True
    if owner.get("host") != socket.gethostname() or os.name == "nt":
        return True  # cannot check another host's processes; on Windows os.kill would terminate one
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    except OSError:
        return True
    if _process_state(pid) == "Z":
        return False  # killed, not yet reaped
    started = owner.get("process_start")
    now = _process_start(pid)
    return started is None or now is None or now == started  # a different start time: pid reused


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _process_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[0] if fields else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk so a rename never exposes a folder with missing data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync folders
    finally:
        os.close(fd)
