"""The chunked PyTorch ops equal the naive fp32 references: output, final state / lse, every gradient."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms

from linearize import kernels
from linearize.kernels import chunked, reference

DTYPES = [torch.float32, torch.bfloat16]


def _leaves(dtype, *tensors):
    """Kernel inputs (rounded to ``dtype``) and the reference's fp32 copies of the same values."""
    ours = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
    ref = [None if t is None else t.detach().float().requires_grad_() for t in ours]
    return ours, ref


def _grads(outputs, cotangents, inputs):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents) if o is not None)
    present = [x for x in inputs if x is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [None if x is None else next(grads) for x in inputs]


# ------------------------------------------------------------------------------------------------
# Gated linear attention
# ------------------------------------------------------------------------------------------------


def _gla_inputs(B=2, T=100, H=4, Hkv=2, K=8, V=6, gate="gla", n_states=None):
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, Hkv, K)
    v = torch.randn(B, T, Hkv, V)
    if gate == "gla":  # Liger's key-reused gate, logsigmoid / 16
        g = F.logsigmoid(torch.randn(B, T, Hkv, K)) / 16
    elif gate == "strong":  # down to -20 per step
        g = -20 * torch.rand(B, T, Hkv, K)
    elif gate == "rwkv6":  # -exp(k), clamped at -20
        g = -torch.exp(2 * torch.randn(B, T, Hkv, K)).clamp(max=20)
    elif gate == "spiky":  # huge forgetting steps between tiny ones: tests fp32 cancellation
        g = F.logsigmoid(torch.randn(B, T, Hkv, K)) / 16
        g[:, ::7] = -1e4
    s0 = torch.randn(n_states or B, Hkv, K, V)
    return q, k, v, g, s0


def _check_gla(dtype, q, k, v, g, s0, cu_seqlens=None, **kw):
    (q1, k1, v1, g1, _), (q2, k2, v2, g2, s2) = _leaves(dtype, q, k, v, g, None)
    s1 = None if s0 is None else s0.clone().requires_grad_()  # the state is fp32 in both
    s2 = None if s0 is None else s0.clone().requires_grad_()
    o1, f1 = chunked.gated_linear_attention(q1, k1, v1, g1, initial_state=s1, output_final_state=True, cu_seqlens=cu_seqlens, **kw)
    o2, f2 = reference.gated_linear_attention_ref(q2, k2, v2, g2, initial_state=s2, output_final_state=True, cu_seqlens=cu_seqlens)
    assert o1.dtype == dtype and f1.dtype == torch.float32
    assert o1.shape == o2.shape and f1.shape == f2.shape
    assert torch.isfinite(o1).all() and torch.isfinite(f1).all()
    assert_close_rms(o1, o2, dtype, "o")
    assert_close_rms(f1, f2, dtype, "final state")
    do = torch.randn_like(o2).to(dtype).float()
    dS = torch.randn_like(f2)
    grads1 = _grads([o1, f1], [do, dS], [q1, k1, v1, g1, s1])
    grads2 = _grads([o2, f2], [do, dS], [q2, k2, v2, g2, s2])
    for name, a, b in zip("q k v g initial_state".split(), grads1, grads2):
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
        assert_close_rms(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gla_matches_reference(dtype):
    _check_gla(dtype, *_gla_inputs(T=100))  # T = 100: one full chunk of 64 and a padded one


@pytest.mark.parametrize("chunk_size", [48, 8, 1])
def test_gla_chunk_sizes(chunk_size):
    # 48: three sub-chunks of 16; 8: one sub-chunk per chunk; 1: every token its own chunk
    _check_gla(torch.float32, *_gla_inputs(T=37), chunk_size=chunk_size)


@pytest.mark.parametrize("gate", ["strong", "rwkv6", "spiky"])
def test_gla_strong_gates_are_exact(gate):
    q, k, v, g, s0 = _gla_inputs(T=70, gate=gate)
    assert g.min() <= -19.0
    _check_gla(torch.float32, q, k, v, g, s0)


def test_gla_without_initial_state_and_mha():
    q, k, v, g, _ = _gla_inputs(B=1, T=20, H=2, Hkv=2, K=4, V=4)
    _check_gla(torch.float32, q, k, v, g, None, chunk_size=16)
    o, final = chunked.gated_linear_attention(q, k, v, g)
    assert final is None and o.shape == (1, 20, 2, 4)


def test_gla_scale():
    q, k, v, g, s0 = _gla_inputs(B=1, T=9)
    o1, _ = chunked.gated_linear_attention(q, k, v, g, scale=0.3, initial_state=s0)
    o2, _ = reference.gated_linear_attention_ref(q, k, v, g, scale=0.3, initial_state=s0)
    assert_close_rms(o1, o2, torch.float32, "o with scale 0.3")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gla_packed_sequences(dtype):
    cu = torch.tensor([0, 5, 5, 6, 75, 90])  # an empty and a one-token sequence included
    q, k, v, g, s0 = _gla_inputs(B=1, T=90, n_states=5)
    _check_gla(dtype, q, k, v, g, s0, cu_seqlens=cu, chunk_size=32)


def test_gla_packed_equals_separate_calls():
    cu = [0, 17, 60]
    q, k, v, g, s0 = _gla_inputs(B=1, T=60, n_states=2)
    o, final = chunked.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=torch.tensor(cu))
    for n in range(2):
        a, b = cu[n], cu[n + 1]
        o_n, f_n = chunked.gated_linear_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], initial_state=s0[n : n + 1], output_final_state=True
        )
        assert_close_rms(o[:, a:b], o_n, torch.float32, f"o of sequence {n}")
        assert_close_rms(final[n : n + 1], f_n, torch.float32, f"state of sequence {n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gla_long_sequence_in_segments(dtype, monkeypatch):
    """Sequences longer than SEGMENT_TOKENS run segment by segment (state carried): still exact."""
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 20)  # chunk 8 -> segments of 16 tokens
    _check_gla(dtype, *_gla_inputs(T=53), chunk_size=8)


