"""Quantized sizes against real quantized models built on this machine (CPU): bitsandbytes 4-bit (nf4,
fp4, double quantization) and 8-bit, torchao int8 / float8 / intx; and each quantizer's offload rule
against transformers' own validation."""

from __future__ import annotations

import importlib.abc
import re
import sys
import warnings
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from devicemap.inputs.dtypes import storage_bits  # noqa: E402
from devicemap.sizing.quantization import OffloadRule, QuantizedSizer, offload_rule, quantized_sizer  # noqa: E402
from optional_libraries import (  # noqa: E402
    import_bitsandbytes_for_transformers,
    import_torchao_quantization,
)
from tiny_models import BF16, saved_bf16_llama  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return saved_bf16_llama(tmp_path_factory, layers=2)


def _group(name: str) -> str:
    """The top-level block a tensor belongs to: ``model.layers.3``, ``encoder.block.0``, ``lm_head``..."""
    found = re.match(r"(.*?\.(?:layers|block|h)\.\d+)(?:\.|$)", name)
    if found:
        return found.group(1)
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("model", "encoder", "decoder") and len(parts) > 2 else parts[0]


def _inner_bytes(tensor) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.untyped_storage().nbytes() if tensor.dim() else tensor.element_size()
    names, _ = flatten()
    return sum(_inner_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)


def _aliases(model) -> set[str]:
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def real_bytes(model) -> dict[str, int]:
    """Bytes per block of the quantized model's state_dict, quantization state included, tied copies once."""
    aliases = _aliases(model)
    out: dict[str, int] = defaultdict(int)
    for name, tensor in model.state_dict().items():
        if name not in aliases:
            out[_group(name)] += _inner_bytes(tensor)
    return dict(out)


def planned_bytes(meta, sizer: QuantizedSizer, dtype, *, offloaded: bool = False) -> dict[str, int]:
    """Bytes per block as a tree export would count them: the sizer's override, else the dtype rule."""
    out: dict[str, int] = defaultdict(int)
    tensors = list(meta.named_parameters())
    for module_name, module in meta.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                tensors.append((f"{module_name}.{name}" if module_name else name, buf))
    for name, tensor in tensors:
        bits = sizer.offloaded_bits(name, tensor) if offloaded else sizer.bits(name, tensor)
        if bits is None:
            per = storage_bits(dtype) if tensor.is_floating_point() else storage_bits(tensor.dtype)
            bits = tensor.numel() * per
        out[_group(name)] += bits // 8
    return dict(out)


def assert_matches(planned: dict[str, int], real: dict[str, int], slack: int = 0) -> None:
    assert planned.keys() == real.keys()
    for group, want in real.items():
        got = planned[group]
        assert abs(got - want) <= slack, (group, got, want)
        assert abs(got - want) <= want / 100, (group, got, want)


BNB_CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=BF16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.mark.parametrize("kind", list(BNB_CONFIGS))
def test_bitsandbytes_sizes_equal_the_quantized_state_dict(llama, kind):
    import_bitsandbytes_for_transformers()
    path, meta = llama
    config = transformers.BitsAndBytesConfig(**BNB_CONFIGS[kind])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu"
    )
    sizer = quantized_sizer(meta, config, BF16)
    # 7 Linear layers per decoder layer are quantized; the head (last parameter, output embeddings) is not
    assert len(sizer.quantized_names) == 14 and "lm_head.weight" not in sizer.quantized_names
    # Every state_dict entry of a quantized weight is predicted, byte for byte but the JSON quant-state
    # record of double quantization, whose float offset's repr varies by a byte or two.
    state = model.state_dict()
    record_slack = 0
    for name in sizer.quantized_names:
        parts = sizer.parts(name)
        assert parts is not None
        for key, bits in parts.items():
            real = state[key].numel() * state[key].element_size()
            if "quant_state" in key and "double" in kind:
                assert abs(bits // 8 - real) <= 3, (key, bits // 8, real)
                record_slack += 3
            else:
                assert bits // 8 == real, (key, bits // 8, real)
        stored = {k for k in state if k.startswith(name.removesuffix("weight"))}
        module_keys = {k for k in parts} | {name.removesuffix("weight") + "bias"}
        assert stored <= module_keys, stored - module_keys
    assert_matches(planned_bytes(meta, sizer, BF16), real_bytes(model), slack=record_slack)


def test_bitsandbytes_dict_config_and_skip_modules(llama):
    import_bitsandbytes_for_transformers()
    path, meta = llama
    as_dict = {
        "quant_method": "bitsandbytes",
        "load_in_8bit": True,
        "llm_int8_skip_modules": ["down_proj", "model.layers.1"],
    }
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.BitsAndBytesConfig(**as_dict), device_map="cpu"
    )
    sizer = quantized_sizer(meta, as_dict, BF16)
    # naming modules replaces the default skips: lm_head is quantized; a name matches as a suffix
    # (every down_proj) or as a prefix up to a module boundary (all of layer 1, none of a layer 10)
    assert "lm_head.weight" in sizer.quantized_names
    assert not any("down_proj" in n or "layers.1." in n for n in sizer.quantized_names)
    assert len(sizer.quantized_names) == 7
    assert_matches(planned_bytes(meta, sizer, BF16), real_bytes(model))


