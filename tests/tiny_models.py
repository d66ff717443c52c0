"""Small transformers models shared by several test files (random weights, no download)."""

from __future__ import annotations

import torch
import transformers

BF16 = torch.bfloat16

TINY_LLAMA = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
"""The tiny Llama most tests build (random weights, no download); each test overrides what it is about."""


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    """:data:`TINY_LLAMA` with ``overrides`` (e.g. ``tie_word_embeddings=True``, ``num_hidden_layers=2``)."""
    return transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})


def quantizable_llama_config(layers: int) -> transformers.LlamaConfig:
    """A Llama whose Linear layers bitsandbytes and torchao quantize on the CPU. Intermediate 688: 688 * 256 /
    64 = 2752 absmax blocks, not a multiple of 256 (double quantization rounds up)."""
    return transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=False,
    )


def saved_bf16_llama(tmp_path_factory, layers: int):
    """That Llama saved in bfloat16, and the same model on the meta device as from_pretrained builds it."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(quantizable_llama_config(layers)).to(BF16).save_pretrained(path)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(quantizable_llama_config(layers), dtype=BF16)
    return path, meta


def big_vocab_llama_config() -> transformers.LlamaConfig:
    """A Llama whose untied embedding and head (32000 x 64, 8 MB each in float32) are larger than the small
    GPUs the execution tests give it."""
    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def small_qwen3_moe_config(**overrides) -> transformers.Qwen3MoeConfig:
    """A Qwen3-MoE small enough to plan and save in a test (4 layers of 8 experts, top 2, 256 wide), whose
    experts are the bulk of each layer as in the real ones; ``overrides`` as for :func:`tiny_llama_config`."""
    fields = dict(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        vocab_size=4096,
    )
    return transformers.Qwen3MoeConfig(**{**fields, **overrides})
