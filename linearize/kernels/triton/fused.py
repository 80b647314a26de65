"""Fused Liger attention in Triton: the sliding-window softmax branch and the gated linear branch
of a chunk of queries in one kernel, mixed before the single store.

    o = w · SWA(q, k, v; window)  +  (1 − w) · GLA(q_lin, k_lin, v, g)

The two branches share the values ``v`` and the query/key positions; ``q_lin``/``k_lin`` are the
feature-mapped queries/keys of the linear branch and ``q``/``k`` the RoPE'd ones of the window
branch (the mixer computes both from one projection; feature maps and gates have learned or
per-method forms, so they stay outside the kernel).

Pipeline: ``_cumsum`` and ``_fwd_h`` of ``gla.py`` (the sequential state pass), then one program
per (sub-chunk of 16 queries, query head) that computes the GLA output for all value columns
(inter- and intra-chunk), runs the window's online softmax over the keys those queries see, and
writes ``w·o_swa + (1 − w)·o_lin`` once, plus the window's lse (and ``o_swa`` when a backward
will follow). Compared with running the two ops and mixing, this saves a launch, re-reading q's
rows and v, and writing, re-reading and adding two [T, H, V] outputs.

Backward: the window branch's and the linear branch's Triton backward kernels, fed ``w·do`` and
``(1 − w)·do``; ``dv`` is their sum.

Packed sequences (``cu_seqlens``): the state restarts and the window stops at every boundary.
This op covers training and prefill without a cached window (queries = keys); decoding with a
window buffer uses ``sliding_window_attention`` and ``gla_decode_step``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validate import check_swa_inputs
from ._utils import block, configs, dot_precision, full_block
from .gla import BLOCK_K_MAX, CHUNK_SIZE, SUB_CHUNK_SIZE, _sub_chunk_out, _tile, chunk_cumsum, chunk_states
from .gla import gla_backward, prepare_gla
from .swa import BLOCK_N, LOG2E, _window_finish, _window_softmax, make_windows, swa_backward


@triton.autotune(configs=configs([{}]), key=["H", "HKV", "K", "D", "V", "BT", "BK", "BN", "HAS_MASK", "HAS_SINK"])
@triton.jit
def _fused_fwd_kernel(
    q_lin, k_lin, v, gc, h, q, k, o, o_swa, lse, key_mask, sink, blocks, cu,
    scale_lin, scale_log2, window, w_win,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, D: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SINK: tl.constexpr, STORE_SWA: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """grid (NT * BT // BC, H): one sub-chunk of queries of one head, all value columns."""
    i_cs, i_h = tl.program_id(0), tl.program_id(1)
    NC: tl.constexpr = BT // BC
    i_c, i_s = i_cs // NC, i_cs % NC
    i_hk = i_h // (H // HKV)
    n = tl.load(blocks + 2 * i_c)
    t0 = tl.load(blocks + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    o_v = tl.arange(0, BV)
    mv = o_v < V
    # linear branch
    acc_lin = _sub_chunk_out(q_lin, k_lin, v, gc, h, i_c, i_s, t0, eos, i_h, o_v, mv, H, HKV, K, V, BC, BK, BV, PREC)
    # window branch over the keys [max(bos, r0 − window + 1), min(r0 + BC, eos))
    r0 = t0 + i_s * BC
    ti = r0 + tl.arange(0, BC)
    mi = ti < eos
    o_d = tl.arange(0, BD)
    md = o_d < D
    b_q = _tile(q + i_h * D, ti, mi, H * D, o_d, md)
    pos = (ti - bos).to(tl.int32)  # positions inside the sequence
    p0 = (r0 - bos).to(tl.int32)
    lo = tl.maximum(p0 - window + 1, 0)
    hi = tl.minimum(p0 + BC, (eos - bos).to(tl.int32))
    acc, m_i, l_i = _window_softmax(
        b_q, k + (bos * HKV + i_hk) * D, v + (bos * HKV + i_hk) * V, key_mask, bos, lo, hi, pos, mi, scale_log2, window,
        HKV * D, HKV * V, BC, BN, BV, o_d, md, o_v, mv, HAS_MASK, PREC,
    )  # fmt: skip
    b_s = tl.zeros([BC], dtype=tl.float32)
    if HAS_SINK:
        b_s += tl.load(sink + i_h)
    b_win, b_lse = _window_finish(acc, m_i, l_i, b_s, HAS_SINK)
    b_o = w_win * b_win + (1.0 - w_win) * scale_lin * acc_lin
    off = (ti[:, None] * H + i_h) * V + o_v[None, :]
    m_out = mi[:, None] & mv[None, :]
    tl.store(o + off, b_o.to(o.dtype.element_ty), mask=m_out)
    tl.store(lse + ti * H + i_h, b_lse, mask=mi)
    if STORE_SWA:
        tl.store(o_swa + off, b_win.to(o_swa.dtype.element_ty), mask=m_out)


class FusedLigerAttention(torch.autograd.Function):
    """Autograd wrapper; inputs flattened to ``[B*T, heads, dim]``."""

    @staticmethod
    def forward(
        ctx, q_lin, k_lin, g, q, k, v, h0, key_mask, sink, seqs, window, w_win, scale_lin, scale_swa, want_final
    ):
        Ttot, H, K = q_lin.shape
        Hkv, D, V = k_lin.shape[1], q.shape[-1], v.shape[-1]
        gc = chunk_cumsum(g, seqs)
        h, ht = chunk_states(k_lin, v, gc, seqs, h0, want_final)
        store_swa = any(ctx.needs_input_grad)
        o = torch.empty(Ttot, H, V, dtype=q.dtype, device=q.device)
        o_swa = torch.empty_like(o) if store_swa else None
        lse = torch.empty(Ttot, H, dtype=torch.float32, device=q.device)
        grid = (seqs.n_chunks * (seqs.chunk // SUB_CHUNK_SIZE), H)
        _fused_fwd_kernel[grid](
            q_lin, k_lin, v, gc, h, q, k, o, o_swa, lse, key_mask, sink, seqs.blocks, seqs.cu,
            scale_lin, scale_swa * LOG2E, window, w_win,
            H, Hkv, K, D, V, seqs.chunk, SUB_CHUNK_SIZE, block(K, BLOCK_K_MAX), BLOCK_N, full_block(D), full_block(V),
            key_mask is not None, sink is not None, store_swa, dot_precision(q.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q_lin, k_lin, g, q, k, v, h0, ht, o_swa, lse, key_mask, sink)
        ctx.seqs, ctx.window, ctx.w_win, ctx.scale_lin, ctx.scale_swa = seqs, window, w_win, scale_lin, scale_swa
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q_lin, k_lin, g, q, k, v, h0, ht, o_swa, lse, key_mask, sink = ctx.saved_tensors
        seqs, w = ctx.seqs, ctx.w_win
        if do is None:
            do = torch.zeros_like(o_swa)
        do = do.float()
        dht = None if dht is None else dht.float().contiguous()
        dq_lin, dk_lin, dv_lin, dg, dh0 = gla_backward(
            q_lin, k_lin, v, g, (1.0 - w) * do, dht, ht, h0, seqs, ctx.scale_lin
        )
        win = make_windows(seqs.offsets, seqs.offsets, q.shape[1] // k.shape[1], ctx.window, q.device)
        dq, dk, dv_swa, dsink = swa_backward(q, k, v, o_swa, lse, w * do, None, key_mask, sink, win, ctx.scale_swa)
        dv = (dv_lin.float() + dv_swa.float()).to(v.dtype)
        return dq_lin, dk_lin, dg, dq, dk, dv, dh0, None, dsink, *([None] * 6)


def fused_liger_attention(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    window_weight: float = 0.5,
    scale_lin: float | None = None,
    scale_swa: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger attention ``o = w·SWA(q, k, v) + (1 − w)·GLA(q_lin, k_lin, v, g)`` in one pass.

    Shapes: q_lin [B, T, H, K] and k_lin [B, T, Hkv, K] (feature-mapped, no RoPE); g [B, T, Hkv, K]
    log decay (<= 0); q [B, T, H, D] and k [B, T, Hkv, D] (RoPE'd); v [B, T, Hkv, V] shared by both
    branches; initial_state [N, Hkv, K, V] fp32; cu_seqlens [N + 1] (B == 1); key_mask [B, T] bool
    (window branch only); sinks [H] or [H, M] (window branch denominator only).
    ``window_weight`` w is a float in [0, 1]; scales default to K**-0.5 and D**-0.5.
    Returns o [B, T, H, V] in q.dtype and the fp32 final state [N, Hkv, K, V] of the linear branch
    (or None). Differentiable in q_lin, k_lin, g, q, k, v, initial_state and sinks.
    """
    check_swa_inputs(q, k, v, window, key_mask, sinks)
    (ql, kl, vf, gf), h0, seqs = prepare_gla(q_lin, k_lin, v, g, initial_state, cu_seqlens, chunk_size)
    if q.shape[:3] != q_lin.shape[:3] or k.shape[:3] != k_lin.shape[:3]:
        raise ValueError(
            "the window branch's q, k must have the linear branch's batch, time and heads: "
            f"q {tuple(q.shape)} vs q_lin {tuple(q_lin.shape)}, k {tuple(k.shape)} vs k_lin {tuple(k_lin.shape)}"
        )
    if q.dtype != q_lin.dtype or k.dtype != q_lin.dtype:
        raise ValueError(f"q, k must share q_lin's dtype {q_lin.dtype}, got {q.dtype}, {k.dtype}")
    if isinstance(window_weight, torch.Tensor) or not 0.0 <= float(window_weight) <= 1.0:
        raise ValueError(f"window_weight must be a float in [0, 1], got {window_weight!r}")
    B, T, H, K = q_lin.shape
    D = q.shape[-1]
    qf = q.reshape(B * T, H, D).contiguous()
    kf = k.reshape(B * T, k.shape[2], D).contiguous()
    mask = None if key_mask is None else key_mask.reshape(-1).to(torch.int8).contiguous()
    sink = None if sinks is None else torch.logsumexp(sinks.float().reshape(H, -1), dim=-1).contiguous()  # [H]
    scale_lin = K**-0.5 if scale_lin is None else float(scale_lin)
    scale_swa = D**-0.5 if scale_swa is None else float(scale_swa)
    o, ht = FusedLigerAttention.apply(
        ql, kl, gf, qf, kf, vf, h0, mask, sink, seqs, window, float(window_weight), scale_lin, scale_swa,
        output_final_state,
    )  # fmt: skip
    return o.reshape(B, T, H, v.shape[-1]), ht
