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


# --- finetune fixtures (tests of linearize.train) ---------------------------------------------------

WORDS = "the a red green blue cat dog bird runs sits sings on under mat tree".split()


def tiny_teacher(seed: int = 0, max_positions: int = 64):
    """A 2-layer Llama over the byte tokenizer's 257 ids, tied embeddings (as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=257, max_position_embeddings=max_positions, bos_token_id=256, eos_token_id=256, pad_token_id=256,
        tie_word_embeddings=True,  # as SmolLM2: checkpoints must handle the shared tensor
    )
    return LlamaForCausalLM(config).eval()


def write_corpus(path, lines: int = 120, seed: int = 0):
    """Six-word sentences from WORDS, one per line."""
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) + "." for _ in range(lines)) + "\n")
    return path


def tiny_recipe(tmp_path, out="run", *extra):
    """Two short stages (4 steps each) of a Lizard conversion of :func:`tiny_teacher` on a corpus."""
    from linearize.recipe import load_recipe

    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    return load_recipe(None, [
        "model=tiny", "conversion.mixer=lizard", "conversion.window=4",
        f"data.source={corpus}", "data.seq_len=16", "data.validation_samples=8",
        "stages=[attention_transfer, lora]",
        "attention_transfer.lr=1e-2", "attention_transfer.max_steps=4", "attention_transfer.schedule=constant",
        "lora.lr=1e-2", "lora.max_steps=4", "lora.kl_weight=0.5", "lora.schedule=constant",
        "train.batch_size=4", "train.eval_batches=2", "train.log_every=2",
        f"output_dir={tmp_path / out}", *extra,
    ])


def save_tiny_teacher(folder, tokenizer=None):
    """A tiny Llama teacher folder with a tokenizer (default: a word-level one over its vocabulary)."""
    from tiny_tokenizer import word_tokenizer

    tiny_model("llama").save_pretrained(folder)
    (tokenizer or word_tokenizer(VOCAB)).save_pretrained(folder)
    return folder


def tiny_finetune_inputs(tmp_path):
    """(teacher folder, corpus file) for recipe files: :func:`tiny_teacher` with a byte tokenizer."""
    from tiny_tokenizer import byte_tokenizer

    teacher = tmp_path / "teacher"
    tiny_teacher().save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    return teacher, write_corpus(tmp_path / "corpus.txt")
