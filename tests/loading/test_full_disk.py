"""A full disk while devicemap writes offloaded weights: an OffloadFolderError before anything is half
written, never a dead process (accelerate's np.memmap writes die of SIGBUS, exit 135) nor a
safetensors error.

The real case runs in a private mount namespace (``unshare -rm``) with a 1 MiB tmpfs as the offload folder;
the up-front check is also tested by making the filesystem report less free space than needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import devicemap
from devicemap.loading import offload_writer

FULL_DISK = textwrap.dedent(
    """
    import sys, torch, devicemap
    offload, checkpoint = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]).eval()  # 1 MiB per layer
    plan = devicemap.plan(model, max_memory={"cpu": 2_200_000, "disk": 10**10})
    assert list(plan.device_map.values()).count("disk") >= 2, plan.device_map
    try:
        devicemap.dispatch(model, plan, offload_dir=offload)
        print("dispatched")
    except devicemap.OffloadFolderError as error:
        print("dispatch:", type(error).__name__, error)
    from safetensors.torch import save_model
    save_model(torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]), checkpoint + "/model.safetensors")
    target = torch.nn.Sequential(*[torch.nn.Linear(512, 512, device="meta") for _ in range(4)])
    plan = devicemap.plan_checkpoint(checkpoint, max_memory={"cpu": 2_200_000, "disk": 10**10}, dtype="float64")
    try:
        devicemap.load_checkpoint(target, checkpoint, plan, offload_dir=offload, dtype="float64", progress=False)
        print("loaded")
    except devicemap.OffloadFolderError as error:
        print("convert:", type(error).__name__, error)
    import os
    print("left:", sorted(os.listdir(offload)))
    """
)


def namespaces_can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.mark.skipif(
    not namespaces_can_mount(), reason="this machine lets no process mount a tmpfs (unshare -rm)"
)
def test_a_full_disk_is_an_offload_folder_error_not_a_sigbus(tmp_path: Path) -> None:
    offload = tmp_path / "small-disk"
    checkpoint = tmp_path / "checkpoint"
    offload.mkdir()
    checkpoint.mkdir()
    command = f'mount -t tmpfs -o size=1m tmpfs "{offload}" && exec "$0" -c "$1" "$2" "$3"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command, sys.executable, FULL_DISK, str(offload), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    lines = done.stdout.splitlines()
    dispatch = next(line for line in lines if line.startswith("dispatch"))
    assert "OffloadFolderError" in dispatch and "free some space" in dispatch, dispatch
    convert = next(line for line in lines if line.startswith("convert"))
    assert "OffloadFolderError" in convert and "free some space" in convert, convert
    assert lines[-1] == "left: []", lines  # nothing half-written stays behind


def test_too_little_free_space_is_refused_before_a_byte_is_written(tmp_path: Path, monkeypatch) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).eval()
    plan = devicemap.plan(model, max_memory={"cpu": 40_000, "disk": 10**9})
    monkeypatch.setattr(offload_writer, "free_bytes", lambda folder: 1000)
    offload = tmp_path / "offload"
    with pytest.raises(devicemap.OffloadFolderError, match=r"need .* and its filesystem has 1000 B free"):
        devicemap.dispatch(model, plan, offload_dir=offload)
    assert list(offload.iterdir()) == []
