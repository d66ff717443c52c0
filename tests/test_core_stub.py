"""The hand-written stub python/devicemap/_core.pyi must agree with the compiled binding.

mypy's stubtest imports devicemap._core and compares every name, parameter, default and class
against the stub; a binding change that forgets the stub fails here instead of misleading type checkers.
"""

import subprocess
import sys

import pytest

pytest.importorskip("mypy.stubtest", reason="stubtest comes with mypy")


def test_stubtest_finds_no_difference_between_core_stub_and_binding():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "devicemap._core"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
