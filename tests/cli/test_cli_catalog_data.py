"""The command plans a catalog model from its shape as data (no torch, no transformers) and prints exactly
what it prints when it builds the model: every command, flag and error message, compared in-process with
the data switched off (``catalog.trees.shape`` answering None, as for a model without data). And
accelerate's map from devicemap.compat's port on the data is accelerate's map of the built model."""

from __future__ import annotations

import json
import warnings

import pytest

from devicemap import catalog, cli
from devicemap.catalog import trees
from devicemap.cli import command
from devicemap.cli.accelerate_side import accelerate_device_map, port_applies

PLANS = [
    ("plan", "llama-3-8b", "--gpus", "2x8GiB", "--cpu", "64GiB", "--dtype", "bf16"),
    ("plan", "llama-3-70b", "--max-memory", "0=24GiB,1=24GiB,cpu=128GiB,disk", "--strategy", "sequential"),
    (
        *("plan", "mixtral-8x7b", "--gpus", "2x24GiB", "--cpu", "16GiB", "--disk", "--dtype", "bf16"),
        *("--batch", "4", "--seq-len", "4096", "--json"),
    ),
    (
        *("plan", "llama-3.2-1b", "--gpus", "2x1GiB", "--cpu", "8GiB", "--balance", "compute"),
        *("--pin", "lm_head=1", "--gpu0-reserve", "100MiB", "--offload-buffers", "--json"),
    ),
    ("plan", "llama-3.2-1b", "--gpus", "2x2GiB", "--no-split", "LlamaMLP", "--no-split", "LlamaAttention"),
    ("plan", "qwen3-30b-a3b", "--gpus", "1x8GiB", "--cpu", "64GiB", "--execution-device", "cpu"),
    ("plan", "t5-large", "--gpus", "2x2GiB", "--dtype", "fp16", "--batch", "1"),  # float32 keeps
    (
        *("plan", "deepseek-v2-lite", "--gpus", "2x8GiB", "--cpu", "64GiB", "--dtype", "auto"),
        *("--kv-dtype", "float8_e4m3fn", "--seq-len", "2048", "--json"),
    ),
    ("plan", "gemma-2-9b", "--gpus", "4x4GiB", "--dtype", "float8_e4m3fn", "--strategy", "balanced_low_0"),
    ("plan", "opt-6.7b", "--gpus", "1x2GiB", "--cpu", "4GiB", "--disk", "--dtype", "int8"),
    ("export", "llama-3-8b", "--gpus", "2x10GiB", "--dtype", "bf16", "--to", "vllm"),
    ("export", "llama-3-8b", "--gpus", "2x10GiB", "--dtype", "bf16", "--to", "pipelining", "--json"),
    ("export", "mixtral-8x7b", "--gpus", "2x20GiB", "--cpu", "64GiB", "--dtype", "bf16", "--to", "llama.cpp"),
    (
        "export",
        "qwen2.5-7b",
        "--gpus",
        "3x8GiB",
        "--dtype",
        "bf16",
        "--to",
        "deepspeed",
        "--pin",
        "lm_head=2",
    ),
    ("models",),
]
COMPARES = [
    ("compare", "llama-3-8b", "--gpus", "2x8GiB", "--cpu", "64GiB", "--dtype", "bfloat16"),
    ("compare", "llama-3.2-1b", "--gpus", "2x2GiB", "--dtype", "bf16", "--json"),
    ("compare", "mixtral-8x7b", "--gpus", "3x20GiB", "--cpu", "64GiB", "--strategy", "balanced_low_0"),
    ("compare", "t5-large", "--gpus", "2x512MiB", "--cpu", "8GiB", "--strategy", "sequential"),
    ("compare", "phi-3-mini", "--max-memory", "0=3GiB,cpu=8GiB", "--dtype", "fp16", "--no-split", "Phi3MLP"),
]
REFUSED = [
    ("plan", "llama-3.2-1b", "--gpus", "1x1GiB", "--pin", "lm_haed=0"),
    ("plan", "llama-3.2-1b", "--gpus", "1x1GiB", "--no-split", "LlamaLayer"),
    ("plan", "llama-3-70b", "--gpus", "2x8GiB"),  # does not fit: exit 1
    ("export", "llama-3-8b", "--gpus", "1x8GiB", "--cpu", "64GiB", "--dtype", "bf16", "--to", "vllm"),
    ("plan", "llama-3-8b", "--gpus", "1x8GiB", "--batch", "2", "--kv-dtype", "bool"),
]