@pytest.mark.parametrize("T", [1, 3])
def test_gla_decode_steps(T):
    _check_gla(torch.float32, *_gla_inputs(T=T))


@pytest.mark.parametrize("split", [37, 64, 97])
def test_gla_prefill_then_continue_equals_one_call(split):
    """Invariant 2: [0:T1] then [T1:T] from the first call's state equals one call over [0:T]."""
    q, k, v, g, s0 = _gla_inputs(T=100)
    o, final = chunked.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    o_a, s_a = chunked.gated_linear_attention(
        q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=s0, output_final_state=True
    )
    o_b, s_b = chunked.gated_linear_attention(
        q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=s_a, output_final_state=True
    )
    assert_close_rms(torch.cat([o_a, o_b], dim=1), o, torch.float32, "o")
    assert_close_rms(s_b, final, torch.float32, "final state")


def test_gla_token_by_token_equals_chunked():
    q, k, v, g, s0 = _gla_inputs(B=1, T=12)
    o, final = chunked.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=8)
    state, outs = s0, []
    for t in range(12):
        o_t, state = chunked.gated_linear_attention(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], initial_state=state, output_final_state=True
        )
        outs.append(o_t)
    assert_close_rms(torch.cat(outs, dim=1), o, torch.float32, "o")
    assert_close_rms(state, final, torch.float32, "final state")


def test_gla_dispatcher_chunked_backend():
    q, k, v, g, s0 = _gla_inputs(T=40)
    o1, f1 = kernels.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="chunked")
    o2, f2 = reference.gated_linear_attention_ref(q, k, v, g, initial_state=s0, output_final_state=True)
    assert_close_rms(o1, o2, torch.float32, "o")
    assert_close_rms(f1, f2, torch.float32, "final state")
    o3, _ = kernels.gated_linear_attention(q, k, v, g, initial_state=s0)  # CPU tensors: chunked by default
    assert torch.equal(o3, o1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, g, s: (q[0], k, v, g, s), "q must have shape"),
        (lambda q, k, v, g, s: (q, k[..., :4], v, g, s), "k and g must be"),
        (lambda q, k, v, g, s: (q[:, :, :3], k, v, g, s), "multiple of key/value heads"),
        (lambda q, k, v, g, s: (q, k, v[:, :5], g, s), "share batch and time"),
        (lambda q, k, v, g, s: (q, k, v, g, s[:, :, :2]), "initial_state must be"),
    ],
)
def test_gla_bad_shapes_raise(change, message):
    args = change(*_gla_inputs(T=6))
    with pytest.raises(ValueError, match=message):
        kernels.gated_linear_attention(*args[:4], initial_state=args[4], backend="chunked")


def test_gla_bad_packing_and_chunk_size_raise():
    q, k, v, g, _ = _gla_inputs(B=2, T=6)
    with pytest.raises(ValueError, match="batch must be 1"):
        kernels.gated_linear_attention(q, k, v, g, cu_seqlens=torch.tensor([0, 6]), backend="chunked")
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        kernels.gated_linear_attention(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 5]), backend="chunked")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunked.gated_linear_attention(q, k, v, g, chunk_size=0)


# ------------------------------------------------------------------------------------------------
# Sliding-window attention
# ------------------------------------------------------------------------------------------------


def _swa_inputs(B=2, Tq=40, Tk=40, H=4, Hkv=2, D=8, sinks=None):
    q = torch.randn(B, Tq, H, D)
    k = torch.randn(B, Tk, Hkv, D)
    v = torch.randn(B, Tk, Hkv, D)
    s = {None: None, "per_head": torch.randn(H), "meta": torch.randn(H, 3)}[sinks]
    return q, k, v, s


def _check_swa(dtype, q, k, v, sinks, window, key_mask=None, **kw):
    (q1, k1, v1, s1), (q2, k2, v2, s2) = _leaves(dtype, q, k, v, sinks)
    if sinks is not None:  # sink logits are a parameter kept in fp32
        s1 = sinks.clone().requires_grad_()
    o1, l1 = chunked.sliding_window_attention(q1, k1, v1, window=window, key_mask=key_mask, sinks=s1, **kw)
    o2, l2 = reference.sliding_window_attention_ref(q2, k2, v2, window=window, key_mask=key_mask, sinks=s2)
    assert o1.dtype == dtype and l1.dtype == torch.float32
    assert o1.shape == o2.shape and l1.shape == l2.shape
    assert not o1.isnan().any() and not l1.isnan().any()
    assert torch.equal(torch.isinf(l1), torch.isinf(l2)), "rows that see nothing differ"
    assert_close_rms(o1, o2, dtype, "o")
    seen = torch.isfinite(l2)
    if seen.any():
        assert_close_rms(l1[seen], l2[seen], dtype, "lse")
    do = torch.randn_like(o2).to(dtype).float()
    dl = torch.randn_like(l2)
    # A loss that also reads lse (its -inf entries replaced by 0, as a caller would).
    grads1 = _grads([o1, torch.where(seen, l1, 0.0)], [do, dl], [q1, k1, v1, s1])
    grads2 = _grads([o2, torch.where(seen, l2, 0.0)], [do, dl], [q2, k2, v2, s2])
    for name, a, b in zip("q k v sinks".split(), grads1, grads2):
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
        assert_close_rms(a, b, dtype, f"d{name}")
    return o1, l1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sinks", [None, "per_head", "meta"])
def test_swa_matches_reference(dtype, sinks):
    _check_swa(dtype, *_swa_inputs(sinks=sinks), window=7, block_size=8)


@pytest.mark.parametrize("window", [1, 16, 40, 100])
def test_swa_windows(window):
    # window 1: only the token itself; 40 == T and 100 > T: plain causal attention
    _check_swa(torch.float32, *_swa_inputs(Tq=23, Tk=23), window=window, block_size=8)


def test_swa_default_block_size():
    _check_swa(torch.float32, *_swa_inputs(Tq=150, Tk=150, B=1, H=2, Hkv=1), window=64)


@pytest.mark.parametrize("sinks", [None, "meta"])
def test_swa_left_padding(sinks):
    q, k, v, s = _swa_inputs(sinks=sinks)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, :10] = False  # row 1 is left-padded by 10
    o, lse = _check_swa(torch.float32, q, k, v, s, window=4, key_mask=key_mask, block_size=8)
    # Queries 0..9 of row 1 see only padding: zero output; lse -inf, or the sinks' alone.
    assert torch.equal(o[1, :10], torch.zeros_like(o[1, :10]))
    if s is None:
        assert torch.isneginf(lse[1, :10]).all()
    else:
        assert_close_rms(lse[1, :10], s.logsumexp(-1).expand(10, -1), torch.float32, "lse of sinks alone")
    assert torch.isfinite(lse[1, 10:]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tq", [40, 27])
def test_swa_long_sequence_in_segments(dtype, Tq, monkeypatch):
    """Queries beyond SEGMENT_TOKENS go segment by segment, each with the keys its windows reach."""
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 8)
    q, k, v, s = _swa_inputs(sinks="meta")
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, :10] = False
    _check_swa(dtype, q[:, -Tq:], k, v, s, window=5, key_mask=key_mask, block_size=4)


