"""Tiny random teachers of every supported architecture (seconds to build and run on CPU)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**COMMON)
    if arch == "mistral":
        return MistralConfig(**COMMON, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**COMMON)  # q/k/v carry a bias
    if arch == "qwen3":
        return Qwen3Config(**{**COMMON, "head_dim": 24})  # explicit head_dim != hidden / heads, QK-norm
    if arch == "gemma3_text":
        return Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3, "head_dim": 32}, query_pre_attn_scalar=24,
            sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")
    if arch == "qwen2":  # a non-zero bias so the test sees it
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    return model.eval()
