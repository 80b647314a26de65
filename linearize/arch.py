"""The only per-architecture knowledge in linearize: one table.

Every supported decoder keeps its attention at ``<layers>[i].<attn>`` with ``q_proj``, ``k_proj``,
``v_proj`` and ``o_proj`` linear layers (optionally biased), optional per-head RMS norms
``q_norm``/``k_norm`` applied before RoPE, a ``scaling`` attribute for the softmax, and receives
precomputed rotate-half RoPE ``position_embeddings = (cos, sin)`` from its decoder layer.

To add an architecture whose attention follows that contract, add one ``ArchSpec`` line below
and a tiny config of it to ``tests/tiny_models.py``; the test suite then checks every invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its attention, and its quirks."""

    layers: str = "model.layers"
    """Dotted path from the causal LM to the list of decoder layers."""
    attention: str = "self_attn"
    """Attribute of a decoder layer holding the attention module."""
    qk_norm: bool = False
    """Per-head RMS norms ``q_norm``/``k_norm`` on queries and keys before RoPE (Qwen3, Gemma3)."""
    note: str = ""


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(note="Llama 2/3, SmolLM2"),
    "mistral": ArchSpec(note="Mistral (its own sliding window is ignored: every layer is converted)"),
    "qwen2": ArchSpec(note="q/k/v projections carry a bias"),
    "qwen3": ArchSpec(qk_norm=True, note="QK-norm, explicit head_dim"),
    "gemma3_text": ArchSpec(qk_norm=True, note="QK-norm, head_dim 256, query_pre_attn_scalar, 5 local : 1 global"),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The table entry for ``model_type``, or an error that lists what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported (supported: {supported}). To add it, give it an "
            "ArchSpec entry in linearize/arch.py if its attention has q_proj/k_proj/v_proj/o_proj and takes "
            "rotate-half position_embeddings, and a tiny config in tests/tiny_models.py."
        ) from None


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of a causal LM, following ``spec.layers``."""
    module = model
    for name in spec.layers.split("."):
        module = getattr(module, name)
    return module
