"""Input checks of the gated delta-rule op: a clear ValueError with the shapes instead of a shape
error deep in torch. Shared by every backend (``delta.py`` calls them once per op)."""

from __future__ import annotations

import torch

from .validate import _shape, check_packed_state


def check_delta_inputs(q, k, v, beta, g, initial_state=None, cu_seqlens=None) -> None:
    """q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; beta [B, T, Hkv];
    g [B, T, Hkv, K] (per key channel) or [B, T, Hkv] (one scalar per head);
    initial_state [N, Hkv, K, V]; cu_seqlens [N + 1] with B == 1."""
    _shape("q", q, 4, "[B, T, H, K]")
    _shape("k", k, 4, "[B, T, Hkv, K]")
    _shape("v", v, 4, "[B, T, Hkv, V]")
    _shape("beta", beta, 3, "[B, T, Hkv]")
    if not isinstance(g, torch.Tensor) or g.dim() not in (3, 4):
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g must have shape [B, T, Hkv, K] (per key channel) or [B, T, Hkv] (scalar), got {got}")
    B, T, H, K = q.shape
    if any(x.shape[:2] != (B, T) for x in (k, v, beta, g)):
        raise ValueError(
            f"q, k, v, beta, g must share batch and time: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, beta {tuple(beta.shape)}, g {tuple(g.shape)}"
        )
    Hkv = k.shape[2]
    if k.shape[3] != K:
        raise ValueError(f"k must be [B, T, Hkv, {K}] like q's key dim, got {tuple(k.shape)}")
    if v.shape[2] != Hkv or beta.shape[2] != Hkv:
        raise ValueError(f"v and beta must have {Hkv} heads like k, got v {tuple(v.shape)}, beta {tuple(beta.shape)}")
    if g.shape[2] != Hkv or (g.dim() == 4 and g.shape[3] != K):
        raise ValueError(f"g must be [B, T, {Hkv}, {K}] or [B, T, {Hkv}], got {tuple(g.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if not (q.device == k.device == v.device == beta.device == g.device):
        raise ValueError("q, k, v, beta, g must be on the same device")
    check_packed_state(B, T, (Hkv, K, v.shape[3]), initial_state, cu_seqlens)
    if cu_seqlens is not None and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
