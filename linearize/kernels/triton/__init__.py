"""Triton kernels for the converted layers (picked by ``linearize.kernels`` for CUDA tensors)."""

from .gla import gated_linear_attention
from .swa import sliding_window_attention

__all__ = ["gated_linear_attention", "sliding_window_attention"]
