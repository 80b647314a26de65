"""Memory-light autograd for the chunked PyTorch ops: save the inputs, recompute in the backward.

``chunked.py``'s forward, differentiated by autograd, keeps every intermediate of every segment
(per-chunk states, decay factors, the ``[c, c, K]`` diagonal tensors, window scores) until the
backward: 0.33 GB per converted SmolLM2 layer at T = 2048 (``benchmarks/results/memory_cpu.md``).
The Functions here run the very same forward (bit-identical outputs) under no grad, save only their
inputs (and the segment's output state), and in the backward recompute one segment's intermediates
at a time and apply hand-written gradients, as the Triton kernels do on GPU:

Gated linear attention, one segment ``(q, k, v, g, S_in) -> (o, S_out)`` in chunks (the forward's
sub-chunk factorisation with its own sub-chunk length, so only exponentials of sums <= 0 are taken):

    dv_j = Σ_{i >= j} A_ij do_i + (k_j ⊙ exp(B_C − b_j)) dS_end        (A: the forward's decayed q·k)
    dq_i = Σ_{j <= i} (do_i·v_j) exp(b_i − b_j) ⊙ k_j + exp(b_i) ⊙ (S_start do_iᵀ)
    dk_j = Σ_{i >= j} (do_i·v_j) exp(b_i − b_j) ⊙ q_i + exp(B_C − b_j) ⊙ (dS_end v_jᵀ)
    dS_start = exp(B_C) ⊙ dS_end + Σ_i (q_i ⊙ exp(b_i))ᵀ do_i          (a reverse scan over chunks)
    dg_s = Σ_{t >= s} (q_t ⊙ dq_t − k_t ⊙ dk_t) + Σ_v S_out ⊙ dS_out    (flash-linear-attention's dg)

The last line holds because everything depends on g through the cumulative sums A_t only
(``o_t = (q_t ⊙ e^{A_t})·(S_in + Σ_{j<=t} (k_j ⊙ e^{−A_j}) v_jᵀ)``, ``S_out = e^{A_T} ⊙ (...)``).

One decay per head (``chunked._gla_chunked_scalar``, g [.., 1]): the same gradients in matmuls, with
``E = exp(D)`` the forward's masked [C, C] decay and ``A = (Q Kᵀ) ⊙ E``:

    dV = Aᵀ dO + (K ⊙ e^{B_C − b}) dS_end          dP = (dO Vᵀ) ⊙ E
    dQ = dP K + e^b ⊙ (dO S_startᵀ)                dK = dPᵀ Q + e^{B_C − b} ⊙ (V dS_endᵀ)
    dS_start = e^{B_C} dS_end + (Q ⊙ e^b)ᵀ dO      dg_s = Σ_K (the per-key dg_s above)

Sliding-window attention, one segment: flash-attention's backward over the window band, with the
probabilities recomputed from the inputs and the saved lse; ``lse`` is an output with its own gradient (the hybrid
layer merges it with the sink tokens'), and the learned sink logits get ``Σ p_sink (dlse − D)``.

Each segment is its own Function, so peak memory is one segment's intermediates plus the inputs.
The backwards are not differentiable again (``once_differentiable``: a double backward raises).
Measured (``benchmarks/results/memory_cpu.md``): a LoRA step of the default SmolLM2 recipe at
T = 2048 keeps 3.45 GB for the backward instead of 9.48 GB (peak RSS 11.8 -> 7.3 GB, tokens/s x1.07), and forward +
backward of the GLA op takes 330 ms instead of 455 ms (window op 110 vs 113 ms; 1 CPU thread).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .chunked import (
    _chunk_starts,
    _gla_chunked,
    _gla_chunked_scalar,
    _scalar_chunks,
    _scalar_decay_pieces,
    _scalar_unchunk,
    _swa_blocks,
)

# ------------------------------------------------------------------------------------------------
# Outputs kept for a recomputing caller
# ------------------------------------------------------------------------------------------------


class _Outputs(threading.local):
    """Where the segments' outputs go (``record``) or come from (``replay``) in this thread."""

    store: deque | None = None
    replay: bool = False


_OUTPUTS = _Outputs()


