"""Chunked PyTorch implementations of the ops: the fast path everywhere without a GPU.

Plain torch ops only, so autograd gives every gradient. Semantics are exactly those of
``reference.py`` (the tests pin that down); layout is time-first ``[B, T, H, D]``; all arithmetic
is fp32 and outputs come back in ``q.dtype``.

Gated linear attention (chunk size C, sub-chunk size c, after flash-linear-attention's chunk GLA):
within a chunk, with ``b_t`` the cumulative log decay from the chunk start (``b_t <= 0``, falling),

    o_i = q_i·diag(exp(b_i))·S_start  +  Σ_{j <= i in chunk} (q_i ⊙ exp(b_i − b_j))·k_j  v_j

Only exponentials of non-positive numbers are ever taken: the inter-chunk term uses ``exp(b_i)``;
the intra-chunk term between different sub-chunks I > J factors through the log decay ``r_I`` at
the end of sub-chunk I − 1 as ``(q_i ⊙ exp(b_i − r_I))·(k_j ⊙ exp(r_I − b_j))``; inside a
diagonal sub-chunk it is computed exactly per key dimension (a ``[c, c, K]`` tensor, masked in log
space before the exponential). Each log decay is formed as a sum of the g's it spans, never as a
difference of two long cumulative sums, so fp32 keeps its precision after a very strong gate.
Memory is O(T·C) per head, never O(T²).

One decay per head (``g`` [B, T, Hkv, 1], e.g. Lizard's learned gate): the decay is a scalar per
token and head, so the chunk form needs no sub-chunks and no ``[c, c, K]`` tensors, only matmuls
(Mamba-2's SSD, flash-linear-attention's "simple GLA"), ``_gla_chunked_scalar``: with ``b_i`` the
chunk's cumulative log decay to i and ``D_ij = Σ_{j<s<=i} g_s`` (a running sum over a ``[C, C]``
mask, never a difference of cumulative sums),

    A = (Q Kᵀ) ⊙ exp(D) (causal),  O = A V + (Q ⊙ e^b) S_start,  S_end = e^{B_C} S_start + (K ⊙ e^{B_C − b})ᵀ V.

Sliding-window attention: queries in blocks of ``bq``; each block gathers only the
``bq + window − 1`` keys it can see (a strided view), so memory is O(T·window).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64
"""Chunk length C of the chunked GLA form (flash-linear-attention's chunk GLA uses 64)."""
SUB_CHUNK_SIZE = 16
"""Secondary chunk length c inside a chunk (flash-linear-attention's intra-chunk BC = 16)."""
RECURRENT_MAX_T = 4
"""Sequences this short (decode steps) run the plain recurrence instead of padding to a chunk, and
the window op one dense score block instead of padded query blocks. The one cut-off: a converted
layer also advances its cached state with the decode op for steps of at most this many tokens."""
SWA_BLOCK_SIZE = 64
"""Minimum query block length of the sliding-window op (blocks are at least ``window`` long)."""
SEGMENT_TOKENS = 512
"""Long sequences are processed in segments of this many tokens (the GLA state, or the window's
keys, carried across), so the intermediates stay cache-sized: exact, and on 2 CPU cores (SmolLM2
shapes, H=9, Hkv=3, D=64, fp32) GLA at T=16K took 265 ms instead of 575 ms and the window op 107 ms
instead of 219 ms (``benchmarks/results/README.md``)."""
LIGHT_BACKWARD = True
"""When a backward will follow (grad enabled, an input requires grad), the GLA and window segments run
as ``chunked_backward``'s autograd Functions: the same forward, only the inputs saved, gradients
recomputed per segment by a hand-written backward (SmolLM2 default recipe at T = 2048: peak RSS of a
LoRA step 11.5 -> 7.1-7.4 GB, ``benchmarks/results/memory_cpu.md``). False: autograd over the
forward, keeping every intermediate."""
SCALAR_DECAY = True
"""A decay given once per head (``g`` [B, T, Hkv, 1]) takes the scalar-decay chunk form
(``_gla_chunked_scalar``, plain matmuls). False: it is expanded to every key dimension and takes the
general per-key form (the same numbers to fp32 rounding; for before/after comparisons and tests).
Default recipe's shapes (T 2048, q [1, T, 9, 128], v [1, T, 3, 65]), forward + memory-light
backward, 1 thread of a loaded 2-core CPU: 75-83 ms instead of 359-386 ms
(``benchmarks/light_ops.py --time-ops --decay per-head``, ``benchmarks/results/memory_cpu.md``)."""


# ------------------------------------------------------------------------------------------------
# Gated linear attention
# ------------------------------------------------------------------------------------------------


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

    Same contract as ``reference.gated_linear_attention_ref``: q [B, T, H, K]; k [B, T, Hkv, K];
    g [B, T, Hkv, K], or [B, T, Hkv, 1] for one decay per head (the scalar-decay form, see
    ``SCALAR_DECAY``); v [B, T, Hkv, V]; initial_state [N, Hkv, K, V]; cu_seqlens [N + 1] (B == 1,
    state restarts at each boundary). Returns o [B, T, H, V] in q.dtype and the fp32 final state (or
    None). g's gradient has g's shape (summed over K for a per-head decay).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    if g.shape[-1] not in (1, K):
        raise ValueError(f"g's last dim must be 1 (one decay per head) or K={K}, got g {tuple(g.shape)}")
    if g.shape[-1] != K and not SCALAR_DECAY:
        g = g.expand(*g.shape[:-1], K)  # the general per-key form (autograd sums g's gradient back)
    if cu_seqlens is None:
        o, final = _gla_batched(q, k, v, g, scale, initial_state, chunk_size)
    else:
        seq, pos, t_max = _packed_index(cu_seqlens, T)
        n_seq = cu_seqlens.numel() - 1
        padded = [_to_padded(x, seq, pos, n_seq, t_max) for x in (q, k, v, g)]  # each [N, Tmax, ., .]
        o_pad, final = _gla_batched(*padded, scale, initial_state, chunk_size)
        o = o_pad[seq, pos].unsqueeze(0)  # [1, T, H, V]
    return o.to(q.dtype), (final if output_final_state else None)


def _light_backward(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate an op on ``tensors`` and the memory-light backward is on."""
    return LIGHT_BACKWARD and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _packed_index(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each packed token: its sequence index and its position inside that sequence."""
    offsets = cu_seqlens.to(device="cpu", dtype=torch.long)
    lengths = offsets[1:] - offsets[:-1]  # [N]
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [T]
    pos = torch.arange(T) - offsets[seq]  # [T]
    t_max = int(lengths.max()) if lengths.numel() else 0
    device = cu_seqlens.device
    return seq.to(device), pos.to(device), t_max


def _to_padded(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, n_seq: int, t_max: int) -> torch.Tensor:
    """[1, T, ...] packed -> [N, Tmax, ...] zero padded at the end (zero k and g keep the state)."""
    out = x.new_zeros(n_seq, t_max, *x.shape[2:])  # [N, Tmax, ., .]
    out[seq, pos] = x[0]
    return out


def _gla_batched(q, k, v, g, scale, initial_state, chunk_size):
    """GLA over a batch of equal-length sequences; o [B, T, H, V] fp32, final state [B, Hkv, K, V]."""
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    group = H // Hkv
    qf = (q.float() if scale == 1.0 else q.float() * scale).reshape(B, T, Hkv, group, K)  # [B, T, Hkv, G, K]
    kf, vf, gf = k.float(), v.float(), g.float()
    if initial_state is None:
        state = q.new_zeros(B, Hkv, K, V, dtype=torch.float32)  # [B, Hkv, K, V]
    else:
        state = initial_state.float()
    if T == 0:
        return q.new_zeros(B, 0, H, V, dtype=torch.float32), state
    if T <= RECURRENT_MAX_T:
        o, state = _gla_recurrent(qf, kf, vf, gf, state)  # a per-head gf [.., 1] broadcasts
    else:
        segment = max(chunk_size, SEGMENT_TOKENS // chunk_size * chunk_size)
        per_head = gf.shape[-1] == 1 and K > 1  # K == 1: both forms are the same; keep the general one
        run = _gla_chunked_scalar if per_head else _gla_chunked
        if _light_backward(qf, kf, vf, gf, state):  # inputs saved only, recomputed in the backward
            from .chunked_backward import gla_chunked, gla_chunked_scalar

            run = gla_chunked_scalar if per_head else gla_chunked
        outs = []
        # The state carries over: the same sums, in cache-sized pieces. ``split`` rather than slices:
        # its backward is one concatenation, where each slice's would fill a zero tensor of the full length.
        pieces = zip(*(x.split(segment, dim=1) for x in (qf, kf, vf, gf)))
        for q_s, k_s, v_s, g_s in pieces:
            o, state = run(q_s, k_s, v_s, g_s, state, chunk_size)
            outs.append(o)
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.reshape(B, T, H, V), state


def _gla_recurrent(qf, kf, vf, gf, state):
    """One token at a time (decode). qf [B, T, Hkv, G, K]; returns o [B, T, Hkv, G, V]."""
    outs = []
    for t in range(qf.shape[1]):
        state = state * gf[:, t].exp()[..., None] + kf[:, t, :, :, None] * vf[:, t, :, None, :]  # [B, Hkv, K, V]
        outs.append(torch.einsum("bhgk,bhkv->bhgv", qf[:, t], state))  # [B, Hkv, G, V]
    return torch.stack(outs, dim=1), state


def _gla_chunked(qf, kf, vf, gf, state, chunk_size):
    """Chunked form. qf [B, T, Hkv, G, K] (already scaled); returns o [B, T, Hkv, G, V]."""
    B, T, Hkv, G, K = qf.shape
    V = vf.shape[-1]
    C = chunk_size
    c = math.gcd(C, SUB_CHUNK_SIZE)  # sub-chunk length, divides C
    n, ns = -(-T // C), C // c
    pad = n * C - T
    # Zero padding at the end: g = 0 (no decay) and k = 0 leave the final state untouched.
    qc = F.pad(qf, (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, G, K).permute(0, 3, 4, 1, 2, 5)  # [B, Hkv, G, n, C, K]
    kc, gc = (F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, K).permute(0, 3, 1, 2, 4) for x in (kf, gf))  # [B, Hkv, n, C, K]
    vc = F.pad(vf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, V).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, V]
    # Every log decay below is a sum of the g's it spans (never a difference of two cumulative sums,
    # which loses fp32 precision after a strong gate), and only exponentials of sums <= 0 are taken.
    dev = gc.device
    g_sub = gc.reshape(B, Hkv, n, ns, c, K)  # [B, Hkv, n, ns, c, K]
    b_loc = g_sub.cumsum(dim=4)  # [B, Hkv, n, ns, c, K] from the sub-chunk start to i, inclusive
    total = b_loc[..., -1, :]  # [B, Hkv, n, ns, K] one sub-chunk's log decay
    rest = F.pad(g_sub.flip(4).cumsum(4).flip(4)[..., 1:, :], (0, 0, 0, 1))  # [B, Hkv, n, ns, c, K] after j, to the sub-chunk end
    sub = torch.arange(ns, device=dev)
    strictly = (sub[:, None, None] < sub[None, None, :]) & (sub[None, None, :] < sub[None, :, None])  # [J, I, M]: J < M < I
    between = torch.einsum("jim,bhnmk->bhnijk", strictly.to(gc.dtype), total)  # [B, Hkv, n, ns(I), ns(J), K]
    after = torch.einsum("jm,bhnmk->bhnjk", (sub[:, None] < sub[None, :]).to(gc.dtype), total)  # [B, Hkv, n, ns, K]

    # Intra-chunk, between sub-chunks J < I, factored through the end of sub-chunk I - 1.
    q_sub = qc.reshape(B, Hkv, G, n, ns, c, K)
    q_off = q_sub * b_loc.exp()[:, :, None]  # [B, Hkv, G, n, ns, c, K]
    k_log = rest[:, :, :, None] + between[..., None, :]  # [B, Hkv, n, ns(I), ns(J), c, K]
    earlier = sub[None, :] < sub[:, None]  # [I, J]
    k_log = k_log.masked_fill(~earlier[:, :, None, None], float("-inf")).reshape(B, Hkv, n, ns, C, K)
    k_off = kc[:, :, :, None] * k_log.exp()  # [B, Hkv, n, ns, C, K]
    a_off = torch.einsum("bhgnick,bhnijk->bhgnicj", q_off, k_off)  # [B, Hkv, G, n, ns, c, C]
    o_intra = torch.einsum("bhgnicj,bhnjv->bhgnicv", a_off, vc)  # [B, Hkv, G, n, ns, c, V]

    # Intra-chunk, inside a sub-chunk: exact per key dimension, masked in log space.
    pos = torch.arange(c, device=dev)
    span = (pos[None, :, None] < pos[None, None, :]) & (pos[None, None, :] <= pos[:, None, None])  # [i, j, s]: j < s <= i
    d_log = torch.einsum("ijs,bhnask->bhnaijk", span.to(gc.dtype), g_sub)  # [B, Hkv, n, ns, c(i), c(j), K]
    causal = pos[None, :] <= pos[:, None]  # [i, j]
    kd = d_log.masked_fill(~causal[..., None], float("-inf")).exp() * kc.reshape(B, Hkv, n, ns, 1, c, K)  # [B, Hkv, n, ns, c, c, K]
    a_diag = torch.einsum("bhgnsik,bhnsijk->bhgnsij", q_sub, kd)  # [B, Hkv, G, n, ns, c, c]
    o_intra = o_intra + torch.einsum("bhgnsij,bhnsjv->bhgnsiv", a_diag, vc.reshape(B, Hkv, n, ns, c, V))
    o_intra = o_intra.reshape(B, Hkv, G, n, C, V)

    # Inter-chunk: a sequential scan over chunk states.
    to_end = (rest + after[..., None, :]).reshape(B, Hkv, n, C, K)  # [B, Hkv, n, C, K] after j, to the chunk end
    update = torch.einsum("bhnck,bhncv->bhnkv", kc * to_end.exp(), vc)  # [B, Hkv, n, K, V]
    start_states, state = _chunk_starts(state, total.sum(dim=3), update)  # [B, Hkv, n, K, V]
    from_start = gc.cumsum(dim=3)  # [B, Hkv, n, C, K] chunk start to i, inclusive
    o_inter = torch.einsum("bhgnck,bhnkv->bhgncv", qc * from_start.exp()[:, :, None], start_states)  # [B, Hkv, G, n, C, V]

    o = (o_inter + o_intra).permute(0, 3, 4, 1, 2, 5).reshape(B, n * C, Hkv, G, V)[:, :T]  # [B, T, Hkv, G, V]
    return o, state


def _scalar_decay_pieces(gc: torch.Tensor):
    """The log decays of the scalar-decay chunk form from gc [..., C] (one chunk's g's per row):
    b (chunk start to i, inclusive), to_end (after j to the chunk end, ``B_C − b_j``), total
    (``B_C``, [..., 1]) and the masked intra-chunk decay factors ``exp(D)`` [..., C, C] with
    ``D_ij = Σ_{j<s<=i} g_s`` for i >= j and 0 above the diagonal. Each is a running sum of the
    g's it spans (no difference of cumulative sums), and only exponentials of sums <= 0 are taken."""
    C = gc.shape[-1]
    pos = torch.arange(C, device=gc.device)
    below = pos[None, :] < pos[:, None]  # [i, j]: j < i
    b = gc.cumsum(dim=-1)  # [..., C]
    total = b[..., -1:]  # [..., 1]
    to_end = F.pad(gc.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # [..., C] Σ_{s>j} g_s
    d_log = (gc[..., :, None] * below).cumsum(dim=-2)  # [..., C(i), C(j)] Σ_{j<s<=i} g_s (0 for i <= j)
    causal = ~below.T  # [i, j]: j <= i
    decay = d_log.masked_fill_(~causal, float("-inf")).exp_()  # [..., C, C]
    return b, to_end, total, decay


def _scalar_chunks(qf, kf, vf, gf, C):
    """The scalar-decay form's chunk layout: q [B, Hkv, n, G*C, K] (rows g-major), k [B, Hkv, n, C, K],
    v [B, Hkv, n, C, V], g [B, Hkv, n, C], zero padded at the end (g = 0, k = 0 keep the state)."""
    B, T, Hkv, G, K = qf.shape
    V = vf.shape[-1]
    n = -(-T // C)
    pad = n * C - T
    qc = F.pad(qf, (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, G, K).permute(0, 3, 1, 4, 2, 5)
    qc = qc.reshape(B, Hkv, n, G * C, K)  # [B, Hkv, n, G*C, K]
    kc = F.pad(kf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, K).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, K]
    vc = F.pad(vf, (0, 0, 0, 0, 0, pad)).reshape(B, n, C, Hkv, V).permute(0, 3, 1, 2, 4)  # [B, Hkv, n, C, V]
    gc = F.pad(gf[..., 0], (0, 0, 0, pad)).reshape(B, n, C, Hkv).permute(0, 3, 1, 2)  # [B, Hkv, n, C]
    return qc, kc, vc, gc


def _scalar_unchunk(x, T, G):
    """[B, Hkv, n, G*C, X] (the layout of ``_scalar_chunks``' q) -> [B, T, Hkv, G, X]."""
    B, Hkv, n, GC, X = x.shape
    C = GC // G
    return x.reshape(B, Hkv, n, G, C, X).permute(0, 2, 4, 1, 3, 5).reshape(B, n * C, Hkv, G, X)[:, :T]


def _chunk_starts(state, total, update):
    """The state at each chunk's start: a sequential scan. state [B, Hkv, K, V]; total [B, Hkv, n, 1]
    (or [B, Hkv, n, K]) chunk log decays; update [B, Hkv, n, K, V]. Returns the starts
    [B, Hkv, n, K, V] and the final state."""
    chunk_decay = total.exp()[..., None]  # [B, Hkv, n, 1 or K, 1]
    starts = []
    for i in range(update.shape[2]):
        starts.append(state)
        state = state * chunk_decay[:, :, i] + update[:, :, i]  # [B, Hkv, K, V]
    return torch.stack(starts, dim=2), state


def _gla_chunked_scalar(qf, kf, vf, gf, state, chunk_size):
    """Chunked form for one decay per head: qf [B, T, Hkv, G, K] (already scaled), kf [B, T, Hkv, K],
    vf [B, T, Hkv, V], gf [B, T, Hkv, 1], state [B, Hkv, K, V], all fp32. Returns o [B, T, Hkv, G, V]
    and the final state. Only matmuls per chunk; no sub-chunks."""
    G = qf.shape[3]
    C = chunk_size
    qc, kc, vc, gc = _scalar_chunks(qf, kf, vf, gf, C)
    b, to_end, total, decay = _scalar_decay_pieces(gc)
    e_q = b.exp().repeat(1, 1, 1, G)[..., None]  # [B, Hkv, n, G*C, 1] rows g-major, like qc
    update = torch.matmul((kc * to_end.exp()[..., None]).transpose(-1, -2), vc)  # [B, Hkv, n, K, V]
    starts, state = _chunk_starts(state, total, update)
    a = torch.matmul(qc, kc.transpose(-1, -2))  # [B, Hkv, n, G*C, C]
    a = (a.unflatten(3, (G, -1)) * decay[:, :, :, None]).flatten(3, 4)  # ⊙ exp(D), causal
    o = torch.matmul(a, vc).add_(torch.matmul(qc * e_q, starts))  # [B, Hkv, n, G*C, V]
    return _scalar_unchunk(o, qf.shape[1], G), state


# ------------------------------------------------------------------------------------------------
# Sliding-window attention
# ------------------------------------------------------------------------------------------------


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    block_size: int = SWA_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the last ``window`` keys, the query's own included.

    Same contract as ``reference.sliding_window_attention_ref``: q [B, Tq, H, D] are the last Tq
    positions of k, v [B, Tk, Hkv, D]; key_mask [B, Tk] bool; sinks [H] or [H, M] join the
    denominator only. Returns o [B, Tq, H, D] (q.dtype) and lse [B, Tq, H] fp32 (-inf and a zero
    output where a query sees nothing).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    Tq, Tk = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if 0 < Tq <= RECURRENT_MAX_T:  # decode steps
        return _swa_few(q, k, v, window, scale, key_mask, sinks)
    segment = max(SEGMENT_TOKENS, block_size, window)
    run = _swa_blocks
    if _light_backward(q, k, v, sinks):  # inputs saved only, recomputed in the backward
        from .chunked_backward import swa_blocks as run
    if Tq <= segment:
        return run(q, k, v, window, scale, key_mask, sinks, block_size)
    outs, lses = [], []
    for a in range(0, Tq, segment):  # each segment of queries with the keys its windows reach
        b = min(Tq, a + segment)
        end = Tk - Tq + b
        start = max(0, end - (b - a) - (window - 1))
        mask = None if key_mask is None else key_mask[:, start:end]
        o, lse = run(q[:, a:b], k[:, start:end], v[:, start:end], window, scale, mask, sinks, block_size)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _window_softmax(logits: torch.Tensor, sinks, Hkv: int, group: int):
    """Softmax over the last dim of masked logits [B, Hkv, G, ..., L] with sink logits in the
    denominator. Returns p (unnormalised), the denominator (1 where a row sees nothing, so o = 0)
    and lse (-inf there)."""
    m = logits.amax(dim=-1)  # [B, Hkv, G, ...]
    sink_logits = None
    if sinks is not None:
        sink_logits = sinks.float().reshape(Hkv, group, *([1] * (logits.dim() - 4)), -1)  # [Hkv, G, 1.., M]
        m = torch.maximum(m, sink_logits.amax(dim=-1))
    m = m.detach()  # a shift only: the softmax does not depend on it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = (logits - m[..., None]).exp()  # [B, Hkv, G, ..., L]
    denom = p.sum(dim=-1)
    if sink_logits is not None:
        denom = denom + (sink_logits - m[..., None]).exp().sum(dim=-1)
    seen = denom > 0
    denom = torch.where(seen, denom, torch.ones_like(denom))  # rows that see nothing: o = 0, no NaN
    lse = torch.where(seen, m + denom.log(), torch.full_like(denom, float("-inf")))
    return p, denom, lse


def _swa_few(q, k, v, window, scale, key_mask, sinks):
    """Few queries (decode steps): one dense [Tq, L] score block over the L keys they can see."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    L = min(Tk, Tq + window - 1)
    kf, vf = k[:, Tk - L :].float(), v[:, Tk - L :].float()  # [B, L, Hkv, .]
    qf = q.float().reshape(B, Tq, Hkv, group, D) * scale  # [B, Tq, Hkv, G, D]
    logits = torch.einsum("bqhgd,blhd->bhgql", qf, kf)  # [B, Hkv, G, Tq, L]
    pos_q = torch.arange(L - Tq, L, device=q.device)[:, None]
    pos_k = torch.arange(L, device=q.device)[None, :]
    visible = (pos_k <= pos_q) & (pos_k > pos_q - window)  # [Tq, L]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, None, Tk - L :].bool()  # [B, 1, 1, Tq, L]
    p, denom, lse = _window_softmax(logits.masked_fill(~visible, float("-inf")), sinks, Hkv, group)
    o = torch.einsum("bhgql,blhv->bqhgv", p, vf) / denom.permute(0, 3, 1, 2)[..., None]  # [B, Tq, Hkv, G, Dv]
    return o.reshape(B, Tq, H, -1).to(q.dtype), lse.permute(0, 3, 1, 2).reshape(B, Tq, H)


def _swa_blocks(q, k, v, window, scale, key_mask, sinks, block_size):
    """``sliding_window_attention`` over all query blocks at once."""
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    if Tq == 0:
        return q.new_zeros(B, 0, H, Dv), q.new_zeros(B, 0, H, dtype=torch.float32)
    W = min(window, Tk)  # a window at least as long as the keys sees every earlier key
    first = Tk - Tq - (W - 1)  # key index the first query's window starts at (may be < 0)
    front = max(0, -first)
    bq = min(Tq, max(block_size, W))  # query block length
    n = -(-Tq // bq)
    back = n * bq - Tq
    L = bq + W - 1  # keys one block can see

    # Keys from the first visible one, padded so query i (local) sees keys [i, i + W - 1].
    keep = torch.ones(B, Tk, dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    keep = F.pad(keep[:, max(0, first) :], (front, back), value=False)  # [B, n*bq + W - 1]
    kf, vf = (F.pad(x[:, max(0, first) :].float(), (0, 0, 0, 0, front, back)) for x in (k, v))  # [B, n*bq + W - 1, Hkv, .]
    k_blocks = kf.unfold(1, L, bq)  # [B, n, Hkv, D, L]
    v_blocks = vf.unfold(1, L, bq)  # [B, n, Hkv, Dv, L]
    keep_blocks = keep.unfold(1, L, bq)  # [B, n, L]
    qf = (F.pad(q.float(), (0, 0, 0, 0, 0, back)) * scale).reshape(B, n, bq, Hkv, group, D)  # [B, n, bq, Hkv, G, D]

    logits = torch.einsum("bnrhgd,bnhdl->bhgnrl", qf, k_blocks)  # [B, Hkv, G, n, bq, L]
    rows = torch.arange(bq, device=q.device)[:, None]
    cols = torch.arange(L, device=q.device)[None, :]
    band = (cols >= rows) & (cols < rows + W)  # [bq, L]
    visible = band & keep_blocks[:, None, None, :, None, :]  # [B, 1, 1, n, bq, L]
    p, denom, lse = _window_softmax(logits.masked_fill(~visible, float("-inf")), sinks, Hkv, group)
    o = torch.einsum("bhgnrl,bnhvl->bhgnrv", p, v_blocks) / denom[..., None]  # [B, Hkv, G, n, bq, Dv]

    o = o.permute(0, 3, 4, 1, 2, 5).reshape(B, n * bq, H, Dv)[:, :Tq]  # [B, Tq, H, Dv]
    lse = lse.permute(0, 3, 4, 1, 2).reshape(B, n * bq, H)[:, :Tq]  # [B, Tq, H]
    return o.to(q.dtype), lse


# ------------------------------------------------------------------------------------------------
# Single-token decode steps (no autograd): a handful of ops, the recurrent state updated in place
# ------------------------------------------------------------------------------------------------


def gla_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
              scale: float = 1.0) -> torch.Tensor:
    """One token of gated linear attention; ``state`` [B, Hkv, K, V] (fp32, contiguous) advances in place.

    q [B, 1, H, K]; k [B, 1, Hkv, K]; g [B, 1, Hkv, K] or [B, 1, Hkv, 1] (one decay per head,
    broadcast); v [B, 1, Hkv, V]. Returns o [B, 1, H, V] fp32. Three ops on the state (decay, rank-1
    update, read-out) instead of the general path's copy of it per token.
    """
    B, _, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    state.mul_(g.float().exp().reshape(B, Hkv, -1, 1))  # diag(exp(g_t)) S (a per-head g broadcasts)
    state.view(B * Hkv, K, V).baddbmm_(k.float().reshape(B * Hkv, K, 1), v.float().reshape(B * Hkv, 1, V))  # + kᵀv
    o = torch.matmul(q.float().reshape(B, Hkv, H // Hkv, K), state)  # [B, Hkv, G, V]
    if scale != 1.0:
        o.mul_(scale)
    return o.view(B, 1, H, V)


def window_step(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, bias: torch.Tensor, scale: float,
                may_see_nothing: bool = True) -> torch.Tensor:
    """Softmax attention of one query over a window ring buffer (the slot order does not matter).

    q [B, 1, H, D]; ring_k, ring_v [B, Hkv, W, D]; bias [B, 1, 1, W] fp32: 0 for a visible slot,
    -inf for an empty or padding one. Returns o [B, 1, H, D] fp32; a query that sees no slot gets 0
    (as ``sliding_window_attention``) unless ``may_see_nothing`` is False (its own token is visible).
    """
    B, _, H, D = q.shape
    Hkv = ring_k.shape[1]
    logits = torch.matmul(q.float().reshape(B, Hkv, H // Hkv, D), ring_k.float().transpose(-1, -2))  # [B, Hkv, G, W]
    p = torch.add(bias, logits, alpha=scale).softmax(dim=-1)
    if may_see_nothing:
        p = p.nan_to_num_(0.0)  # an all -inf row
    return torch.matmul(p, ring_v.float()).view(B, 1, H, -1)  # [B, 1, H, D]
