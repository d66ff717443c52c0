"""Run devicemap.compat's comparisons against several accelerate releases (not part of ``make test``).

    DEVICEMAP_ACCELERATE_VERSIONS=1.1.1,1.7.0,1.16.0 .venv/bin/python tests/compat_matrix.py [pytest options]

(or ``make compat-matrix``). For each release, its wheel is downloaded once with pip into
``~/.cache/devicemap/accelerate`` (``$DEVICEMAP_CACHE`` to move it) and put first on ``PYTHONPATH``; the
script checks that ``import accelerate`` and the package metadata devicemap reads both give that release,
then runs the compat tests (the hypothesis comparisons, the per-release checks and accelerate's own
device-map tests of that release) in a fresh pytest process. Extra arguments go to pytest, e.g.
``-k balanced`` or ``-x``; ``DEVICEMAP_EXAMPLES`` sets the number of hypothesis examples as usual.
Without the variable, :data:`DEFAULT_VERSIONS` run. Exits non-zero if any release fails.

The default list is one release per behaviour change (see devicemap.compat.versions) that installs
beside transformers 5 (which requires accelerate >= 1.1); these tests do not go through transformers'
accelerate integration, so 1.0.0 and 1.2.1 run too when named (1.0's placement code is 1.1's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate_sources import FetchError, release_dir  # noqa: E402

DEFAULT_VERSIONS = "1.1.1,1.3.0,1.7.0,1.11.0,1.15.0,1.16.0"
TESTS = [
    "tests/compat/test_compat_accelerate.py",
    "tests/compat/test_compat_warnings.py",
    "tests/compat/test_compat_versions.py",
    "tests/compat/test_accelerate_suite.py",
]
ROOT = Path(__file__).resolve().parent.parent

_VERSION_CHECK = "import importlib.metadata, accelerate; print(accelerate.__version__, importlib.metadata.version('accelerate'))"


def run(version: str, pytest_args: list[str]) -> tuple[bool, str]:
    """Run the compat tests against one release: (passed, one line of summary)."""
    try:
        folder = release_dir(version)
    except FetchError as err:
        return False, f"download failed: {err}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
    seen = subprocess.run(
        [sys.executable, "-c", _VERSION_CHECK], env=env, capture_output=True, text=True, check=False
    ).stdout.split()
    if seen != [version, version]:
        return False, f"import accelerate / its metadata give {seen}, not {version}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *pytest_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0:
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    return done.returncode == 0, f"{summary} ({time.monotonic() - started:.0f} s)"


def main(argv: list[str]) -> int:
    versions = [
        v.strip() for v in os.environ.get("DEVICEMAP_ACCELERATE_VERSIONS", DEFAULT_VERSIONS).split(",")
    ]
    results = []
    for version in filter(None, versions):
        print(f"accelerate {version} ...", flush=True)
        ok, summary = run(version, argv)
        results.append((version, ok, summary))
        print(f"accelerate {version}: {'ok' if ok else 'FAILED'}: {summary}", flush=True)
    print("\n| accelerate | result |\n|---|---|")
    for version, ok, summary in results:
        print(f"| {version} | {'ok' if ok else 'FAILED'}: {summary} |")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