@contextlib.contextmanager
def reused_outputs(store: deque, replay: bool) -> Iterator[None]:
    """Within the block every memory-light segment (GLA and window) appends its outputs to ``store``
    (``replay`` False), or takes them from ``store`` in order instead of computing them (``replay``
    True): a caller that recomputes its forward in the backward (``mixers.hybrid``'s mixer recompute,
    through ``torch.utils.checkpoint``) keeps only these outputs and the inputs it recomputes from,
    and the expensive forwards of the ops are not run twice. The segments' saved tensors, and so their
    backward, are those of the recomputed inputs; the replayed outputs are the first run's, bit for
    bit. A replayed segment whose inputs differ in shape from the recorded one raises."""
    before = (_OUTPUTS.store, _OUTPUTS.replay)
    _OUTPUTS.store, _OUTPUTS.replay = store, replay
    try:
        yield
    finally:
        _OUTPUTS.store, _OUTPUTS.replay = before


def _forward(fn, *args):
    """``fn(*args)`` (a tuple of tensors), recorded or replayed as ``reused_outputs`` says."""
    store = _OUTPUTS.store
    if store is None:
        return fn(*args)
    shapes = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
    if _OUTPUTS.replay:
        if not store:
            raise RuntimeError(f"{fn.__name__}: more segments replayed than recorded")
        recorded, outs = store.popleft()
        if recorded != shapes:
            raise RuntimeError(f"{fn.__name__}: replayed with inputs {shapes}, recorded with {recorded}")
        return outs
    outs = fn(*args)
    store.append((shapes, tuple(o.detach() for o in outs)))
    return outs


# ------------------------------------------------------------------------------------------------
# Gated linear attention
# ------------------------------------------------------------------------------------------------


def _chunk_end_grads(state, dfinal, total, into):
    """The reverse of ``chunked._chunk_starts``: the gradient of the state at each chunk's end
    [B, Hkv, n, K, V] and of the initial state [B, Hkv, K, V], from the final state's gradient
    (None: zero), the chunks' log decays ``total`` [B, Hkv, n, 1 or K] and ``into`` [B, Hkv, n, K, V],
    what each chunk's reads of its start state send back."""
    chunk_decay = total.exp()[..., None]  # [B, Hkv, n, 1 or K, 1]
    ds = dfinal.float() if dfinal is not None else torch.zeros_like(state)
    ends = [None] * into.shape[2]
    for i in range(into.shape[2] - 1, -1, -1):
        ends[i] = ds
        ds = ds * chunk_decay[:, :, i] + into[:, :, i]
    return torch.stack(ends, dim=2), ds


BACKWARD_SUB_CHUNK_SIZE = 8
"""Sub-chunk length c of the GLA backward (it recomputes everything, so it need not be the forward's
16): its exact diagonal blocks cost O(T·c·K), the factored off-diagonal ones O(T·C·K / c). At the
default recipe's shapes (T 2048, C 64, K 128, H 9, Hkv 3, 1 thread, load 5.3) the backward took
235-264 ms CPU with c = 8 and 286-339 ms with c = 16 (``benchmarks/light_ops.py --time-ops``)."""


class _GLASegment(torch.autograd.Function):
    """``chunked._gla_chunked`` (``scalar`` False: a decay per key dimension, gf [B, T, Hkv, K]) or
    ``chunked._gla_chunked_scalar`` (``scalar`` True: one decay per head, gf [B, T, Hkv, 1]) with a
    recomputing backward. qf [B, T, Hkv, G, K] (already scaled), kf [B, T, Hkv, K], vf [B, T, Hkv, V],
    state [B, Hkv, K, V], all fp32."""

    @staticmethod
    def forward(ctx, qf, kf, vf, gf, state, chunk_size, scalar):
        o, final = _forward(_gla_chunked_scalar if scalar else _gla_chunked, qf, kf, vf, gf, state, chunk_size)
        ctx.chunk_size, ctx.scalar = chunk_size, scalar
        ctx.save_for_backward(qf, kf, vf, gf, state, final)
        return o, final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dfinal):
        qf, kf, vf, gf, state, final = ctx.saved_tensors
        grad_fn = _gla_scalar_segment_backward if ctx.scalar else _gla_segment_backward
        grads = grad_fn(qf, kf, vf, gf, state, final, do, dfinal, ctx.chunk_size)
        return (*grads, None, None)