def test_bitsandbytes_fp32_cpu_offload_loads_offloaded_modules_unquantized(llama, tmp_path):
    pytest.importorskip("bitsandbytes")  # every layer stays unquantized: nothing is swapped in
    path, meta = llama
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map=device_map, offload_folder=str(tmp_path)
    )
    sizer = quantized_sizer(meta, config, BF16)
    assert sizer.offload == OffloadRule(offloaded_quantized=False)
    # the offloaded layers are plain Linear at the load dtype (bfloat16 here, not float32)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == BF16
    real = real_bytes(model)
    planned = planned_bytes(meta, sizer, BF16, offloaded=True)
    for group in ("model.embed_tokens", "model.layers.0", "model.norm", "lm_head"):  # disk: on meta
        assert planned[group] == real[group], group


def test_keep_in_fp32_modules_and_ties_under_bitsandbytes_4bit(tmp_path):
    import_bitsandbytes_for_transformers()
    config = transformers.T5Config(
        vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = transformers.T5ForConditionalGeneration(config)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True)
    model = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=quant, device_map="cpu", dtype=torch.float16
    )
    sizer = quantized_sizer(meta, quant, torch.float16)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert wo in sizer.fp32_names and wo not in sizer.quantized_names
    assert model.state_dict()[wo].dtype == torch.float32
    assert_matches(planned_bytes(meta, sizer, torch.float16), real_bytes(model))
    # without a quantizer, only the float32 keeps apply (and only when loading in float16)
    plain = quantized_sizer(meta, None, torch.float16)
    assert plain.bits(wo, meta.get_parameter(wo)) == 128 * 256 * 32
    assert quantized_sizer(meta, None, BF16).bits(wo, meta.get_parameter(wo)) is None


TORCHAO_CONFIGS = {
    "int8-weight-only": lambda ao: ao.Int8WeightOnlyConfig(),
    "int8-dynamic": lambda ao: ao.Int8DynamicActivationInt8WeightConfig(),
    "float8-weight-only": lambda ao: ao.Float8WeightOnlyConfig(),
    "int4-per-group-unpacked": lambda ao: ao.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=ao.PerGroup(16)
    ),
}


@pytest.mark.parametrize("kind", list(TORCHAO_CONFIGS))
def test_torchao_sizes_equal_the_quantized_state_dict(llama, kind):
    ao = import_torchao_quantization()
    path, meta = llama
    config = transformers.TorchAoConfig(TORCHAO_CONFIGS[kind](ao))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu"
    )
    sizer = quantized_sizer(meta, config.to_dict(), BF16)
    assert len(sizer.quantized_names) == 14
    assert_matches(planned_bytes(meta, sizer, BF16), real_bytes(model))


@pytest.mark.parametrize("kind", ["int8", "intx"])
def test_torchao_with_embeddings(llama, kind):
    ao = import_torchao_quantization()
    path, meta = llama
    ao_config = ao.Int8WeightOnlyConfig() if kind == "int8" else ao.IntxWeightOnlyConfig()
    config = transformers.TorchAoConfig(ao_config, include_input_output_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu"
    )
    sizer = quantized_sizer(meta, config, BF16)
    assert "lm_head.weight" in sizer.quantized_names
    # transformers hands the input embeddings to torchao's quantize_ with its default filter, which
    # takes Linear layers only: the embeddings stay unquantized (unless an FqnToConfig names them)
    assert "model.embed_tokens.weight" not in sizer.quantized_names
    assert_matches(planned_bytes(meta, sizer, BF16), real_bytes(model))


def _refuses(quantizer, device_map) -> bool:
    try:
        quantizer.validate_environment(device_map=device_map)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(
    "config",
    [
        dict(quant_method="bitsandbytes", load_in_4bit=True),
        dict(quant_method="bitsandbytes", load_in_8bit=True),
        dict(quant_method="bitsandbytes", load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True),
        "torchao",
    ],
)
@pytest.mark.parametrize("pre_quantized", [False, True])
def test_offload_rules_agree_with_transformers(config, pre_quantized):
    from transformers.quantizers.auto import AutoHfQuantizer

    if config == "torchao":
        ao = import_torchao_quantization()
        config = transformers.TorchAoConfig(ao.Int8WeightOnlyConfig())
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=pre_quantized)
    rule = offload_rule(config, pre_quantized=pre_quantized)
    for offload in ("cpu", "disk"):
        refused = _refuses(quantizer, {"model.layers.0": 0, "model.layers.1": offload})
        if offload == "disk" and not pre_quantized and isinstance(config, transformers.TorchAoConfig):
            # transformers accepts the map, but the model then fails on its first forward: accelerate cannot
            # re-create torchao's tensors as it streams a layer back to the disk (the torchao rows of
            # tests/integrations/test_loader_differential.py). devicemap refuses the disk instead.
            assert not refused and not rule.allows(offload)
            continue
        assert refused == (not rule.allows(offload)), (offload, rule)
    assert _refuses(quantizer, {"": "cpu"}) == (not rule.cpu_only)


