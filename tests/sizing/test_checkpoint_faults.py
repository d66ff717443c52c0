"""Checkpoint header faults: headers are accepted exactly when safetensors would load the
file, every fault is a CheckpointError naming the file, index shards stay inside the folder, and the
layer lists are found when the checkpoint holds more or fewer layers than config.json says."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch

import devicemap
from tiny_models import tiny_llama_config

CPU = {"cpu": "1GiB"}


def tensor(begin: int, end: int, shape=(4,), dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def write_raw(path, header: bytes, data: int, length: int | None = None) -> None:
    size = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + header + b"\0" * data)


def safetensors_loads(path) -> bool:
    """Whether the safetensors library itself loads every tensor of the file (the rule we follow)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                handle.get_tensor(name)
    except SafetensorError:
        return False
    return True


# --- the data section must be tiled exactly ---------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {"a": tensor(0, 16), "b": tensor(20, 36)},
            36,
            r'4 unused bytes \(a gap\) between tensor "a" and tensor "b"',
        ),
        ({"a": tensor(8, 24)}, 24, r'8 unused bytes \(a gap\) between the start of the data and tensor "a"'),
        ({"a": tensor(0, 16)}, 20, r'4 bytes of data after tensor "a" belong to no tensor'),
        ({}, 8, "8 bytes of data after the header"),
    ],
    ids=["gap-between", "gap-at-start", "data-after-last", "data-without-tensors"],
)
def test_gaps_and_unused_data_are_refused_as_safetensors_refuses_them(tmp_path, header, data, message):
    path = tmp_path / "gappy.safetensors"
    write_raw(path, json.dumps(header).encode(), data)
    assert not safetensors_loads(path)
    with pytest.raises(devicemap.CheckpointError, match=message) as info:
        devicemap.plan_checkpoint(path, max_memory=CPU)
    assert "gappy.safetensors" in str(info.value)
    # load_checkpoint reads the same headers the same way: refused before any tensor is touched.
    with pytest.raises(devicemap.CheckpointError, match=message):
        devicemap.load_checkpoint(torch.nn.Linear(2, 2), path, {"": "cpu"}, progress=False)


# --- every header fault is a CheckpointError naming the file; what safetensors loads is accepted -----


def raw(text: str) -> bytes:
    return text.encode()


