"""Gated delta rule in Triton: chunked forward and a recurrent decode step (no backward yet).

Semantics are those of ``delta_reference.gated_delta_rule_ref``::

    S_t = (I − β_t k_t k_tᵀ) diag(exp(g_t)) S_{t-1} + β_t k_t v_tᵀ ,   o_t = scale · q_t S_t

with a per-key-channel log decay ``g`` [.., K] or one per head [..] (broadcast over K here), GQA,
an initial state, the fp32 final state and packed sequences (``cu_seqlens``). The caller
L2-normalises k.

Forward (the WY / UT form of ``delta_chunked.py``; chunks of ``CHUNK_SIZE`` = 16 tokens, one
``tl.dot`` edge, so the triangular inverse is a 16-step forward substitution in registers):

1. ``gla._cumsum``   b = chunk-local cumulative log decay (fp32).
2. ``_wu``           per chunk and KV head: A[t, s] = β_t Σ_d k_t,d k_s,d exp(b_t,d − b_s,d) (s < t,
   exact per channel in a [BT, BT, BK] tile masked in log space), (I + A)⁻¹ by forward
   substitution, W = (I + A)⁻¹ diag(β)(K ⊙ exp(b)) and U = (I + A)⁻¹ diag(β) V (fp32).
3. ``_fwd_h``        per (value block, sequence × KV head): walks the chunks with the state in
   registers (all of K, a block of V): stores the chunk-start state h, Δ = U − W S (the corrected
   values δ_t) and S ← diag(exp(b_C)) S + (K ⊙ exp(b_C − b))ᵀ Δ.
4. ``gla._fwd_o``    o = scale·[(q ⊙ exp(b)) h + Σ_{s <= t} (q_t ⊙ exp(b_t − b_s))·k_s δ_s]: exactly
   the GLA output kernel with v replaced by Δ.

Backward: not implemented; ``gated_delta_rule`` raises NotImplementedError when a gradient reaches
it (the dispatcher picks the chunked backend for differentiable calls unless Triton is asked for
by name). Decode: ``_decode`` holds a [K, BV] slice of the state in registers across 1..few tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..delta_validate import check_delta_inputs
from . import gla
from ._utils import (
    INTERPRET,
    _dot,
    block,
    check_device,
    check_float,
    dot_precision,
    full_block,
)

CHUNK_SIZE = 16
"""Chunk length BT of the Triton delta rule (one tl.dot edge: the (I + A)⁻¹ of a chunk is a
16-step forward substitution in registers; flash-linear-attention uses 64 with blockwise inverses)."""
BLOCK_K_MAX = 64
"""Largest key block of ``_wu`` on GPUs (a [BT, BT, BK] fp32 tile)."""
BLOCK_V_MAX = 32
"""Value columns per ``_fwd_h`` / ``_decode`` program on GPUs: a [K, 32] fp32 state stays in
registers for K <= 256."""


@triton.jit
def _tile(ptr, rows, rmask, stride, cols, cmask):
    """Load ``ptr[rows * stride + cols]`` as a [len(rows), len(cols)] tile, zero outside the masks."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _wu_kernel(
    k, v, beta, gc, w, u, blocks, cu,
    HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """W, U (fp32) of one chunk of one KV head.  grid (NT, HKV)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    mt = t < eos
    b_beta = tl.load(beta + t * HKV + i_h, mask=mt, other=0.0).to(tl.float32)  # [BT]
    strict = o_t[:, None] > o_t[None, :]
    A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)
        m3 = strict[:, :, None] & (mt[:, None] & mk[None, :])[:, None, :]
        d = tl.where(m3, b_g[:, None, :] - b_g[None, :, :], float("-inf"))
        A += tl.sum(b_k[:, None, :] * b_k[None, :, :] * tl.exp(d), axis=2)
    A = -A * b_beta[:, None]
    # (I + A)⁻¹ = I + X, row by row: X[i] = −A[i] − Σ_{j<i} A[i, j] X[j] (here A holds −A).
    for i in range(1, BT):
        row = tl.sum(tl.where(o_t[:, None] == i, A, 0.0), axis=0)  # [BT]
        row = row + tl.sum(row[:, None] * A, axis=0)
        A = tl.where(o_t[:, None] == i, row[None, :], A)
    Tinv = A + (o_t[:, None] == o_t[None, :]).to(tl.float32)
    for i_k in range(NK):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)
        b_kb = tl.where(mt[:, None] & mk[None, :], b_k * tl.exp(b_g) * b_beta[:, None], 0.0)
        b_w = _dot(Tinv, b_kb, PREC)
        tl.store(w + (t[:, None] * HKV + i_h) * K + o_k[None, :], b_w, mask=mt[:, None] & mk[None, :])
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        mv = o_v < V
        b_v = _tile(v + i_h * V, t, mt, HKV * V, o_v, mv).to(tl.float32) * b_beta[:, None]
        b_u = _dot(Tinv, b_v, PREC)
        tl.store(u + (t[:, None] * HKV + i_h) * V + o_v[None, :], b_u, mask=mt[:, None] & mv[None, :])


@triton.jit
def _fwd_h_kernel(
    k, w, u, gc, h, dv, h0, ht, cu, first,
    HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunk-start states h, corrected values Δ = U − W S (``dv``) and the final state.
    grid (NV, N * HKV); BK covers all of K."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HKV, i_nh % HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    nc = tl.load(first + i_n + 1).to(tl.int64) - c0
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_k < K, o_v < V
    m_kv = mk[:, None] & mv[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(nc):
        tl.store(h + ((c0 + c) * HKV + i_h) * K * V + kv_off, S.to(h.dtype.element_ty), mask=m_kv)
        t0 = bos + c * BT
        t = t0 + tl.arange(0, BT)
        mt = t < eos
        last = tl.minimum(t0 + BT, eos) - 1
        b_w = _tile(w + i_h * K, t, mt, HKV * K, o_k, mk)  # [BT, BK] fp32
        b_u = _tile(u + i_h * V, t, mt, HKV * V, o_v, mv)  # [BT, BV] fp32
        b_d = b_u - _dot(b_w, S, PREC)  # [BT, BV]
        tl.store(dv + (t[:, None] * HKV + i_h) * V + o_v[None, :], b_d.to(dv.dtype.element_ty), mask=mt[:, None] & mv[None, :])
        b_gl = tl.load(gc + (last * HKV + i_h) * K + o_k, mask=mk, other=0.0)  # [BK]
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        m_tk = mt[:, None] & mk[None, :]
        b_kd = tl.where(m_tk, b_k * tl.exp(tl.where(m_tk, b_gl[None, :] - b_g, 0.0)), 0.0)
        S = S * tl.exp(b_gl)[:, None] + _dot(tl.trans(b_kd), b_d, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + kv_off, S, mask=m_kv)


@triton.jit
def _decode_kernel(
    q, k, v, beta, g, state, o, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SCALAR_G: tl.constexpr,
):  # fmt: skip
    """grid (NV, B * HKV): the [K, BV] state slice of one batch row and KV head, token by token."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_k < K, o_v < V
    s_off = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_kv = mk[:, None] & mv[None, :]
    S = tl.load(state + s_off, mask=m_kv, other=0.0)
    row0 = i_b.to(tl.int64) * T
    for t in range(T):
        row = row0 + t
        b_k = tl.load(k + (row * HKV + i_hk) * K + o_k, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (row * HKV + i_hk) * V + o_v, mask=mv, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + row * HKV + i_hk).to(tl.float32)
        if SCALAR_G:
            S = S * tl.exp(tl.load(g + row * HKV + i_hk).to(tl.float32))
        else:
            b_g = tl.load(g + (row * HKV + i_hk) * K + o_k, mask=mk, other=0.0).to(tl.float32)
            S = S * tl.exp(b_g)[:, None]
        err = b_v - tl.sum(b_k[:, None] * S, axis=0)  # [BV]
        S = S + (b_beta * b_k)[:, None] * err[None, :]
        for i_g in range(G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (row * H + i_h) * K + o_k, mask=mk, other=0.0).to(tl.float32)
            b_o = tl.sum(b_q[:, None] * S, axis=0) * scale
            tl.store(o + (row * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=mv)
    tl.store(state + s_off, S, mask=m_kv)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


def delta_forward(q, k, v, beta, g, h0, seqs: gla.Seqs, scale: float, want_final: bool):
    """o [Ttot, H, V] (q.dtype) and the fp32 final state (or None) of flattened inputs:
    q [Ttot, H, K]; k, g [Ttot, Hkv, K]; v [Ttot, Hkv, V]; beta [Ttot, Hkv]."""
    Ttot, Hkv, K = k.shape
    V = v.shape[-1]
    BT = seqs.chunk
    prec = dot_precision(v.dtype)
    gc = gla.chunk_cumsum(g, seqs)  # [Ttot, Hkv, K] fp32
    w = torch.empty(Ttot, Hkv, K, dtype=torch.float32, device=k.device)
    u = torch.empty(Ttot, Hkv, V, dtype=torch.float32, device=k.device)
    BK, BV = block(K, BLOCK_K_MAX), block(V, BLOCK_V_MAX)
    _wu_kernel[(seqs.n_chunks, Hkv)](k, v, beta, gc, w, u, seqs.blocks, seqs.cu, Hkv, K, V, BT, BK, BV, prec)
    h = torch.empty(seqs.n_chunks, Hkv, K, V, dtype=v.dtype, device=k.device)
    dv = torch.empty(Ttot, Hkv, V, dtype=v.dtype, device=k.device)
    ht = torch.empty(seqs.n_seq, Hkv, K, V, dtype=torch.float32, device=k.device) if want_final else None
    _fwd_h_kernel[(triton.cdiv(V, BV), seqs.n_seq * Hkv)](
        k, w, u, gc, h, dv, h0, ht, seqs.cu, seqs.first, Hkv, K, V, BT, full_block(K), BV,
        h0 is not None, want_final, prec,
    )  # fmt: skip
    o = gla.gla_output(q, k, dv, gc, h, seqs, scale)
    return o, ht


class GatedDeltaRule(torch.autograd.Function):
    """Forward-only autograd wrapper: the backward raises NotImplementedError."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, h0, output_final_state, seqs):
        return delta_forward(q, k, v, beta, g, h0, seqs, scale, output_final_state)

    @staticmethod
    def backward(ctx, do, dht):
        raise NotImplementedError(
            "the Triton gated delta rule has no backward yet; use backend='chunked' (or backend=None, which "
            "picks chunked when a gradient is needed) to differentiate"
        )


def _check(q, k, v, beta, g, state, cu_seqlens):
    check_delta_inputs(q, k, v, beta, g, state, cu_seqlens)
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g)):
        check_float(name, x)
    check_device(q, k, v, beta, g, state)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunked Triton forward. Shapes as ``delta_reference.gated_delta_rule_ref``:
    q [B, T, H, K]; k [B, T, Hkv, K]; v [B, T, Hkv, V]; beta [B, T, Hkv]; g [B, T, Hkv, K] or
    [B, T, Hkv]; initial_state [N, Hkv, K, V]; cu_seqlens [N + 1] (B == 1). Returns o [B, T, H, V]
    in q.dtype and the fp32 final state (or None). Not differentiable (NotImplementedError)."""
    _check(q, k, v, beta, g, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    seqs = gla.make_seqs(B, T, cu_seqlens, CHUNK_SIZE, q.device)
    if g.dim() == 3:  # one decay per head: the per-channel kernels with g broadcast over K
        g = g[..., None].expand(B, T, Hkv, K)
    qf, kf, vf, gf = (x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g))
    bf = beta.reshape(B * T, Hkv).contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht = GatedDeltaRule.apply(qf, kf, vf, bf, gf, scale, h0, output_final_state, seqs)
    return o.reshape(B, T, H, V), ht


def delta_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Advance ``state`` [B, Hkv, K, V] (fp32, contiguous) by the new tokens in place and return
    their outputs o [B, Tn, H, V] (q.dtype). Shapes as ``gated_delta_rule``. Not differentiable."""
    _check(q, k, v, beta, g, state, None)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous float32 tensor (it is updated in place), got {state.dtype}"
            f"{'' if state.is_contiguous() else ', non-contiguous'}"
        )
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, beta, g, state)):
        raise ValueError(
            "delta_decode_step (Triton) has no backward; call it under torch.no_grad() (decoding), or use "
            "gated_delta_rule(..., initial_state=state, backend='chunked') to differentiate"
        )
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, beta, g = (x.contiguous() for x in (q, k, v, beta, g))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    BV = block(V, BLOCK_V_MAX)
    _decode_kernel[(triton.cdiv(V, BV), B * Hkv)](
        q, k, v, beta, g, state, o, scale, T, H, Hkv, K, V, full_block(K), BV, g.dim() == 3,
        num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return o
