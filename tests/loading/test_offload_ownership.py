"""Offload folders where models are served: a forked worker, a second container on the same volume and odd
markers never make devicemap delete a folder in use; a folder nobody uses any more is removed.

Each scenario runs in subprocesses (fork, SIGKILL, a process's exit) with a small model dispatched with its
last layers on disk, so a folder lost shows as a failing forward pass (accelerate reads the weights back
from the folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from devicemap.loading import offload_folder, owned_folders

DISPATCH = textwrap.dedent(
    """
    import os, sys, torch, devicemap

    def dispatched(offload_dir):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).eval()
        expected = model(torch.ones(1, 64))
        plan = devicemap.plan(model, max_memory={"cpu": 40_000, "disk": 10**9})
        assert list(plan.device_map.values()).count("disk") >= 2, plan.device_map
        model = devicemap.dispatch(model, plan, offload_dir=offload_dir)
        return model, expected

    def check(model, expected):
        with torch.no_grad():
            torch.testing.assert_close(model(torch.ones(1, 64)), expected)

    def folders(offload_dir):
        return sorted(p for p in os.listdir(offload_dir) if p.startswith("devicemap-dispatch-"))
    """
)


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", DISPATCH + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def dispatch_folders(offload_dir: Path) -> list[Path]:
    return sorted(offload_dir.glob("devicemap-dispatch-*"))


def test_a_forked_worker_that_exits_keeps_its_parents_folder(tmp_path: Path) -> None:
    """gunicorn --preload / multiprocessing fork: the worker's normal exit (atexit, finalizers) must not
    delete the parent's live folder, or the parent's next forward fails with FileNotFoundError."""
    offload = tmp_path / "offload"
    run(
        """
        model, expected = dispatched(sys.argv[1])
        [folder] = folders(sys.argv[1])
        pid = os.fork()
        if pid == 0:
            check(model, expected)  # the worker uses the model too
            sys.exit(0)  # a normal exit: atexit handlers and finalizers run
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert folders(sys.argv[1]) == [folder], "the worker's exit removed the parent's folder"
        check(model, expected)
        print("ok")
        """,
        str(offload),
    )
    assert dispatch_folders(offload) == []  # the parent's own exit removed it


def test_a_parent_exiting_before_its_worker_leaves_the_folder_to_the_worker(tmp_path: Path) -> None:
    """The last process using a folder removes it: a worker outliving its parent keeps reading weights."""
    offload = tmp_path / "offload"
    started = run(
        """
        model, expected = dispatched(sys.argv[1])
        r, w = os.pipe()
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # returns when the parent is gone (the pipe's writer closed)
            check(model, expected)
            sys.exit(0)
        os.close(r)
        print("parent exits", flush=True)
        """,
        str(offload),
    )
    assert "parent exits" in started.stdout
    # The worker was waiting on a pipe whose writer closed with the parent: it has run or is running.
    deadline = time.monotonic() + 120
    while dispatch_folders(offload) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dispatch_folders(offload) == []


HOLD = """
model, expected = dispatched(sys.argv[1])
print(folders(sys.argv[1])[0], flush=True)
sys.stdin.readline()  # wait until asked to check
check(model, expected)
print("ok", flush=True)
sys.stdin.readline()
"""


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_folder_of_another_pid_namespace_is_kept(tmp_path: Path) -> None:
    """Two containers sharing a volume (same hostname, each its own PID namespace): a live folder whose
    marker names a pid that is dead *here* is not stale; the lock decides."""
    offload = tmp_path / "offload"
    holder = subprocess.Popen(
        [sys.executable, "-c", DISPATCH + HOLD, str(offload)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        name = holder.stdout.readline().strip()
        assert name, holder.stderr.read()
        folder = offload / name
        marker = folder / owned_folders.OWNER_MARKER
        other = json.loads(marker.read_text())
        # What the other container's marker looks like from here: its pid 1, or a number dead here.
        for pid in (dead_pid(), 1, 2**32):
            marker.write_text(json.dumps({**other, "pid": pid, "process_start": 12345}))
            assert offload_folder.remove_stale(offload) == []
            offload_folder.prepare(offload)  # what every load into this folder runs first
            assert folder.is_dir()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "ok", holder.stderr.read()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
        holder.stderr.close()
    # Killed: the kernel released its lock, so the next use of the folder removes it.
    assert offload_folder.remove_stale(offload) == [folder]
    assert not folder.exists()


def test_markers_that_do_not_decide_anything_raise_nothing(tmp_path: Path) -> None:
    """A marker with a pid past 64 bits, garbage, or none at all: removal follows the lock alone, and a
    folder without a lock file (not made by this devicemap, or still being made) is kept whatever its age."""
    offload = tmp_path / "offload"
    offload.mkdir()
    locked_free = offload / "devicemap-dispatch-123-abcdef012345"
    locked_free.mkdir()
    (locked_free / owned_folders.LOCK_FILE).write_text("")
    (locked_free / owned_folders.OWNER_MARKER).write_text(json.dumps({"pid": 2**32, "host": 7}))
    unlocked_old = offload / ".devicemap-partial-0123abcd-77-abcdef012345"
    unlocked_old.mkdir()
    (unlocked_old / "weights.safetensors").write_text("data")
    hours_ago = time.time() - 7200
    os.utime(unlocked_old, (hours_ago, hours_ago))
    garbage = offload / "devicemap-transformers-9-abcdef012345"
    garbage.mkdir()
    (garbage / owned_folders.OWNER_MARKER).write_text("{not json")
    assert offload_folder.remove_stale(offload) == [locked_free]
    assert unlocked_old.is_dir() and (unlocked_old / "weights.safetensors").read_text() == "data"
    assert garbage.is_dir()


def test_a_folder_appears_only_once_it_is_locked(tmp_path: Path) -> None:
    """A cleaner racing a creation never sees the final name without a held lock: the creation happens
    under a hidden name, renamed once locked; an abandoned creation is removed once its lock is free and
    it is old enough that its creator cannot still be between mkdir and lock."""
    made = owned_folders.create(tmp_path, "devicemap-dispatch-1-abcdef012345")
    assert offload_folder.remove_stale(tmp_path) == []  # held by this process
    assert owned_folders.release(made) is True and not made.exists()

    abandoned = tmp_path / f"{owned_folders.CREATING_PREFIX}{'ab' * 16}"
    abandoned.mkdir()
    (abandoned / owned_folders.LOCK_FILE).write_text("")
    assert offload_folder.remove_stale(tmp_path) == []  # too young to tell
    old = time.time() - 2 * owned_folders.CREATING_GRACE_SECONDS
    os.utime(abandoned, (old, old))
    assert offload_folder.remove_stale(tmp_path) == [abandoned]
