"""Chunked gated linear attention in Triton: forward, backward and the autograd wrapper.

Semantics are those of ``reference.gated_linear_attention_ref``::

    S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t ,   o_t = scale · q_t S_t

with a per-key-dimension log decay ``g`` (scalar gates are ``g`` broadcast over K), GQA (query
head h reads key/value head ``h // (H // Hkv)``; nothing is repeated in memory), an optional
initial state, the fp32 final state, and packed sequences (``cu_seqlens``).

Algorithm (the chunked form of flash-linear-attention's chunk GLA, written from the maths):
every sequence is cut into chunks of ``BT`` tokens, every chunk into sub-chunks of ``BC``. With
``b_t`` the cumulative log decay from the chunk start (fp32, ``b <= 0`` and falling):

    o_t = scale · [ (q_t ⊙ exp(b_t)) S_chunk  +  Σ_{s <= t in chunk} (q_t ⊙ exp(b_t − b_s))·k_s v_s ]

1. ``_cumsum``  b per chunk.
2. ``_fwd_h``   one program per (key block, value block, sequence × KV head) walks the chunks of
   its sequence and stores the state at every chunk start (``h``, the inputs' dtype).
3. ``_fwd_o``   one program per (value block, sub-chunk, query head): the inter-chunk term from
   ``h``; the intra-chunk term between sub-chunks I > J through the log decay ``r`` at the first
   row of sub-chunk I as ``(q ⊙ exp(b − r))·(k ⊙ exp(r − b))ᵀ`` (both factors <= 1); inside a
   diagonal sub-chunk exactly per key dimension (a ``[BC, BC, BK]`` tile masked in log space
   before the exponential). No exponential of a positive number is ever taken.

Backward: ``_bwd_dh`` walks the chunks backwards for the state gradients (summed over the query
heads of a KV head, plus ``dht``); ``_bwd_dq``, ``_bwd_dk``, ``_bwd_dv`` mirror ``_fwd_o``; the
decay gradient uses the exact identity ``dG_t = q_t⊙dq_t − k_t⊙dk_t`` (G the cumulative log decay
over the whole sequence; ``t = T`` adds ``Σ_v S_T ⊙ dS_T``), reverse-summed over each sequence by
``_bwd_dg``. The states ``h`` are recomputed in the backward pass rather than kept.

Accumulation is fp32 everywhere; ``tl.dot`` operands are the inputs' dtype (exact fp32 products
for fp32 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..validate import check_gla_inputs
from ._utils import INTERPRET, _dot, block, check_device, check_float, chunk_table, configs, dot_precision, seq_offsets

CHUNK_SIZE = 32 if INTERPRET else 64
"""Chunk length BT (flash-linear-attention's chunk GLA uses 64; 32 under the interpreter so the
tiny test shapes cover several chunks and several sub-chunks per chunk)."""
SUB_CHUNK_SIZE = 16
"""Sub-chunk length BC (flash-linear-attention's intra-chunk BC = 16; the smallest tl.dot edge)."""
BLOCK_K_MAX = 64
"""Largest key-dimension block on GPUs (per-program registers: a [BC, BC, BK] tile on the diagonal)."""
BLOCK_V_MAX = 64
"""Largest value-dimension block on GPUs."""


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _tile(ptr, rows, rmask, stride, cols, cmask):
    """Load ``ptr[rows * stride + cols]`` as a [len(rows), len(cols)] tile, zero outside the masks."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.autotune(configs=configs([{}], warps=(1, 2, 4), stages=(1,)), key=["K", "BT"])
@triton.jit
def _cumsum_kernel(g, gc, blocks, cu, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """gc[t] = Σ_{chunk start <= s <= t} g[s] in fp32.  grid (NK, NT, HKV)."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1)
    eos = tl.load(cu + n + 1)
    t = (t0 + tl.arange(0, BT)).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (t < eos)[:, None] & (o_k < K)[None, :]
    off = (t[:, None] * HKV + i_h) * K + o_k[None, :]
    x = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
    tl.store(gc + off, tl.cumsum(x, axis=0), mask=m)


@triton.autotune(configs=configs([{}]), key=["K", "V", "BT", "BK", "BV"])
@triton.jit
def _fwd_h_kernel(
    k, v, gc, h, h0, ht, cu, first,
    HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """h[c] = state at the start of chunk c.  grid (NK, NV, N * HKV)."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // HKV, i_nh % HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    nc = tl.load(first + i_n + 1).to(tl.int64) - c0
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_k < K, o_v < V
    m_kv = mk[:, None] & mv[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(0, nc):
        tl.store(h + ((c0 + c) * HKV + i_h) * K * V + kv_off, S.to(h.dtype.element_ty), mask=m_kv)
        t0 = bos + c * BT
        t = t0 + tl.arange(0, BT)
        mt = t < eos
        last = tl.minimum(t0 + BT, eos) - 1
        b_gl = tl.load(gc + (last * HKV + i_h) * K + o_k, mask=mk, other=0.0)  # [BK]
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)  # [BT, BK]
        b_k = _tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32)
        b_v = _tile(v + i_h * V, t, mt, HKV * V, o_v, mv)  # [BT, BV]
        m_tk = mt[:, None] & mk[None, :]
        b_kd = tl.where(m_tk, b_k * tl.exp(tl.where(m_tk, b_gl[None, :] - b_g, 0.0)), 0.0)
        S = S * tl.exp(b_gl)[:, None] + _dot(tl.trans(b_kd).to(b_v.dtype), b_v, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + kv_off, S, mask=m_kv)


@triton.jit
def _sub_chunk_out(
    q, k, v, gc, h, i_c, i_s, t0, eos, i_h, o_v, mv,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Unscaled GLA output [BC, BV] of sub-chunk ``i_s`` of chunk ``i_c`` (first token ``t0``) for
    query head ``i_h`` and value columns ``o_v``: inter-chunk term from ``h`` plus intra-chunk terms."""
    NK: tl.constexpr = (K + BK - 1) // BK
    i_hk = i_h // (H // HKV)
    r0 = t0 + i_s * BC  # first row of this sub-chunk: the reference for the off-diagonal terms
    ti = r0 + tl.arange(0, BC)
    mi = ti < eos
    dt = v.dtype.element_ty
    causal = tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :]

    acc = tl.zeros([BC, BV], dtype=tl.float32)
    A = tl.zeros([BC, BC], dtype=tl.float32)  # diagonal sub-chunk
    for i_k in range(0, NK):
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        m_ik = mi[:, None] & mk[None, :]
        b_q = _tile(q + i_h * K, ti, mi, H * K, o_k, mk).to(tl.float32)
        b_k = _tile(k + i_hk * K, ti, mi, HKV * K, o_k, mk).to(tl.float32)
        b_g = _tile(gc + i_hk * K, ti, mi, HKV * K, o_k, mk)
        b_h = tl.load(
            h + ((i_c * HKV + i_hk) * K + o_k[:, None]) * V + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0
        )
        acc += _dot((b_q * tl.exp(b_g)).to(dt), b_h, PREC)
        d = tl.where(m_ik[:, None, :] & causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf"))
        A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * tl.exp(d), axis=2)
    b_v = _tile(v + i_hk * V, ti, mi, HKV * V, o_v, mv)
    acc += _dot(A.to(dt), b_v, PREC)

    for j in range(0, i_s):  # earlier sub-chunks of the chunk
        tj = t0 + j * BC + tl.arange(0, BC)
        mj = tj < eos
        A = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, NK):
            o_k = i_k * BK + tl.arange(0, BK)
            mk = o_k < K
            b_r = tl.load(gc + (tl.minimum(r0, eos - 1) * HKV + i_hk) * K + o_k, mask=mk, other=0.0)  # [BK]
            b_q = _tile(q + i_h * K, ti, mi, H * K, o_k, mk).to(tl.float32)
            b_g = _tile(gc + i_hk * K, ti, mi, HKV * K, o_k, mk)
            b_k = _tile(k + i_hk * K, tj, mj, HKV * K, o_k, mk).to(tl.float32)
            b_gk = _tile(gc + i_hk * K, tj, mj, HKV * K, o_k, mk)
            b_qg = tl.where(mi[:, None], b_q * tl.exp(tl.where(mi[:, None], b_g - b_r[None, :], 0.0)), 0.0)
            b_kg = tl.where(mj[:, None], b_k * tl.exp(tl.where(mj[:, None], b_r[None, :] - b_gk, 0.0)), 0.0)
            A += _dot(b_qg.to(dt), tl.trans(b_kg.to(dt)), PREC)
        b_vj = _tile(v + i_hk * V, tj, mj, HKV * V, o_v, mv)
        acc += _dot(A.to(dt), b_vj, PREC)
    return acc


