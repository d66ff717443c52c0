"""plan(..., quantization_config=...) through the public API: every device's planned bytes equal what the
quantized model really holds there, and a quantizer's offload rule is kept (never a map it then refuses).
The quantized models are real: bitsandbytes and torchao quantize on this CPU."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import transformers
from transformers.quantizers.auto import AutoHfQuantizer

import devicemap
from devicemap.formatting import format_bytes
from devicemap.inputs.module_names import device_for
from optional_libraries import import_bitsandbytes_for_transformers, import_torchao_quantization
from tiny_models import BF16, saved_bf16_llama

ROOMY = {0: "3MiB", 1: "3MiB", "cpu": "1GiB"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return saved_bf16_llama(tmp_path_factory, layers=4)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, through tensor subclasses (torchao) to their inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.untyped_storage().nbytes() if tensor.dim() else tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)


def real_bytes_per_device(model: torch.nn.Module, device_map: dict) -> dict:
    """What the quantized model's state_dict holds on each device of ``device_map``, tied copies once."""
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    out: dict = defaultdict(int)
    for name, tensor in model.state_dict().items():
        if name not in aliases:
            out[device_for(name, device_map)] += tensor_bytes(tensor)
    return dict(out)


def quantized(path, config) -> torch.nn.Module:
    if isinstance(config, transformers.BitsAndBytesConfig):
        import_bitsandbytes_for_transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu"
    )


def planned_bytes(plan: devicemap.Plan) -> dict:
    return {u.device: u.weights for u in plan.usage if u.weights}


def assert_within_one_percent(planned: dict, real: dict) -> None:
    assert planned.keys() == real.keys()
    for device, want in real.items():
        assert abs(planned[device] - want) <= want / 100, (device, planned[device], want)


def accepted_by_transformers(config, device_map) -> bool:
    try:
        AutoHfQuantizer.from_config(config).validate_environment(device_map=device_map)
    except ValueError:
        return False
    return True


QUANTIZERS = {
    "bnb-nf4": lambda: transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "bnb-nf4-double": lambda: transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ),
    "bnb-int8": lambda: transformers.BitsAndBytesConfig(load_in_8bit=True),
    "torchao-int8": lambda: transformers.TorchAoConfig(import_torchao_quantization().Int8WeightOnlyConfig()),
}


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_planned_bytes_per_device_equal_the_quantized_model(llama, kind):
    path, meta = llama
    config = QUANTIZERS[kind]()
    plan = devicemap.plan(meta, ROOMY, dtype=BF16, quantization_config=config)
    assert len({d for d in plan.device_map.values()}) == 2  # split over both GPUs: the test sees two sums
    real = real_bytes_per_device(quantized(path, config), plan.device_map)
    assert_within_one_percent(planned_bytes(plan), real)
    # the flat bf16 sizes would have been far off: the plan really counted the quantizer
    unquantized = devicemap.plan(meta, ROOMY, dtype=BF16)
    assert sum(planned_bytes(plan).values()) < 0.8 * sum(planned_bytes(unquantized).values())


def test_bitsandbytes_gets_a_gpu_only_plan_although_the_cpu_is_offered(llama):
    _, meta = llama
    config = QUANTIZERS["bnb-nf4"]()
    # sized at bf16 these GPUs are too small and layers would go to the CPU, which bitsandbytes refuses
    memory = {0: "1.85MiB", 1: "1.85MiB", "cpu": "1GiB"}
    assert "cpu" in devicemap.plan(meta, memory, dtype=BF16).device_map.values()
    plan = devicemap.plan(meta, memory, dtype=BF16, quantization_config=config)
    assert set(plan.device_map.values()) <= {0, 1}
    assert accepted_by_transformers(config, plan.device_map)


def test_every_gpu_keeps_room_to_quantize_the_largest_weight_while_loading(llama):
    # transformers reads each weight at the load dtype onto its GPU and quantizes it there: the plan keeps
    # the largest quantized weight's bf16 bytes free on every GPU, shown as reserve, instead of 10%.
    _, meta = llama
    config = QUANTIZERS["bnb-nf4"]()
    plan = devicemap.plan(meta, ROOMY, dtype=BF16, quantization_config=config)
    largest = max(
        p.numel() * 2 for n, p in meta.named_parameters() if n.endswith("proj.weight")
    )  # the MLP projections; lm_head stays unquantized under bitsandbytes
    for usage in plan.usage:
        if isinstance(usage.device, int):
            assert usage.reserve == largest and usage.capacity == 3 * 2**20
            assert usage.used <= usage.capacity


def test_bitsandbytes_that_cannot_fit_the_gpus_is_refused_saying_why(llama):
    _, meta = llama
    with pytest.raises(devicemap.DoesNotFitError) as err:
        devicemap.plan(
            meta,
            {0: "600KiB", 1: "600KiB", "cpu": "1GiB"},
            dtype=BF16,
            quantization_config=QUANTIZERS["bnb-nf4"](),
        )
    message = str(err.value)
    assert "bitsandbytes refuses CPU/disk" in message and "llm_int8_enable_fp32_cpu_offload" in message
    assert "'cpu'" in message and 'add "disk"' not in message  # no advice the quantizer would refuse
    # how much the GPUs lack, in the message and as a number
    assert err.value.shortfall == "no_disk" and err.value.missing_bytes > 0
    assert format_bytes(err.value.missing_bytes) in message


def test_torchao_may_offload_to_the_cpu_and_transformers_accepts_the_map(llama):
    _, meta = llama
    config = QUANTIZERS["torchao-int8"]()
    plan = devicemap.plan(meta, {0: "2MiB", "cpu": "1GiB"}, dtype=BF16, quantization_config=config)
    assert {0, "cpu"} <= set(plan.device_map.values())
    assert accepted_by_transformers(config, plan.device_map)


def test_keep_in_fp32_modules_are_sized_as_they_load(tmp_path):
    # T5 keeps `wo` in float32 when loaded in float16; the plan must count it at 4 bytes, not 2.
    config = transformers.T5Config(d_model=64, d_ff=256, num_layers=2, num_heads=2, d_kv=32, vocab_size=128)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = transformers.T5ForConditionalGeneration(config)
    plan = devicemap.plan(meta, {"cpu": "1GiB"}, dtype=torch.float16)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert plan.block_bytes("encoder.block.0") == sum(
        t.numel() * t.element_size() for t in loaded.encoder.block[0].state_dict().values()
    )


def fp32_offload_config():
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_enable_fp32_cpu_offload=True
    )


def test_fp32_cpu_offload_counts_offloaded_layers_unquantized(llama):
    # With llm_int8_enable_fp32_cpu_offload bitsandbytes quantizes only what is on a GPU: a layer on the
    # CPU loads as a plain bf16 layer, 3.5x its 4-bit size.
    _, meta = llama
    config = fp32_offload_config()
    plain = devicemap.plan(meta, {"cpu": "1GiB"}, dtype=BF16)  # every block at its bf16 size
    nf4 = devicemap.plan(meta, {"cpu": "1GiB"}, dtype=BF16, quantization_config=QUANTIZERS["bnb-nf4"]())
    # buffers offloaded with their blocks, so each device's sum is exactly its blocks' bytes
    plan = devicemap.plan(
        meta, {0: "1.5MiB", "cpu": "1GiB"}, dtype=BF16, quantization_config=config, offload_buffers=True
    )
    on = defaultdict(list)
    for block, device in plan.assignments.items():
        on[device].append(block)
    assert on[0] and on["cpu"]
    assert accepted_by_transformers(config, plan.device_map)
    used = planned_bytes(plan)
    assert used[0] == sum(nf4.block_bytes(b) for b in on[0])
    assert used["cpu"] == sum(plain.block_bytes(b) for b in on["cpu"])
    assert all(o.bytes == plain.block_bytes(o.name) for o in plan.offloaded)


def test_fp32_cpu_offload_moves_to_disk_what_the_cpu_cannot_hold_unquantized(llama):
    _, meta = llama
    layer_bf16 = devicemap.plan(meta, {"cpu": "1GiB"}, dtype=BF16).block_bytes("model.layers.2")
    # Room on the CPU for 4 layers at 4-bit but only 1 at bf16; a plan sized at 4-bit would overfill it.
    cpu = int(1.5 * layer_bf16)
    memory = {0: "1.5MiB", "cpu": cpu, "disk": 0}
    plan = devicemap.plan(meta, memory, dtype=BF16, quantization_config=fp32_offload_config())
    cpu_usage = next(u for u in plan.usage if u.device == "cpu")
    assert cpu_usage.used <= cpu and cpu_usage.capacity == cpu
    assert "disk" in plan.device_map.values()
    with pytest.raises(devicemap.DoesNotFitError, match="unquantized"):
        devicemap.plan(meta, {0: "1.5MiB", "cpu": cpu}, dtype=BF16, quantization_config=fp32_offload_config())


