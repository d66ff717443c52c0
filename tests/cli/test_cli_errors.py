"""The devicemap command on bad input: one line naming the input and the fix, exit code 2, never a
traceback, and never a silent change of what the user asked for.

Most cases call ``devicemap.cli.command.main`` in-process (a subprocess imports torch again, seconds each); a
few run the real command to check exit codes, tracebacks and closed pipes end to end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import devicemap
from devicemap import catalog
from devicemap.cli import command as cli

SMALL = "llama-3.2-1b"  # the cheapest bundled model to build


def refused(capsys, *args: str) -> str:
    """Run the command in-process; assert exit 2 with one ``devicemap: ...`` line; return that line."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    assert code == 2, (args, captured.err)
    assert "Traceback" not in captured.err
    line = captured.err.strip()
    assert line.startswith("devicemap: ") and "\n" not in line, line
    return line


def planned(capsys, *args: str) -> dict:
    """Run ``plan ... --json`` in-process; assert exit 0; return the printed plan."""
    code = cli.main(["plan", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "devicemap.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kwargs,
    )


# ----- tracebacks and wrong messages ------------------------------------------------------------------


def test_unknown_dtypes_are_refused_with_the_accepted_names(capsys):
    for flag in ("--dtype", "--kv-dtype"):
        line = refused(capsys, "plan", SMALL, "--gpus", "1x8GiB", "--batch", "1", flag, "float77")
        assert f"{flag} 'float77'" in line and "bfloat16 (bf16)" in line and "float16 (fp16, half)" in line
    line = refused(capsys, "compare", SMALL, "--gpus", "1x8GiB", "--dtype", "complex64")
    assert "'complex64'" in line


def test_dtype_aliases_and_auto_mean_the_torch_dtype(capsys):
    def weights(*dtype: str) -> list[int]:
        return [d["weights"] for d in planned(capsys, SMALL, "--gpus", "1x80GiB", *dtype)["devices"]]

    bfloat16 = weights("--dtype", "bfloat16")
    assert weights("--dtype", "bf16") == weights("--dtype", "auto") == bfloat16  # the config says bfloat16
    assert weights("--dtype", "fp16") == weights("--dtype", "half") == weights("--dtype", "float16")
    assert weights("--dtype", "fp32") == weights("--dtype", "float") == weights("--dtype", "float32")
    assert weights("--dtype", "int8") == [bfloat16[0] // 2]


def test_counts_must_be_positive(capsys):
    for flag, value in (("--batch", "-1"), ("--batch", "0"), ("--seq-len", "0"), ("--seq-len", "-5")):
        line = refused(capsys, "plan", SMALL, "--gpus", "1x8GiB", flag, value)
        assert f"{flag} {value}" in line and "at least 1" in line


def test_seq_len_alone_plans_batch_one(capsys):
    alone = planned(capsys, SMALL, "--gpus", "1x80GiB", "--seq-len", "4096")
    with_batch = planned(capsys, SMALL, "--gpus", "1x80GiB", "--seq-len", "4096", "--batch", "1")
    assert alone == with_batch and alone["devices"][0]["runtime"] > 0


def test_sizes_too_large_for_the_core_are_refused(capsys):
    line = refused(capsys, "plan", SMALL, "--gpus", "18446744073709551615")
    assert "--gpus" in line and "18446744073709551615" in line and "2 EiB" in line
    line = refused(capsys, "plan", SMALL, "--gpus", "100000x8GiB")
    assert "100000x8GiB" in line and "1024" in line
    line = refused(capsys, "plan", SMALL, "--max-memory", "99999999999999999999=8GiB")
    assert "99999999999999999999" in line


def test_bad_config_files_name_the_file_and_the_field(capsys, tmp_path):
    good = catalog.load_config(SMALL)
    cases = {
        "unknown.json": ({"model_type": "nosuch"}, "unknown model_type 'nosuch'"),
        "typo.json": ({**good, "model_type": "lama"}, "did you mean llama"),
        "list.json": ([1, 2], "holds a JSON list, not an object"),
        "negative.json": ({**good, "num_hidden_layers": -3}, "num_hidden_layers=-3"),
        "text.json": ({**good, "num_hidden_layers": "x"}, "num_hidden_layers='x'"),
        "field.json": ({**good, "hidden_size": "wide"}, "'hidden_size'"),
        # last: checked before any layer is built (building 10**12 would take hours)
        "deep.json": ({**good, "num_hidden_layers": 10**12}, "num_hidden_layers=1000000000000"),
    }
    for name, (config, expected) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(config))
        line = refused(capsys, "plan", str(path), "--gpus", "1x8GiB")
        assert name in line and expected in line, line
    (tmp_path / "broken.json").write_text("{not json")
    line = refused(capsys, "export", str(tmp_path / "broken.json"), "--gpus", "1x8GiB", "--to", "vllm")
    assert "broken.json" in line and "not valid JSON" in line


def test_missing_paths_say_no_such_file(capsys, tmp_path):
    for missing in ("./nope/config.json", str(tmp_path / "nope.safetensors"), "nope/"):
        line = refused(capsys, "plan", missing, "--gpus", "1x8GiB")
        assert repr(missing) in line and "no such file or folder" in line
    line = refused(capsys, "plan", str(tmp_path), "--gpus", "1x8GiB")
    assert "holds neither a config.json nor *.safetensors" in line
    (tmp_path / "weights.bin").write_bytes(b"")
    line = refused(capsys, "compare", str(tmp_path / "weights.bin"), "--gpus", "1x8GiB")
    assert "weights.bin" in line


def test_an_empty_model_argument_is_refused(capsys, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(catalog.load_config(SMALL)))
    monkeypatch.chdir(tmp_path)  # an empty path must not resolve to the current folder's config.json
    line = refused(capsys, "plan", "", "--gpus", "1x8GiB")
    assert "the model argument is empty" in line
    refused(capsys, "plan", "  ", "--gpus", "1x8GiB")


def test_out_is_checked_before_planning(capsys, tmp_path):
    base = ("plan", SMALL, "--gpus", "1x8GiB", "--out")
    line = refused(capsys, *base, str(tmp_path / "missing" / "plan.svg"))
    assert "missing" in line and "does not exist" in line
    (tmp_path / "folder.svg").mkdir()
    line = refused(capsys, *base, str(tmp_path / "folder.svg"))
    assert "folder.svg" in line and "is a folder" in line
    line = refused(capsys, *base, str(tmp_path / "plan.png"))
    assert "plan.png" in line and ".svg or .html" in line
    keep = tmp_path / "plan.svg.tmp"  # a file of the user's at a predictable temporary name: kept
    keep.write_text("mine")
    assert cli.main([*base, str(tmp_path / "plan.svg")]) == 0
    assert keep.read_text() == "mine" and (tmp_path / "plan.svg").read_text().startswith("<svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.svg", "plan.svg", "plan.svg.tmp"]


def test_a_picture_that_cannot_be_written_leaves_nothing_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "devicemap-demo.svg").mkdir()  # the demo's picture name, taken by a folder
    line = refused(capsys, "demo")
    assert "cannot write the picture 'devicemap-demo.svg'" in line
    assert [p.name for p in tmp_path.iterdir()] == ["devicemap-demo.svg"]  # no temporary file left