def gla_chunked(qf, kf, vf, gf, state, chunk_size):
    """Drop-in for ``chunked._gla_chunked`` that saves only its inputs for the backward."""
    return _GLASegment.apply(qf, kf, vf, gf, state, chunk_size, False)


def gla_chunked_checkpointed(qf, kf, vf, gf, state, chunk_size):
    """The same through ``torch.utils.checkpoint`` (autograd's backward of a recomputed forward)."""
    return checkpoint(_gla_chunked, qf, kf, vf, gf, state, chunk_size, use_reentrant=False)


def _gla_segment_backward(qf, kf, vf, gf, state, final, do, dfinal, chunk_size):
    """Gradients of ``_gla_chunked`` w.r.t. qf, kf, vf, gf and state, recomputing its intermediates."""
    B, T, Hkv, G, K = qf.shape
    V = vf.shape[-1]
    C = chunk_size
    c = math.gcd(C, BACKWARD_SUB_CHUNK_SIZE)  # the backward's own sub-chunks (it recomputes everything)
    n, ns = -(-T // C), C // c
    pad = n * C - T
    qc = F.pad(qf, (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, G, K).permute(0, 3, 4, 1, 2, 5)  # [B, Hkv, G, n, C, K]
    doc = F.pad(do.float(), (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, G, V).permute(0, 3, 4, 1, 2, 5)  # [B, Hkv, G, n, C, V]
    kc, gc = (F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, K).permute(0, 3, 1, 2, 4) for x in (kf, gf))  # [B, Hkv, n, C, K]
    vc = F.pad(vf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, V).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, V]

    # The forward's decay pieces (the same expressions, so the same numbers).
    dev = gc.device
    g_sub = gc.reshape(B, Hkv, n, ns, c, K)  # [B, Hkv, n, ns, c, K]
    b_loc = g_sub.cumsum(dim=4)  # [B, Hkv, n, ns, c, K]
    total = b_loc[..., -1, :]  # [B, Hkv, n, ns, K]
    rest = F.pad(g_sub.flip(4).cumsum(4).flip(4)[..., 1:, :], (0, 0, 0, 1))  # [B, Hkv, n, ns, c, K]
    sub = torch.arange(ns, device=dev)
    strictly = (sub[:, None, None] < sub[None, None, :]) & (sub[None, None, :] < sub[None, :, None])  # [J, I, M]
    between = torch.einsum("jim,bhnmk->bhnijk", strictly.to(gc.dtype), total)  # [B, Hkv, n, ns(I), ns(J), K]
    after = torch.einsum("jm,bhnmk->bhnjk", (sub[:, None] < sub[None, :]).to(gc.dtype), total)  # [B, Hkv, n, ns, K]

    # Off-diagonal sub-chunk blocks.
    q_sub = qc.reshape(B, Hkv, G, n, ns, c, K)
    do_sub = doc.reshape(B, Hkv, G, n, ns, c, V)
    e_q = b_loc.exp()[:, :, None]  # [B, Hkv, 1, n, ns, c, K]
    q_off = q_sub * e_q  # [B, Hkv, G, n, ns, c, K]
    k_log = rest[:, :, :, None] + between[..., None, :]  # [B, Hkv, n, ns(I), ns(J), c, K]
    earlier = sub[None, :] < sub[:, None]  # [I, J]
    e_off = k_log.masked_fill_(~earlier[:, :, None, None], float("-inf")).reshape(B, Hkv, n, ns, C, K).exp_()  # [B, Hkv, n, ns, C, K]
    k_off = kc[:, :, :, None] * e_off  # [B, Hkv, n, ns, C, K]
    a_off = torch.einsum("bhgnick,bhnijk->bhgnicj", q_off, k_off)  # [B, Hkv, G, n, ns, c, C]
    da_off = torch.einsum("bhgnicv,bhnjv->bhgnicj", do_sub, vc)  # [B, Hkv, G, n, ns, c, C]
    dv = torch.einsum("bhgnicj,bhgnicv->bhnjv", a_off, do_sub)  # [B, Hkv, n, C, V]
    dq_sub = torch.einsum("bhgnicj,bhnijk->bhgnick", da_off, k_off) * e_q  # [B, Hkv, G, n, ns, c, K]
    dk = torch.einsum("bhgnicj,bhgnick->bhnijk", da_off, q_off).mul_(e_off).sum(dim=3)  # [B, Hkv, n, C, K]
    del a_off, da_off, k_off, q_off, e_off, k_log

    # Diagonal sub-chunk blocks: exact per key dimension.
    pos = torch.arange(c, device=dev)
    span = (pos[None, :, None] < pos[None, None, :]) & (pos[None, None, :] <= pos[:, None, None])  # [i, j, s]
    d_log = torch.einsum("ijs,bhnask->bhnaijk", span.to(gc.dtype), g_sub)  # [B, Hkv, n, ns, c, c, K]
    causal = pos[None, :] <= pos[:, None]
    e_diag = d_log.masked_fill_(~causal[..., None], float("-inf")).exp_()  # [B, Hkv, n, ns, c, c, K]
    k_sub = kc.reshape(B, Hkv, n, ns, 1, c, K)
    kd = e_diag * k_sub  # [B, Hkv, n, ns, c, c, K]
    v_sub = vc.reshape(B, Hkv, n, ns, c, V)
    a_diag = torch.einsum("bhgnsik,bhnsijk->bhgnsij", q_sub, kd)  # [B, Hkv, G, n, ns, c, c]
    da_diag = torch.einsum("bhgnsiv,bhnsjv->bhgnsij", do_sub, v_sub)  # [B, Hkv, G, n, ns, c, c]
    dv = dv + torch.einsum("bhgnsij,bhgnsiv->bhnsjv", a_diag, do_sub).reshape(B, Hkv, n, C, V)
    dq_sub = dq_sub + torch.einsum("bhgnsij,bhnsijk->bhgnsik", da_diag, kd)
    qda = torch.einsum("bhgnsij,bhgnsik->bhnsijk", da_diag, q_sub)  # [B, Hkv, n, ns, c, c, K]
    dk = dk + qda.mul_(e_diag).sum(dim=4).reshape(B, Hkv, n, C, K)
    del kd, e_diag, qda, a_diag, da_diag
    dqc = dq_sub.reshape(B, Hkv, G, n, C, K)

    # Inter-chunk: the states at the chunk starts again, then a reverse scan for their gradients.
    e_end = (rest + after[..., None, :]).reshape(B, Hkv, n, C, K).exp()  # [B, Hkv, n, C, K] after j, to the chunk end
    k_end = kc * e_end
    update = torch.einsum("bhnck,bhncv->bhnkv", k_end, vc)  # [B, Hkv, n, K, V]
    chunk_total = total.sum(dim=3)  # [B, Hkv, n, K] each chunk's log decay
    start_states, _ = _chunk_starts(state, chunk_total, update)  # [B, Hkv, n, K, V]
    e_start = gc.cumsum(dim=3).exp()[:, :, None]  # [B, Hkv, 1, n, C, K]
    q_start = qc * e_start  # [B, Hkv, G, n, C, K]
    dqc = dqc + torch.einsum("bhgncv,bhnkv->bhgnck", doc, start_states) * e_start
    into = torch.einsum("bhgnck,bhgncv->bhnkv", q_start, doc)  # [B, Hkv, n, K, V] each chunk's reads of its start state
    end_grads, dstate = _chunk_end_grads(state, dfinal, chunk_total, into)  # [B, Hkv, n, K, V], [B, Hkv, K, V]
    dk = dk + torch.einsum("bhncv,bhnkv->bhnck", vc, end_grads) * e_end
    dv = dv + torch.einsum("bhnck,bhnkv->bhncv", k_end, end_grads)

    # Decays: reverse cumulative sum of q ⊙ dq − k ⊙ dk, plus the final state's term at the end.
    da = ((qc * dqc).sum(dim=2) - kc * dk).reshape(B, Hkv, n * C, K)  # [B, Hkv, Tp, K]
    if dfinal is not None:
        da[:, :, -1] += (final * dfinal.float()).sum(dim=-1)
    dgc = da.flip(2).cumsum(2).flip(2)  # [B, Hkv, Tp, K]

    dq = dqc.permute(0, 3, 4, 1, 2, 5).reshape(B, n * C, Hkv, G, K)[:, :T]  # [B, T, Hkv, G, K]
    dk = dk.permute(0, 2, 3, 1, 4).reshape(B, n * C, Hkv, K)[:, :T]  # [B, T, Hkv, K]
    dv = dv.permute(0, 2, 3, 1, 4).reshape(B, n * C, Hkv, V)[:, :T]  # [B, T, Hkv, V]
    dg = dgc.permute(0, 2, 1, 3)[:, :T]  # [B, T, Hkv, K]
    return dq, dk, dv, dg, dstate


def gla_chunked_scalar(qf, kf, vf, gf, state, chunk_size):
    """Drop-in for ``chunked._gla_chunked_scalar`` that saves only its inputs for the backward."""
    return _GLASegment.apply(qf, kf, vf, gf, state, chunk_size, True)


def _gla_scalar_segment_backward(qf, kf, vf, gf, state, final, do, dfinal, chunk_size):
    """Gradients of ``_gla_chunked_scalar`` w.r.t. qf, kf, vf, gf ([B, T, Hkv, 1]) and state,
    recomputing its intermediates (the forward's expressions, so the same numbers)."""
    B, T, Hkv, G, K = qf.shape
    V = vf.shape[-1]
    qc, kc, vc, gc = _scalar_chunks(qf, kf, vf, gf, chunk_size)  # [B, Hkv, n, G*C | C, .]
    n, C = gc.shape[2], gc.shape[3]
    pad = n * C - T
    doc = F.pad(do.float(), (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, G, V).permute(0, 3, 1, 4, 2, 5)
    doc = doc.reshape(B, Hkv, n, G * C, V)  # [B, Hkv, n, G*C, V]
    b, to_end, total, decay = _scalar_decay_pieces(gc)
    e_q = b.exp().repeat(1, 1, 1, G)[..., None]  # [B, Hkv, n, G*C, 1]
    e_k = to_end.exp()[..., None]  # [B, Hkv, n, C, 1]
    k_end = kc * e_k  # [B, Hkv, n, C, K]
    starts, _ = _chunk_starts(state, total, torch.matmul(k_end.transpose(-1, -2), vc))  # [B, Hkv, n, K, V]
    q_start = qc * e_q  # [B, Hkv, n, G*C, K]

    # Reverse scan: the gradient of the state at each chunk's end.
    into = torch.matmul(q_start.transpose(-1, -2), doc)  # [B, Hkv, n, K, V] each chunk's reads of its start
    end_grads, dstate = _chunk_end_grads(state, dfinal, total, into)  # [B, Hkv, n, K, V], [B, Hkv, K, V]

    decay_g = decay[:, :, :, None]  # [B, Hkv, n, 1, C, C] broadcast over the G query groups
    a = (torch.matmul(qc, kc.transpose(-1, -2)).unflatten(3, (G, -1)) * decay_g).flatten(3, 4)  # [B, Hkv, n, G*C, C]
    dp = (torch.matmul(doc, vc.transpose(-1, -2)).unflatten(3, (G, -1)) * decay_g).flatten(3, 4)  # [B, Hkv, n, G*C, C]
    dv = torch.matmul(a.transpose(-1, -2), doc).add_(torch.matmul(k_end, end_grads))  # [B, Hkv, n, C, V]
    dqc = torch.matmul(dp, kc).add_(torch.matmul(doc, starts.transpose(-1, -2)).mul_(e_q))  # [B, Hkv, n, G*C, K]
    dkc = torch.matmul(dp.transpose(-1, -2), qc).add_(torch.matmul(vc, end_grads.transpose(-1, -2)).mul_(e_k))
    del a, dp

    # Decays: reverse cumulative sum over time of Σ_K (q ⊙ dq − k ⊙ dk), plus the final state's term.
    da = (qc * dqc).sum(dim=-1).unflatten(3, (G, C)).sum(dim=3) - (kc * dkc).sum(dim=-1)  # [B, Hkv, n, C]
    da = da.reshape(B, Hkv, n * C)
    if dfinal is not None:
        da[:, :, -1] += (final * dfinal.float()).sum(dim=(-2, -1))
    dg = da.flip(2).cumsum(2).flip(2).permute(0, 2, 1)[:, :T, :, None]  # [B, T, Hkv, 1]

    dq = _scalar_unchunk(dqc, T, G)  # [B, T, Hkv, G, K]
    dk = dkc.permute(0, 2, 3, 1, 4).reshape(B, n * C, Hkv, K)[:, :T]  # [B, T, Hkv, K]
    dv = dv.permute(0, 2, 3, 1, 4).reshape(B, n * C, Hkv, V)[:, :T]  # [B, T, Hkv, V]
    return dq, dk, dv, dg, dstate


# ------------------------------------------------------------------------------------------------
# Sliding-window attention
# ------------------------------------------------------------------------------------------------

BACKWARD_BLOCK_SIZE = 32
"""Query block length of the window backward (its rows' lse is saved, so it need not use the
forward's blocks): a block of bq queries multiplies against bq + window - 1 keys, so shorter blocks
waste less of each product on keys outside the band. 32 measured best of 16/32/64/128 at window
128, D 64, H 9, Hkv 3 on 2 shared CPU cores (``benchmarks/light_ops.py --time-ops``)."""


class _SWASegment(torch.autograd.Function):
    """``chunked._swa_blocks`` with a recomputing flash-attention style backward."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, key_mask, window, scale, block_size):
        o, lse = _forward(_swa_blocks, q, k, v, window, scale, key_mask, sinks, block_size)
        ctx.args = (window, scale, block_size)
        ctx.save_for_backward(q, k, v, sinks, key_mask, lse)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, sinks, key_mask, lse = ctx.saved_tensors
        dq, dk, dv, dsinks = _swa_segment_backward(q, k, v, sinks, key_mask, lse, *ctx.args, do, dlse)
        return dq, dk, dv, dsinks, None, None, None, None


def swa_blocks(q, k, v, window, scale, key_mask, sinks, block_size):
    """Drop-in for ``chunked._swa_blocks`` that saves only its inputs for the backward."""
    if q.shape[1] == 0:
        return _swa_blocks(q, k, v, window, scale, key_mask, sinks, block_size)
    return _SWASegment.apply(q, k, v, sinks, key_mask, window, scale, block_size)


def swa_blocks_checkpointed(q, k, v, window, scale, key_mask, sinks, block_size):
    """The same through ``torch.utils.checkpoint`` (autograd's backward of a recomputed forward)."""
    return checkpoint(_swa_blocks, q, k, v, window, scale, key_mask, sinks, block_size, use_reentrant=False)


def _swa_segment_backward(q, k, v, sinks, key_mask, lse, window, scale, block_size, do, dlse):
    """Gradients of ``_swa_blocks`` w.r.t. q, k, v and sinks: the forward's query blocks and the keys
    each can see, probabilities recomputed from the saved lse. The [.., bq, L] tensors are laid out
    [B, Hkv, n, G * bq, L] so every product is a plain batched matmul."""
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    W = min(window, Tk)
    first = Tk - Tq - (W - 1)
    front = max(0, -first)
    bq = min(Tq, BACKWARD_BLOCK_SIZE)  # the backward's own query blocks: it needs only each row's lse
    n = -(-Tq // bq)
    back = n * bq - Tq
    L = bq + W - 1

    keep = torch.ones(B, Tk, dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    keep = F.pad(keep[:, max(0, first) :], (front, back), value=False)  # [B, n*bq + W - 1]
    kf, vf = (F.pad(x[:, max(0, first) :].float(), (0, 0, 0, 0, front, back)) for x in (k, v))  # [B, n*bq + W - 1, Hkv, .]
    k_blocks = kf.unfold(1, L, bq).permute(0, 2, 1, 3, 4)  # [B, Hkv, n, D, L]
    v_blocks = vf.unfold(1, L, bq).permute(0, 2, 1, 3, 4)  # [B, Hkv, n, Dv, L]
    keep_blocks = keep.unfold(1, L, bq)  # [B, n, L]

    def blocks(x, last):  # [B, Tq, H, last] -> [B, Hkv, n, G * bq, last]
        x = F.pad(x.float(), (0, 0, 0, 0, 0, back)).reshape(B, n, bq, Hkv, group, last)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, Hkv, n, group * bq, last)

    qf = blocks(q, D) * scale  # [B, Hkv, n, G*bq, D]
    do_b = blocks(do, Dv)  # [B, Hkv, n, G*bq, Dv]
    # lse per row; rows past Tq and rows that see nothing get +inf, so their probabilities are 0.
    lse_rows = torch.where(torch.isneginf(lse), float("inf"), lse)
    lse_b = blocks(lse_rows[..., None], 1)  # [B, Hkv, n, G*bq, 1]
    if back:
        lse_b = lse_b.reshape(B, Hkv, n, group, bq)
        lse_b[:, :, -1, :, bq - back :] = float("inf")
        lse_b = lse_b.reshape(B, Hkv, n, group * bq, 1)
    dlse_b = blocks(dlse[..., None], 1)  # [B, Hkv, n, G*bq, 1]

    rows = torch.arange(bq, device=q.device)[:, None]
    cols = torch.arange(L, device=q.device)[None, :]
    band = (cols >= rows) & (cols < rows + W)  # [bq, L]
    visible = band & keep_blocks[:, None, :, None, :]  # [B, 1, n, bq, L]
    p = torch.matmul(qf, k_blocks).reshape(B, Hkv, n, group, bq, L)  # [B, Hkv, n, G, bq, L] logits
    p = p.masked_fill_(~visible[:, :, :, None], float("-inf")).sub_(lse_b.reshape(B, Hkv, n, group, bq, 1))
    p = p.exp_().reshape(B, Hkv, n, group * bq, L)  # probabilities, 0 where masked

    dp = torch.matmul(do_b, v_blocks)  # [B, Hkv, n, G*bq, L]
    dv_blocks = torch.matmul(p.transpose(-1, -2), do_b)  # [B, Hkv, n, L, Dv]
    delta = (p * dp).sum(dim=-1, keepdim=True)  # [B, Hkv, n, G*bq, 1] = do · o
    ds = dp.sub_(delta - dlse_b).mul_(p)  # [B, Hkv, n, G*bq, L] gradient of the logits
    del p
    dq = torch.matmul(ds, k_blocks.transpose(-1, -2)) * scale  # [B, Hkv, n, G*bq, D]
    dk_blocks = torch.matmul(ds.transpose(-1, -2), qf)  # [B, Hkv, n, L, D]
    del ds
    dkf = torch.ops.aten.unfold_backward(dk_blocks.permute(0, 2, 1, 4, 3), list(kf.shape), 1, L, bq)  # [B, n*bq + W - 1, Hkv, D]
    dvf = torch.ops.aten.unfold_backward(dv_blocks.permute(0, 2, 1, 4, 3), list(vf.shape), 1, L, bq)
    dk, dv = (F.pad(x[:, front : x.shape[1] - back], (0, 0, 0, 0, max(0, first), 0)) for x in (dkf, dvf))  # [B, Tk, Hkv, .]

    dsinks = None
    if sinks is not None:
        sink_logits = sinks.float().reshape(Hkv, 1, group, 1, -1)  # [Hkv, 1, G, 1, M]
        p_sink = (sink_logits - lse_b.reshape(B, Hkv, n, group, bq, 1)).exp()  # [B, Hkv, n, G, bq, M]
        weight = (dlse_b - delta).reshape(B, Hkv, n, group, bq, 1)
        dsinks = (p_sink * weight).sum(dim=(0, 2, 4)).reshape(sinks.shape).to(sinks.dtype)

    dq = dq.reshape(B, Hkv, n, group, bq, D).permute(0, 2, 4, 1, 3, 5).reshape(B, n * bq, H, D)[:, :Tq]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks
