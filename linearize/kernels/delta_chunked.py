"""Chunked PyTorch gated delta rule (the WY / UT-transform form): the path everywhere without a GPU.

Semantics are those of ``delta_reference.gated_delta_rule_ref``::

    S_t = (I − β_t k_t k_tᵀ) diag(exp(g_t)) S_{t-1} + β_t k_t v_tᵀ ,   o_t = scale · q_t S_t

Chunked form (Yang et al. 2024, "Gated Delta Networks"; flash-linear-attention's chunk KDA for the
per-channel gate), written from the maths. Inside a chunk of C tokens with state ``S0`` at its
start, ``b_t`` the log decay from the chunk start to t (inclusive, per key channel), write the
update as ``S_t = diag(exp(g_t)) S_{t-1} + k_t δ_tᵀ``. Then ``δ_t = β_t (v_t − S'_tᵀ k_t)`` gives
the unit lower-triangular system

    (I + A) Δ = diag(β) V − diag(β) (K ⊙ exp(b)) S0 ,   A[t, s] = β_t Σ_d k_t,d k_s,d exp(b_t,d − b_s,d)  (s < t)

so ``Δ = U − W S0`` with ``U = (I + A)⁻¹ diag(β) V`` and ``W = (I + A)⁻¹ diag(β) (K ⊙ exp(b))``
(one triangular solve per chunk, independent of the state), and

    o_t   = scale · [ (q_t ⊙ exp(b_t)) S0 + Σ_{s <= t} (Σ_d q_t,d k_s,d exp(b_t,d − b_s,d)) δ_s ]
    S_end = diag(exp(b_C)) S0 + Σ_s (k_s ⊙ exp(b_C − b_s)) δ_sᵀ

Only the last two lines and ``Δ = U − W S0`` run chunk after chunk. The decayed score matrices are
formed as in ``chunked.py``'s GLA: every log decay is a sum of the g's it spans, only
exponentials of sums <= 0 are taken (per channel: exact inside sub-chunks of 16, factored through
the sub-chunk start between them), so a very strong gate stays exact in fp32. Memory O(T·C) per
head; long sequences run in segments of ``chunked.SEGMENT_TOKENS`` with the state carried.
All arithmetic is fp32 (autograd through torch ops gives every gradient); outputs come back in
``q.dtype``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import chunked
from .chunked import RECURRENT_MAX_T, _packed_index, _to_padded

CHUNK_SIZE = 64
"""Chunk length C (flash-linear-attention's chunk gated delta rule uses 64)."""
SUB_CHUNK_SIZE = 16
"""Sub-chunk length of the per-channel decayed scores (as in ``chunked.py``)."""


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunked. Same contract as ``delta_reference.gated_delta_rule_ref``:
    q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; beta [B, T, Hkv]; g [B, T, Hkv, K] or
    [B, T, Hkv]; initial_state [N, Hkv, K, V]; cu_seqlens [N + 1] (B == 1). Returns o [B, T, H, V]
    in q.dtype and the fp32 final state (or None)."""
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    T, K = q.shape[1], q.shape[3]
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        o, final = _delta_batched(q, k, v, beta, g, scale, initial_state, chunk_size)
    else:
        seq, pos, t_max = _packed_index(cu_seqlens, T)
        n_seq = cu_seqlens.numel() - 1
        # zero padding at the end: beta = 0 writes nothing and g = 0 does not decay
        padded = [_to_padded(x, seq, pos, n_seq, t_max) for x in (q, k, v, beta, g)]  # each [N, Tmax, ...]
        o_pad, final = _delta_batched(*padded, scale, initial_state, chunk_size)
        o = o_pad[seq, pos].unsqueeze(0)  # [1, T, H, V]
    return o.to(q.dtype), (final if output_final_state else None)


def _delta_batched(q, k, v, beta, g, scale, initial_state, chunk_size):
    """Equal-length sequences; o [B, T, H, V] fp32 and the final state [B, Hkv, K, V]."""
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    group = H // Hkv
    qf = (q.float() * scale).reshape(B, T, Hkv, group, K)  # [B, T, Hkv, G, K]
    kf, vf, bf, gf = k.float(), v.float(), beta.float(), g.float()  # gf [B, T, Hkv(, K)]
    state = q.new_zeros(B, Hkv, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        return q.new_zeros(B, 0, H, V, dtype=torch.float32), state
    if T <= RECURRENT_MAX_T:
        o, state = _delta_recurrent(qf, kf, vf, bf, gf, state)
    else:
        segment = max(chunk_size, chunked.SEGMENT_TOKENS // chunk_size * chunk_size)
        outs = []
        for a in range(0, T, segment):  # the state carries over: the same sums, in cache-sized pieces
            piece = [x[:, a : a + segment] for x in (qf, kf, vf, bf, gf)]
            o, state = _delta_chunked(*piece, state, chunk_size)
            outs.append(o)
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.reshape(B, T, H, V), state


def _delta_recurrent(qf, kf, vf, bf, gf, state):
    """One token at a time (decode). qf [B, T, Hkv, G, K] (scaled); returns o [B, T, Hkv, G, V]."""
    outs = []
    for t in range(qf.shape[1]):
        decay = gf[:, t].exp()  # [B, Hkv, K] or [B, Hkv]
        state = state * (decay[..., None] if gf.dim() == 4 else decay[..., None, None])  # S'_t
        err = vf[:, t] - torch.einsum("bhk,bhkv->bhv", kf[:, t], state)  # [B, Hkv, V]
        state = state + (bf[:, t, :, None] * kf[:, t])[..., None] * err[:, :, None, :]  # [B, Hkv, K, V]
        outs.append(torch.einsum("bhgk,bhkv->bhgv", qf[:, t], state))  # [B, Hkv, G, V]
    return torch.stack(outs, dim=1), state


def _delta_chunked(qf, kf, vf, bf, gf, state, chunk_size):
    """Chunked form over one segment. qf [B, T, Hkv, G, K] (scaled); returns o [B, T, Hkv, G, V]."""
    B, T, Hkv, G, K = qf.shape
    V = vf.shape[-1]
    C = chunk_size
    n = -(-T // C)
    pad = n * C - T
    per_channel = gf.dim() == 4
    # Zero padding at the end: beta = 0 and g = 0 leave the state untouched.
    qc = F.pad(qf, (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, G, K).permute(0, 3, 4, 1, 2, 5)  # [B, Hkv, G, n, C, K]
    kc = F.pad(kf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, K).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, K]
    vc = F.pad(vf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, V).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, V]
    bc = F.pad(bf, (0, 0, 0, pad)).reshape(B, n, C, Hkv).permute(0, 3, 1, 2)  # [B, Hkv, n, C]
    if per_channel:
        gc = F.pad(gf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, K).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, K]
        a_qk = _scores_channel(qc, kc, gc)  # [B, Hkv, G, n, C, C], j <= i
        a_kk = _scores_channel(kc[:, :, None], kc, gc)[:, :, 0]  # [B, Hkv, n, C, C]
    else:
        gc = F.pad(gf, (0, 0, 0, pad)).reshape(B, n, C, Hkv).permute(0, 3, 1, 2)[..., None]  # [B, Hkv, n, C, 1]
        decay = _decay_matrix(gc[..., 0])  # [B, Hkv, n, C, C], j <= i
        a_qk = torch.einsum("bhgnik,bhnjk->bhgnij", qc, kc) * decay[:, :, None]
        a_kk = torch.einsum("bhnik,bhnjk->bhnij", kc, kc) * decay
    from_start = gc.cumsum(dim=3)  # [B, Hkv, n, C, K|1] chunk start to i, inclusive
    to_end = F.pad(gc.flip(3).cumsum(3).flip(3)[..., 1:, :], (0, 0, 0, 1))  # [B, Hkv, n, C, K|1] after j, to the chunk end
    chunk_decay = from_start[..., -1, :].exp()  # [B, Hkv, n, K|1]

    # The UT transform: (I + A) [W | U] = diag(beta) [K ⊙ exp(b) | V], A strictly lower.
    strict = torch.ones(C, C, dtype=torch.bool, device=qf.device).tril(-1)
    a = (a_kk * bc[..., None]).masked_fill(~strict, 0.0)  # [B, Hkv, n, C, C]
    eye = torch.eye(C, dtype=a.dtype, device=a.device)
    rhs = torch.cat([kc * from_start.exp(), vc], dim=-1) * bc[..., None]  # [B, Hkv, n, C, K + V]
    wu = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]  # [B, Hkv, n, C, K], [B, Hkv, n, C, V]
    k_end = kc * to_end.exp()  # [B, Hkv, n, C, K]

    # Inter-chunk: a sequential scan over chunk states.
    starts, deltas = [], []
    for i in range(n):
        starts.append(state)
        delta = u[:, :, i] - w[:, :, i] @ state  # [B, Hkv, C, V]
        deltas.append(delta)
        state = state * chunk_decay[:, :, i, :, None] + k_end[:, :, i].transpose(-1, -2) @ delta  # [B, Hkv, K, V]
    start_states = torch.stack(starts, dim=2)  # [B, Hkv, n, K, V]
    delta = torch.stack(deltas, dim=2)  # [B, Hkv, n, C, V]
    o_inter = torch.einsum("bhgnck,bhnkv->bhgncv", qc * from_start.exp()[:, :, None], start_states)
    o_intra = torch.einsum("bhgnij,bhnjv->bhgniv", a_qk, delta)  # [B, Hkv, G, n, C, V]
    o = (o_inter + o_intra).permute(0, 3, 4, 1, 2, 5).reshape(B, n * C, Hkv, G, V)[:, :T]  # [B, T, Hkv, G, V]
    return o, state


def _decay_matrix(g: torch.Tensor) -> torch.Tensor:
    """exp(Σ_{j < s <= i} g_s) for j <= i, else 0. g [..., C] -> [..., C, C] (a sum of the g's it
    spans, masked in log space before the exponential)."""
    C = g.shape[-1]
    pos = torch.arange(C, device=g.device)
    span = (pos[None, :, None] < pos[None, None, :]) & (pos[None, None, :] <= pos[:, None, None])  # [i, j, s]
    log = torch.einsum("ijs,...s->...ij", span.to(g.dtype), g)  # [..., C, C]
    causal = pos[None, :] <= pos[:, None]
    return log.masked_fill(~causal, float("-inf")).exp()


def _scores_channel(x: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-channel decayed scores ``Σ_d x_i,d k_j,d exp(Σ_{j < s <= i} g_s,d)`` for j <= i, else 0.

    x [B, Hkv, X, n, C, K]; k, g [B, Hkv, n, C, K] -> [B, Hkv, X, n, C, C]. As in ``chunked.py``:
    exact per channel inside sub-chunks, factored through the sub-chunk start between them.
    """
    B, Hkv, X, n, C, K = x.shape
    c = math.gcd(C, SUB_CHUNK_SIZE)
    ns = C // c
    dev = g.device
    g_sub = g.reshape(B, Hkv, n, ns, c, K)
    b_loc = g_sub.cumsum(dim=4)  # [B, Hkv, n, ns, c, K] from the sub-chunk start to i, inclusive
    total = b_loc[..., -1, :]  # [B, Hkv, n, ns, K]
    rest = F.pad(g_sub.flip(4).cumsum(4).flip(4)[..., 1:, :], (0, 0, 0, 1))  # after j, to the sub-chunk end
    sub = torch.arange(ns, device=dev)
    strictly = (sub[:, None, None] < sub[None, None, :]) & (sub[None, None, :] < sub[None, :, None])  # [J, I, M]
    between = torch.einsum("jim,bhnmk->bhnijk", strictly.to(g.dtype), total)  # [B, Hkv, n, ns(I), ns(J), K]

    # between sub-chunks J < I, through the start of sub-chunk I
    x_sub = x.reshape(B, Hkv, X, n, ns, c, K)
    x_off = x_sub * b_loc.exp()[:, :, None]  # [B, Hkv, X, n, ns, c, K]
    k_log = rest[:, :, :, None] + between[..., None, :]  # [B, Hkv, n, ns(I), ns(J), c, K]
    earlier = sub[None, :] < sub[:, None]  # [I, J]
    k_log = k_log.masked_fill(~earlier[:, :, None, None], float("-inf")).reshape(B, Hkv, n, ns, C, K)
    k_off = k[:, :, :, None] * k_log.exp()  # [B, Hkv, n, ns(I), C, K]
    scores = torch.einsum("bhxnick,bhnijk->bhxnicj", x_off, k_off)  # [B, Hkv, X, n, ns, c, C]

    # inside a sub-chunk: exact per channel, masked in log space
    pos = torch.arange(c, device=dev)
    span = (pos[None, :, None] < pos[None, None, :]) & (pos[None, None, :] <= pos[:, None, None])  # [i, j, s]
    d_log = torch.einsum("ijs,bhnask->bhnaijk", span.to(g.dtype), g_sub)  # [B, Hkv, n, ns, c, c, K]
    causal = pos[None, :] <= pos[:, None]
    kd = d_log.masked_fill(~causal[..., None], float("-inf")).exp() * k.reshape(B, Hkv, n, ns, 1, c, K)
    diag = torch.einsum("bhxnsik,bhnsijk->bhxnsij", x_sub, kd)  # [B, Hkv, X, n, ns, c, c]
    block_eye = torch.eye(ns, dtype=x.dtype, device=dev)[:, None, :, None]  # [ns(I), 1, ns(J), 1]
    scores = scores.reshape(B, Hkv, X, n, ns, c, ns, c) + diag[..., None, :] * block_eye
    return scores.reshape(B, Hkv, X, n, C, C)