def test_usage_errors_are_one_line(capsys):
    line = refused(capsys, "plan", SMALL, "--gpus", "1x8GiB", "--strategy", "fastest")
    assert "--strategy" in line and "'fastest'" in line and "balanced" in line
    line = refused(capsys, "plan", SMALL, "--gpus", "1x8GiB", "--balance", "speed")
    assert "--balance" in line and "'speed'" in line
    line = refused(capsys, "export", SMALL, "--gpus", "1x8GiB", "--to", "tensorrt")
    assert "--to" in line and "vllm" in line
    line = refused(capsys, "plan", "--gpus", "1x8GiB")
    assert "model" in line
    line = refused(capsys, "plan", SMALL, "--gpus", "1x8GiB", "--batch", "two")
    assert "--batch" in line and "'two'" in line
    refused(capsys, "nosuchcommand")


def test_a_bug_exits_3_with_a_traceback_to_report(capsys, monkeypatch):
    def broken() -> int:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "run_models", broken)
    assert cli.main(["models"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "simulated bug" in err and "please report" in err


# ----- no silent changes ------------------------------------------------------------------------------


def test_a_device_given_twice_in_max_memory_is_refused(capsys):
    for spec, device in (
        ("0=8GiB,0=9GiB", "'0'"),
        ("0=8GiB,cuda:0=9GiB", "'cuda:0'"),
        ("cpu=1GiB,cpu=2GiB", "'cpu'"),
    ):
        line = refused(capsys, "plan", SMALL, "--max-memory", spec)
        assert spec in line and f"device {device} is given twice" in line


def test_max_memory_excludes_gpus_cpu_and_disk(capsys):
    for extra in (["--gpus", "1x8GiB"], ["--cpu", "8GiB"], ["--disk"]):
        line = refused(capsys, "plan", SMALL, "--max-memory", "0=8GiB", *extra)
        assert f"--max-memory cannot be combined with {extra[0]}" in line


def test_only_disk_may_stand_alone_in_max_memory(capsys):
    for spec, name in (("0=8GiB,cpu", "'cpu'"), ("0", "'0'")):
        line = refused(capsys, "plan", SMALL, "--max-memory", spec)
        assert f"{name} needs a size" in line
    line = refused(capsys, "plan", SMALL, "--max-memory", "0=8GiB,disk=5GiB")
    assert "disk takes no size" in line
    assert planned(capsys, SMALL, "--max-memory", "0=80GiB,disk")["device_map"] == {"": 0}


def test_a_bare_small_number_needs_a_unit(capsys):
    for flags in (["--gpus", "24"], ["--gpus", "2x24"], ["--gpus", "1x8GiB", "--cpu", "64"]):
        line = refused(capsys, "plan", SMALL, *flags)
        assert "did you mean" in line and "GiB?" in line and "B for bytes" in line
    line = refused(capsys, "plan", SMALL, "--max-memory", "0=24,cpu=1GiB")
    assert "'0=24'" in line and "did you mean 24GiB?" in line
    bytes_ = planned(capsys, SMALL, "--gpus", f"{80 * 2**30}")  # plain byte counts >= 1 MiB stay accepted
    assert bytes_ == planned(capsys, SMALL, "--gpus", "80GiB")


def test_capital_x_repeats_gpus(capsys):
    assert planned(capsys, SMALL, "--gpus", "2X8GiB") == planned(capsys, SMALL, "--gpus", "2x8GiB")


def test_the_kv_cache_dtype_is_the_compute_dtype_not_the_weight_dtype(capsys):
    model = catalog.build_meta_model(SMALL)

    def runtime(dtype: str, kv_dtype: str) -> int:
        workload = devicemap.Workload(batch_size=2, seq_len=1024, kv_dtype=kv_dtype)
        return devicemap.plan(model, max_memory={0: "80GiB"}, dtype=dtype, workload=workload).usage[0].runtime

    def printed(*flags: str) -> int:
        args = (SMALL, "--gpus", "1x80GiB", "--batch", "2", "--seq-len", "1024", *flags)
        return planned(capsys, *args)["devices"][0]["runtime"]

    # int8 weights: the cache still holds bfloat16 activations (the config's dtype)
    assert printed("--dtype", "int8") == runtime("int8", "bfloat16") != runtime("int8", "int8")
    assert printed("--dtype", "float32") == runtime("float32", "float32")
    assert printed("--dtype", "int8", "--kv-dtype", "float8_e4m3fn") == runtime("int8", "float8_e4m3fn")
    line = refused(capsys, "plan", SMALL, "--gpus", "1x80GiB", "--kv-dtype", "fp16")
    assert "--kv-dtype" in line and "--batch" in line


# ----- the real command -------------------------------------------------------------------------------


def test_the_command_prints_one_line_and_exits_2(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("[]")
    out = run("plan", str(config), "--gpus", "1x8GiB")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"devicemap: '{config}' holds a JSON list, not an object: a transformers config.json looks like "
        '{"model_type": "llama", ...}'
    ]
    usage = run("plan", SMALL, "--gpus", "1x8GiB", "--dtype", "float77")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1 and "float77" in usage.stderr


@pytest.mark.skipif(not hasattr(os, "pipe"), reason="needs a pipe")
def test_a_closed_output_ends_quietly():
    """`devicemap plan ... | head -1`: the reader leaves early; no 'Broken pipe' message, exit 141."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        out = subprocess.run(
            [sys.executable, "-m", "devicemap.cli", "plan", SMALL, "--gpus", "1x8GiB"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        os.close(write)
    # Only the libraries' own import-time log lines may appear (torchao logs deprecations when
    # transformers imports it); nothing from devicemap, no 'Broken pipe', no traceback.
    library_log = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ \S*site-packages/")
    assert out.returncode == 141
    assert [line for line in out.stderr.splitlines() if not library_log.match(line)] == []


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"devicemap {devicemap.__version__}"


def test_a_fifo_or_a_hostile_config_is_one_line_not_a_hang_or_a_traceback(capsys, tmp_path):
    """`devicemap plan` on a FIFO must not block forever, and a config.json nested 100k deep or holding a
    5000-digit integer must not end in a traceback (exit 3): each is one line, exit 2."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    line = refused(capsys, "plan", str(fifo), "--cpu", "8GiB")
    assert "is a FIFO, not a regular file" in line
    fifo.unlink()
    for text, message in (
        ("[" * 100_000 + "]" * 100_000, "nests JSON deeper than Python can parse"),
        (
            '{"model_type": "llama", "num_hidden_layers": ' + "9" * 5000 + "}",
            "holds a value Python cannot read",
        ),
    ):
        fifo.write_text(text)
        line = refused(capsys, "plan", str(fifo), "--cpu", "8GiB")
        assert message in line and str(fifo) in line


def test_names_from_a_checkpoint_reach_the_terminal_escaped_and_cut(tmp_path):
    """Tensor names reach the terminal escaped, so a checkpoint cannot send it escape sequences or a forged
    second line, and messages quote header content only up to a limit (never a 50 MB message)."""
    import struct

    names = ["layers.0.w", "layers.1.\x1b[31mred\x1b[0m\nFORGED LINE.w", "x" * 100_000 + ".w"]
    header = {
        n: {"dtype": "F32", "shape": [1024], "data_offsets": [i * 4096, (i + 1) * 4096]}
        for i, n in enumerate(names)
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4096 * len(names))
    done = subprocess.run(
        [sys.executable, "-m", "devicemap.cli", "plan", str(path), "--gpus", "1x8KiB", "--cpu", "1GiB"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and not any(
        line.startswith("FORGED") for line in done.stdout.splitlines()
    )
    assert "\\x1b[31mred\\x1b[0m\\nFORGED LINE" in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) < 1000

    bad = "a..b" + "x" * 5_000_000  # an empty component: refused, and the message quotes the name
    raw = json.dumps({bad: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(devicemap.CheckpointError) as caught:
        devicemap.plan_checkpoint(path, max_memory={"cpu": "1GiB"})
    message = str(caught.value)
    assert len(message) <= 8200 and "characters cut" in message and str(path) in message


def test_main_leaves_the_callers_logging_as_it_found_it():
    """The command quiets accelerate's per-GPU warnings while it runs; a program (or a test run) calling
    main() in-process keeps its own logging settings afterwards."""
    import logging

    accelerate_logger = logging.getLogger("accelerate")
    before = accelerate_logger.level
    assert cli.main(["models"]) == 0
    assert accelerate_logger.level == before
