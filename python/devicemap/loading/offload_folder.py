"""Offload folders shared with their users: devicemap writes only into subfolders it creates and owns,
and never deletes, renames or overwrites anything it did not create.

Inside a user's ``offload_dir`` (``D``) devicemap makes three kinds of folder:

- ``D/devicemap-converted-<key>/``: dtype-converted disk weights of one load, named by a hash of what
  determines their content (checkpoint path; each shard's safetensors header, inode, size, modification
  and change times; target dtype; the converted tensors). Complete by construction: written elsewhere and renamed into place with its manifest
  (``devicemap-offload.json``) last, so any later load of the same content reuses it, and concurrent
  loads of the same content share it. Different content gets a different folder.
- ``D/.devicemap-partial-<key>-<pid>-<random>/``: where such a folder is written before the rename,
  private to one load.
- ``D/devicemap-dispatch-<pid>-<random>/`` and ``D/devicemap-transformers-<pid>-<random>/``: one per
  model, for the files accelerate's ``dispatch_model`` or transformers write themselves; removed when the
  model is garbage-collected or the process exits, unless a process ``fork`` made still uses it (then the
  last of them removes it).

The staging and per-model folders carry a lock held by the processes using them and an owner marker
(:mod:`devicemap.loading.owned_folders`); they appear under their name only once locked. **Stale folders.** A load
killed mid-way (SIGKILL, power loss) leaves its folder behind, with its lock released by the kernel. Every use
of ``D`` first removes those devicemap folders whose lock nobody holds. Nothing else is removed: not a folder
whose lock is held (by a process on this machine, in another container or PID namespace sharing the volume,
or a forked worker), not one without a lock file, not complete ``devicemap-converted-*`` folders (delete
them yourself when no load uses them), not anything without devicemap's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

from ..errors import OffloadFolderError
from . import owned_folders
from .offload_writer import check_room, tensor_bytes

T = TypeVar("T")

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST = "devicemap-offload.json"
CONVERTED_PREFIX = "devicemap-converted-"
STAGING_PREFIX = ".devicemap-partial-"
SESSION_KINDS = ("dispatch", "transformers")
FORMAT_VERSION = 1

_STAGING_NAME = re.compile(r"^\.devicemap-partial-[0-9a-f]+-\d+-[0-9a-f]+$")
_SESSION_NAME = re.compile(r"^devicemap-(?:dispatch|transformers)-\d+-[0-9a-f]+$")
_CREATING_NAME = re.compile(r"^\.devicemap-creating-[0-9a-f]{32}$")


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
    """Remove devicemap's staging and per-model folders that no process uses any more; return them."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        creating = _CREATING_NAME.match(entry.name) is not None
        if not (creating or _STAGING_NAME.match(entry.name) or _SESSION_NAME.match(entry.name)):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if (
            owned_folders.remove_abandoned_creation(entry)
            if creating
            else owned_folders.remove_if_unused(entry)
        ):
            removed.append(entry)
    return removed


def session_folder(offload_dir: PathLike, kind: str) -> Path:
    """A fresh folder in ``offload_dir`` for the files of one model that another library writes itself
    (``kind``: "dispatch" or "transformers"). Tie its lifetime to the model with :func:`remove_with`;
    a killed process leaves it to the next :func:`prepare`."""
    assert kind in SESSION_KINDS, kind
    parent = prepare(offload_dir)
    return owned_folders.create(parent, f"devicemap-{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def remove_with(owner: Any, folder: Path) -> None:
    """Release ``folder`` when ``owner`` is garbage-collected, or at interpreter exit: it is removed then
    unless another process (one ``fork`` made) still holds it."""
    weakref.finalize(owner, owned_folders.release, folder)


def owned_by_result(folder: Path | None, build: Callable[[], T]) -> T:
    """Run ``build`` (which writes into the session ``folder``); the folder goes when the result is
    garbage-collected, or at once if ``build`` fails."""
    try:
        result = build()
    except BaseException:
        if folder is not None:
            owned_folders.release(folder)
        raise
    if folder is not None:
        remove_with(result, folder)
    return result


def content_key(checkpoint: PathLike, files: Iterable[str], dtype: str, tensors: Iterable[str]) -> str:
    """A hash of everything that determines the converted weights of a load: a different checkpoint,
    a rewritten or replaced shard, another dtype or another set of disk tensors gives another folder.

    Each shard counts by its path, its safetensors header and its file identity: device, inode, size,
    modification time and *change* time. Copies that keep the modification time (``cp -p``, ``rsync -a``,
    ``tar x``) still write the file, which sets its change time (the kernel's, not settable by tools) and
    often its inode, so a checkpoint replaced by another of the same size never reuses the old weights.
    """
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}\0{Path(checkpoint).resolve()}\0{dtype}\0".encode())
    for file in sorted(set(files)):
        stat = os.stat(file)
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        digest.update(f"{Path(file).resolve()}\0{identity}\0".encode())
        digest.update(_header_digest(file))
    for name in sorted(tensors):
        digest.update(f"{name}\0".encode())
    return digest.hexdigest()[:32]


HEADER_LIMIT = 100_000_000
"""safetensors refuses headers above 100 MB; the checkpoint reader checked each shard against it."""


def _header_digest(file: str) -> bytes:
    """sha256 of a safetensors file's header (its first 8 + N bytes)."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return hashlib.sha256(handle.read(min(size, HEADER_LIMIT))).digest()


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
        from safetensors import SafetensorError  # type: ignore[attr-defined,unused-ignore]  # 0.4.x stubs lack it
        from safetensors.torch import save_file

        if self.staging is None:
            name = f"{STAGING_PREFIX}{self.key}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.staging = owned_folders.create(self.folder, name)
        file = f"converted-{len(set(self.written.values())):05d}.safetensors"
        needed = sum(tensor_bytes(t) for t in tensors.values())
        check_room(self.staging, needed, f"{len(tensors)} dtype-converted disk weights")
        try:
            save_file(dict(tensors), self.staging / file)
        except (
            OSError,
            SafetensorError,
        ) as error:  # safetensors reports I/O faults, ENOSPC included, as its own
            raise OffloadFolderError(
                f'cannot write dtype-converted weights into "{self.staging}" ({error}): free some space, or pass '
                "an offload_dir on a larger disk"
            ) from None
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
        owned_folders.moved(self.staging, self.final)
        owned_folders.release(self.final, remove=False)  # complete: kept for later loads
        self.staging = None
        _fsync(self.folder)
        return {tensor: self.final / name for tensor, name in self.written.items()}

    def abort(self) -> None:
        if self.staging is not None:
            owned_folders.release(self.staging)
            self.staging = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
