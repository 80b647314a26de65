"""Input checks shared by every backend: a clear ValueError instead of a shape error deep in torch."""

from __future__ import annotations

import torch


def _shape(name: str, x: torch.Tensor, ndim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")


def check_gla_inputs(q, k, v, g, initial_state=None, cu_seqlens=None, per_head_decay: bool = False) -> None:
    """``per_head_decay``: g may also be [B, T, Hkv, 1] (one decay per head, the dispatcher's and the
    chunked backend's form); the Triton kernels take a per-key g only."""
    _shape("q", q, 4, "[B, T, H, K]")
    _shape("k", k, 4, "[B, T, Hkv, K]")
    _shape("v", v, 4, "[B, T, Hkv, V]")
    _shape("g", g, 4, "[B, T, Hkv, K]")
    g_shape = tuple(g.shape)  # as given, for the messages
    if per_head_decay and g.shape[-1] == 1 and k.shape[-1] != 1:
        g = g.expand(*g.shape[:-1], k.shape[-1])  # a view: the checks below as for a per-key decay
    B, T, H, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or g.shape[:2] != (B, T):
        raise ValueError(
            f"q, k, v, g must share batch and time: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, g {g_shape}"
        )
    Hkv = k.shape[2]
    if k.shape[3] != K or g.shape != k.shape:
        one = " or [B, T, Hkv, 1] (one decay per head)" if per_head_decay else ""
        raise ValueError(f"k and g must be [B, T, Hkv, {K}]{one}, got k {tuple(k.shape)}, g {g_shape}")
    if v.shape[2] != Hkv:
        raise ValueError(f"v must have {Hkv} heads like k, got {tuple(v.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if not (q.device == k.device == v.device == g.device):
        raise ValueError("q, k, v, g must be on the same device")
    check_packed_state(B, T, (Hkv, K, v.shape[3]), initial_state, cu_seqlens)


def check_packed_state(B: int, T: int, state_dims: tuple[int, int, int], initial_state=None,
                       cu_seqlens=None) -> int:
    """The checks a recurrent op shares: ``cu_seqlens`` [N + 1] offsets of packed sequences (B == 1)
    and ``initial_state`` [N, Hkv, K, V] for ``state_dims`` (Hkv, K, V). Returns N."""
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be 1 (packed sequences), got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != T or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must be [N + 1] offsets from 0 to T={T}, got {cu_seqlens.tolist()}")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        want = (n_seq, *state_dims)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [N, Hkv, K, V] = {list(want)}, got {list(initial_state.shape)}")
    return n_seq


def check_swa_inputs(q, k, v, window, key_mask=None, sinks=None) -> None:
    _shape("q", q, 4, "[B, Tq, H, D]")
    _shape("k", k, 4, "[B, Tk, Hkv, D]")
    _shape("v", v, 4, "[B, Tk, Hkv, D]")
    B, Tq, H, D = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, Tk, Hkv, {D}] with B={B}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] < Tq:
        raise ValueError(f"there must be at least as many keys as queries: Tk={k.shape[1]} < Tq={Tq}")
    if H % k.shape[2] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[2]})")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if key_mask is not None and tuple(key_mask.shape) != (B, k.shape[1]):
        raise ValueError(f"key_mask must be [B, Tk] = {[B, k.shape[1]]}, got {list(key_mask.shape)}")
    if sinks is not None and (sinks.shape[0] != H or sinks.dim() > 2):
        raise ValueError(f"sinks must be [H] or [H, M] with H={H}, got {list(sinks.shape)}")
