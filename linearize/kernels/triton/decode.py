"""Recurrent decode step of gated linear attention in Triton: 1..few new tokens, state in place.

    S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t ,   o_t = scale · q_t S_t

One program per (value block, batch × KV head) holds its [K, BV] slice of the fp32 state in
registers across the new tokens and serves every query head of the KV head (GQA), so the state is
read and written exactly once per call. Inference only: there is no backward (use
``gated_linear_attention`` with ``initial_state`` to differentiate through a continuation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validate import check_gla_inputs
from ._utils import INTERPRET, block, check_device, check_float, full_block

BLOCK_V_MAX = 32
"""Value columns per program on GPUs: a [K, 32] fp32 state slice stays in registers for K <= 256."""


@triton.jit
def _decode_kernel(
    q, k, v, g, state, o, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """grid (NV, B * HKV)."""
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
    for t in range(0, T):
        row = row0 + t
        b_k = tl.load(k + (row * HKV + i_hk) * K + o_k, mask=mk, other=0.0).to(tl.float32)
        b_g = tl.load(g + (row * HKV + i_hk) * K + o_k, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (row * HKV + i_hk) * V + o_v, mask=mv, other=0.0).to(tl.float32)
        S = S * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        for i_g in range(0, G):
            i_h = i_hk * G + i_g
            b_q = tl.load(q + (row * H + i_h) * K + o_k, mask=mk, other=0.0).to(tl.float32)
            b_o = tl.sum(b_q[:, None] * S, axis=0) * scale
            tl.store(o + (row * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=mv)
    tl.store(state + s_off, S, mask=m_kv)


def gla_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Advance the recurrent state by the new tokens and return their outputs; ``state`` is updated
    in place.

    Shapes: q [B, Tn, H, K]; k, g [B, Tn, Hkv, K]; v [B, Tn, Hkv, V]; state [B, Hkv, K, V] fp32,
    contiguous. Returns o [B, Tn, H, V] in q.dtype. ``scale`` defaults to K**-0.5. Not differentiable.
    """
    check_gla_inputs(q, k, v, g, state, None)
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        check_float(name, x)
    check_device(q, k, v, g, state)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous float32 tensor (it is updated in place), got {state.dtype}"
            f"{'' if state.is_contiguous() else ', non-contiguous'}"
        )
    if state.device != q.device:
        raise ValueError(f"state must be on {q.device} like q, got {state.device}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, state)):
        raise ValueError(
            "gla_decode_step has no backward; call it under torch.no_grad() (decoding), or use "
            "gated_linear_attention(..., initial_state=state) to differentiate"
        )
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    BV = block(V, BLOCK_V_MAX)
    _decode_kernel[(triton.cdiv(V, BV), B * Hkv)](
        q, k, v, g, state, o, scale, T, H, Hkv, K, V, full_block(K), BV, num_warps=1 if INTERPRET else 4
    )
    return o
