"""Every wrong argument of the public API raises a devicemap.PlacementError subclass naming the argument,
never an OverflowError, TypeError, AttributeError or bare ValueError from deep inside."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap import compat
from devicemap.inputs.memory import accelerator_count
from tiny_models import tiny_llama_config

HUGE = 10**30  # bytes: beyond the 2 EiB the core counts in 64-bit bits
MEMORY = {0: "1GiB", "cpu": "1GiB"}


@pytest.fixture(scope="module")
def model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))


PLAN_CASES = [
    # (keyword arguments of plan(), expected error, fragments the message must hold)
    (
        dict(max_memory={0: HUGE}),
        devicemap.InvalidSizeError,
        ["max_memory[0]", str(HUGE), "2305843009213693951"],
    ),
    (dict(max_memory={"cpu": 1e30}), devicemap.InvalidSizeError, ["max_memory['cpu']", "2 EiB"]),
    (dict(max_memory={0: "3000000TiB"}), devicemap.InvalidSizeError, ["3000000TiB", "2 EiB"]),
    (dict(max_memory={}), devicemap.UnknownDeviceError, ["max_memory names no device", "'cpu': '64GiB'"]),
    (dict(max_memory=MEMORY, gpu0_reserve=HUGE), devicemap.InvalidSizeError, ["gpu0_reserve", "2 EiB"]),
    (
        dict(max_memory=MEMORY, dtype="float77"),
        devicemap.InvalidOptionError,
        ["dtype", "'float77'", "bfloat16"],
    ),
    (dict(max_memory=MEMORY, dtype=5), devicemap.InvalidOptionError, ["dtype", "5"]),
    (
        dict(max_memory=MEMORY, dtype="uint4"),
        devicemap.InvalidOptionError,
        ["'uint4'", "quantization_config"],
    ),
    (
        dict(max_memory=MEMORY, special_dtypes={"0.weight": "x"}),
        devicemap.InvalidOptionError,
        ["special_dtypes['0.weight']", "'x'"],
    ),
    (
        dict(max_memory=MEMORY, special_dtypes=["0.weight"]),
        devicemap.InvalidOptionError,
        ["special_dtypes", "dict"],
    ),
    (
        dict(max_memory=MEMORY, offload_buffers="yes"),
        devicemap.InvalidOptionError,
        ["offload_buffers", "'yes'", "True or False"],
    ),
    (
        dict(max_memory=MEMORY, offload_buffers=None),
        devicemap.InvalidOptionError,
        ["offload_buffers", "None"],
    ),
    (dict(max_memory=MEMORY, untie="no"), devicemap.InvalidOptionError, ["untie", "'no'"]),
    (
        dict(max_memory=MEMORY, strategy=3),
        devicemap.InvalidOptionError,
        ["strategy", "3", '"balanced_low_0"'],
    ),
    (dict(max_memory=MEMORY, balance=None), devicemap.InvalidOptionError, ["balance", "None", '"compute"']),
    (
        dict(max_memory=MEMORY, pins=["lm_head"]),
        devicemap.InvalidOptionError,
        ["pins", "['lm_head']", "dict"],
    ),
    (dict(max_memory=MEMORY, pins={"0": 1.5}), devicemap.UnknownDeviceError, ["1.5", "'cpu'"]),
    (
        dict(max_memory=MEMORY, no_split_module_classes=5),
        devicemap.InvalidOptionError,
        ["no_split_module_classes", "5"],
    ),
    (
        dict(max_memory=MEMORY, no_split_module_classes=[torch.nn.Linear]),
        devicemap.InvalidOptionError,
        ["no_split_module_classes", "'Linear'"],
    ),
    (dict(max_memory=MEMORY, workload="x"), devicemap.InvalidOptionError, ["workload", "'x'", "Workload("]),
    (dict(max_memory=[1, 2]), devicemap.UnknownDeviceError, ["max_memory", "list"]),
]


@pytest.mark.parametrize(("kwargs", "error", "fragments"), PLAN_CASES, ids=lambda v: repr(v)[:50])
def test_plan_names_the_wrong_argument(model, kwargs, error, fragments):
    with pytest.raises(error) as info:
        devicemap.plan(model, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_plan_refuses_what_is_not_a_model():
    with pytest.raises(devicemap.InvalidOptionError, match="torch.nn.Module.*str"):
        devicemap.plan("gpt2", max_memory=MEMORY)
    with pytest.raises(devicemap.InvalidOptionError, match="torch.nn.Module"):
        devicemap.ModuleTree.from_module("gpt2")


def test_a_model_beyond_the_core_limit_is_a_size_error():
    with pytest.raises(devicemap.InvalidSizeError, match="2 EiB"):
        devicemap.plan(torch.nn.Linear(10**9, 10**9, device="meta"), max_memory={0: "1GiB", "disk": 0})


def test_parse_size_refuses_sizes_the_core_cannot_count():
    with pytest.raises(devicemap.InvalidSizeError, match="2305843009213693951"):
        devicemap.parse_size(HUGE)
    assert devicemap.parse_size((2**64 - 1) // 8) == (2**64 - 1) // 8


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(batch_size=0), ["batch_size", "0"]),
        (dict(batch_size=-3), ["batch_size", "-3"]),
        (dict(seq_len="long"), ["seq_len", "'long'"]),
        (dict(batch_size=True), ["batch_size", "True"]),
        (dict(logits_tokens=True), ["logits_tokens", "True"]),
        (dict(kv_dtype="float77"), ["kv_dtype", "'float77'"]),
    ],
)
def test_workload_fields(kwargs, fragments):
    with pytest.raises(devicemap.InvalidOptionError) as info:
        devicemap.Workload(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_workload_needs_a_config(model):
    with pytest.raises(devicemap.InvalidOptionError, match="config"):
        devicemap.plan(model, max_memory=MEMORY, workload=devicemap.Workload())


def test_workload_beyond_the_core_limit(tiny_llama):
    huge = devicemap.Workload(batch_size=10**12, seq_len=10**12)
    with pytest.raises(devicemap.InvalidSizeError, match="batch_size"):
        devicemap.plan(tiny_llama, max_memory=MEMORY, workload=huge)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (dict(hosts=None), devicemap.InvalidOptionError, ["hosts", "None"]),
        (dict(hosts="80GiB"), devicemap.InvalidOptionError, ["hosts", "'80GiB'"]),
        (dict(hosts=["80GiB"]), devicemap.InvalidOptionError, ["hosts[0]", "'80GiB'"]),
        (dict(hosts=[]), devicemap.InvalidOptionError, ["no GPU"]),
        (dict(hosts=[["1GiB", "lots"]]), devicemap.InvalidSizeError, ["hosts[0][1]", "lots"]),
        (dict(hosts=[["1GiB"]], tied="share"), devicemap.InvalidOptionError, ["tied", '"share"', '"copy"']),
        (dict(hosts=[["1GiB"]], balance="flops"), devicemap.InvalidOptionError, ["balance", '"flops"']),
        (dict(hosts=[["1GiB"]], dtype="float77"), devicemap.InvalidOptionError, ["dtype", "'float77'"]),
        (
            dict(hosts=[["1GiB"]], no_split_module_classes=5),
            devicemap.InvalidOptionError,
            ["no_split_module_classes"],
        ),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_plan_stages_names_the_wrong_argument(model, kwargs, error, fragments):
    with pytest.raises(error) as info:
        devicemap.plan_stages(model, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        (dict(max_memory=[1000]), devicemap.UnknownDeviceError, "max_memory"),
        (dict(max_memory={0: [1]}), devicemap.InvalidSizeError, "max_memory[0]"),
        (dict(max_memory={0: float("nan")}), devicemap.InvalidSizeError, "nan"),
        (
            dict(max_memory={0: 1000}, no_split_module_classes=5),
            devicemap.InvalidOptionError,
            "no_split_module_classes",
        ),
        (dict(max_memory={0: 1000}, dtype="float77"), devicemap.InvalidOptionError, "'float77'"),
        (
            dict(max_memory={0: 1000}, special_dtypes="float16"),
            devicemap.InvalidOptionError,
            "special_dtypes",
        ),
    ],
    ids=lambda v: repr(v)[:40],
)
@pytest.mark.parametrize("function", [compat.infer_auto_device_map, compat.get_balanced_memory])
def test_compat_bad_arguments_are_placement_errors(model, function, kwargs, error, fragment):
    with pytest.raises(error) as info:
        function(model, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("size", [HUGE, float("inf"), 1e30])
def test_compat_takes_unbounded_sizes_like_accelerate(model, size):
    from accelerate.utils import infer_auto_device_map as accelerate_infer

    memory = {0: size, "cpu": size}
    assert compat.infer_auto_device_map(model, max_memory=dict(memory)) == accelerate_infer(
        model, max_memory=dict(memory)
    )
    balanced = compat.get_balanced_memory(model, max_memory={0: size, 1: size, "cpu": size})
    assert balanced[1] == size


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(path=5), ["checkpoint path", "5"]),
        (dict(path=b"ckpt"), ["checkpoint path", "b'ckpt'"]),
        (dict(block_pattern=5), ["block_pattern", "5", "'model.layers.*'"]),
        (dict(block_pattern=["model.layers.*", 3]), ["block_pattern", "3"]),
        (dict(config=[1, 2]), ["config", "[1, 2]"]),
        (dict(workload="batch 4"), ["workload", "'batch 4'", "Workload"]),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_plan_checkpoint_names_the_wrong_argument(tmp_path, kwargs, fragments):
    from safetensors.torch import save_file

    save_file({"layers.0.w": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    path = kwargs.pop("path", tmp_path)
    with pytest.raises(devicemap.InvalidOptionError) as info:
        devicemap.plan_checkpoint(path, max_memory=MEMORY, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_a_plan_for_gpus_this_machine_lacks_says_rehearse(model):
    visible = accelerator_count()  # as accelerate counts them
    missing = {"": visible}  # one GPU index past the last this machine has
    with pytest.raises(devicemap.UnknownDeviceError, match="rehearse=True"):
        devicemap.dispatch(model, missing)
    out = devicemap.dispatch(model, missing, rehearse=True)(torch.ones(1, 8))
    assert out.shape == (1, 8)


def test_from_pretrained_for_gpus_this_machine_lacks_says_rehearse(tmp_path):
    """The README's call on a machine without those GPUs: UnknownDeviceError before any weight is read (not
    torch's "Found no NVIDIA driver" from inside transformers), the same check dispatch and load_checkpoint make."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    visible = accelerator_count()
    budget = {visible: "24GiB", visible + 1: "24GiB", "cpu": "64GiB"}  # GPUs past the last this machine has
    with pytest.raises(devicemap.UnknownDeviceError, match=f"on GPU {visible}.*rehearse=True"):
        devicemap.from_pretrained(tmp_path, max_memory=budget)
    rehearsed = devicemap.from_pretrained(tmp_path, max_memory=budget, rehearse=True)
    assert rehearsed(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    with pytest.raises(devicemap.InvalidOptionError, match="device_map='auto'.*makes the device map itself"):
        devicemap.from_pretrained(tmp_path, max_memory={"cpu": "1GiB"}, device_map="auto")


def test_dispatch_to_a_main_device_this_machine_lacks(model):
    visible = accelerator_count()
    for missing in (visible, f"cuda:{visible}"):
        with pytest.raises(devicemap.UnknownDeviceError, match="main_device.*rehearse=True"):
            devicemap.dispatch(model, {"": "cpu"}, main_device=missing)
    # In a rehearsal the CPU stands in for that GPU as it does for the map's.
    out = devicemap.dispatch(model, {"": visible}, main_device=visible, rehearse=True)(torch.ones(1, 8))
    assert out.shape == (1, 8)


@pytest.mark.parametrize("device", ["cuda:{visible}", "tpu:0"])
def test_pipeline_stage_on_a_device_this_machine_lacks(model, device):
    stages = devicemap.plan_stages(model, hosts=[["1MiB", "1MiB"]])
    with pytest.raises(devicemap.UnknownDeviceError, match="device="):
        devicemap.pipeline(
            model, stages, (torch.ones(1, 8),), 0, device=device.format(visible=accelerator_count())
        )


@pytest.mark.parametrize(
    ("device_map", "error", "fragment"),
    [
        ({"": "cpu", "0": "disk"}, devicemap.InvalidOptionError, "overlap"),
        ({"0": "cpu"}, devicemap.InvalidOptionError, "1.weight"),  # 1.* has no device
        ({"": "tpu"}, devicemap.UnknownDeviceError, '"tpu"'),
        ({3: "cpu"}, devicemap.InvalidOptionError, "module name string"),
        ([("", "cpu")], devicemap.InvalidOptionError, "devicemap.Plan"),
    ],
)
def test_dispatch_checks_the_device_map(model, device_map, error, fragment):
    with pytest.raises(error, match=fragment):
        devicemap.dispatch(model, device_map)


def test_a_whole_model_on_disk_dispatches(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
    expected = model(torch.ones(1, 8))
    # accelerate finds no weights for the root "" on disk; devicemap names the top-level modules instead
    out = devicemap.dispatch(model, {"": "disk"}, offload_dir=tmp_path)(torch.ones(1, 8))
    torch.testing.assert_close(out, expected)


def test_only_disk_in_max_memory_is_refused(model):
    with pytest.raises(devicemap.UnknownDeviceError, match="only 'disk'.*add 'cpu'"):
        devicemap.plan(model, max_memory={"disk": 0})


def test_load_dtype_must_be_floating(tmp_path, model):
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(devicemap.InvalidOptionError, match="'int8'.*floating"):
        devicemap.load_checkpoint(model, tmp_path, {"": "cpu"}, dtype="int8")


def test_workload_with_a_config_missing_fields_names_them(tmp_path):
    from safetensors.torch import save_file

    save_file({f"model.layers.{i}.w": torch.zeros(2, 2) for i in range(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2, "hidden_size": "big"}')
    with pytest.raises(devicemap.InvalidOptionError, match="num_attention_heads"):
        devicemap.plan_checkpoint(
            tmp_path, max_memory=MEMORY, workload=devicemap.Workload(batch_size=1, seq_len=4)
        )


def test_compat_low_zero_with_gpus_numbered_from_one_is_a_compat_error(model):
    with pytest.raises(devicemap.AccelerateCompatError, match="KeyError"):
        compat.get_balanced_memory(model, max_memory={1: 1, 2: 1}, low_zero=True)


def test_compute_balance_on_a_cyclic_model_finishes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 8)))
    model[1]._modules["back"] = model
    plan = devicemap.plan(model, max_memory={0: 400, 1: 400}, balance="compute")
    assert set(plan.device_map.values()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(dtype="bfloat16"), "dtype"),
        (dict(balance="compute"), "compute"),
        (dict(tied="copy"), "untie=True"),
    ],
)
def test_plan_stages_on_a_tree_names_what_needs_the_model(kwargs, fragment):
    model = torch.nn.Sequential(torch.nn.Embedding(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied: the tree keeps them as one storage
    tree = devicemap.ModuleTree.from_module(model)
    options = {"tied": "error", **kwargs}
    with pytest.raises(devicemap.InvalidOptionError, match=fragment):
        devicemap.plan_stages(tree, hosts=[["1MiB", "1MiB"]], **options)
    # The model itself takes all of them.
    devicemap.plan_stages(model, hosts=[["1MiB", "1MiB"]], **{"tied": "copy", **kwargs})
