"""The memory-light chunked ops (``kernels/chunked_backward.py``: save the inputs, recompute in the
backward) give the chunked ops' outputs bit for bit and their gradients (q, k, v, g, initial state,
sinks; through lse too) to the dtype's tolerance, and equal the naive fp32 references."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms

from linearize.kernels import chunked, chunked_backward, reference

DTYPES = [torch.float32, torch.bfloat16]
VARIANTS = ["recompute", "checkpoint"]


@pytest.fixture
def light(monkeypatch):
    """Switch chunked.py's segment functions to a memory-light variant (or back to autograd's)."""

    def use(variant):
        gla = {"autograd": chunked._gla_chunked, "recompute": chunked_backward.gla_chunked,
               "checkpoint": chunked_backward.gla_chunked_checkpointed}[variant]
        swa = {"autograd": chunked._swa_blocks, "recompute": chunked_backward.swa_blocks,
               "checkpoint": chunked_backward.swa_blocks_checkpointed}[variant]
        monkeypatch.setattr(chunked, "LIGHT_BACKWARD", False, raising=False)  # chunked.py's own switch, if wired
        monkeypatch.setattr(chunked, "_gla_chunked", gla)
        monkeypatch.setattr(chunked, "_swa_blocks", swa)

    original = (chunked._gla_chunked, chunked._swa_blocks)
    yield use
    chunked._gla_chunked, chunked._swa_blocks = original


def _run(fn, dtype, inputs, fp32_names, cotangent_seed=1):
    """fn(**leaves) -> outputs; returns outputs and the gradients of a random linear loss of them."""
    leaves = {}
    for name, t in inputs.items():
        if t is None or not t.is_floating_point():
            leaves[name] = t
        else:
            leaves[name] = t.clone().to(torch.float32 if name in fp32_names else dtype).requires_grad_()
    outs = fn(**leaves)
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs if o is not None)
    names = [n for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return outs, dict(zip(names, grads))


def _compare(light, dtype, variant, op, ref_op, inputs, fp32_names=(), transform=lambda outs: outs):
    light("autograd")
    outs0, grads0 = _run(op, dtype, inputs, fp32_names)
    light(variant)
    outs1, grads1 = _run(op, dtype, inputs, fp32_names)
    outs2, grads2 = _run(ref_op, torch.float32, inputs, set(inputs))
    for a, b, c in zip(transform(outs1), transform(outs0), transform(outs2)):
        if b is None:  # no final state asked for
            assert a is None and c is None
            continue
        assert torch.equal(a, b), "the forward must be the chunked op's, bit for bit"
        assert_close_rms(a, c, dtype, "output vs reference")
    assert grads1.keys() == grads0.keys() and grads1
    for name in grads0:
        a, b, c = grads1[name], grads0[name], grads2[name]
        assert a.dtype == b.dtype and torch.isfinite(a).all(), f"d{name}"
        assert_close_rms(a, b, torch.float32 if dtype == torch.float32 else dtype, f"d{name} vs chunked")
        assert_close_rms(a, c, dtype, f"d{name} vs reference")


# ------------------------------------------------------------------------------------------------
# Gated linear attention
# ------------------------------------------------------------------------------------------------


def _gla_inputs(B=2, T=45, H=4, Hkv=2, K=8, V=6, gate="gla", n_states=None):
    g = F.logsigmoid(torch.randn(B, T, Hkv, K)) / 4
    if gate == "strong":  # down to -20 per step
        g = -20 * torch.rand(B, T, Hkv, K)
    elif gate == "spiky":  # huge forgetting steps between tiny ones: fp32 cancellation in the sums
        g[:, ::7] = -1e4
    return {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, Hkv, K), "v": torch.randn(B, T, Hkv, V), "g": g,
                "initial_state": torch.randn(n_states or B, Hkv, K, V)}


def _gla(final=True, **kw):
    def fn(**x):
        return chunked.gated_linear_attention(**x, output_final_state=final, **kw)

    def ref(**x):
        kw_ref = {k: v for k, v in kw.items() if k != "chunk_size"}
        return reference.gated_linear_attention_ref(**x, output_final_state=final, **kw_ref)

    return fn, ref


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gla_gradients(light, dtype, variant, monkeypatch):
    """GQA, T not a multiple of the chunk, several segments (state carried), initial and final state."""
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 16)  # chunk 8 -> segments of 16 tokens
    _compare(light, dtype, variant, *_gla(chunk_size=8), _gla_inputs(), fp32_names={"g", "initial_state"})


@pytest.mark.parametrize("gate", ["gla", "strong", "spiky"])
def test_gla_default_chunks_no_final_state(light, gate):
    """Default chunk and sub-chunk sizes, T over one chunk but ragged, strong gates, MHA, no final state."""
    x = _gla_inputs(B=1, T=150, H=2, Hkv=2, K=16, V=5, gate=gate)
    _compare(light, torch.float32, "recompute", *_gla(final=False), x, fp32_names={"g"})


def test_gla_without_initial_state(light):
    x = _gla_inputs(T=40)
    x["initial_state"] = None
    _compare(light, torch.float32, "recompute", *_gla(chunk_size=16), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gla_packed_sequences(light, dtype):
    """cu_seqlens: the state restarts at each boundary, each sequence has its own initial state."""
    x = _gla_inputs(B=1, T=50, n_states=3)
    _compare(light, dtype, "recompute", *_gla(chunk_size=8, cu_seqlens=torch.tensor([0, 13, 14, 50])), x,
             fp32_names={"g", "initial_state"})


# ------------------------------------------------------------------------------------------------
# Sliding-window attention
# ------------------------------------------------------------------------------------------------


def _swa_inputs(B=2, Tq=40, Tk=40, H=4, Hkv=2, D=8, sinks=None):
    s = {None: None, "per_head": torch.randn(H), "meta": torch.randn(H, 3)}[sinks]
    return {"q": torch.randn(B, Tq, H, D), "k": torch.randn(B, Tk, Hkv, D), "v": torch.randn(B, Tk, Hkv, D), "sinks": s}


def _swa(window, key_mask=None, **kw):
    def fn(**x):
        return chunked.sliding_window_attention(**x, window=window, key_mask=key_mask, **kw)

    def ref(**x):
        return reference.sliding_window_attention_ref(**x, window=window, key_mask=key_mask)

    return fn, ref


def _finite_lse(outs):
    o, lse = outs
    return o, torch.where(torch.isfinite(lse), lse, 0.0)  # a loss reads lse, its -inf entries as 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sinks", [None, "meta"])
def test_swa_gradients(light, dtype, variant, sinks, monkeypatch):
    """GQA, segments (queries beyond SEGMENT_TOKENS with the keys they reach), ragged last block."""
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 16)
    fn, ref = _swa(7, block_size=8)
    _compare(light, dtype, variant, lambda **x: _finite_lse(fn(**x)), lambda **x: _finite_lse(ref(**x)),
             _swa_inputs(Tq=37, Tk=37, sinks=sinks), fp32_names={"sinks"})


@pytest.mark.parametrize("sinks", [None, "per_head"])
def test_swa_padding_and_more_keys(light, sinks):
    """Left padding (queries that see nothing), more keys than queries, window over the block size."""
    key_mask = torch.ones(2, 50, dtype=torch.bool)
    key_mask[1, :25] = False
    fn, ref = _swa(12, key_mask=key_mask, block_size=8)
    _compare(light, torch.float32, "recompute", lambda **x: _finite_lse(fn(**x)),
             lambda **x: _finite_lse(ref(**x)), _swa_inputs(Tq=30, Tk=50, sinks=sinks), fp32_names={"sinks"})


def test_swa_window_longer_than_keys(light):
    fn, ref = _swa(100, block_size=8)
    _compare(light, torch.float32, "recompute", lambda **x: _finite_lse(fn(**x)),
             lambda **x: _finite_lse(ref(**x)), _swa_inputs(Tq=23, Tk=23))


def test_light_ops_save_only_their_inputs(light):
    """What autograd keeps for the backward: the recomputing ops save a small fraction of the bytes."""

    def saved_bytes(variant):
        light(variant)
        seen, total = set(), [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total[0] += t.untyped_storage().nbytes()
            return t

        x = _gla_inputs(B=1, T=256, H=4, Hkv=2, K=32, V=32)
        s = _swa_inputs(B=1, Tq=256, Tk=256, D=32)
        leaves = {n: t.requires_grad_() for n, t in {**x, **s}.items() if t is not None}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            chunked.gated_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                           initial_state=leaves["initial_state"])
            chunked.sliding_window_attention(leaves["q"], leaves["k"], leaves["v"], window=64)
        return total[0]

    before, after = saved_bytes("autograd"), saved_bytes("recompute")
    assert after < before / 4, (before, after)



def _graph_nodes(*outputs):
    names, stack = set(), [o.grad_fn for o in outputs]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(f for f, _ in node.next_functions)
    return names


def test_training_takes_the_light_backward_by_default():
    """chunked.py routes a differentiated call through chunked_backward (LIGHT_BACKWARD on) and a call
    without grad through its plain forward: the same outputs."""
    assert chunked.LIGHT_BACKWARD is True
    x = {n: t.requires_grad_() for n, t in _gla_inputs(T=40).items()}
    o, _ = chunked.gated_linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"])
    o_swa, _ = chunked.sliding_window_attention(x["q"], x["k"], x["k"], window=8, block_size=8)
    names = _graph_nodes(o, o_swa)
    assert "_GLASegmentBackward" in names and "_SWASegmentBackward" in names, names
    with torch.no_grad():
        o2, _ = chunked.gated_linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"])
        o_swa2, _ = chunked.sliding_window_attention(x["q"], x["k"], x["k"], window=8, block_size=8)
    assert torch.equal(o.detach(), o2) and torch.equal(o_swa.detach(), o_swa2)