@pytest.mark.parametrize("Tq, Tk, window", [(1, 9, 8), (1, 30, 8), (3, 30, 8), (4, 4, 16), (5, 30, 8), (6, 8, 16)])
def test_swa_queries_continue_keys(Tq, Tk, window):
    """Decode / chunked prefill: queries are the last Tq positions of the keys."""
    q, k, v, s = _swa_inputs(Tq=Tk, Tk=Tk, sinks="per_head")
    key_mask = torch.ones(2, Tk, dtype=torch.bool)
    key_mask[0, :2] = False
    o, lse = _check_swa(torch.float32, q[:, -Tq:], k, v, s, window=window, key_mask=key_mask, block_size=4)
    o_full, lse_full = chunked.sliding_window_attention(q, k, v, window=window, key_mask=key_mask, sinks=s)
    assert_close_rms(o, o_full[:, -Tq:], torch.float32, "o of the last queries")
    assert_close_rms(lse, lse_full[:, -Tq:], torch.float32, "lse of the last queries")


def test_swa_dispatcher_and_bad_inputs():
    q, k, v, s = _swa_inputs(sinks="per_head")
    o1, l1 = kernels.sliding_window_attention(q, k, v, window=5, sinks=s, backend="chunked")
    o2, l2 = reference.sliding_window_attention_ref(q, k, v, window=5, sinks=s)
    assert_close_rms(o1, o2, torch.float32, "o")
    assert_close_rms(l1, l2, torch.float32, "lse")
    with pytest.raises(ValueError, match="window must be a positive int"):
        kernels.sliding_window_attention(q, k, v, window=0, backend="chunked")
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        kernels.sliding_window_attention(q, k[:, :10], v[:, :10], window=5, backend="chunked")
    with pytest.raises(ValueError, match="key_mask must be"):
        kernels.sliding_window_attention(q, k, v, window=5, key_mask=torch.ones(2, 7, dtype=torch.bool), backend="chunked")
    with pytest.raises(ValueError, match="sinks must be"):
        kernels.sliding_window_attention(q, k, v, window=5, sinks=torch.zeros(3), backend="chunked")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kernels.sliding_window_attention(q[:, :, :3], k, v, window=5, backend="chunked")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        chunked.sliding_window_attention(q, k, v, window=5, block_size=0)


def _largest_saved(fn) -> int:
    """Elements in the largest tensor autograd saves while running ``fn``."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_memory_is_linear_in_time():
    """No T×T tensor anywhere: the largest saved intermediate grows ×4 when T does, not ×16."""

    def swa(T):
        q, k, v, _ = _swa_inputs(B=1, Tq=T, Tk=T, H=1, Hkv=1, D=4)
        return _largest_saved(lambda: chunked.sliding_window_attention(q.requires_grad_(), k, v, window=8, block_size=8))

    def gla(T):
        q, k, v, g, _ = _gla_inputs(B=1, T=T, H=1, Hkv=1, K=4, V=4)
        return _largest_saved(lambda: chunked.gated_linear_attention(q.requires_grad_(), k, v, g, chunk_size=16))

    for name, widest in [("swa", swa), ("gla", gla)]:
        small, large = widest(256), widest(1024)
        assert small > 0 and large <= 4 * small, f"{name}: largest saved tensor {small} at T=256, {large} at T=1024"


def test_empty_inputs():
    q, k, v, g, s0 = _gla_inputs(T=0)
    o, final = kernels.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="chunked")
    assert o.shape == (2, 0, 4, 6) and torch.equal(final, s0)
    q, k, v, _ = _swa_inputs(Tq=0, Tk=5)
    o, lse = kernels.sliding_window_attention(q, k, v, window=3, backend="chunked")
    assert o.shape == (2, 0, 4, 8) and lse.shape == (2, 0, 4)