def run(capsys, args: tuple[str, ...]) -> tuple[int, str, str]:
    """Exit code, output and devicemap's own error lines (not the warnings torch prints on import)."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    errors = "\n".join(line for line in captured.err.splitlines() if line.startswith("devicemap"))
    return code, captured.out, errors


def without_data(monkeypatch, capsys, args: tuple[str, ...]) -> tuple[int, str, str]:
    """The command as it runs for a model without data: it builds the model with transformers."""
    with monkeypatch.context() as patched:
        patched.setattr(trees, "shape", lambda name: None)
        return run(capsys, args)


@pytest.mark.parametrize("args", PLANS + REFUSED, ids=" ".join)
def test_plans_exports_and_refusals_are_the_same_from_data(monkeypatch, capsys, catalog_data_as_built, args):
    if args != ("models",):
        catalog_data_as_built(args[1])
    from_data = run(capsys, args)
    assert from_data == without_data(monkeypatch, capsys, args)
    assert from_data[0] == (0 if args in PLANS else 1 if "2x8GiB" in args and "llama-3-70b" in args else 2)


def _without_times(out: str) -> str:
    """compare's output less what differs from run to run: times, and the note saying which computed
    accelerate's map."""
    try:
        printed = json.loads(out)
    except ValueError:
        return "\n".join(
            line for line in out.splitlines() if not line.startswith(("time (", "accelerate's map by"))
        )
    for side in printed["sides"]:
        side.pop("seconds")
    return json.dumps(printed)


@pytest.mark.parametrize("args", COMPARES, ids=" ".join)
def test_compare_is_the_same_from_data(monkeypatch, capsys, catalog_data_as_built, args):
    catalog_data_as_built(args[1])
    code, out, err = run(capsys, args)
    assert code == 0, err
    if "--json" not in args:  # says where accelerate's map came from (accelerate < 1.15 runs itself)
        noted = "accelerate's map by devicemap.compat's port of accelerate" in out
        assert noted == port_applies({0: 1, "cpu": 1})
    built = without_data(monkeypatch, capsys, args)
    assert built[0] == 0 and _without_times(out) == _without_times(built[1])


def test_the_demo_is_the_same_from_data(monkeypatch, capsys, catalog_data_as_built, tmp_path):
    catalog_data_as_built(command.DEMO_MODEL)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, ("demo",))
    picture = (tmp_path / "devicemap-demo.svg").read_text()
    built = without_data(monkeypatch, capsys, ("demo",))
    assert code == built[0] == 0
    assert (tmp_path / "devicemap-demo.svg").read_text() == picture
    lines, built_lines = out.splitlines(), built[1].splitlines()
    assert [line for line in lines if not line.startswith("time:")] == [
        line for line in built_lines if not line.startswith("time:")
    ]
    assert ("(accelerate's map by devicemap.compat's port" in lines[-2]) == port_applies({0: 1, "cpu": 1})


@pytest.mark.parametrize("name", ["llama-3.2-1b", "mixtral-8x7b", "t5-large", "qwen2.5-0.5b", "gemma-2-9b"])
def test_accelerate_maps_from_data_are_accelerates(catalog_data_as_built, name):
    catalog_data_as_built(name)
    model, shape = catalog.build_meta_model(name), trees.shape(name)
    assert shape is not None
    total = shape.tree("bfloat16").total_bytes
    no_split = shape.no_split_module_classes
    cases = [
        ({0: total // 3, 1: total // 3, "cpu": total}, "balanced", "bfloat16"),
        ({0: total // 4, 1: total // 2, 2: total, "cpu": total}, "balanced_low_0", "bfloat16"),
        ({0: total // 5, "cpu": total // 4}, "sequential", None),
        ({0: total // 10, 1: total // 10, "cpu": 4 * total}, "balanced", "float16"),
        ({0: 0, 1: total, "cpu": total}, "balanced", "float32"),
    ]
    warned = False
    for memory, strategy, dtype in cases:
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            expected = accelerate_device_map(model, dict(memory), strategy, no_split, dtype)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            assert accelerate_device_map(shape, dict(memory), strategy, no_split, dtype) == expected
        assert [str(w.message) for w in ours] == [
            str(w.message) for w in theirs if "Current model requires" in str(w.message)
        ]
        warned = warned or bool(ours)
    # the rotary frequencies of an offloaded module fit no GPU when GPU 0 has 0 bytes: accelerate warns
    assert warned == (name in ("llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-9b"))