@triton.autotune(configs=configs([{}]), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _fwd_o_kernel(
    q, k, v, gc, h, o, blocks, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """o for one sub-chunk of one query head.  grid (NV, NT * BT // BC, H)."""
    i_v, i_cs, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    i_c, i_s = i_cs // NC, i_cs % NC
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V
    acc = _sub_chunk_out(q, k, v, gc, h, i_c, i_s, t0, eos, i_h, o_v, mv, H, HKV, K, V, BC, BK, BV, PREC)
    ti = t0 + i_s * BC + tl.arange(0, BC)
    m_out = (ti < eos)[:, None] & mv[None, :]
    tl.store(o + (ti[:, None] * H + i_h) * V + o_v[None, :], (acc * scale).to(o.dtype.element_ty), mask=m_out)


@triton.autotune(configs=configs([{}]), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _bwd_dh_kernel(
    q, do, gc, dh, dht, dh0, cu, first, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dh[c] = dL/d(state at the end of chunk c) (summed over the group's query heads).
    grid (NK, NV, N * HKV)."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // HKV, i_nh % HKV
    G: tl.constexpr = H // HKV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(first + i_n).to(tl.int64)
    nc = tl.load(first + i_n + 1).to(tl.int64) - c0
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk, mv = o_k < K, o_v < V
    m_kv = mk[:, None] & mv[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]
    dt = do.dtype.element_ty
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    for c in range(0, nc):
        cc = nc - 1 - c
        tl.store(dh + ((c0 + cc) * HKV + i_h) * K * V + kv_off, dS.to(dh.dtype.element_ty), mask=m_kv)
        t0 = bos + cc * BT
        t = t0 + tl.arange(0, BT)
        mt = t < eos
        last = tl.minimum(t0 + BT, eos) - 1
        b_gl = tl.load(gc + (last * HKV + i_h) * K + o_k, mask=mk, other=0.0)
        b_g = _tile(gc + i_h * K, t, mt, HKV * K, o_k, mk)
        dS = dS * tl.exp(b_gl)[:, None]
        for i_g in range(0, G):
            i_q = i_h * G + i_g
            b_q = _tile(q + i_q * K, t, mt, H * K, o_k, mk).to(tl.float32)
            b_do = _tile(do + i_q * V, t, mt, H * V, o_v, mv)
            b_qg = b_q * tl.exp(b_g) * scale
            dS += _dot(tl.trans(b_qg).to(dt), b_do, PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + kv_off, dS, mask=m_kv)


@triton.autotune(configs=configs([{}]), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _bwd_dq_kernel(
    k, v, gc, h, do, dq, blocks, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dq (fp32) for one sub-chunk of one query head.  grid (NK, NT * BT // BC, H)."""
    i_k, i_cs, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    NV: tl.constexpr = (V + BV - 1) // BV
    G: tl.constexpr = H // HKV
    i_c, i_s = i_cs // NC, i_cs % NC
    i_hk = i_h // G
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    r0 = t0 + i_s * BC
    ti = r0 + tl.arange(0, BC)
    mi = ti < eos
    o_k = i_k * BK + tl.arange(0, BK)
    mk = o_k < K
    m_ik = mi[:, None] & mk[None, :]
    dt = v.dtype.element_ty
    causal = tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :]
    b_g = _tile(gc + i_hk * K, ti, mi, HKV * K, o_k, mk)  # [BC, BK]

    # inter-chunk: exp(b) ⊙ (do S_chunkᵀ); diagonal: dA = do vᵀ
    inter = tl.zeros([BC, BK], dtype=tl.float32)
    dA = tl.zeros([BC, BC], dtype=tl.float32)
    for i_v in range(0, NV):
        o_v = i_v * BV + tl.arange(0, BV)
        mv = o_v < V
        b_do = _tile(do + i_h * V, ti, mi, H * V, o_v, mv)
        b_v = _tile(v + i_hk * V, ti, mi, HKV * V, o_v, mv)
        b_h = tl.load(
            h + ((i_c * HKV + i_hk) * K + o_k[:, None]) * V + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0
        )
        inter += _dot(b_do, tl.trans(b_h), PREC)
        dA += _dot(b_do, tl.trans(b_v), PREC)
    b_dq = inter * tl.exp(b_g)
    b_k = _tile(k + i_hk * K, ti, mi, HKV * K, o_k, mk).to(tl.float32)
    d = tl.where(m_ik[:, None, :] & causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf"))
    b_dq += tl.sum(tl.where(causal, dA, 0.0)[:, :, None] * b_k[None, :, :] * tl.exp(d), axis=1)

    b_r = tl.load(gc + (tl.minimum(r0, eos - 1) * HKV + i_hk) * K + o_k, mask=mk, other=0.0)
    for j in range(0, i_s):
        tj = t0 + j * BC + tl.arange(0, BC)
        mj = tj < eos
        dA = tl.zeros([BC, BC], dtype=tl.float32)
        for i_v in range(0, NV):
            o_v = i_v * BV + tl.arange(0, BV)
            mv = o_v < V
            b_do = _tile(do + i_h * V, ti, mi, H * V, o_v, mv)
            b_v = _tile(v + i_hk * V, tj, mj, HKV * V, o_v, mv)
            dA += _dot(b_do, tl.trans(b_v), PREC)
        b_kj = _tile(k + i_hk * K, tj, mj, HKV * K, o_k, mk).to(tl.float32)
        b_gk = _tile(gc + i_hk * K, tj, mj, HKV * K, o_k, mk)
        b_kg = tl.where(mj[:, None], b_kj * tl.exp(tl.where(mj[:, None], b_r[None, :] - b_gk, 0.0)), 0.0)
        b_dq += tl.exp(tl.where(mi[:, None], b_g - b_r[None, :], 0.0)) * _dot(dA.to(dt), b_kg.to(dt), PREC)
    tl.store(dq + (ti[:, None] * H + i_h) * K + o_k[None, :], b_dq * scale, mask=m_ik)


@triton.autotune(configs=configs([{}]), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _bwd_dk_kernel(
    q, v, gc, dh, do, dk, blocks, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dk (fp32) for one sub-chunk of one KV head.  grid (NK, NT * BT // BC, HKV)."""
    i_k, i_cs, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    NV: tl.constexpr = (V + BV - 1) // BV
    G: tl.constexpr = H // HKV
    i_c, i_s = i_cs // NC, i_cs % NC
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    n_sub = tl.cdiv(tl.minimum(eos - t0, BT), BC)  # non-empty sub-chunks of this chunk
    tj = t0 + i_s * BC + tl.arange(0, BC)
    mj = tj < eos
    o_k = i_k * BK + tl.arange(0, BK)
    mk = o_k < K
    m_jk = mj[:, None] & mk[None, :]
    dt = v.dtype.element_ty
    causal = tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :]
    last = tl.minimum(t0 + BT, eos) - 1
    b_gl = tl.load(gc + (last * HKV + i_hk) * K + o_k, mask=mk, other=0.0)
    b_gk = _tile(gc + i_hk * K, tj, mj, HKV * K, o_k, mk)  # [BC, BK]

    # inter-chunk: exp(b_last − b) ⊙ (v dh_chunkᵀ)
    inter = tl.zeros([BC, BK], dtype=tl.float32)
    for i_v in range(0, NV):
        o_v = i_v * BV + tl.arange(0, BV)
        mv = o_v < V
        b_v = _tile(v + i_hk * V, tj, mj, HKV * V, o_v, mv)
        b_dh = tl.load(
            dh + ((i_c * HKV + i_hk) * K + o_k[:, None]) * V + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0
        )
        inter += _dot(b_v, tl.trans(b_dh), PREC)
    b_dk = inter * tl.exp(tl.where(m_jk, b_gl[None, :] - b_gk, 0.0))

    intra = tl.zeros([BC, BK], dtype=tl.float32)
    for i_g in range(0, G):
        i_q = i_hk * G + i_g
        # diagonal: rows t (queries) >= columns s (keys), both in this sub-chunk
        dA = tl.zeros([BC, BC], dtype=tl.float32)
        for i_v in range(0, NV):
            o_v = i_v * BV + tl.arange(0, BV)
            mv = o_v < V
            b_do = _tile(do + i_q * V, tj, mj, H * V, o_v, mv)
            b_v = _tile(v + i_hk * V, tj, mj, HKV * V, o_v, mv)
            dA += _dot(b_do, tl.trans(b_v), PREC)
        b_q = _tile(q + i_q * K, tj, mj, H * K, o_k, mk).to(tl.float32)
        d = tl.where(m_jk[:, None, :] & causal[:, :, None], b_gk[:, None, :] - b_gk[None, :, :], float("-inf"))
        intra += tl.sum(tl.where(causal, dA, 0.0)[:, :, None] * b_q[:, None, :] * tl.exp(d), axis=0)
        # later sub-chunks i of the chunk, through the log decay at their first row
        for i in range(i_s + 1, n_sub):
            ri = t0 + i * BC
            ti = ri + tl.arange(0, BC)
            mi = ti < eos
            dA = tl.zeros([BC, BC], dtype=tl.float32)
            for i_v in range(0, NV):
                o_v = i_v * BV + tl.arange(0, BV)
                mv = o_v < V
                b_do = _tile(do + i_q * V, ti, mi, H * V, o_v, mv)
                b_v = _tile(v + i_hk * V, tj, mj, HKV * V, o_v, mv)
                dA += _dot(b_do, tl.trans(b_v), PREC)  # [t, s]
            b_r = tl.load(gc + (ri * HKV + i_hk) * K + o_k, mask=mk, other=0.0)
            b_qi = _tile(q + i_q * K, ti, mi, H * K, o_k, mk).to(tl.float32)
            b_gi = _tile(gc + i_hk * K, ti, mi, HKV * K, o_k, mk)
            b_qg = tl.where(mi[:, None], b_qi * tl.exp(tl.where(mi[:, None], b_gi - b_r[None, :], 0.0)), 0.0)
            intra += tl.exp(tl.where(mj[:, None], b_r[None, :] - b_gk, 0.0)) * _dot(
                tl.trans(dA).to(dt), b_qg.to(dt), PREC
            )
    b_dk += intra * scale
    tl.store(dk + (tj[:, None] * HKV + i_hk) * K + o_k[None, :], b_dk, mask=m_jk)


@triton.autotune(configs=configs([{}]), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _bwd_dv_kernel(
    q, k, gc, dh, do, dv, blocks, cu, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dv for one sub-chunk of one KV head.  grid (NV, NT * BT // BC, HKV)."""
    i_v, i_cs, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    NK: tl.constexpr = (K + BK - 1) // BK
    G: tl.constexpr = H // HKV
    i_c, i_s = i_cs // NC, i_cs % NC
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    n_sub = tl.cdiv(tl.minimum(eos - t0, BT), BC)
    tj = t0 + i_s * BC + tl.arange(0, BC)
    mj = tj < eos
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V
    dt = do.dtype.element_ty
    causal = tl.arange(0, BC)[:, None] >= tl.arange(0, BC)[None, :]
    last = tl.minimum(t0 + BT, eos) - 1

    b_dv = tl.zeros([BC, BV], dtype=tl.float32)
    for i_k in range(0, NK):  # inter-chunk: (k ⊙ exp(b_last − b)) dh_chunk
        o_k = i_k * BK + tl.arange(0, BK)
        mk = o_k < K
        m_jk = mj[:, None] & mk[None, :]
        b_gl = tl.load(gc + (last * HKV + i_hk) * K + o_k, mask=mk, other=0.0)
        b_k = _tile(k + i_hk * K, tj, mj, HKV * K, o_k, mk).to(tl.float32)
        b_gk = _tile(gc + i_hk * K, tj, mj, HKV * K, o_k, mk)
        b_kd = tl.where(m_jk, b_k * tl.exp(tl.where(m_jk, b_gl[None, :] - b_gk, 0.0)), 0.0)
        b_dh = tl.load(
            dh + ((i_c * HKV + i_hk) * K + o_k[:, None]) * V + o_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0
        )
        b_dv += _dot(b_kd.to(dt), b_dh, PREC)

    intra = tl.zeros([BC, BV], dtype=tl.float32)
    for i_g in range(0, G):
        i_q = i_hk * G + i_g
        A = tl.zeros([BC, BC], dtype=tl.float32)  # diagonal, [t, s]
        for i_k in range(0, NK):
            o_k = i_k * BK + tl.arange(0, BK)
            mk = o_k < K
            m_jk = mj[:, None] & mk[None, :]
            b_q = _tile(q + i_q * K, tj, mj, H * K, o_k, mk).to(tl.float32)
            b_k = _tile(k + i_hk * K, tj, mj, HKV * K, o_k, mk).to(tl.float32)
            b_g = _tile(gc + i_hk * K, tj, mj, HKV * K, o_k, mk)
            d = tl.where(m_jk[:, None, :] & causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf"))
            A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * tl.exp(d), axis=2)
        b_do = _tile(do + i_q * V, tj, mj, H * V, o_v, mv)
        intra += _dot(tl.trans(A).to(dt), b_do, PREC)
        for i in range(i_s + 1, n_sub):
            ri = t0 + i * BC
            ti = ri + tl.arange(0, BC)
            mi = ti < eos
            A = tl.zeros([BC, BC], dtype=tl.float32)
            for i_k in range(0, NK):
                o_k = i_k * BK + tl.arange(0, BK)
                mk = o_k < K
                b_r = tl.load(gc + (ri * HKV + i_hk) * K + o_k, mask=mk, other=0.0)
                b_qi = _tile(q + i_q * K, ti, mi, H * K, o_k, mk).to(tl.float32)
                b_gi = _tile(gc + i_hk * K, ti, mi, HKV * K, o_k, mk)
                b_k = _tile(k + i_hk * K, tj, mj, HKV * K, o_k, mk).to(tl.float32)
                b_gk = _tile(gc + i_hk * K, tj, mj, HKV * K, o_k, mk)
                b_qg = tl.where(mi[:, None], b_qi * tl.exp(tl.where(mi[:, None], b_gi - b_r[None, :], 0.0)), 0.0)
                b_kg = tl.where(mj[:, None], b_k * tl.exp(tl.where(mj[:, None], b_r[None, :] - b_gk, 0.0)), 0.0)
                A += _dot(b_qg.to(dt), tl.trans(b_kg.to(dt)), PREC)
            b_do = _tile(do + i_q * V, ti, mi, H * V, o_v, mv)
            intra += _dot(tl.trans(A).to(dt), b_do, PREC)
    b_dv += intra * scale
    tl.store(dv + (tj[:, None] * HKV + i_hk) * V + o_v[None, :], b_dv, mask=mj[:, None] & mv[None, :])


@triton.autotune(configs=configs([{}], warps=(2, 4), stages=(1,)), key=["H", "K", "V", "BT", "BK"])
@triton.jit
def _bwd_dg_kernel(
    q, k, dq, dk, ht, dht, dg, cu, first,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr,
):  # fmt: skip
    """dg[t] = Σ_{s >= t in sequence} (Σ_group q⊙dq − k⊙dk)[s]  +  Σ_v S_T ⊙ dS_T.  grid (NK, N * HKV)."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // HKV, i_nh % HKV
    G: tl.constexpr = H // HKV
    NV: tl.constexpr = (V + BV - 1) // BV
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nc = tl.load(first + i_n + 1) - tl.load(first + i_n)
    o_k = i_k * BK + tl.arange(0, BK)
    mk = o_k < K
    carry = tl.zeros([BK], dtype=tl.float32)
    if USE_DHT:
        for i_v in range(0, NV):
            o_v = i_v * BV + tl.arange(0, BV)
            off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
            m = mk[:, None] & (o_v < V)[None, :]
            carry += tl.sum(tl.load(ht + off, mask=m, other=0.0) * tl.load(dht + off, mask=m, other=0.0), axis=1)
    for c in range(0, nc):
        t0 = bos + (nc - 1 - c) * BT
        t = t0 + tl.arange(0, BT)
        mt = t < eos
        x = -_tile(k + i_h * K, t, mt, HKV * K, o_k, mk).to(tl.float32) * _tile(dk + i_h * K, t, mt, HKV * K, o_k, mk)
        for i_g in range(0, G):
            i_q = i_h * G + i_g
            x += _tile(q + i_q * K, t, mt, H * K, o_k, mk).to(tl.float32) * _tile(dq + i_q * K, t, mt, H * K, o_k, mk)
        total = tl.sum(x, axis=0)
        b_dg = x - tl.cumsum(x, axis=0) + (total + carry)[None, :]
        tl.store(dg + (t[:, None] * HKV + i_h) * K + o_k[None, :], b_dg, mask=mt[:, None] & mk[None, :])
        carry += total


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seqs:
    """Where the sequences and chunks of a flattened ``[B*T]`` token axis lie (all int32)."""

    cu: torch.Tensor  # [N + 1] sequence offsets
    blocks: torch.Tensor  # [NT, 2] (sequence, first token) per chunk
    first: torch.Tensor  # [N + 1] first chunk of each sequence
    n_seq: int
    n_chunks: int
    chunk: int
    offsets: tuple[int, ...]  # the same offsets on the host


def make_seqs(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk: int, device: torch.device) -> Seqs:
    """Tables of a padded batch (cached: no host-to-device copy per call) or of packed sequences."""
    if cu_seqlens is None:
        return _batch_seqs(B, T, chunk, device)
    return _seqs(tuple(seq_offsets(B, T, cu_seqlens)), chunk, device)


@lru_cache(maxsize=64)
def _batch_seqs(B: int, T: int, chunk: int, device: torch.device) -> Seqs:
    return _seqs(tuple(seq_offsets(B, T, None)), chunk, device)


def _seqs(offsets: tuple[int, ...], chunk: int, device: torch.device) -> Seqs:
    blocks, first = chunk_table(offsets, chunk, device)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    return Seqs(cu, blocks, first, len(offsets) - 1, blocks.shape[0], chunk, tuple(offsets))


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < SUB_CHUNK_SIZE or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of two >= {SUB_CHUNK_SIZE}, got {chunk!r}")


def chunk_cumsum(g: torch.Tensor, seqs: Seqs) -> torch.Tensor:
    """g [Ttot, Hkv, K] -> chunk-local cumulative sum, fp32 [Ttot, Hkv, K]."""
    Ttot, Hkv, K = g.shape
    gc = torch.empty(Ttot, Hkv, K, dtype=torch.float32, device=g.device)
    BK = block(K, 64)
    _cumsum_kernel[(triton.cdiv(K, BK), seqs.n_chunks, Hkv)](g, gc, seqs.blocks, seqs.cu, Hkv, K, seqs.chunk, BK)
    return gc


def chunk_states(k, v, gc, seqs: Seqs, h0: torch.Tensor | None, want_final: bool):
    """States at every chunk start h [NT, Hkv, K, V] (the inputs' dtype) and the fp32 final state."""
    Ttot, Hkv, K = k.shape
    V = v.shape[-1]
    h = torch.empty(seqs.n_chunks, Hkv, K, V, dtype=v.dtype, device=k.device)
    ht = torch.empty(seqs.n_seq, Hkv, K, V, dtype=torch.float32, device=k.device) if want_final else None
    BK, BV = block(K, BLOCK_K_MAX), block(V, BLOCK_V_MAX)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), seqs.n_seq * Hkv)
    _fwd_h_kernel[grid](
        k, v, gc, h, h0, ht, seqs.cu, seqs.first, Hkv, K, V, seqs.chunk, BK, BV,
        h0 is not None, want_final, dot_precision(v.dtype),
    )  # fmt: skip
    return h, ht


def gla_output(q, k, v, gc, h, seqs: Seqs, scale: float) -> torch.Tensor:
    """o [Ttot, H, V] in q.dtype from the chunk states (kernel ``_fwd_o``)."""
    Ttot, H, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    o = torch.empty(Ttot, H, V, dtype=q.dtype, device=q.device)
    BK, BV = block(K, BLOCK_K_MAX), block(V, BLOCK_V_MAX)
    grid = (triton.cdiv(V, BV), seqs.n_chunks * (seqs.chunk // SUB_CHUNK_SIZE), H)
    _fwd_o_kernel[grid](
        q, k, v, gc, h, o, seqs.blocks, seqs.cu, scale, H, Hkv, K, V, seqs.chunk, SUB_CHUNK_SIZE, BK, BV,
        dot_precision(v.dtype),
    )  # fmt: skip
    return o


def gla_backward(q, k, v, g, do, dht, ht, h0, seqs: Seqs, scale: float):
    """Gradients of q, k, v, g (their dtypes) and of the initial state (fp32, or None).

    q, do [Ttot, H, .]; k, g [Ttot, Hkv, K]; v [Ttot, Hkv, V]; dht, ht [N, Hkv, K, V] or None.
    """
    Ttot, H, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    BT, BC = seqs.chunk, SUB_CHUNK_SIZE
    BK, BV = block(K, BLOCK_K_MAX), block(V, BLOCK_V_MAX)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    prec = dot_precision(v.dtype)
    do = do.to(v.dtype).contiguous()
    gc = chunk_cumsum(g, seqs)
    h, _ = chunk_states(k, v, gc, seqs, h0, False)
    dh = torch.empty_like(h)
    dh0 = torch.empty(seqs.n_seq, Hkv, K, V, dtype=torch.float32, device=q.device) if h0 is not None else None
    _bwd_dh_kernel[(NK, NV, seqs.n_seq * Hkv)](
        q, do, gc, dh, dht, dh0, seqs.cu, seqs.first, scale, H, Hkv, K, V, BT, BK, BV,
        dht is not None, h0 is not None, prec,
    )  # fmt: skip
    n_sub = seqs.n_chunks * (BT // BC)
    dq = torch.empty(Ttot, H, K, dtype=torch.float32, device=q.device)
    dk = torch.empty(Ttot, Hkv, K, dtype=torch.float32, device=q.device)
    dv = torch.empty(Ttot, Hkv, V, dtype=torch.float32, device=q.device)
    dg = torch.empty(Ttot, Hkv, K, dtype=torch.float32, device=q.device)
    args = (seqs.blocks, seqs.cu, scale, H, Hkv, K, V, BT, BC, BK, BV, prec)
    _bwd_dq_kernel[(NK, n_sub, H)](k, v, gc, h, do, dq, *args)
    _bwd_dk_kernel[(NK, n_sub, Hkv)](q, v, gc, dh, do, dk, *args)
    _bwd_dv_kernel[(NV, n_sub, Hkv)](q, k, gc, dh, do, dv, *args)
    _bwd_dg_kernel[(NK, seqs.n_seq * Hkv)](
        q, k, dq, dk, ht, dht, dg, seqs.cu, seqs.first, H, Hkv, K, V, BT, BK, BV, dht is not None
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dh0


class GatedLinearAttention(torch.autograd.Function):
    """Autograd wrapper over the chunked kernels; inputs are flattened ``[B*T, heads, dim]``."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, output_final_state, seqs):
        gc = chunk_cumsum(g, seqs)
        h, ht = chunk_states(k, v, gc, seqs, h0, output_final_state)
        o = gla_output(q, k, v, gc, h, seqs, scale)
        ctx.save_for_backward(q, k, v, g, h0, ht)
        ctx.scale, ctx.seqs = scale, seqs
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, ht = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:2] + v.shape[-1:], dtype=q.dtype, device=q.device)
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dh0 = gla_backward(q, k, v, g, do, dht, ht, h0, ctx.seqs, ctx.scale)
        return dq, dk, dv, dg, None, dh0, None, None


def prepare_gla(q, k, v, g, initial_state, cu_seqlens, chunk_size):
    """Validate, flatten to ``[B*T, heads, dim]`` (contiguous) and build the chunk table."""
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens)
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        check_float(name, x)
    check_device(q, k, v, g, initial_state)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_chunk(chunk_size)
    B, T = q.shape[:2]
    seqs = make_seqs(B, T, cu_seqlens, chunk_size, q.device)
    flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g)]
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return flat, h0, seqs


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale·q_t S_t``.

    Shapes: q [B, T, H, K]; k, g [B, T, Hkv, K] (g is the log decay, <= 0); v [B, T, Hkv, V];
    initial_state [N, Hkv, K, V]; cu_seqlens [N + 1] int offsets of packed sequences (B == 1).
    Returns o [B, T, H, V] in q.dtype and the fp32 final state [N, Hkv, K, V] (or None).
    Differentiable in q, k, v, g and initial_state. ``scale`` defaults to K**-0.5.
    """
    (qf, kf, vf, gf), h0, seqs = prepare_gla(q, k, v, g, initial_state, cu_seqlens, chunk_size)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else float(scale)
    o, ht = GatedLinearAttention.apply(qf, kf, vf, gf, scale, h0, output_final_state, seqs)
    return o.reshape(B, T, H, v.shape[-1]), ht
