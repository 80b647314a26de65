"""Gated delta rule in Triton: chunked forward and backward, and a recurrent decode step.

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

Backward (intermediates recomputed): ``_bwd_dvi`` the intra-chunk part of dΔ; ``_bwd_dh`` walks
the chunks backwards with dS in registers: dΔ = dΔ_intra + (K ⊙ exp(b_C − b)) dS_end and
dS_start = exp(b_C) ⊙ dS_end + scale·(q ⊙ exp(b))ᵀ do − Wᵀ dΔ; ``_bwd_wu`` goes back through
Δ = U − W S and the UT transform (dv, dβ, and dk as a read key via W and A's rows, as a write key
via A's columns); GLA's ``_bwd_dq`` and ``_bwd_dk`` give the output and state terms with v = Δ;
GLA's ``_bwd_dg`` turns dG_t = q_t⊙dq_t + k_t⊙dk_read − k_t⊙dk_write into the decay gradient.
Decode: ``_decode`` holds a [K, BV] slice of the state in registers across 1..few tokens.

Precision: as in GLA's Triton kernels, decays inside a chunk are differences of the chunk-local
cumulative log decay, so their fp32 error grows with its size: exact to ~1e-7 for gates down to
−20 per step (tested), but a single huge step (g = −1e4, which ``delta_chunked`` handles exactly)
leaves ~6e-4 relative error in the tokens after it in the same chunk.
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
BLOCK_K_BWD = 32
"""Key block of ``_bwd_wu`` on GPUs: it holds several [BT, BT, BK] tiles at once (64 spills in bf16)."""
BLOCK_V_MAX = 32
"""Value columns per ``_fwd_h`` / ``_decode`` program on GPUs: a [K, 32] fp32 state stays in
registers for K <= 256."""


@triton.jit
def _tile(ptr, rows, rmask, stride, cols, cmask):
    """Load ``ptr[rows * stride + cols]`` as a [len(rows), len(cols)] tile, zero outside the masks."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _chunk_inverse(k, beta, gc, t, mt, i_h, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """(I + A)⁻¹ [BT, BT] of one chunk (rows ``t``), A[t, s] = β_t Σ_d k_t,d k_s,d exp(b_t,d − b_s,d)
    for s < t, and β [BT]."""
    NK: tl.constexpr = (K + BK - 1) // BK
    o_t = tl.arange(0, BT)
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
    return A + (o_t[:, None] == o_t[None, :]).to(tl.float32), b_beta


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
    t = t0 + tl.arange(0, BT)
    mt = t < eos
    Tinv, b_beta = _chunk_inverse(k, beta, gc, t, mt, i_h, HKV, K, BT, BK)
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
def _bwd_dvi_kernel(
    q, k, gc, do, dvi, blocks, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Intra-chunk part of dΔ: scale·Σ_g Σ_{t >= s} P_g[t, s] do_g[t] (fp32).  grid (NV, NT, HKV)."""
    i_v, i_c, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NK: tl.constexpr = (K + BK - 1) // BK
    G: tl.constexpr = H // HKV
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, BT)
    mt = t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_g in range(G):
        i_q = i_hk * G + i_g
        P = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(NK):
            o_k = i_k * BK + tl.arange(0, BK)
            mk = o_k < K
            m_tk = mt[:, None] & mk[None, :]
            b_q = _tile(q + i_q * K, t, mt, H * K, o_k, mk).to(tl.float32)
            b_k = _tile(k + i_hk * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
            b_g = _tile(gc + i_hk * K, t, mt, HKV * K, o_k, mk)
            d = tl.where(m_tk[:, None, :] & causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf"))
            P += tl.sum(b_q[:, None, :] * b_k[None, :, :] * tl.exp(d), axis=2)
        b_do = _tile(do + i_q * V, t, mt, H * V, o_v, mv).to(tl.float32)
        acc += _dot(tl.trans(P), b_do, PREC)
    tl.store(dvi + (t[:, None] * HKV + i_hk) * V + o_v[None, :], acc * scale, mask=mt[:, None] & mv[None, :])


@triton.jit
def _bwd_dh_kernel(
    q, k, w, gc, do, dvi, dh, dd, dht, dh0, cu, first, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Backwards over the chunks: dh[c] = dL/d(state at the end of chunk c), dΔ (``dd``, fp32) and
    dL/d(initial state).  grid (NV, N * HKV); BK covers all of K."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HKV, i_nh % HKV
    G: tl.constexpr = H // HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    nc = tl.load(first + i_n + 1).to(tl.int64) - c0
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_k < K, o_v < V
    m_kv = mk[:, None] & mv[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(nc):
        cc = nc - 1 - c
        tl.store(dh + ((c0 + cc) * HKV + i_h) * K * V + kv_off, dS.to(dh.dtype.element_ty), mask=m_kv)
        t0 = bos + cc * BT
        t = t0 + tl.arange(0, BT)
        mt = t < eos
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        last = tl.minimum(t0 + BT, eos) - 1
        b_gl = tl.load(gc + (last * HKV + i_h) * K + o_k, mask=mk, other=0.0)  # [BK]
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        b_kd = tl.where(m_tk, b_k * tl.exp(tl.where(m_tk, b_gl[None, :] - b_g, 0.0)), 0.0)
        b_dd = _tile(dvi + i_h * V, t, mt, HKV * V, o_v, mv) + _dot(b_kd, dS, PREC)  # [BT, BV]
        tl.store(dd + (t[:, None] * HKV + i_h) * V + o_v[None, :], b_dd, mask=m_tv)
        b_w = _tile(w + i_h * K, t, mt, HKV * K, o_k, mk)  # [BT, BK] fp32
        dS = dS * tl.exp(b_gl)[:, None] - _dot(tl.trans(b_w), b_dd, PREC)
        b_eg = tl.exp(tl.where(m_tk, b_g, 0.0)) * scale
        for i_g in range(G):
            i_q = i_h * G + i_g
            b_q = _tile(q + i_q * K, t, mt, H * K, o_k, mk).to(tl.float32)
            b_do = _tile(do + i_q * V, t, mt, H * V, o_v, mv).to(tl.float32)
            dS += _dot(tl.trans(b_q * b_eg), b_do, PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + kv_off, dS, mask=m_kv)


@triton.jit
def _bwd_wu_kernel(
    k, v, beta, gc, u, w, h, dd, dv, dbeta, dkr, dkra, dkwa, blocks, cu,
    HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Through Δ = U − W S and the UT transform of one chunk of one KV head: dv, dβ and the key
    gradients as a read key (``dkr`` via W, ``dkra`` via A) and as a write key (``dkwa`` via A).
    grid (NT, HKV)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    mt = t < eos
    Tinv, b_beta = _chunk_inverse(k, beta, gc, t, mt, i_h, HKV, K, BT, BK)
    TinvT = tl.trans(Tinv)
    dA = tl.zeros([BT, BT], dtype=tl.float32)  # dL/dA without its sign: A's gradient is −tril(dA)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(NV):  # U = Tinv diag(β) V, dU = dΔ
        o_v = i_v * BV + tl.arange(0, BV)
        mv = o_v < V
        m_tv = mt[:, None] & mv[None, :]
        b_dy = _dot(TinvT, _tile(dd + i_h * V, t, mt, HKV * V, o_v, mv), PREC)  # dL/d(β V) [BT, BV]
        b_v = _tile(v + i_h * V, t, mt, HKV * V, o_v, mv).to(tl.float32)
        tl.store(dv + (t[:, None] * HKV + i_h) * V + o_v[None, :], b_dy * b_beta[:, None], mask=m_tv)
        b_dbeta += tl.sum(b_dy * b_v, axis=1)
        dA += _dot(b_dy, tl.trans(_tile(u + i_h * V, t, mt, HKV * V, o_v, mv)), PREC)
    for i_k in range(NK):  # W = Tinv diag(β)(K ⊙ exp(b)), dW = −dΔ Sᵀ
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        m_tk = mt[:, None] & mk[None, :]
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(NV):
            o_v = i_v * BV + tl.arange(0, BV)
            mv = o_v < V
            b_h = tl.load(
                h + ((i_c * HKV + i_h) * K + o_k[:, None]) * V + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0
            ).to(tl.float32)
            b_dw -= _dot(_tile(dd + i_h * V, t, mt, HKV * V, o_v, mv), tl.trans(b_h), PREC)
        b_dy = _dot(TinvT, b_dw, PREC)  # dL/d(β K ⊙ exp(b)) [BT, BK]
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        b_e = tl.exp(tl.where(m_tk, _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk), 0.0))
        b_dbeta += tl.sum(b_dy * b_k * b_e, axis=1)
        tl.store(dkr + (t[:, None] * HKV + i_h) * K + o_k[None, :], b_dy * b_e * b_beta[:, None], mask=m_tk)
        dA += _dot(b_dy, tl.trans(_tile(w + i_h * K, t, mt, HKV * K, o_k, mk)), PREC)
    strict = o_t[:, None] > o_t[None, :]
    dA = tl.where(strict & mt[:, None] & mt[None, :], -dA, 0.0)
    dM = dA * b_beta[:, None]  # A[t, s] = β_t M[t, s]
    for i_k in range(NK):  # M[t, s] = Σ_d k_t,d k_s,d exp(b_t,d − b_s,d)
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        m_tk = mt[:, None] & mk[None, :]
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)
        d = tl.where(strict[:, :, None] & m_tk[:, None, :], b_g[:, None, :] - b_g[None, :, :], float("-inf"))
        E = tl.exp(d)  # [BT(t), BT(s), BK]
        kkE = b_k[:, None, :] * b_k[None, :, :] * E
        b_dbeta += tl.sum(dA * tl.sum(kkE, axis=2), axis=1)
        b_dkr = tl.sum(dM[:, :, None] * b_k[None, :, :] * E, axis=1)  # k_t as the read key
        b_dkw = tl.sum(dM[:, :, None] * b_k[:, None, :] * E, axis=0)  # k_s as the write key
        tl.store(dkra + (t[:, None] * HKV + i_h) * K + o_k[None, :], b_dkr, mask=m_tk)
        tl.store(dkwa + (t[:, None] * HKV + i_h) * K + o_k[None, :], b_dkw, mask=m_tk)
    tl.store(dbeta + t * HKV + i_h, b_dbeta, mask=mt)


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


def _forward_parts(q, k, v, beta, g, h0, seqs: gla.Seqs, want_final: bool):
    """Chunk-local log decay gc, W, U (fp32), chunk-start states h and corrected values Δ (v.dtype),
    and the fp32 final state (or None)."""
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
    return gc, w, u, h, dv, ht


def delta_forward(q, k, v, beta, g, h0, seqs: gla.Seqs, scale: float, want_final: bool):
    """o [Ttot, H, V] (q.dtype) and the fp32 final state (or None) of flattened inputs:
    q [Ttot, H, K]; k, g [Ttot, Hkv, K]; v [Ttot, Hkv, V]; beta [Ttot, Hkv]."""
    gc, _, _, h, dv, ht = _forward_parts(q, k, v, beta, g, h0, seqs, want_final)
    return gla.gla_output(q, k, dv, gc, h, seqs, scale), ht


def delta_backward(q, k, v, beta, g, do, dht, ht, h0, seqs: gla.Seqs, scale: float):
    """Gradients of q, k, v, beta, g (their dtypes) and of the initial state (fp32, or None).

    The forward intermediates are recomputed. Key gradients come in two roles: k_t as a write key
    (the output's and the state's k_s, A's columns) and as a read key (W's K ⊙ exp(b), A's rows);
    the decay gradient uses the identity dG_t = q_t⊙dq_t + k_t⊙dk_read,t − k_t⊙dk_write,t (G the
    cumulative log decay over the sequence; the final state adds Σ_v S_T ⊙ dS_T), reverse-summed
    per sequence by GLA's ``_bwd_dg``.
    """
    Ttot, H, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    BT = seqs.chunk
    BK, BV = block(K, BLOCK_K_MAX), block(V, BLOCK_V_MAX)
    NV = triton.cdiv(V, BV)
    prec = dot_precision(v.dtype)
    do = do.to(v.dtype).contiguous()
    gc, w, u, h, delta, _ = _forward_parts(q, k, v, beta, g, h0, seqs, False)
    f32 = {"dtype": torch.float32, "device": q.device}
    dvi = torch.empty(Ttot, Hkv, V, **f32)
    _bwd_dvi_kernel[(NV, seqs.n_chunks, Hkv)](
        q, k, gc, do, dvi, seqs.blocks, seqs.cu, scale, H, Hkv, K, V, BT, BK, BV, prec
    )  # fmt: skip
    dh = torch.empty_like(h)
    dd = torch.empty(Ttot, Hkv, V, **f32)
    dh0 = torch.empty(seqs.n_seq, Hkv, K, V, **f32) if h0 is not None else None
    _bwd_dh_kernel[(NV, seqs.n_seq * Hkv)](
        q, k, w, gc, do, dvi, dh, dd, dht, dh0, seqs.cu, seqs.first, scale, H, Hkv, K, V, BT, full_block(K), BV,
        dht is not None, h0 is not None, prec,
    )  # fmt: skip
    dv, dbeta = torch.empty(Ttot, Hkv, V, **f32), torch.empty(Ttot, Hkv, **f32)
    dkr, dkra, dkwa = (torch.empty(Ttot, Hkv, K, **f32) for _ in range(3))
    _bwd_wu_kernel[(seqs.n_chunks, Hkv)](
        k, v, beta, gc, u, w, h, dd, dv, dbeta, dkr, dkra, dkwa, seqs.blocks, seqs.cu, Hkv, K, V, BT,
        block(K, BLOCK_K_BWD), BV, prec,
    )  # fmt: skip
    # The output and state terms are GLA's with v replaced by Δ (dh: gradients at chunk ends).
    BKg, BVg = block(K, gla.BLOCK_K_MAX), block(V, gla.BLOCK_V_MAX)
    args = (seqs.blocks, seqs.cu, scale, H, Hkv, K, V, BT, BT, BKg, BVg, prec)
    dq = torch.empty(Ttot, H, K, **f32)
    dkw = torch.empty(Ttot, Hkv, K, **f32)
    gla._bwd_dq_kernel[(triton.cdiv(K, BKg), seqs.n_chunks, H)](k, delta, gc, h, do, dq, *args)
    gla._bwd_dk_kernel[(triton.cdiv(K, BKg), seqs.n_chunks, Hkv)](q, delta, gc, dh, do, dkw, *args)
    dk_read, dk_write = dkr + dkra, dkw + dkwa
    dg = torch.empty(Ttot, Hkv, K, **f32)
    gla._bwd_dg_kernel[(triton.cdiv(K, BKg), seqs.n_seq * Hkv)](
        q, k, dq, dk_write - dk_read, ht, dht, dg, seqs.cu, seqs.first, H, Hkv, K, V, BT, BKg, BVg, dht is not None
    )  # fmt: skip
    dk = dk_read + dk_write
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dg.to(g.dtype), dh0


class GatedDeltaRule(torch.autograd.Function):
    """Autograd wrapper over the chunked kernels; inputs are flattened ``[B*T, heads, dim]``."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, h0, output_final_state, seqs):
        o, ht = delta_forward(q, k, v, beta, g, h0, seqs, scale, output_final_state)
        ctx.save_for_backward(q, k, v, beta, g, h0, ht)
        ctx.scale, ctx.seqs = scale, seqs
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, ht = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:2] + v.shape[-1:], dtype=q.dtype, device=q.device)
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dbeta, dg, dh0 = delta_backward(q, k, v, beta, g, do, dht, ht, h0, ctx.seqs, ctx.scale)
        return dq, dk, dv, dbeta, dg, None, dh0, None, None


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
    in q.dtype and the fp32 final state (or None). Differentiable in q, k, v, beta, g, initial_state."""
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