A = '"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
REFUSED = {
    "not-utf8": (b'{"a\xff": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', 16, "not UTF-8"),
    "zero-length": (b"", 16, "header length is 0"),
    "duplicate-tensor": (
        raw("{" + A + ", " + A.replace("[0, 16]", "[16, 32]") + "}"),
        32,
        'tensor "a" is listed twice in the header, with different entries',
    ),
    "duplicate-metadata": (
        raw('{"__metadata__": {}, "__metadata__": {}, ' + A + "}"),
        16,
        'two "__metadata__"',
    ),
    "negative-offset": (raw(A.replace("[0, 16]", "[-1, 16]").join("{}")), 16, "data_offsets holds -1"),
    "float-offset": (raw(A.replace("[0, 16]", "[0.0, 16]").join("{}")), 16, r"data_offsets holds 0\.0"),
    "float-shape": (raw(A.replace("[4]", "[4.0]").join("{}")), 16, r"shape holds 4\.0"),
    "shape-overflow": (
        raw(json.dumps({"a": tensor(0, 0, shape=(2**63, 2**63, 0))})),
        0,
        "more elements than 64 bits can count",
    ),
    "metadata-not-strings": (
        raw('{"__metadata__": {"x": 1}, ' + A + "}"),
        16,
        "__metadata__ must map strings",
    ),
    "metadata-list": (raw('{"__metadata__": [], ' + A + "}"), 16, "__metadata__ must map strings"),
    "entry-not-object": (raw('{"a": 3}'), 0, "not an object"),
    "half-byte": (raw(json.dumps({"a": tensor(0, 2, shape=(3,), dtype="F4")})), 2, "whole number of bytes"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_every_header_fault_is_a_checkpoint_error_naming_the_file(tmp_path, case):
    header, data, message = REFUSED[case]
    path = tmp_path / f"{case}.safetensors"
    write_raw(path, header, data)
    assert not safetensors_loads(path)
    with pytest.raises(devicemap.CheckpointError, match=message) as info:
        devicemap.plan_checkpoint(path, max_memory=CPU)
    assert f"{case}.safetensors" in str(info.value)


def test_oversized_header_length_is_refused_without_echoing_file_bytes(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(b"SECRET!!" + b"\0" * 64)
    length = str(struct.unpack("<Q", b"SECRET!!")[0])
    with pytest.raises(devicemap.CheckpointError, match="exceeds the 100000000-byte limit") as info:
        devicemap.checkpoint_tree(path)
    assert length not in str(info.value) and "huge.safetensors" in str(info.value)


ACCEPTED = {
    "metadata-null": (raw('{"__metadata__": null, ' + A + "}"), 16),
    "identical-duplicate": (raw("{" + A + ", " + A + "}"), 16),
    "float4": (raw(json.dumps({"a": tensor(0, 2, shape=(4,), dtype="F4")})), 2),
    "unsorted-offsets": (raw(json.dumps({"b": tensor(16, 32), "a": tensor(0, 16)})), 32),
    "empty-tensor": (raw(json.dumps({"e": tensor(0, 0, shape=(0,)), "a": tensor(0, 16)})), 16),
}


@pytest.mark.parametrize("case", ACCEPTED, ids=list(ACCEPTED))
def test_headers_safetensors_loads_are_planned(tmp_path, case):
    header, data = ACCEPTED[case]
    path = tmp_path / f"{case}.safetensors"
    write_raw(path, header, data)
    if case != "float4" or hasattr(torch, "float4_e2m1fn_x2"):  # torch < 2.8 has no dtype to load F4 into
        assert safetensors_loads(path)
    tree = devicemap.checkpoint_tree(path)
    assert tree.total_bytes == data


# --- tensor names that cannot be module paths ------------------------------------------------------


@pytest.mark.parametrize("name", ["a..b", ".a", "a.", ""], ids=["a..b", ".a", "a.", "empty"])
def test_names_no_module_can_hold_are_checkpoint_errors_naming_file_and_tensor(tmp_path, name):
    header = {"w": tensor(0, 16), name: tensor(16, 32)}
    path = tmp_path / "names.safetensors"
    write_raw(path, json.dumps(header).encode(), 32)
    with pytest.raises(devicemap.CheckpointError) as info:
        devicemap.plan_checkpoint(path, max_memory=CPU)
    assert "names.safetensors" in str(info.value) and json.dumps(name) in str(info.value)


def test_a_tensor_nested_under_a_tensor_is_its_state_and_counts_with_it(tmp_path):
    # bitsandbytes saves "proj.weight.absmax", "proj.weight.quant_map", ... beside "proj.weight": no module
    # holds them; they load with the weight, so the weight's module carries their bytes.
    header = {
        "proj.weight": tensor(0, 16),
        "proj.weight.absmax": tensor(16, 24, shape=(2,)),
        "proj.weight.quant_state.bitsandbytes__nf4": tensor(24, 32, shape=(8,), dtype="U8"),
        "proj.bias": tensor(32, 40, shape=(2,)),
    }
    path = tmp_path / "state.safetensors"
    write_raw(path, json.dumps(header).encode(), 40)
    tree = devicemap.checkpoint_tree(path)
    assert tree.module_bytes("proj.weight") == 32 and tree.total_bytes == 40


# --- index shards stay inside the checkpoint folder ------------------------------------------------


def write_index(folder, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def test_index_shards_outside_the_folder_are_refused_without_reading_them(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"SECRET!!" + b"\0" * 64)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    echoed = str(struct.unpack("<Q", b"SECRET!!")[0])
    for shard, why in [
        (str(outside), "is an absolute path"),
        ("../outside.safetensors", "leaves the checkpoint"),
    ]:
        write_index(folder, {"w": shard})
        for read in (
            lambda: devicemap.plan_checkpoint(folder, max_memory=CPU),
            lambda: devicemap.load_checkpoint(torch.nn.Linear(2, 2), folder, {"": "cpu"}, progress=False),
        ):
            with pytest.raises(devicemap.CheckpointError, match=why) as info:
                read()
            assert "model.safetensors.index.json" in str(info.value)
            assert echoed not in str(info.value) and "SECRET" not in str(info.value)


def test_index_shards_in_subfolders_are_planned_and_loaded(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    folder = tmp_path / "ckpt"
    (folder / "shards").mkdir(parents=True)
    state = model.state_dict()
    save_file(
        {k: v for k, v in state.items() if k.startswith("0.")}, folder / "shards" / "part-1.safetensors"
    )
    save_file({k: v for k, v in state.items() if k.startswith("1.")}, folder / "part-2.safetensors")
    write_index(
        folder,
        {k: ("shards/part-1.safetensors" if k.startswith("0.") else "./part-2.safetensors") for k in state},
    )
    plan = devicemap.plan_checkpoint(folder, max_memory=CPU)
    assert plan.device_map == {"": "cpu"}
    empty = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    loaded = devicemap.load_checkpoint(empty, folder, plan, progress=False)
    for name, value in state.items():
        assert torch.equal(loaded.state_dict()[name], value), name


# --- more (or fewer) numbered layers than config.json says ------------------------------------------


def llama_checkpoint(folder, layers_saved: int, layers_in_config: int, mtp_extras: bool = False) -> dict:
    """A tiny Llama saved with ``layers_saved`` decoder layers and a config.json claiming
    ``layers_in_config``. ``mtp_extras`` adds DeepSeek-V3-style projection tensors to the last layer.
    Returns the config as saved."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers_saved
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in model.state_dict().items()}
    if mtp_extras:
        last = f"model.layers.{layers_saved - 1}"
        state[f"{last}.eh_proj.weight"] = torch.zeros(32, 64)
        state[f"{last}.enorm.weight"] = torch.zeros(32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors")
    saved = config.to_dict() | {"num_hidden_layers": layers_in_config}
    (folder / "config.json").write_text(json.dumps(saved))
    return saved


def layer_kept_whole(plan: devicemap.Plan, index: int) -> bool:
    name = f"model.layers.{index}"
    return name in plan.assignments and not any(k.startswith(name + ".") for k in plan.assignments)


def test_extra_layers_past_num_hidden_layers_are_blocks_with_their_kv_cache(tmp_path):
    """DeepSeek-V3 style: num_hidden_layers=4 but model.layers.0..4 stored (4 is a multi-token-
    prediction layer). Every layer stays whole and the workload's KV cache covers all five."""
    folder = tmp_path / "mtp"
    config = llama_checkpoint(folder, layers_saved=5, layers_in_config=4, mtp_extras=True)
    layer_bytes = devicemap.checkpoint_tree(folder).module_bytes("model.layers.1")
    # Room for about one layer and a half per GPU: without blocks, layers would be cut across GPUs.
    memory = {g: int(layer_bytes * 1.6) for g in range(6)} | {"cpu": "1GiB"}
    plan = devicemap.plan_checkpoint(folder, max_memory=memory, strategy="sequential")
    for i in range(5):
        assert layer_kept_whole(plan, i), (i, plan.assignments)
    # The KV cache is planned for all five layers: the same runtime memory as a config saying five.
    workload = devicemap.Workload(batch_size=1, seq_len=16, kv_dtype="float32")
    runtime = runtime_bytes(folder, workload)
    assert runtime == runtime_bytes(folder, workload, config | {"num_hidden_layers": 5})
    with pytest.warns(UserWarning, match="holds 4 layers"):
        assert runtime > runtime_bytes(folder, workload, config | {"num_hidden_layers": 5}, layers=4)


def runtime_bytes(folder, workload, config=None, layers=None) -> int:
    """Runtime memory of a plan (KV cache, activations, logits); ``layers`` keeps only that many
    layers' KV cache, by planning a copy of the checkpoint without the others."""
    if layers is not None:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        kept = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{layers}.")}
        folder = folder.parent / f"{folder.name}-{layers}"
        folder.mkdir()
        save_file(kept, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
    plan = devicemap.plan_checkpoint(folder, max_memory=CPU, workload=workload, config=config)
    return sum(u.runtime for u in plan.usage)


def test_truncated_checkpoint_keeps_its_layers_whole_and_says_so(tmp_path):
    folder = tmp_path / "truncated"
    config = llama_checkpoint(folder, layers_saved=3, layers_in_config=5)
    workload = devicemap.Workload(batch_size=1, seq_len=16, kv_dtype="float32")
    with pytest.warns(UserWarning, match=r"num_hidden_layers=5 but the checkpoint's model\.layers holds 3"):
        plan = devicemap.plan_checkpoint(folder, max_memory=CPU, workload=workload)
    assert plan.tree.core.modules_of_class("CheckpointBlock") == [f"model.layers.{i}" for i in range(3)]
    # The KV cache of the three layers present, as if the config said three.
    assert sum(u.runtime for u in plan.usage) == runtime_bytes(
        folder, workload, config | {"num_hidden_layers": 3}
    )


def test_matching_layer_count_draws_no_warning(tmp_path):
    folder = tmp_path / "exact"
    llama_checkpoint(folder, layers_saved=3, layers_in_config=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = devicemap.checkpoint_tree(folder)
    assert tree.core.modules_of_class("CheckpointBlock") == [f"model.layers.{i}" for i in range(3)]


def test_encoder_decoder_stacks_of_different_lengths(tmp_path):
    """T5 with num_layers=3, num_decoder_layers=2: both stacks kept whole, KV cache for the decoder's
    two layers only, as planning the model itself gives."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2
    )
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v for k, v in state.items() if "embed_tokens" not in k}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(config.to_json_string())
    workload = devicemap.Workload(batch_size=1, seq_len=8, kv_dtype="float32")
    plan = devicemap.plan_checkpoint(tmp_path, max_memory=CPU, workload=workload, dtype="float32")
    blocks = plan.tree.core.modules_of_class("CheckpointBlock")
    assert blocks == [f"encoder.block.{i}" for i in range(3)] + [f"decoder.block.{i}" for i in range(2)]
    from_model = devicemap.plan(model, max_memory=CPU, workload=workload, dtype="float32")
    assert sum(u.runtime for u in plan.usage) == sum(u.runtime for u in from_model.usage)


# ----- file kinds and sizes: every read is of a regular file, bounded ---------------------------------

PLAN_IN_A_CHILD = """
import sys, devicemap
try:
    devicemap.plan_checkpoint(sys.argv[1], max_memory={"cpu": "1GiB"})
except devicemap.PlacementError as err:
    print(type(err).__name__, err)
"""


def plan_in_a_child(path) -> str:
    """plan_checkpoint in a subprocess, so a read that blocks fails the test instead of hanging it."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", PLAN_IN_A_CHILD, str(path)], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"planning {path} hung")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def small_checkpoint(folder) -> None:
    folder.mkdir()
    header = json.dumps({"layers.0.w": tensor(0, 16)}).encode()
    write_raw(folder / "model-00001.safetensors", header, 16)


@pytest.mark.parametrize(
    "which", ["model.safetensors", "model.safetensors.index.json", "shard", "checkpoint"]
)
def test_a_fifo_where_a_checkpoint_file_belongs_is_refused_without_blocking(tmp_path, which):
    """A FIFO named model.safetensors or model.safetensors.index.json would block plan_checkpoint (and
    `devicemap plan`) forever on open, and a FIFO shard is not a "missing" one: each is refused as a FIFO."""
    import os

    folder = tmp_path / "ckpt"
    if which == "model.safetensors":
        folder.mkdir()
        os.mkfifo(folder / "model.safetensors")
        target = folder
    elif which == "model.safetensors.index.json":
        small_checkpoint(folder)
        os.mkfifo(folder / "model.safetensors.index.json")
        target = folder
    elif which == "shard":
        small_checkpoint(folder)
        os.mkfifo(folder / "model-00002.safetensors")
        index = {
            "weight_map": {"layers.0.w": "model-00001.safetensors", "layers.1.w": "model-00002.safetensors"}
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        target = folder
    else:
        os.mkfifo(tmp_path / "fifo.safetensors")
        target = tmp_path / "fifo.safetensors"
    out = plan_in_a_child(target)
    assert out.startswith("CheckpointError") and "FIFO, not a regular file" in out, out


def test_an_index_that_is_a_device_or_too_big_is_refused_before_reading(tmp_path):
    """The index is read only as a regular file under a size limit: a symlink to /dev/zero would otherwise
    be read until the memory cap."""
    folder = tmp_path / "ckpt"
    small_checkpoint(folder)
    (folder / "model.safetensors.index.json").symlink_to("/dev/zero")
    out = plan_in_a_child(folder)
    assert out.startswith("CheckpointError") and "a device, not a regular file" in out, out
    (folder / "model.safetensors.index.json").unlink()
    with open(folder / "model.safetensors.index.json", "wb") as handle:
        handle.truncate(300_000_000)  # sparse: nothing is written, the size is what counts
    with pytest.raises(
        devicemap.CheckpointError, match=r"index is 300000000 bytes, above the \d+-byte limit"
    ):
        devicemap.plan_checkpoint(folder, max_memory=CPU)


@pytest.mark.parametrize(
    "config, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nests JSON deeper than Python can parse"),
        ('{"num_hidden_layers": ' + "9" * 5000 + "}", "holds a value Python cannot read"),
        ("[1, 2]", "holds a JSON list, not an object"),
    ],
    ids=["nested-100k", "5000-digit-int", "list"],
)
def test_a_hostile_config_json_is_a_checkpoint_error(tmp_path, config, message):
    """config.json nested 100k deep (Python's RecursionError) or holding a 5000-digit integer (a bare
    ValueError) is a CheckpointError saying what is wrong with it."""
    folder = tmp_path / "ckpt"
    small_checkpoint(folder)
    (folder / "config.json").write_text(config)
    with pytest.raises(devicemap.CheckpointError, match=message):
        devicemap.plan_checkpoint(folder, max_memory=CPU)


@pytest.mark.parametrize("depth", [80_000, 1_000_000])
def test_names_nested_absurdly_deep_are_refused_in_linear_memory(tmp_path, depth):
    """One tensor name 80k components deep fits in a 160 KB header; keeping the full dotted name of every
    prefix would take 6.1 GB and 29 s, and a 2 MB header would abort the process on a Rust allocation
    failure. Such names are refused in memory linear in the header."""
    import resource

    name = ".".join(["a"] * depth) + ".w"
    path = tmp_path / "deep.safetensors"
    write_raw(path, json.dumps({name: tensor(0, 4, shape=(1,))}).encode(), 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(devicemap.CheckpointError, match="names nest too deep"):
        devicemap.plan_checkpoint(path, max_memory=CPU)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024, f"peak memory grew by {grown_kib} KiB"
