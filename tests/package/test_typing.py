"""mypy over the package (with the settings in pyproject.toml) and over the calls users write: a typed
``dict[int, int]`` or ``dict[str, str]`` is a valid ``max_memory`` (a Mapping is invariant in its key, so
``Mapping[object, ...]`` would refuse both)."""

import subprocess
import sys
import textwrap

from repo import REPO

ROOT = REPO

USER_CALLS = """
    import torch

    from devicemap import compat, from_pretrained, plan, plan_checkpoint

    model = torch.nn.Linear(8, 8)
    gpus: dict[int, int] = {0: 1024, 1: 1024}
    named: dict[str, str] = {"cuda:0": "1GiB", "cpu": "4GiB", "disk": "0"}
    plan(model, max_memory=gpus)
    plan(model, named)
    plan_checkpoint("model.safetensors", max_memory=gpus)
    from_pretrained("model_dir", max_memory=named)
    compat.infer_auto_device_map(model, max_memory=gpus)
"""


def test_package_and_user_calls_type_check(tmp_path):
    calls = tmp_path / "user_calls.py"
    calls.write_text(textwrap.dedent(USER_CALLS))
    # One mypy run for both: it reads torch's stubs once.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "python/devicemap", str(calls)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
