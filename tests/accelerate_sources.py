"""accelerate releases for the compatibility checks, fetched from PyPI with pip and cached.

- :func:`release_dir`: a release's wheel unpacked (``accelerate/`` and its ``.dist-info``, so
  ``importlib.metadata`` agrees with ``accelerate.__version__``), to put first on ``PYTHONPATH``
  (``tests/compat_matrix.py`` runs the compat tests so against several releases);
- :func:`modeling_tests`: the release's own ``tests/test_modeling_utils.py``, from its sdist
  (``tests/compat/test_accelerate_suite.py`` runs its device-map tests against devicemap.compat).

Everything lands in ``$DEVICEMAP_CACHE/accelerate`` (default ``~/.cache/devicemap/accelerate``) and is
reused; nothing of accelerate is kept in this repository. A download that fails raises
:class:`FetchError` with pip's reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

__all__ = ["FetchError", "cache_root", "modeling_tests", "release_dir"]


class FetchError(RuntimeError):
    """A release could not be downloaded (offline, unknown version, ...)."""


def cache_root() -> Path:
    """Where fetched releases are kept."""
    base = os.environ.get("DEVICEMAP_CACHE") or Path.home() / ".cache" / "devicemap"
    return Path(base) / "accelerate"


def _pip_download(version: str, dest: Path, kind: str) -> Path:
    """Download accelerate==version's wheel (``kind="--only-binary"``) or sdist (``"--no-binary"``)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--quiet", kind, ":all:", "--dest", str(dest), f"accelerate=={version}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    files = sorted(dest.glob("accelerate-*"))
    if done.returncode != 0 or not files:
        reason = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"pip could not download accelerate=={version} ({kind} :all:) from the package index: "
            + " / ".join(reason or ["no file"])
        )
    return files[0]


def _publish(staging: Path, target: Path) -> None:
    """Move a finished download into place (another process may have done it meanwhile)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:
        if not target.exists():
            raise


def release_dir(version: str) -> Path:
    """A folder holding accelerate ``version`` as installed (to put first on ``PYTHONPATH``)."""
    target = cache_root() / f"wheel-{version}"
    if (target / "accelerate" / "__init__.py").is_file():
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        wheel = _pip_download(version, Path(tmp), "--only-binary")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
        _publish(unpacked, target)
    return target


def modeling_tests(version: str) -> Path:
    """accelerate ``version``'s ``tests/test_modeling_utils.py`` (from the sdist on PyPI)."""
    target = cache_root() / f"tests-{version}" / "test_modeling_utils.py"
    if target.is_file():
        return target
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        sdist = _pip_download(version, Path(tmp), "--no-binary")
        with tarfile.open(sdist) as archive:
            member = next((m for m in archive if m.name.endswith("/tests/test_modeling_utils.py")), None)
            source = archive.extractfile(member) if member is not None else None
            if source is None:
                raise FetchError(
                    f"accelerate {version}'s sdist ({sdist.name}) has no tests/test_modeling_utils.py"
                )
            staging = Path(tmp) / "tests"
            staging.mkdir()
            with open(staging / target.name, "wb") as out:
                shutil.copyfileobj(source, out)
        _publish(staging, target.parent)
    return target
