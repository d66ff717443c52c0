"""Folders devicemap creates inside a user's offload folder, and how it knows which are still in use.

Every such folder holds a lock file (``.devicemap-owner.lock``) that the processes using the folder keep
locked (``flock``, shared by the processes ``fork`` makes, released by the kernel when the last of them
closes it or dies, whatever PID namespace or container it runs in), and an owner marker
(``.devicemap-owner.json``: host, boot id, pid, process start, a random token, creation time) that says who
made it, for people reading the folder. A folder appears under its final name only once its lock is held:
it is made under a hidden ``.devicemap-creating-<token>`` name, locked, marked, then renamed.

Removal is never a guess:

- a process that is done with a folder (its model was garbage-collected, or the process exits) releases its
  hold and removes the folder only if no other process holds it: a worker ``fork`` made keeps its parent's
  folder alive, and a parent's folder survives its worker's exit;
- a later use of the same offload folder removes a devicemap folder whose lock nobody holds (its users were
  all killed); one whose lock is held, whose lock file is missing (made by an older devicemap, or being
  made), or that does not carry devicemap's name is left alone.

Locks over NFS are emulated by the server's lock manager; where it does not work, nothing is removed by a
later use (the lock file cannot be locked) and folders of killed processes stay until deleted by hand.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from ..errors import OffloadFolderError

OWNER_MARKER = ".devicemap-owner.json"
LOCK_FILE = ".devicemap-owner.lock"
CREATING_PREFIX = ".devicemap-creating-"
CREATING_GRACE_SECONDS = 60
"""A creating folder whose lock is free is removed only after this long: its creator locks it within
microseconds of making it, so a free lock this late means the creator died in between."""

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are never removed by a later use
    fcntl = None  # type: ignore[assignment]

_held: dict[str, int] = {}  # folder path -> the descriptor holding its lock in this process
_held_lock = threading.Lock()


def _reset_after_fork() -> None:
    # The descriptors stay open in the child (it shares its parent's hold on each folder); only the
    # thread lock, which another thread may have held at the fork, is made anew.
    global _held_lock
    _held_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def create(parent: Path, name: str) -> Path:
    """Make ``parent / name``, held by this process (see the module docstring) until :func:`release`."""
    token = uuid.uuid4().hex
    creating = parent / f"{CREATING_PREFIX}{token}"
    final = parent / name
    try:
        creating.mkdir()
        fd = _lock(creating / LOCK_FILE, create=True)
        if fd is None:
            raise OSError(errno.EAGAIN, "could not lock a folder devicemap just created")
        try:
            (creating / OWNER_MARKER).write_text(json.dumps(_identity(token)))
            os.rename(creating, final)
        except BaseException:
            os.close(fd)
            raise
    except OSError as error:
        shutil.rmtree(creating, ignore_errors=True)
        raise OffloadFolderError(
            f'cannot create "{final}" ({error.strerror or error}): check the offload folder is writable '
            "and has free space"
        ) from None
    with _held_lock:
        _held[str(final)] = fd
    return final


def moved(old: Path, new: Path) -> None:
    """Record that a held folder was renamed (its lock is on the lock file, which moved with it)."""
    with _held_lock:
        fd = _held.pop(str(old), None)
        if fd is not None:
            _held[str(new)] = fd


def release(folder: Path, remove: bool = True) -> bool:
    """Give up this process's hold on ``folder``; with ``remove``, delete the folder if no other process
    holds it (a forked worker, a parent). Returns whether it was deleted. Safe to call in any process and
    more than once."""
    with _held_lock:
        fd = _held.pop(str(folder), None)
    if fd is not None:
        os.close(fd)
    return remove and remove_if_unused(folder)


def remove_if_unused(folder: Path) -> bool:
    """Delete ``folder`` if its lock file exists and no process holds it; True if deleted."""
    with _held_lock:
        if str(folder) in _held:
            return False  # this process holds it (the check below cannot see that on NFS)
    fd = _lock(folder / LOCK_FILE, create=False)
    if fd is None:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def remove_abandoned_creation(folder: Path) -> bool:
    """Delete a ``.devicemap-creating-*`` folder whose creator died before renaming it."""
    try:
        age = time.time() - folder.stat().st_mtime
    except OSError:
        return False
    return age > CREATING_GRACE_SECONDS and remove_if_unused(folder)


def _lock(path: Path, create: bool) -> int | None:
    """A descriptor holding an exclusive lock on ``path``, or None if another process holds it, the file
    is missing (and not to be created), or locks are not available."""
    if fcntl is None:
        return None
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _identity(token: str) -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "token": token,
        "created": time.time(),
    }


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None
