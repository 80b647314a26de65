"""Naive fp32 reference implementations of every op, written as plain loops.

These are the ground truth the chunked PyTorch path and the Triton kernels are tested against.
They are slow on purpose: one token at a time, fp32 throughout, no tricks.

Layout everywhere is time-first: ``[B, T, H, D]``.
"""

from __future__ import annotations

import torch


def gated_linear_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with per-key-dimension decay, one token at a time.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t

    Shapes:
        q: [B, T, H, K]     queries (H query heads)
        k: [B, T, Hkv, K]   keys (H % Hkv == 0; query head h reads kv head h // (H // Hkv))
        v: [B, T, Hkv, V]
        g: [B, T, Hkv, K]   log decay (<= 0), per key dimension
        initial_state: [N, Hkv, K, V] with N = B, or the number of sequences in ``cu_seqlens``
        cu_seqlens: [N + 1] int offsets of packed sequences (then B == 1); the state restarts at
            each boundary.
    Returns:
        o: [B, T, H, V] in q.dtype; final state [N, Hkv, K, V] in fp32 (or None).
    """
    B, T, H, K = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, gf = (x.float() for x in (q, k, v, g))
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float32, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is not None:
            S = initial_state[n].float().clone()  # [Hkv, K, V]
        else:
            S = torch.zeros(Hkv, K, v.shape[-1], dtype=torch.float32, device=q.device)
        for t in range(start, end):
            S = S * gf[b, t].exp()[..., None] + kf[b, t][..., None] * vf[b, t][:, None, :]
            S_q = S.repeat_interleave(group, dim=0)  # [H, K, V]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", qf[b, t], S_q)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def sliding_window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the last ``window`` keys (the query's own position included).

    The queries are the last Tq positions of the key sequence: query i sits at key index
    ``Tk - Tq + i`` and sees key j iff ``pos - window < j <= pos`` and ``key_mask[b, j]``.

    Shapes:
        q: [B, Tq, H, D];  k, v: [B, Tk, Hkv, D] with Tk >= Tq and H % Hkv == 0
        key_mask: [B, Tk] bool (False = padding, never attended)
        sinks: [H] or [H, M] logits that join the softmax denominator and carry no value
    Returns:
        o: [B, Tq, H, D] in q.dtype, lse: [B, Tq, H] fp32 log of the softmax denominator
        (-inf and a zero output where a query sees nothing).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    sink_logits = None if sinks is None else sinks.float().reshape(H, -1)
    o = torch.zeros(B, Tq, H, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, Tq, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        for i in range(Tq):
            pos = Tk - Tq + i
            lo = max(0, pos - window + 1)
            for h in range(H):
                kv_h = h // group
                logits = (kf[b, lo : pos + 1, kv_h] @ qf[b, i, h]) * scale  # [L]
                vals = vf[b, lo : pos + 1, kv_h]
                if key_mask is not None:
                    keep = key_mask[b, lo : pos + 1].bool()
                    logits, vals = logits[keep], vals[keep]
                all_logits = logits if sink_logits is None else torch.cat([logits, sink_logits[h]])
                if all_logits.numel() == 0:
                    continue
                m = all_logits.max()
                weights = (logits - m).exp()
                denom = (all_logits - m).exp().sum()
                o[b, i, h] = (weights[:, None] * vals).sum(0) / denom
                lse[b, i, h] = m + denom.log()
    return o.to(q.dtype), lse
