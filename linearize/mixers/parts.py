"""Building blocks of the converted attention: RoPE, key-reused gates, feature maps.

All functions work on the time-first layout ``[B, T, H, D]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# rwkv6-style gates take exp(k): clamp the logit so exp stays finite in fp32/bf16.
RWKV6_LOGIT_MAX = 20.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, T, H, D]; cos, sin: [B, T, D] as the decoder layer passes them."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # [B, T, 1, D]
    return x * cos + rotate_half(x) * sin


def key_gate(k: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """Log decay from the key itself (no new parameters). k: [B, T, Hkv, D] -> [B, T, Hkv, D or 1].

    gla / hgrn2: logsigmoid(k)/τ;  mamba2: −softplus(k)/τ;  rwkv6: −exp(k)/τ;
    scalar: k mean-pooled over D first, then logsigmoid/τ (one decay per head).
    """
    k = k.float()
    if kind in ("gla", "hgrn2"):
        return F.logsigmoid(k) / tau
    if kind == "mamba2":
        return -F.softplus(k) / tau
    if kind == "rwkv6":
        return -torch.exp(k.clamp(max=RWKV6_LOGIT_MAX)) / tau
    if kind == "scalar":
        return F.logsigmoid(k.mean(dim=-1, keepdim=True)) / tau
    raise ValueError(f"unknown key-reused gate {kind!r}")


class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(xW), softmax(−xW)] per head (Zhang et al. 2024), W initialised to the identity.

    x: [B, T, H, D] -> [B, T, H, 2D].
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, D, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = torch.einsum("bthd,hde->bthe", x, self.weight.to(x.dtype))  # [B, T, H, D]
        return torch.cat([xw.softmax(dim=-1), (-xw).softmax(dim=-1)], dim=-1)
