"""Fuzz suite: valid and junk input to every public entry point, and byte-level mutations of safetensors
headers. Whatever goes in, devicemap returns a plan or raises a ``PlacementError`` (never an
``InternalError``, which is a caught Rust panic, and never another exception type); it never hangs or
aborts the interpreter.

It runs in every ``make test`` for a bounded number of examples. A longer hunt:
``DEVICEMAP_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/properties/test_fuzz.py`` (header mutations scale
with it too).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import devicemap
from devicemap import compat
from tiny_models import tiny_llama_config

from exploration import seed as exploration_seed
from model_strategies import CLASS_NAMES, models
from plan_checks import check_plan

EXAMPLES = int(os.environ.get("DEVICEMAP_FUZZ_EXAMPLES", "120"))
fuzz_settings = settings(
    max_examples=EXAMPLES,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no slow "explain"
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

hashable_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=4),
)
junk = st.one_of(hashable_junk, st.lists(st.integers(-3, 3), max_size=2))

# Each argument has values of the right type (some of them still wrong: unknown units, devices, names)
# and junk. An example makes at most one argument junk (see draw_arguments), so the valid paths run too.
sizes = st.one_of(
    st.integers(0, 2**14),
    st.sampled_from(["1KiB", "4KiB", "64KiB", "1MiB", "20GiB", "8Gb", "1.5KB", "0", "0B", "1e3MB"]),
    st.sampled_from(["-1", "20 GB", "20XB", "GB", "1000"]),
    st.integers(2**60, 2**80),
)
junk_sizes = st.one_of(junk, st.floats(allow_nan=True, allow_infinity=True))
device_keys = st.one_of(
    st.integers(0, 3),
    st.sampled_from(["cpu", "disk", "cuda:0", "cuda:1", "0", "1"]),
    st.sampled_from(["mps", "gpu:1", "", "cuda", "xpu:0", " cpu", "tpu"]),
    st.integers(-3, 2**65),
    st.just(torch.device("cpu")),
    st.just(torch.device("cuda", 1)),
)
max_memories = st.one_of(
    st.fixed_dictionaries({0: st.integers(0, 2**14), 1: st.integers(0, 2**14), "cpu": st.integers(0, 2**16)}),
    st.dictionaries(
        st.integers(0, 3) | st.sampled_from(["cpu", "disk"]), st.integers(0, 4096), min_size=1, max_size=5
    ),
    st.dictionaries(device_keys, sizes, max_size=5),
)
junk_max_memories = st.one_of(junk, st.dictionaries(hashable_junk, junk_sizes, min_size=1, max_size=3))
dtypes = st.one_of(
    st.none(),
    st.sampled_from(["float16", "bfloat16", "float32", "torch.float16", "int8", "float8_e4m3fn", "bool"]),
    st.sampled_from([torch.float16, torch.bfloat16, torch.complex64, torch.int32, torch.bool]),
)
junk_dtypes = st.one_of(
    junk, st.sampled_from(["bf16", "float77", "", "torch.", "uint4", "int4", "Tensor"]), st.just(torch.quint8)
)
strategies = st.sampled_from(devicemap.STRATEGIES)
flags = st.booleans()


def draw_arguments(data: st.DataObject, valid: dict, bad: dict) -> dict:
    """Keyword arguments: every one from ``valid``, except at most one drawn from ``bad`` instead."""
    junk_one = data.draw(st.sampled_from([*[None] * len(bad), *bad]), label="junk argument")  # half: none
    return {
        name: data.draw(bad[name] if name == junk_one else strategy, label=name)
        for name, strategy in valid.items()
    }


class Graph:
    """A drawn model; its repr stays finite (torch's Module repr recurses forever on a cycle)."""

    def __init__(self, model: torch.nn.Module, cyclic: bool):
        self.model, self.cyclic = model, cyclic

    def __repr__(self) -> str:
        names = [name for name, _ in self.model.named_modules()]
        return f"Graph(cyclic={self.cyclic}, modules={names}, edges={_edges(self.model)})"


def _edges(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    ids = {id(m): name for name, m in model.named_modules()}
    return [
        (ids[id(m)], child_name, ids[id(c)])
        for m in model.modules()
        for child_name, c in m._modules.items()
        if c is not None
    ]


@st.composite
def module_graphs(draw: st.DrawFn) -> Graph:
    """A random model, maybe with a module registered under a second parent, maybe with a cycle."""
    model = draw(models())
    modules = list(model.modules())
    cyclic = False
    for _ in range(draw(st.integers(0, 2))):
        owner = modules[draw(st.integers(0, len(modules) - 1))]
        target = modules[draw(st.integers(0, len(modules) - 1))]
        owner._modules[f"extra{len(owner._modules)}"] = target
        cyclic = cyclic or _reaches(target, owner)
    return Graph(model, cyclic)


def _reaches(start: torch.nn.Module, goal: torch.nn.Module) -> bool:
    seen: set[int] = set()
    stack = [start]
    while stack:
        module = stack.pop()
        if module is goal:
            return True
        if id(module) in seen:
            continue
        seen.add(id(module))
        stack.extend(m for m in module._modules.values() if m is not None)
    return False


def module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def expect_placement_error(call, *args, **kwargs):
    """Run ``call``: it returns, or raises a PlacementError that is not an InternalError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call(*args, **kwargs)
        except devicemap.InternalError as err:  # a caught Rust panic: always a bug
            pytest.fail(f"InternalError (a panic) from {call.__name__}: {err}")
        except devicemap.PlacementError as err:
            assert str(err), "an error without a message"
            event(f"{call.__name__}: {type(err).__name__}")
            return None
        except BaseException as err:  # reported briefly: a deep traceback (recursion) can exhaust pytest
            frames = traceback.extract_tb(err.__traceback__)[-6:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
            pytest.fail(f"{call.__name__} raised {type(err).__name__}: {str(err)[:500]} (at {where})")
        event(f"{call.__name__}: returned")  # --hypothesis-show-statistics shows how often each path ran
        return result


class_lists = st.one_of(st.none(), st.lists(st.sampled_from(CLASS_NAMES) | st.text(max_size=4), max_size=3))
junk_class_lists = st.one_of(junk, st.lists(hashable_junk, min_size=1, max_size=2))
PLAN_ARGUMENTS = {
    "max_memory": max_memories,
    "strategy": strategies,
    "no_split_module_classes": class_lists,
    "dtype": dtypes,
    "offload_buffers": flags,
    "balance": st.sampled_from(["memory", "compute"]),
    "gpu0_reserve": st.one_of(st.none(), sizes),
}
PLAN_JUNK = {
    "max_memory": junk_max_memories,
    "strategy": junk,
    "no_split_module_classes": junk_class_lists,
    "dtype": junk_dtypes,
    "offload_buffers": junk,
    "balance": junk,
    "gpu0_reserve": junk_sizes,
    "pins": junk,
}


@fuzz_settings
@given(graph=module_graphs(), data=st.data())
def test_plan_returns_a_plan_or_a_placement_error(graph, data):
    model, cyclic = graph.model, graph.cyclic
    names = module_names(model)
    pins = st.one_of(
        st.none(), st.dictionaries(st.sampled_from(names) | st.text(max_size=6), device_keys, max_size=3)
    )
    kwargs = draw_arguments(data, {**PLAN_ARGUMENTS, "pins": pins}, PLAN_JUNK)
    result = expect_placement_error(devicemap.plan, model, **kwargs)
    if result is not None and not cyclic and kwargs["dtype"] is None:  # check_plan sizes at stored dtypes
        check_plan(model, result, pins=None)


@fuzz_settings
@given(size=st.one_of(sizes, junk_sizes), memory=st.one_of(max_memories, junk_max_memories))
def test_size_and_device_parsing(size, memory):
    parsed = expect_placement_error(devicemap.parse_size, size)
    assert parsed is None or (isinstance(parsed, int) and parsed >= 0)
    normalized = expect_placement_error(devicemap.normalize_max_memory, memory)
    if normalized is not None:
        assert all(v is None or (isinstance(v, int) and v >= 0) for v in normalized.values())


@fuzz_settings
@given(data=st.data())
def test_workload_fields(data):
    kwargs = draw_arguments(
        data,
        {
            "batch_size": st.integers(-2, 64),
            "seq_len": st.integers(-2, 4096),
            "kv_dtype": dtypes,
            "logits_tokens": st.one_of(st.none(), st.integers(-2, 8)),
        },
        {"batch_size": junk, "seq_len": junk, "kv_dtype": junk_dtypes, "logits_tokens": junk},
    )
    expect_placement_error(devicemap.Workload, **kwargs)


@fuzz_settings
@given(model=models(), data=st.data())
def test_compat_drop_ins(model, data):
    kwargs = draw_arguments(
        data,
        {"max_memory": max_memories, "no_split_module_classes": class_lists, "dtype": dtypes},
        {"max_memory": junk_max_memories, "no_split_module_classes": junk_class_lists, "dtype": junk_dtypes},
    )
    low_zero = data.draw(st.one_of(flags, junk), label="low_zero")
    balanced = expect_placement_error(compat.get_balanced_memory, model, low_zero=low_zero, **kwargs)
    if balanced is not None:
        kwargs["max_memory"] = balanced
    expect_placement_error(compat.infer_auto_device_map, model, **kwargs)


@fuzz_settings
@given(model=models(), data=st.data())
def test_plan_stages(model, data):
    kwargs = draw_arguments(
        data,
        {
            "hosts": st.lists(st.lists(sizes, min_size=1, max_size=3), min_size=1, max_size=3),
            "dtype": dtypes,
            "tied": st.sampled_from(["copy", "error"]),
        },
        {
            "hosts": st.one_of(junk, st.lists(st.lists(junk_sizes, max_size=2), max_size=2)),
            "dtype": junk_dtypes,
            "tied": junk,
        },
    )
    expect_placement_error(devicemap.plan_stages, model, **kwargs)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("fuzz-checkpoint")
    save_file({f"model.layers.{i}.weight": torch.zeros(8, 8) for i in range(3)}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {"num_hidden_layers": 3, "model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}
        )
    )
    return folder


@fuzz_settings
@given(data=st.data())
def test_plan_checkpoint_arguments(small_checkpoint, data):
    kwargs = draw_arguments(
        data,
        {
            "path": st.sampled_from(
                [small_checkpoint, str(small_checkpoint), small_checkpoint / "model.safetensors"]
            ),
            "max_memory": max_memories,
            "strategy": strategies,
            "dtype": dtypes,
            "block_pattern": st.sampled_from([None, "model.layers.*", ["model.*"]]),
            "config": st.one_of(st.none(), st.fixed_dictionaries({"num_hidden_layers": st.integers(-1, 5)})),
            "workload": st.one_of(st.none(), st.just(devicemap.Workload(batch_size=1, seq_len=8))),
            "offload_buffers": flags,
        },
        {
            "path": junk,
            "max_memory": junk_max_memories,
            "strategy": junk,
            "dtype": junk_dtypes,
            "block_pattern": junk_class_lists,
            "config": st.one_of(
                junk, st.fixed_dictionaries({"num_hidden_layers": junk, "tie_word_embeddings": junk})
            ),
            "workload": junk,
            "offload_buffers": junk,
        },
    )
    expect_placement_error(devicemap.plan_checkpoint, kwargs.pop("path"), **kwargs)


non_path_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.binary(max_size=3))
device_maps = st.dictionaries(
    st.sampled_from(["", "0", "1", "2"]), device_keys | st.just("disk"), min_size=1, max_size=3
)
junk_device_maps = st.one_of(junk, st.dictionaries(hashable_junk, hashable_junk, min_size=1, max_size=2))


def three_linears() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8, bias=False) for _ in range(3)])


@fuzz_settings
@given(data=st.data())
def test_dispatch_arguments(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("offload")
    kwargs = draw_arguments(
        data,
        {
            "plan": st.one_of(device_maps, st.just({"": "cpu"})),
            "rehearse": flags,
            "offload_buffers": flags,
            "offload_dir": st.just(folder),
        },
        {"plan": junk_device_maps, "rehearse": junk, "offload_buffers": junk, "offload_dir": non_path_junk},
    )
    expect_placement_error(devicemap.dispatch, three_linears(), **kwargs)


@fuzz_settings
@given(data=st.data())
def test_load_checkpoint_arguments(small_checkpoint, tmp_path_factory, data):
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = torch.nn.Module()
        empty.model = torch.nn.Module()
        empty.model.layers = three_linears()
    kwargs = draw_arguments(
        data,
        {
            "checkpoint": st.just(small_checkpoint),
            "plan": st.one_of(device_maps, st.sampled_from([{"": 0}, {"": "cpu"}, {"": "disk"}])),
            "offload_dir": st.just(tmp_path_factory.mktemp("offload")),
            "dtype": dtypes,
            "rehearse": flags,
            "progress": st.just(False),
            "offload_buffers": flags,
        },
        {
            "checkpoint": non_path_junk,
            "plan": junk_device_maps,
            "offload_dir": non_path_junk,
            "dtype": junk_dtypes,
            "rehearse": junk,
            "progress": junk,
            "offload_buffers": junk,
        },
    )
    expect_placement_error(devicemap.load_checkpoint, empty, **kwargs)


# Per flag: values the command accepts, and values it must refuse (one line, exit 2).
CLI_VALUES = {
    "--gpus": (
        ["2x8GiB", "4X24GiB", "80GiB,40GiB", "1x2GiB", "1x256MiB"],
        ["24", "1x", "x8GiB", "-1GiB", "", "2x8GiB,"],
    ),
    "--cpu": (["64GiB", "0B", "1e3GB"], ["abc", "18446744073709551615", "0"]),
    "--strategy": (list(devicemap.STRATEGIES), ["fastest", ""]),
    "--dtype": (["bf16", "fp16", "float32", "int8", "auto", "torch.float16"], ["float77", ""]),
    "--batch": (["1", "4"], ["0", "-1", "two", "1e9"]),
    "--seq-len": (["1", "2048"], ["0", "-5", "x"]),
    "--balance": (["memory", "compute"], ["speed"]),
    "--to": (["vllm", "llama.cpp", "deepspeed", "pipelining"], ["tensorrt"]),
    "--pin": (["lm_head=0", "model.norm=cpu", "model.layers.0=1"], ["lm_head", "nope=0", "lm_head=7", "=0"]),
    "--no-split": (["LlamaDecoderLayer", "Qwen2DecoderLayer"], ["NoSuchLayer", ""]),
    "--gpu0-reserve": (["1GiB", "0B"], ["lots", "-1GiB"]),
}
MAX_MEMORY = (
    ["0=8GiB,cpu=64GiB", "0=1GiB,1=1GiB,cpu=2GiB,disk"],
    ["0=8GiB,0=9GiB", "cpu", "disk=1GiB", "=", "tpu=1GiB"],
)
CLI_SWITCHES = ["--disk", "--json", "--offload-buffers"]
DEVICE_FLAGS = ["--gpus", "--cpu", "--disk", "--strategy", "--dtype", "--json", "--no-split"]
PLACEMENT_FLAGS = ["--pin", "--gpu0-reserve", "--offload-buffers"]
COMMAND_FLAGS = {
    "plan": [*DEVICE_FLAGS, *PLACEMENT_FLAGS, "--batch", "--seq-len", "--balance"],
    "compare": DEVICE_FLAGS,
    "export": [*DEVICE_FLAGS, *PLACEMENT_FLAGS, "--to"],
    "models": [],
}


@st.composite
def command_lines(draw: st.DrawFn, folder: Path) -> list[str]:
    """A command line with at most one bad piece, so that valid runs (exit 0 and 1) happen too."""
    command = draw(st.sampled_from(["plan", "plan", "compare", "export", "models"]))
    takes = COMMAND_FLAGS[command]
    models = ["llama-3.2-1b", "qwen2.5-0.5b", "t5-large"]
    bad_models = [
        "lama-3",
        "",
        str(folder / "missing.json"),
        str(folder / "bad.json"),
        str(folder / "list.json"),
        str(folder / "huge.json"),
        str(folder),
    ]
    flags = draw(st.permutations([f for f in sorted(CLI_VALUES) if f in takes]))[: draw(st.integers(0, 4))]
    pieces = ["model", *flags] + (["--max-memory"] if "--gpus" in takes and draw(st.booleans()) else [])
    bad = draw(st.sampled_from([*[None] * len(pieces), *pieces]), label="bad piece")
    args = [command, draw(st.sampled_from(bad_models if bad == "model" else models))]
    for flag in pieces[1:]:
        good, wrong = MAX_MEMORY if flag == "--max-memory" else CLI_VALUES[flag]
        args += [flag, draw(st.sampled_from(wrong if bad == flag else good))]
    if "--gpus" in takes and "--max-memory" not in pieces and "--gpus" not in pieces and draw(st.booleans()):
        args += ["--gpus", "2x4GiB"]
    args += draw(st.permutations([f for f in CLI_SWITCHES if f in takes]))[: draw(st.integers(0, 2))]
    if command == "export" and "--to" not in pieces:
        args += ["--to", "vllm"]  # required
    if command == "models":
        args = ["models"]
    elif bad is None and draw(st.sampled_from([False] * 9 + [True])):
        args.append("--no-such-flag")  # a usage error
    return args


@pytest.fixture(scope="module")
def config_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-configs")
    (folder / "bad.json").write_text("{not json")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "huge.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 10**12}))
    return folder


@settings(fuzz_settings, max_examples=max(20, EXAMPLES // 3))
@given(data=st.data())
def test_the_command_answers_every_command_line_with_a_documented_exit_code(config_files, data):
    import contextlib
    import io

    from devicemap import cli

    argv = data.draw(command_lines(config_files), label="argv")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(argv)
    event(f"exit {code}")
    assert code in (0, 1, 2), (argv, code, err.getvalue()[-2000:])  # 3 is a bug: a traceback to report
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue()[-2000:])
    if code:
        line = err.getvalue().strip()
        assert line.startswith("devicemap: ") and "\n" not in line, (argv, line)


# -- safetensors headers, mutated byte by byte, in a child process (a hang or an abort is caught) --------

HEADER_FUZZER = textwrap.dedent(
    """
    import json, random, struct, sys
    from pathlib import Path
    import devicemap
    from devicemap import _core

    folder, rounds, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    original = (folder / "seed.safetensors").read_bytes()
    header_len = struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8 : 8 + header_len])
    target = folder / "mutant" / "model.safetensors"
    target.parent.mkdir(exist_ok=True)

    def byte_mutant():
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(6)
            at = rng.randrange(len(data)) if data else 0
            if kind == 0 and data:
                data[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif kind == 2 and data:
                del data[at : at + rng.randint(1, 16)]
            elif kind == 3:
                data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, header_len - 1, header_len + 1, len(data), 2**63, 2**64 - 1]))
            elif kind == 4:
                data = data[: rng.randrange(len(data) + 1)]
            elif kind == 5 and 8 + header_len <= len(data):
                pos = 8 + rng.randrange(header_len)
                data[pos] = rng.choice(b'{}[]",:0123456789-.eE\\\\ ')
        return bytes(data)

    VALUES = [None, True, -1, 0, 1, 2**63, 2**64, 2**70, 1.5, "F16", "BF16", "F8_E4M3", "X9", "", [], {}, [0], [0, 1], [1, 0], [-1, 2], [0, 2**64], "a..b", ".", "a.", ".a"]

    KEYS = ["layers.9.w", "__metadata__", "a..b", ".", "a.", ".a", "", "layers.0.w.x", "head"]

    def json_mutant():
        h = json.loads(json.dumps(header))
        names = [k for k in h if k != "__metadata__"]
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(5)
            name = rng.choice(names)
            if kind in (0, 1) and not isinstance(h.get(name), dict):
                continue
            if kind == 0:
                h[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(VALUES)
            elif kind == 1:
                h[rng.choice(KEYS) if rng.random() < 0.5 else name + "x"] = dict(h[name])
            elif kind == 2:
                h.pop(name, None)
            elif kind == 3:
                h["__metadata__"] = rng.choice(VALUES)
            else:
                h[name] = rng.choice(VALUES)
        text = json.dumps(h).encode()
        text += b" " * rng.choice([0, 0, 3])
        return struct.pack("<Q", len(text)) + text + original[8 + header_len :]

    for round in range(rounds):
        blob = byte_mutant() if round % 2 else json_mutant()
        target.write_bytes(blob)
        for call in (
            lambda: _core.checkpoint_tensors(str(target)),
            lambda: devicemap.plan_checkpoint(str(target), max_memory={0: "4KiB", "cpu": "1MiB", "disk": 0}, block_pattern="layers.*"),
        ):
            try:
                call()
            except devicemap.InternalError as err:
                print(f"round {round}: InternalError {err}; blob={blob[:200]!r}")
                sys.exit(3)
            except devicemap.PlacementError as err:
                if not str(err):
                    print(f"round {round}: empty message")
                    sys.exit(4)
            except BaseException as err:
                print(f"round {round}: {type(err).__name__}: {err}; blob={blob[:200]!r}")
                sys.exit(5)
    print("ok", rounds)
    """
)


def test_mutated_safetensors_headers_raise_checkpoint_errors(tmp_path: Path):
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.w": torch.randn(3, 4 + i) for i in range(4)}
    tensors["layers.0.mask"] = torch.ones(5, dtype=torch.bool)
    tensors["head.w"] = torch.randn(2, 2, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "seed.safetensors", metadata={"format": "pt"})
    rounds = max(400, EXAMPLES * 2)
    seed = exploration_seed()
    try:
        done = subprocess.run(
            [sys.executable, "-c", HEADER_FUZZER, str(tmp_path), str(rounds), str(seed)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the header reader hung (seed {seed})")
    assert done.returncode == 0, f"seed {seed}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip() == f"ok {rounds}"


def test_a_truncated_seed_is_still_a_checkpoint_error(tmp_path: Path):
    # The fuzzer's own sanity check: a plainly broken file is reported, not accepted.
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 100) + json.dumps({}).encode())
    with pytest.raises(devicemap.CheckpointError, match="model.safetensors"):
        devicemap.plan_checkpoint(tmp_path, max_memory={"cpu": "1MiB"})


# ----- hardware, quantization configs, the speed objective, estimate ------------------------------------

numbers = st.one_of(st.floats(min_value=1e-3, max_value=1e16), st.integers(1, 10**15))
junk_numbers = st.one_of(junk, st.sampled_from([0, -1, 10**400, float("inf"), float("nan"), True, "1"]))
fractions = st.floats(min_value=0.01, max_value=1.0)
junk_fractions = st.one_of(junk, st.sampled_from([0, 1.5, -0.1, "0.5"]))
gpu_presets = st.sampled_from(["rtx-4090", "a100-80gb-sxm", "t4", "RTX_4090", "h200", "", "gpu"])
host_presets = st.sampled_from(["desktop-ddr5", "desktop-ddr4", "server-ddr5-12ch", "laptop", ""])


@fuzz_settings
@given(data=st.data())
def test_hardware_descriptions(data):
    """GPU / Host / Hardware built from drawn fields: a Hardware or an InvalidOptionError, in bounded time
    and memory (counts are capped before anything is allocated)."""
    from devicemap.cost.hardware import GPU, Host

    gpu = expect_placement_error(
        GPU,
        **draw_arguments(
            data,
            {
                "name": st.text(max_size=6),
                "memory_bytes": st.integers(0, 2**40),
                "memory_bandwidth": numbers,
                "flops": numbers,
                "flops_fp32": numbers,
                "host_to_device": numbers,
                "memory_efficiency": fractions,
                "compute_efficiency": fractions,
            },
            {
                "name": junk,
                "memory_bytes": junk_numbers,
                "memory_bandwidth": junk_numbers,
                "flops": junk_numbers,
                "host_to_device": junk_numbers,
                "compute_efficiency": junk_fractions,
            },
        ),
    )
    host = expect_placement_error(
        Host,
        **draw_arguments(
            data,
            {
                "name": st.text(max_size=6),
                "memory_bandwidth": numbers,
                "flops_fp32": numbers,
                "flops_bf16": numbers,
                "disk_read": numbers,
                "memory_efficiency": fractions,
            },
            {"name": junk, "disk_read": junk_numbers, "memory_efficiency": junk_fractions},
        ),
    )
    gpus = st.one_of(
        st.none(),
        gpu_presets,
        st.lists(gpu_presets | st.just(gpu), max_size=3),
        st.just(gpu) if gpu is not None else st.none(),
    )
    kwargs = draw_arguments(
        data,
        {
            "gpu": gpus,
            "gpus": st.integers(0, 8) | st.sampled_from([-1, 10**9, 10**12]),
            "host": host_presets | (st.just(host) if host is not None else st.none()),
        },
        {"gpu": junk, "gpus": junk, "host": junk},
    )
    hardware = expect_placement_error(devicemap.Hardware.preset, **kwargs)
    if hardware is not None:
        assert len(hardware.gpus) <= 4096
        expect_placement_error(
            devicemap.Hardware,
            gpus=data.draw(st.one_of(st.just(hardware.gpus), junk), label="gpus field"),
            host=hardware.host,
            link_latency=data.draw(st.one_of(st.floats(0, 1), junk), label="link_latency"),
        )


quantization_configs = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"quant_method": st.just("bitsandbytes"), "load_in_4bit": st.booleans()},
        optional={"llm_int8_skip_modules": st.lists(st.sampled_from(["lm_head", "model.norm"]), max_size=2)},
    ),
    st.fixed_dictionaries(
        {"quant_method": st.just("bitsandbytes"), "load_in_4bit": st.booleans()},
        optional={
            "load_in_8bit": st.booleans(),
            "llm_int8_skip_modules": st.one_of(junk, st.lists(st.sampled_from(["lm_head", "model"]) | junk)),
            "bnb_4bit_quant_type": st.sampled_from(["nf4", "fp4", "x"]) | junk,
            "llm_int8_enable_fp32_cpu_offload": st.booleans() | junk,
        },
    ),
    st.fixed_dictionaries(
        {"quant_method": st.just("torchao")},
        optional={
            "quant_type": st.one_of(junk, st.sampled_from(["int4_weight_only", "int8_weight_only"])),
            "modules_to_not_convert": st.one_of(junk, st.lists(st.text(max_size=4) | junk, max_size=2)),
        },
    ),
    st.dictionaries(st.sampled_from(["quant_method", "bits", "x"]), junk, max_size=3),
    junk,
)


@pytest.fixture(scope="module")
def tiny_meta_llama():
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(num_hidden_layers=2, vocab_size=512, num_key_value_heads=4)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@fuzz_settings
@given(data=st.data())
def test_quantization_configs_speed_objective_and_estimate(tiny_meta_llama, data):
    """plan() with drawn quantization configs and speed-objective options, then plan.estimate() with drawn
    arguments: a result or a PlacementError, never KeyError/AssertionError/TypeError from a library."""
    model = tiny_meta_llama
    speed = data.draw(st.booleans(), label="objective speed")
    kwargs = draw_arguments(
        data,
        {
            "max_memory": st.sampled_from([{0: "40KiB", "cpu": "64MiB"}, {"cpu": "64MiB"}, {0: "64MiB"}]),
        },
        {"max_memory": junk_max_memories},
    )
    if not speed or data.draw(st.booleans(), label="memory-objective options with speed"):
        kwargs.update(
            draw_arguments(
                data,
                {
                    "strategy": strategies,
                    "balance": st.sampled_from(["memory", "compute"]),
                    "execution_device": st.sampled_from([None, "cpu"]),
                },
                {"strategy": junk, "balance": junk, "execution_device": junk | st.just(0)},
            )
        )
    if speed:
        kwargs.update(objective="speed", hardware=devicemap.Hardware.preset("rtx-4090"))
    else:
        kwargs["quantization_config"] = data.draw(quantization_configs, label="quantization_config")
    plan = expect_placement_error(devicemap.plan, model, **kwargs)
    if plan is None:
        return
    arguments = draw_arguments(
        data,
        {
            "workload": st.just(devicemap.Workload(seq_len=16)),
            "hardware": st.just(devicemap.Hardware.preset("rtx-4090", gpus=2)),
            "model_or_config": st.just(model),
        },
        {"workload": junk, "hardware": junk | gpu_presets, "model_or_config": junk},
    )
    expect_placement_error(plan.estimate, *arguments.values())


FILE_KINDS = r"""
import json, os, resource, signal, struct, sys, devicemap
root = sys.argv[1]

def header(names):
    raw = json.dumps({n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)}).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(names)

