"""Writing disk-offloaded weights in accelerate's offload format without memory-mapped writes.

accelerate's ``offload_state_dict`` writes each weight through ``np.memmap``: on a full disk the first store
into a page the filesystem cannot back kills the process with SIGBUS (no exception, nothing cleaned up).
devicemap writes the same files itself, before accelerate would (``dispatch_model`` then finds the folder's
``index.json`` and reads the files as its own):

- the free space of the folder's filesystem is checked against what will be written, up front;
- each file's blocks are reserved (``posix_fallocate``) before its bytes are written with ``write``, so a
  disk that fills meanwhile is an ``ENOSPC`` error, not a signal;
- ``index.json`` is written last, atomically, so a folder without it was never complete.

Any failure raises :class:`~devicemap.errors.OffloadFolderError` saying how much was needed and free.

The format: one ``<tensor name>.dat`` per tensor, its raw bytes in C order (bfloat16 stored as int16, float8
as int8, a 0-d tensor as one element), and ``index.json`` mapping each name to ``{"dtype", "shape"}`` with
the dtype as numpy names it (``"bfloat16"`` / ``"float8_*"`` for those two).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OffloadFolderError
from ..formatting import format_bytes

if TYPE_CHECKING:
    import torch

INDEX = "index.json"
CHUNK = 64 * 2**20


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on ``folder``'s filesystem."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def check_room(folder: Path, needed: int, what: str) -> None:
    """:class:`OffloadFolderError` unless ``folder``'s filesystem has ``needed`` bytes free."""
    try:
        free = free_bytes(folder)
    except OSError:
        return  # a filesystem that cannot say: the writes below still fail cleanly
    if needed > free:
        raise OffloadFolderError(
            f'{what} need {format_bytes(needed)} in "{folder}", and its filesystem has {format_bytes(free)} '
            "free: free some space, or pass an offload_dir on a larger disk"
        )


def write_offloaded(folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` into ``folder`` (which devicemap owns) in accelerate's offload format."""
    needed = sum(tensor_bytes(t) for t in tensors.values())
    check_room(folder, needed, f"{len(tensors)} disk-offloaded weights")
    index: dict[str, dict[str, object]] = {}
    for name, tensor in tensors.items():
        dtype, data = _stored(tensor)
        index[name] = {"dtype": dtype, "shape": list(tensor.shape)}
        _write_file(folder / f"{name}.dat", data, needed)
    temporary = folder / f".{INDEX}.tmp"
    _write_file(temporary, json.dumps(index, indent=1).encode(), needed)
    os.replace(temporary, folder / INDEX)


def _stored(tensor: torch.Tensor) -> tuple[str, memoryview]:
    """The dtype name accelerate's reader expects and the tensor's bytes as it stores them."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    name = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    elif name.startswith("float8_"):
        flat = flat.view(torch.int8)
    else:
        name = str(flat.numpy().dtype)
    return name, flat.numpy().data.cast("B")


def _write_file(path: Path, data: memoryview | bytes, needed: int) -> None:
    size = len(data)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as error:
        raise OffloadFolderError(f'cannot create "{path}": {error.strerror or error}') from None
    try:
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as error:
                if error.errno not in (
                    errno.EINVAL,
                    errno.EOPNOTSUPP,
                ):  # filesystems without it: write anyway
                    raise
        view = memoryview(data)
        written = 0
        while written < size:
            written += os.write(fd, view[written : written + CHUNK])
    except OSError as error:
        os.close(fd)
        if error.errno == errno.ENOSPC:
            raise OffloadFolderError(
                f'the disk holding "{path.parent}" filled while devicemap wrote its offloaded weights '
                f"({format_bytes(needed)} in all): free some space, or pass an offload_dir on a larger disk"
            ) from None
        raise OffloadFolderError(f'cannot write "{path}": {error.strerror or error}') from None
    os.close(fd)
