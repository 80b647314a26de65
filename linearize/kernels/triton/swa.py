"""Causal sliding-window softmax attention in Triton (flash-style): forward, backward, autograd.

Semantics are those of ``reference.sliding_window_attention_ref``: the Tq queries are the last Tq
positions of the Tk keys; query i (key position ``pos = Tk − Tq + i``) sees key j iff
``pos − window < j <= pos`` and ``key_mask[b, j]``; ``sinks`` ([H] or [H, M]) are logits that join
the softmax denominator and carry no value. Returns o and the fp32 log-sum-exp.

GQA without repeating K/V: one program owns one KV head and a block of ``BM`` *packed* query rows
``r = t·G + g`` (the G query heads of that KV head at query t, consecutive), so every key/value
tile it loads serves all G heads; for a decode step (Tq = 1) a block is simply the G heads.
Each program visits only the ``BN``-key tiles inside its rows' windows: O(T·window) work.

Decoding from a window buffer: pass the buffered keys plus the new ones as k, v (the new queries
are the last positions) with ``key_mask`` flagging empty slots. For one new token every slot within
the last ``window`` positions is visible and softmax ignores key order, so a ring buffer can be
passed in storage order as long as it holds at most ``window`` keys.

Backward (flash-attention 2): ``delta = rowsum(do ⊙ o) − dlse``; ``_bwd_dq`` per row block,
``_bwd_dkdv`` per key block over the rows that can see it; the sink gradient is
``−Σ exp(sink − lse)·delta`` (plain torch, [rows, H]).

Sequences are described by offset tables (``cu_q``, ``cu_k``), so the same kernels serve a padded
batch (every sequence Tq queries over Tk keys) and packed sequences (``cu_seqlens``, queries =
keys, used by the fused Liger kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..validate import check_swa_inputs
from ._utils import INTERPRET, _dot, check_device, check_float, chunk_table, configs, dot_precision, full_block

BLOCK_M = 16 if INTERPRET else 64
"""Packed query rows per program (flash-attention's usual 64 for head dims <= 128)."""
BLOCK_N = 16 if INTERPRET else 64
"""Keys per tile (forward; keys per program in the dk/dv kernel)."""
BLOCK_BWD = 16 if INTERPRET else 32
"""Backward inner tiles: keys per step of the dq kernel, packed rows per step of the dk/dv kernel
(64 spills registers at head dim 128: ``python -m linearize.kernels.triton.compile_check``)."""
LOG2E = math.log2(math.e)


@triton.jit
def _rows(blocks, i_b, cu_q, cu_k, G: tl.constexpr, BM: tl.constexpr):
    """Geometry of row block ``i_b``: the sequence's first query and key token (int64), its query
    and key lengths, the query offset in the keys, and the block's first local packed row (int32)."""
    n = tl.load(blocks + 2 * i_b)
    r_first = tl.load(blocks + 2 * i_b + 1).to(tl.int64)
    qs = tl.load(cu_q + n).to(tl.int64)
    Lq = tl.load(cu_q + n + 1) - tl.load(cu_q + n)
    ks = tl.load(cu_k + n).to(tl.int64)
    Lk = tl.load(cu_k + n + 1) - tl.load(cu_k + n)
    r_lo = (r_first - G * qs).to(tl.int32)  # local packed row of the block's first row
    return qs, Lq, ks, Lk, Lk - Lq, r_lo


@triton.jit
def _scores(b_q, k_seq, key_mask, ks, j, mj, pos, mr, o_d, md, scale_log2, window,
            ROW_K: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Scores (log2 units) of rows against local keys ``j`` and which of them are visible.
    ``k_seq`` points at the sequence's first key of this KV head (rows ROW_K elements apart); the
    sequence's key mask starts at ``key_mask + ks``."""
    b_k = tl.load(k_seq + j[:, None] * ROW_K + o_d[None, :], mask=mj[:, None] & md[None, :], other=0.0)  # [BN, BD]
    s = _dot(b_q, tl.trans(b_k), PREC) * scale_log2  # [BM, BN]
    valid = mr[:, None] & mj[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - window)
    if HAS_MASK:
        keep = tl.load(key_mask + ks + j, mask=mj, other=0) != 0
        valid = valid & keep[None, :]
    return s, valid, b_k


@triton.jit
def _window_softmax(b_q, k_seq, v_seq, key_mask, ks, lo, hi, pos, mr, scale_log2, window,
                    ROW_K: tl.constexpr, ROW_V: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BDV: tl.constexpr, o_d, md, o_dv, mdv,
                    HAS_MASK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Online softmax of rows (queries ``b_q`` at local key positions ``pos``) over the local keys
    [lo, hi): the unnormalised output [BM, BDV], running max and sum (log2 units)."""
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        mj = j < hi
        s, valid, b_k = _scores(b_q, k_seq, key_mask, ks, j, mj, pos, mr, o_d, md, scale_log2, window,
                                ROW_K, HAS_MASK, PREC)  # fmt: skip
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        b_v = tl.load(v_seq + j[:, None] * ROW_V + o_dv[None, :], mask=mj[:, None] & mdv[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(b_v.dtype), b_v, PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _window_finish(acc, m_i, l_i, b_s, HAS_SINK: tl.constexpr):
    """Add the sink log-sum-exp ``b_s`` (natural log, per row) to the denominator and normalise:
    o [BM, BDV] fp32 and lse [BM] (natural log; -inf and o = 0 where a row saw nothing)."""
    if HAS_SINK:
        b_s2 = b_s * 1.4426950408889634
        m_new = tl.maximum(m_i, b_s2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.exp2(b_s2 - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new
    seen = l_i > 0
    b_o = acc / tl.where(seen, l_i, 1.0)[:, None]
    b_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return b_o, b_lse


@triton.autotune(configs=configs([{}]), key=["H", "HKV", "D", "DV", "BM", "BN", "HAS_MASK", "HAS_SINK"])
@triton.jit
def _fwd_kernel(
    q, k, v, o, lse, key_mask, sink, blocks, cu_q, cu_k, scale_log2, window,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SINK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """grid (row blocks, HKV)."""
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    qs, Lq, ks, Lk, off, r_lo = _rows(blocks, i_b, cu_q, cu_k, G, BM)
    r = r_lo + tl.arange(0, BM)  # local packed rows t·G + g
    mr = r < G * Lq
    t, hg = r // G, r % G
    pos = t + off
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    md, mdv = o_d < D, o_dv < DV
    head0 = i_hk * G  # first query head of this KV head
    b_q = tl.load(q + (qs * H + head0) * D + ((t * H + hg) * D)[:, None] + o_d[None, :],
                  mask=mr[:, None] & md[None, :], other=0.0)  # fmt: skip
    t_first = r_lo // G
    t_last = tl.minimum((r_lo + BM - 1) // G, Lq - 1)
    lo = tl.maximum(t_first + off - window + 1, 0)
    hi = t_last + off + 1
    acc, m_i, l_i = _window_softmax(
        b_q, k + (ks * HKV + i_hk) * D, v + (ks * HKV + i_hk) * DV, key_mask, ks, lo, hi, pos, mr, scale_log2, window,
        HKV * D, HKV * DV, BM, BN, BDV, o_d, md, o_dv, mdv, HAS_MASK, PREC,
    )  # fmt: skip
    b_s = tl.zeros([BM], dtype=tl.float32)
    if HAS_SINK:
        b_s = tl.load(sink + head0 + hg, mask=mr, other=float("-inf"))
    b_o, b_lse = _window_finish(acc, m_i, l_i, b_s, HAS_SINK)
    tl.store(o + (qs * H + head0) * DV + ((t * H + hg) * DV)[:, None] + o_dv[None, :], b_o.to(o.dtype.element_ty),
             mask=mr[:, None] & mdv[None, :])  # fmt: skip
    tl.store(lse + qs * H + head0 + t * H + hg, b_lse, mask=mr)


@triton.autotune(configs=configs([{}]), key=["H", "HKV", "D", "DV", "BM", "BN", "HAS_MASK"])
@triton.jit
def _bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, key_mask, blocks, cu_q, cu_k, scale, scale_log2, window,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """grid (row blocks, HKV)."""
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    qs, Lq, ks, Lk, off, r_lo = _rows(blocks, i_b, cu_q, cu_k, G, BM)
    r = r_lo + tl.arange(0, BM)
    mr = r < G * Lq
    t, hg = r // G, r % G
    pos = t + off
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    md, mdv = o_d < D, o_dv < DV
    head0 = i_hk * G
    row = t * H + hg  # [BM] row index (token·H + head) relative to the sequence's first query, head0
    q_off = (qs * H + head0) * D + (row * D)[:, None] + o_d[None, :]
    b_q = tl.load(q + q_off, mask=mr[:, None] & md[None, :], other=0.0)
    b_do = tl.load(do + (qs * H + head0) * DV + (row * DV)[:, None] + o_dv[None, :],
                   mask=mr[:, None] & mdv[None, :], other=0.0)  # fmt: skip
    b_lse = tl.load(lse + qs * H + head0 + row, mask=mr, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta + qs * H + head0 + row, mask=mr, other=0.0)
    t_first = r_lo // G
    t_last = tl.minimum((r_lo + BM - 1) // G, Lq - 1)
    lo = tl.maximum(t_first + off - window + 1, 0)
    hi = t_last + off + 1
    k_seq = k + (ks * HKV + i_hk) * D
    v_seq = v + (ks * HKV + i_hk) * DV
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        mj = j < hi
        s, valid, b_k = _scores(b_q, k_seq, key_mask, ks, j, mj, pos, mr, o_d, md, scale_log2, window,
                                HKV * D, HAS_MASK, PREC)  # fmt: skip
        p = tl.where(valid, tl.exp2(tl.where(valid, s - b_lse[:, None], 0.0)), 0.0)
        b_v = tl.load(v_seq + j[:, None] * (HKV * DV) + o_dv[None, :], mask=mj[:, None] & mdv[None, :], other=0.0)
        dp = _dot(b_do, tl.trans(b_v), PREC)
        ds = p * (dp - b_delta[:, None])
        b_dq += _dot(ds.to(b_k.dtype), b_k, PREC)
    tl.store(dq + q_off, (b_dq * scale).to(dq.dtype.element_ty), mask=mr[:, None] & md[None, :])


@triton.autotune(configs=configs([{}]), key=["H", "HKV", "D", "DV", "BM", "BN", "HAS_MASK"])
@triton.jit
def _bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, key_mask, blocks, cu_q, cu_k, scale, scale_log2, window,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """grid (key blocks, HKV): dk, dv of BN keys from every packed row that can see them."""
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    n = tl.load(blocks + 2 * i_b)
    j_first = tl.load(blocks + 2 * i_b + 1).to(tl.int64)
    qs = tl.load(cu_q + n).to(tl.int64)
    Lq = tl.load(cu_q + n + 1) - tl.load(cu_q + n)
    ks = tl.load(cu_k + n).to(tl.int64)
    Lk = tl.load(cu_k + n + 1) - tl.load(cu_k + n)
    off = Lk - Lq
    j_lo = (j_first - ks).to(tl.int32)  # local position of the block's first key
    j = j_lo + tl.arange(0, BN)
    mj = j < Lk
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    md, mdv = o_d < D, o_dv < DV
    k_off = (ks * HKV + i_hk) * D + (j * (HKV * D))[:, None] + o_d[None, :]
    v_off = (ks * HKV + i_hk) * DV + (j * (HKV * DV))[:, None] + o_dv[None, :]
    b_k = tl.load(k + k_off, mask=mj[:, None] & md[None, :], other=0.0)
    b_v = tl.load(v + v_off, mask=mj[:, None] & mdv[None, :], other=0.0)
    keep = mj
    if HAS_MASK:
        keep = keep & (tl.load(key_mask + ks + j, mask=mj, other=0) != 0)
    j_hi = tl.minimum(j_lo + BN, Lk) - 1
    t_lo = tl.maximum(j_lo - off, 0)
    t_hi = tl.minimum(j_hi + window - 1 - off, Lq - 1)
    head0 = i_hk * G
    q_seq = q + (qs * H + head0) * D
    do_seq = do + (qs * H + head0) * DV
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for r0 in range(t_lo * G, (t_hi + 1) * G, BM):
        r = r0 + tl.arange(0, BM)
        mr = r < (t_hi + 1) * G
        t, hg = r // G, r % G
        pos = t + off
        row = t * H + hg
        b_q = tl.load(q_seq + (row * D)[:, None] + o_d[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        b_do = tl.load(do_seq + (row * DV)[:, None] + o_dv[None, :], mask=mr[:, None] & mdv[None, :], other=0.0)
        b_lse = tl.load(lse + qs * H + head0 + row, mask=mr, other=0.0) * 1.4426950408889634
        b_delta = tl.load(delta + qs * H + head0 + row, mask=mr, other=0.0)
        s = _dot(b_q, tl.trans(b_k), PREC) * scale_log2  # [BM, BN]
        valid = mr[:, None] & keep[None, :] & (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - window)
        p = tl.where(valid, tl.exp2(tl.where(valid, s - b_lse[:, None], 0.0)), 0.0)
        b_dv += _dot(tl.trans(p).to(b_do.dtype), b_do, PREC)
        dp = _dot(b_do, tl.trans(b_v), PREC)
        ds = p * (dp - b_delta[:, None])
        b_dk += _dot(tl.trans(ds).to(b_q.dtype), b_q, PREC)
    tl.store(dk + k_off, (b_dk * scale).to(dk.dtype.element_ty), mask=mj[:, None] & md[None, :])
    tl.store(dv + v_off, b_dv.to(dv.dtype.element_ty), mask=mj[:, None] & mdv[None, :])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Query/key sequence tables of a flattened problem (all int32 tensors)."""

    cu_q: torch.Tensor  # [N + 1] query offsets
    cu_k: torch.Tensor  # [N + 1] key offsets
    rows: torch.Tensor  # [NB, 2] (sequence, first global packed row) per block of BM packed rows
    keys: torch.Tensor  # [NK, 2] (sequence, first key) per block of BN keys
    window: int


@lru_cache(maxsize=64)
def make_windows(
    q_offsets: tuple[int, ...], k_offsets: tuple[int, ...], group: int, window: int, device: torch.device
) -> Windows:
    """Tables for sequences n with queries [q_offsets[n], q_offsets[n+1]) over keys [k_offsets[n], ...)
    (cached, so repeated shapes cost no host-to-device copy)."""
    rows, _ = chunk_table([group * x for x in q_offsets], BLOCK_M, device)
    keys, _ = chunk_table(k_offsets, BLOCK_N, device)
    cu_q = torch.tensor(q_offsets, dtype=torch.int32, device=device)
    cu_k = torch.tensor(k_offsets, dtype=torch.int32, device=device)
    return Windows(cu_q, cu_k, rows, keys, window)


def _dims(q, k, v):
    H, D = q.shape[1:]
    return H, k.shape[1], D, v.shape[-1], full_block(D), full_block(v.shape[-1])


def swa_forward(q, k, v, key_mask, sink, win: Windows, scale: float):
    """q [Tq_tot, H, D]; k [Tk_tot, Hkv, D]; v [Tk_tot, Hkv, DV]; key_mask [Tk_tot] int8 or None;
    sink [H] fp32 log-sum-exp of the sink logits or None. Returns o [Tq_tot, H, DV], lse fp32."""
    H, Hkv, D, DV, BD, BDV = _dims(q, k, v)
    o = torch.empty(q.shape[0], H, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], H, dtype=torch.float32, device=q.device)
    _fwd_kernel[(win.rows.shape[0], Hkv)](
        q, k, v, o, lse, key_mask, sink, win.rows, win.cu_q, win.cu_k, scale * LOG2E, win.window,
        H, Hkv, D, DV, BLOCK_M, BLOCK_N, BD, BDV, key_mask is not None, sink is not None, dot_precision(q.dtype),
    )  # fmt: skip
    return o, lse


def swa_backward(q, k, v, o, lse, do, dlse, key_mask, sink, win: Windows, scale: float):
    """Gradients of q, k, v (their dtypes) and of the sink log-sum-exp ([H] fp32, or None)."""
    H, Hkv, D, DV, BD, BDV = _dims(q, k, v)
    do = do.to(q.dtype).contiguous()
    delta = (do.float() * o.float()).sum(-1)  # [Tq_tot, H]
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    prec = dot_precision(q.dtype)
    common = (win.cu_q, win.cu_k, scale, scale * LOG2E, win.window, H, Hkv, D, DV)
    _bwd_dq_kernel[(win.rows.shape[0], Hkv)](  # BLOCK_M rows per program (the forward's row table)
        q, k, v, do, lse, delta, dq, key_mask, win.rows, *common, BLOCK_M, BLOCK_BWD, BD, BDV,
        key_mask is not None, prec,
    )  # fmt: skip
    _bwd_dkdv_kernel[(win.keys.shape[0], Hkv)](  # BLOCK_N keys per program (the key table)
        q, k, v, do, lse, delta, dk, dv, key_mask, win.keys, *common, BLOCK_BWD, BLOCK_N, BD, BDV,
        key_mask is not None, prec,
    )  # fmt: skip
    dsink = None
    if sink is not None:  # d lse/d sink = exp(sink − lse) per row
        p_sink = torch.where(torch.isinf(lse), torch.zeros_like(lse), (sink[None, :] - lse).exp())
        dsink = -(p_sink * delta).sum(0)
    return dq, dk, dv, dsink


class SlidingWindowAttention(torch.autograd.Function):
    """Autograd wrapper over the flattened kernels."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, sink, win, scale):
        o, lse = swa_forward(q, k, v, key_mask, sink, win, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_mask, sink)
        ctx.win, ctx.scale = win, scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, key_mask, sink = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dsink = swa_backward(q, k, v, o, lse, do, dlse, key_mask, sink, ctx.win, ctx.scale)
        return dq, dk, dv, None, dsink, None, None


def prepare_swa(q, k, v, window, key_mask, sinks):
    """Validate; flatten to ``[B*T, heads, dim]``; key mask as int8 [B*Tk]; sinks as their fp32
    log-sum-exp per head (differentiable: autograd carries the gradient back to ``sinks``)."""
    check_swa_inputs(q, k, v, window, key_mask, sinks)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
    check_device(q, k, v, key_mask, sinks)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    flat = [x.reshape(-1, *x.shape[2:]).contiguous() for x in (q, k, v)]
    mask = None if key_mask is None else key_mask.reshape(-1).to(torch.int8).contiguous()
    sink = None if sinks is None else torch.logsumexp(sinks.float().reshape(H, -1), dim=-1).contiguous()  # [H]
    return flat, mask, sink


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the last ``window`` keys, the query's own included.

    Shapes: q [B, Tq, H, D]; k [B, Tk, Hkv, D]; v [B, Tk, Hkv, DV] with Tk >= Tq (the queries are
    the last Tq positions); key_mask [B, Tk] bool (False = never attended); sinks [H] or [H, M]
    denominator-only logits. Returns o [B, Tq, H, DV] in q.dtype and lse [B, Tq, H] fp32 (-inf,
    with o = 0, where a query sees nothing). Differentiable in q, k, v, sinks (and through lse).
    ``scale`` defaults to D**-0.5.
    """
    (qf, kf, vf), mask, sink = prepare_swa(q, k, v, window, key_mask, sinks)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    q_offsets, k_offsets = tuple(b * Tq for b in range(B + 1)), tuple(b * Tk for b in range(B + 1))
    win = make_windows(q_offsets, k_offsets, H // k.shape[2], window, q.device)
    o, lse = SlidingWindowAttention.apply(qf, kf, vf, mask, sink, win, scale)
    return o.reshape(B, Tq, H, v.shape[-1]), lse.reshape(B, Tq, H)