KINDS = {
    "fifo": lambda p: os.mkfifo(p),
    "dev-null": lambda p: os.symlink("/dev/null", p),
    "dev-zero": lambda p: os.symlink("/dev/zero", p),
    "folder": lambda p: os.mkdir(p),
    "dangling": lambda p: os.symlink(p + ".missing", p),
    "deep-names": lambda p: open(p, "wb").write(header([".".join(["a"] * 200_000) + ".w"])),
    "huge-length": lambda p: open(p, "wb").write(struct.pack("<Q", 2**62) + b"{}"),
    "self-loop": lambda p: os.symlink(p, p),
}
ROLES = ["model.safetensors", "model.safetensors.index.json", "config.json", "shard"]

def on_alarm(*_):
    raise TimeoutError("a read blocked")

signal.signal(signal.SIGALRM, on_alarm)
for kind, make in KINDS.items():
    for role in ROLES:
        folder = os.path.join(root, f"{kind}-{role}")
        os.mkdir(folder)
        if role != "model.safetensors":
            open(os.path.join(folder, "model-1.safetensors"), "wb").write(header(["layers.0.w"]))
        if role == "shard":
            index = {"weight_map": {"layers.0.w": "model-1.safetensors", "layers.1.w": "model-2.safetensors"}}
            open(os.path.join(folder, "model.safetensors.index.json"), "w").write(json.dumps(index))
            make(os.path.join(folder, "model-2.safetensors"))
        else:
            make(os.path.join(folder, role))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        signal.alarm(30)
        try:
            devicemap.plan_checkpoint(folder, max_memory={"cpu": "1GiB"})
            outcome = "planned"
        except devicemap.PlacementError as err:
            outcome = type(err).__name__
        except BaseException as err:
            outcome = f"RAW {type(err).__name__}: {str(err)[:200]}"
        finally:
            signal.alarm(0)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(kind, role, outcome, grown, flush=True)
"""


def test_every_file_kind_in_every_checkpoint_role_is_planned_or_refused_quickly(tmp_path: Path):
    """A FIFO, a device, a folder, a dangling or looping symlink, absurdly deep names and a huge header
    length, as the checkpoint file, its index, its config.json or a shard: each is planned or a
    PlacementError, within 30 s and 256 MiB of extra memory per case (one child process runs them all)."""
    done = subprocess.run(
        [sys.executable, "-c", FILE_KINDS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(" ", 3) for line in done.stdout.splitlines()]
    assert len(rows) == 8 * 4, done.stdout
    for kind, role, outcome, grown in rows:
        assert not outcome.startswith("RAW"), (kind, role, outcome)
        assert int(grown) < 256 * 1024, (kind, role, f"grew {grown} KiB")
