"""Naive fp32 reference of the gated delta rule, one token at a time: the ground truth.

    S'_t = diag(exp(g_t)) S_{t-1}
    S_t  = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ = (I − β_t k_t k_tᵀ) S'_t + β_t k_t v_tᵀ
    o_t  = scale · q_t S_t

(Gated DeltaNet, Yang et al. 2024, with one scalar log decay per head; Kimi Linear's KDA, 2025,
with a log decay per key channel.) The state S is [K, V] per key/value head; query head h reads
key/value head ``h // (H // Hkv)``. The op does not normalise k: the caller L2-normalises it
(``‖k_t‖ <= 1`` and ``0 < β_t <= 1`` keep ``I − β_t k_t k_tᵀ`` a contraction, hence the state
bounded). Layout is time-first ``[B, T, H, D]``.
"""

from __future__ import annotations

import torch


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, one token at a time, fp32 throughout (differentiable).

    Shapes:
        q: [B, T, H, K];  k: [B, T, Hkv, K] (L2-normalised by the caller);  v: [B, T, Hkv, V]
        beta: [B, T, Hkv] write strength in (0, 1)
        g: [B, T, Hkv, K] log decay (<= 0) per key channel, or [B, T, Hkv] one per head
        initial_state: [N, Hkv, K, V], N = B or the number of sequences in ``cu_seqlens``
        cu_seqlens: [N + 1] offsets of packed sequences (B == 1); the state restarts at each one
    Returns:
        o [B, T, H, V] in q.dtype; the final state [N, Hkv, K, V] fp32 (or None).
    """
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    group = H // Hkv
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, bf = (x.float() for x in (q, k, v, beta))
    gf = g.float() if g.dim() == 4 else g.float()[..., None].expand(B, T, Hkv, K)  # [B, T, Hkv, K]
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n].float().clone()  # [Hkv, K, V]
        else:
            S = torch.zeros(Hkv, K, V, dtype=torch.float32, device=q.device)
        for t in range(start, end):
            S = S * gf[b, t].exp()[..., None]  # S'_t
            err = vf[b, t] - torch.einsum("hk,hkv->hv", kf[b, t], S)  # [Hkv, V]
            S = S + bf[b, t][:, None, None] * kf[b, t][..., None] * err[:, None, :]
            S_q = S.repeat_interleave(group, dim=0)  # [H, K, V]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", qf[b, t], S_q)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final