def test_from_pretrained_with_a_quantizer_plans_the_bytes_it_loads(llama):
    # The whole model on the CPU: bitsandbytes quantizes it there; the plan counts the 4-bit bytes.
    import_bitsandbytes_for_transformers()
    path, _ = llama
    config = QUANTIZERS["bnb-nf4"]()
    model = devicemap.from_pretrained(
        path, max_memory={"cpu": "1GiB"}, dtype=BF16, quantization_config=config
    )
    assert any("4bit" in type(m).__name__ for m in model.modules())
    plan = model.devicemap_plan
    assert plan.device_map == {"": "cpu"}
    assert_within_one_percent(planned_bytes(plan), real_bytes_per_device(model, plan.device_map))


def test_fp32_offload_to_cpu_and_disk_loads_the_offloaded_layers_unquantized_as_planned(llama, tmp_path):
    # CPU and disk together: transformers leaves every offloaded layer unquantized (bf16). The CPU's
    # planned bytes are those of the plain layers it really holds.
    path, meta = llama
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    layer = devicemap.plan(meta, {"cpu": "1GiB"}, dtype=BF16).block_bytes("model.layers.0")
    model = devicemap.from_pretrained(
        path,
        max_memory={"cpu": int(2.5 * layer), "disk": 0},
        dtype=BF16,
        quantization_config=config,
        offload_dir=tmp_path,
        offload_buffers=True,
    )
    plan = model.devicemap_plan
    on_cpu = [b for b, d in plan.assignments.items() if d == "cpu"]
    assert on_cpu and "disk" in plan.device_map.values()
    assert not any("8bit" in type(m).__name__ for m in model.modules())  # nothing was quantized
    real_cpu = sum(
        tensor_bytes(t)
        for b in on_cpu
        for t in model.get_submodule(b).state_dict().values()
        if t.device.type == "cpu"
    )
    assert planned_bytes(plan)["cpu"] == real_cpu


@pytest.mark.parametrize("kind", ["bnb-int8", "torchao-int8", "bnb-nf4", "bnb-nf4-double"])
def test_a_pre_quantized_checkpoint_is_planned_from_headers_with_its_stored_bytes(llama, tmp_path, kind):
    # dtype=bf16 must not shrink the float32 scales the quantizer saved (they load as float32).
    path, _ = llama
    model = quantized(path, QUANTIZERS[kind]())
    model.save_pretrained(tmp_path, safe_serialization=True)
    plan = devicemap.plan_checkpoint(tmp_path, {"cpu": "1GiB"}, dtype="bfloat16")
    real = real_bytes_per_device(model, {"": "cpu"})
    assert planned_bytes(plan) == real


def test_from_pretrained_plans_a_pre_quantized_checkpoint_from_its_headers(llama, tmp_path):
    # A checkpoint saved in 8-bit: the plan's bytes are the file's (scales included), it keeps the
    # quantizer's offload rule, and the model loads with it.
    path, _ = llama
    quantized(path, QUANTIZERS["bnb-int8"]()).save_pretrained(tmp_path)
    model = devicemap.from_pretrained(tmp_path, max_memory={"cpu": "1GiB"}, dtype=BF16)
    plan = model.devicemap_plan
    assert any("8bit" in type(m).__name__ for m in model.modules())
    assert planned_bytes(plan) == real_bytes_per_device(model, plan.device_map)
    with pytest.raises(devicemap.DoesNotFitError, match="bitsandbytes refuses CPU/disk"):
        devicemap.plan_checkpoint(tmp_path, {0: "600KiB", "cpu": "1GiB"})


def test_loading_through_a_quantizer_torch_cannot_run_says_why_before_loading(llama, monkeypatch):
    """transformers 5 swaps quantized layers in with nn.Module.set_submodule, which torch 2.4 lacks:
    devicemap.from_pretrained says so before reading a weight, unless the map leaves every layer
    unquantized (bitsandbytes' fp32 offload of a model all on the CPU)."""
    from devicemap.sizing.quantization import check_quantizer_runs

    monkeypatch.delattr(torch.nn.Module, "set_submodule", raising=False)  # as torch 2.4
    path, _ = llama
    with pytest.raises(devicemap.InvalidOptionError, match=r"set_submodule, which torch \S+ lacks"):
        devicemap.from_pretrained(
            path, max_memory={"cpu": "1GiB"}, dtype=BF16, quantization_config=QUANTIZERS["bnb-nf4"]()
        )
    offload = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    check_quantizer_runs(offload, {"": "cpu"})  # nothing is quantized, nothing swapped
    with pytest.raises(devicemap.InvalidOptionError, match="set_submodule"):
        check_quantizer_runs(offload, {"model": 0, "lm_head": "cpu"})
