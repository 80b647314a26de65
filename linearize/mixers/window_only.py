"""The converted layer without its linear branch (``linear: none``): the window's softmax alone.

A control, not a model to ship: StreamingLLM's attention (the last ``window`` tokens plus the sink
tokens or learned sink logits) under the same conversion, training and cache as the hybrid layer,
so a study can ask what the linear branch adds. The layer keeps the hybrid's cache layout with an
all-zero linear input (the state stays zero and contributes nothing, exactly), and returns the
window branch's normalised output whatever the mix or normalizer settings say.
"""

from __future__ import annotations

import torch

from ..cache import LayerView, LinearInputs
from .hybrid import HybridAttention


class WindowOnlyAttention(HybridAttention):
    """Drop-in replacement for a decoder's attention module: softmax over the window (and sinks)
    only. Shapes: x [B, T, hidden]."""

    def _linear_inputs(self, x, q, k, v, valid) -> tuple[torch.Tensor, LinearInputs]:
        fq, linear = super()._linear_inputs(x, q, k, v, valid)
        return fq, linear._replace(k=torch.zeros_like(linear.k))  # nothing enters the state

    def _fusable(self, view: LayerView) -> bool:
        return False  # the fused op mixes in the linear branch

    @property
    def _in_place_config(self) -> bool:
        return False  # the in-place step mixes by the configured weight: take the general path

    def _combine(self, o_win: torch.Tensor, lse: torch.Tensor, o_lin: torch.Tensor) -> torch.Tensor:
        return o_win.float()  # [B, T, H, D]: the window's softmax (with its sinks), normalised
