"""GGUF sizes: each tensor stored as llama.cpp's type selection for the file type picks it (rules read in
llama.cpp's src/llama-quant.cpp), at ggml's bytes per block; and plans of those sizes for llama.cpp."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap.errors import InvalidOptionError
from devicemap.sizing.gguf import BLOCKS, GGUF, gguf_bits, gguf_types, tensor_bytes

transformers = pytest.importorskip("transformers")


def llama(layers: int = 32, hidden: int = 256, tied: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def mixtral(experts: int = 8) -> torch.nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    with torch.device("meta"):
        return transformers.MixtralForCausalLM(config)


def of_layer(types: dict[str, str], layer: int, part: str) -> str:
    return next(t for n, t in types.items() if f".layers.{layer}." in n and part in n)


def test_every_tensor_takes_its_types_blocks() -> None:
    model = mixtral()
    types = gguf_types(model, "Q4_K_M")
    bits = gguf_bits(model, "Q4_K_M")
    for name, param in model.named_parameters():
        per_block, size = BLOCKS[types[name]]
        assert bits[name] == -(-param.numel() // per_block) * size * 8
    assert tensor_bytes("Q4_K", 256) == 144 and tensor_bytes("Q8_0", 33) == 68  # a partial block is whole


def test_q4_k_m_gives_attn_v_and_ffn_down_more_bits_in_llama_cpps_layers() -> None:
    types = gguf_types(llama(layers=32), "Q4_K_M")
    # use_more_bits for 32 layers: the first and last eighth, and every third layer from the 7th
    more = {0, 1, 2, 3, 28, 29, 30, 31, 6, 9, 12, 15, 18, 21, 24, 27}
    for layer in range(32):
        expected = "Q6_K" if layer in more else "Q4_K"
        assert of_layer(types, layer, "v_proj") == expected == of_layer(types, layer, "down_proj")
        assert of_layer(types, layer, "q_proj") == "Q4_K" == of_layer(types, layer, "up_proj")
    assert types["lm_head.weight"] == "Q6_K" and types["model.embed_tokens.weight"] == "Q4_K"
    assert types["model.norm.weight"] == "F32" and of_layer(types, 0, "input_layernorm") == "F32"


def test_uniform_files_and_the_output_head() -> None:
    types = gguf_types(llama(layers=4), "Q8_0")
    assert {t for n, t in types.items() if "norm" not in n} == {"Q8_0"}
    tied = gguf_types(llama(layers=4, tied=True), "Q4_K_M")
    assert tied["model.embed_tokens.weight"] == "Q6_K"  # it is the output head too


def test_rows_a_k_quant_cannot_hold_fall_back_as_llama_cpp_does() -> None:
    types = gguf_types(llama(layers=8, hidden=320), "Q4_K_M")  # rows of 320 values: not a multiple of 256
    assert of_layer(types, 0, "q_proj") == "Q5_0" and of_layer(types, 0, "v_proj") == "Q8_0"
    assert types["lm_head.weight"] == "Q8_0"


def test_eight_expert_models_and_mxfp4() -> None:
    model = mixtral(experts=8)
    types = gguf_types(model, "Q4_K_M")
    assert of_layer(types, 3, "k_proj") == "Q8_0" == of_layer(types, 3, "v_proj")
    assert of_layer(types, 3, "o_proj") == "Q5_K"
    assert of_layer(types, 3, "mlp.gate.") == "F16"  # the router stays unquantized
    assert (
        of_layer(types, 3, "experts.down_proj") == "Q6_K"  # 8 layers: 0, 3 and 7 get more bits
        and of_layer(types, 2, "experts.down_proj") == "Q4_K"
    )
    mxfp4 = gguf_types(model, "MXFP4_MOE")
    assert of_layer(mxfp4, 3, "experts.gate_up_proj") == "MXFP4" == of_layer(mxfp4, 3, "experts.down_proj")
    assert of_layer(mxfp4, 3, "q_proj") == "Q8_0" and mxfp4["lm_head.weight"] == "Q8_0"
    assert of_layer(gguf_types(mixtral(experts=4), "Q4_K_M"), 3, "k_proj") == "Q4_K"


def test_a_plan_of_gguf_sizes_keeps_no_conversion_headroom_and_no_disk() -> None:
    model = mixtral()
    config = GGUF("Q4_K_M")
    tree = devicemap.ModuleTree.from_module(model, quantization_config=config)
    assert tree.total_bytes == sum(gguf_bits(model, "Q4_K_M").values()) // 8 + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    memory = {0: tree.total_bytes // 2, "cpu": tree.total_bytes}
    plan = devicemap.plan(model, memory, quantization_config=config)
    # llama.cpp converts nothing while loading: the reserve is the plain plan's (staging), no headroom
    assert plan.usage[0].reserve == devicemap.plan(tree, memory).usage[0].reserve
    with pytest.raises(devicemap.DoesNotFitError):
        devicemap.plan(model, {0: tree.total_bytes // 4, "disk": 1 << 40}, quantization_config=config)


def test_unknown_file_types_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(InvalidOptionError, match="Q4_K_M"):
        GGUF("Q3_K_XL")