def test_unsupported_method_and_bad_config_raise():
    from devicemap import InvalidOptionError

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(InvalidOptionError, match="quant_method"):
        quantized_sizer(model, object())
    assert offload_rule({"quant_method": "hqq"}) == OffloadRule(
        cpu=False, disk=False, cpu_only=False, reason=offload_rule({"quant_method": "hqq"}).reason
    )


class _TorchaoMadeForANewerTorch(importlib.abc.MetaPathFinder):
    """Imports of torchao fail as a torchao made for a newer torch fails (torchao 0.13 on torch 2.4)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchao":
            raise AttributeError("module 'torch' has no attribute 'int0'")
        return None


def _unload_torchao(monkeypatch) -> None:
    """Make the next import of torchao import it again (restored after the test)."""
    for name in [n for n in sys.modules if n.split(".")[0] == "torchao"]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture()
def torchao_made_for_a_newer_torch(monkeypatch):
    _unload_torchao(monkeypatch)
    monkeypatch.setattr(sys, "meta_path", [_TorchaoMadeForANewerTorch(), *sys.meta_path])


def test_a_torchao_config_with_a_torchao_that_cannot_import_says_why(torchao_made_for_a_newer_torch):
    from devicemap import InvalidOptionError, plan
    from devicemap.cli.inputs import quantization

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    config = {"quant_method": "torchao", "quant_type": "int8_weight_only"}
    versions = rf"torchao \S+ cannot be imported with torch {re.escape(torch.__version__)}"
    lacks = rf"it uses torch.int0, which torch {re.escape(torch.__version__)} lacks"
    with pytest.raises(InvalidOptionError, match=f"{versions} \\({lacks}\\)"):
        quantized_sizer(model, config, BF16)
    with pytest.raises(InvalidOptionError, match=versions):
        plan(model, {"cpu": "1GiB"}, quantization_config=config)
    with pytest.raises(InvalidOptionError, match=f"--quant torchao-int8 needs torchao, but {versions}"):
        quantization("torchao-int8")


def test_a_torchao_config_without_torchao_says_to_install_it(monkeypatch):
    from devicemap import InvalidOptionError

    _unload_torchao(monkeypatch)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(InvalidOptionError, match=r"needs torchao \(pip install torchao\)"):
        quantized_sizer(model, {"quant_method": "torchao", "quant_type": "int8_weight_only"}, BF16)


def test_storage_bits_match_torch_storage_for_every_dtype():
    for name in dir(torch):
        dtype = getattr(torch, name)
        if not isinstance(dtype, torch.dtype) or dtype == torch.bool or dtype.is_complex:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental and deprecated dtypes say so
                tensor = torch.empty(8, dtype=dtype)
        except (RuntimeError, TypeError):
            continue
        assert storage_bits(dtype) * 8 == tensor.untyped_storage().nbytes() * 8, dtype
    # one element a byte, sub-byte and packed dtypes alike (int4 and float4_e2m1fn_x2 from torch 2.6 / 2.8)
    sub_byte = ("bits4x2", "uint4", "uint1", "int4", "float4_e2m1fn_x2")
    present = [getattr(torch, name) for name in sub_byte if hasattr(torch, name)]
    assert torch.bits4x2 in present and torch.uint4 in present  # every supported torch has these
    assert {dtype: storage_bits(dtype) for dtype in present} == dict.fromkeys(present, 8)
    assert storage_bits(torch.bool) == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_conv1d_layers_and_tied_head(tmp_path, bits):
    """GPT-2: Conv1D layers are quantized like Linear (out features from the transposed weight), and
    the head tied to the input embeddings stays unquantized and counted once."""
    import_bitsandbytes_for_transformers()
    config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=500, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).to(BF16).save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = transformers.GPT2LMHeadModel(config).to(BF16)
    quant = transformers.BitsAndBytesConfig(
        **({"load_in_8bit": True} if bits == 8 else BNB_CONFIGS["nf4-double"])
    )
    model = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, quantization_config=quant, device_map="cpu"
    )
    sizer = quantized_sizer(meta, quant, BF16)
    assert (
        len(sizer.quantized_names) == 8
        and not {"lm_head.weight", "transformer.wte.weight"} & sizer.quantized_names
    )
    assert_matches(planned_bytes(meta, sizer, BF16), real_bytes(model), slack=0 if bits == 8 else 4 * 3)
