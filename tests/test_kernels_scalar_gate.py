"""One decay per head (g [B, T, Hkv, 1], Lizard's learned gate): the chunked op's scalar-decay form
(``chunked._gla_chunked_scalar`` and its memory-light Function in ``chunked_backward``) equals the
naive reference on g expanded to every key dimension and the general per-key chunked form: output,
final state and every gradient (q, k, v, g summed over K, initial state); and a converted model with
the default recipe's conversion gives the same logits, gradients and decoding with it as without it
(``chunked.SCALAR_DECAY``)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, rel_rms
from test_combinations import CACHE_KW
from tiny_models import VOCAB, tiny_model

import linearize
from linearize import ConversionConfig, kernels
from linearize.cache import output_cache
from linearize.convert import conversion_parameters
from linearize.kernels import chunked, chunked_backward, reference
from linearize.recipe import LoraConfig
from linearize.train.lora import _get_peft_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}
"""Relative RMS error against the reference, which runs in fp32 on the same (bf16-rounded) inputs.
Both compute in fp32 whatever the input dtype, so the fp32 results (final state, dg, d initial
state) are held to the fp32 bound with bf16 inputs too; what comes back in the input's dtype (o, dq,
dk, dv) may also differ by one bf16 rounding where the two fp32 results straddle a rounding boundary
(``BF16_ROUNDING`` more; measured errors are ~5e-5)."""
BF16_ROUNDING = 2.0**-8  # relative rounding of one bf16 value


def _inputs(B=2, T=100, H=6, Hkv=2, K=8, V=5, gate="gla", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, Hkv, K, generator=gen)
    v = torch.randn(B, T, Hkv, V, generator=gen)
    if gate == "gla":  # Lizard's learned gate: logsigmoid / 16
        g = F.logsigmoid(torch.randn(B, T, Hkv, 1, generator=gen) + 2) / 16
    elif gate == "strong":  # down to -20 per step, and one step of -1e4
        g = -20 * torch.rand(B, T, Hkv, 1, generator=gen)
        g[:, T // 3] = -1e4
    else:
        raise ValueError(gate)
    s0 = torch.randn(B, Hkv, K, V, generator=gen)
    return q, k, v, g, s0


def _run(fn, dtype, q, k, v, g, s0, seed=1):
    """fn's output, final state and gradients (q, k, v, g, s0) for random cotangents of both outputs
    (q, k, v in ``dtype``; g and the state fp32, as the converted layers pass them)."""
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [g.clone().requires_grad_(), s0.clone().requires_grad_()]
    o, final = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    loss.backward()
    return [o.float(), final] + [x.grad for x in leaves]


NAMES = ["o", "final state", "dq", "dk", "dv", "dg", "d initial state"]


def _close(got, want, dtype, what=""):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what} {name}: not finite"
        tol = TOL[dtype] + (BF16_ROUNDING if dtype == torch.bfloat16 and name in ("o", "dq", "dk", "dv") else 0.0)
        err = rel_rms(a, b)
        assert err <= tol, f"{what} {name}: relative RMS error {err:.3g} > {tol:.3g} ({dtype})"


def _chunked(chunk_size, scalar, **kw):
    def fn(q, k, v, g, s0):
        chunked.SCALAR_DECAY = scalar
        try:
            return chunked.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,
                                                  chunk_size=chunk_size, **kw)
        finally:
            chunked.SCALAR_DECAY = True
    return fn


def _reference(q, k, v, g, s0, **kw):
    return reference.gated_linear_attention_ref(q, k, v, g.expand(*g.shape[:-1], k.shape[-1]), initial_state=s0,
                                                output_final_state=True, **kw)


@pytest.fixture
def counted(monkeypatch):
    """How often the scalar-decay form and the per-key form ran (either module's name)."""
    calls = collections.Counter()
    for module in (chunked, chunked_backward):
        for name in ("_gla_chunked_scalar", "_gla_chunked"):
            fn = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name: calls.update([name]) or fn(*a))
    return calls


@pytest.mark.parametrize("light", [True, False], ids=["light", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [
    dict(T=100, H=6, Hkv=2),  # GQA, T not a multiple of the chunk
    dict(T=5, H=3, Hkv=3),  # just above the recurrent cut-off, one padded chunk
    dict(T=1100, H=4, Hkv=1, K=16, V=9),  # three segments (SEGMENT_TOKENS = 512)
], ids=["gqa-ragged", "short", "segments"])
def test_scalar_decay_equals_reference_and_per_key_form(monkeypatch, counted, light, dtype, shape):
    monkeypatch.setattr(chunked, "LIGHT_BACKWARD", light)
    inputs = _inputs(**shape)
    fast = _run(_chunked(16, scalar=True), dtype, *inputs)
    assert counted["_gla_chunked_scalar"] > 0 and counted["_gla_chunked"] == 0
    _close(fast, _run(_reference, dtype, *inputs), dtype, "vs reference")
    _close(fast, _run(_chunked(16, scalar=False), dtype, *inputs), dtype, "vs per-key form")
    assert counted["_gla_chunked"] > 0


@pytest.mark.parametrize("light", [True, False], ids=["light", "autograd"])
def test_strong_decays_stay_finite_and_exact(monkeypatch, light):
    """log g down to -20 per step and one -1e4 step: no NaN/inf, the reference's numbers (the state
    is wiped by the -1e4 step, so everything after depends only on what came after it)."""
    monkeypatch.setattr(chunked, "LIGHT_BACKWARD", light)
    inputs = _inputs(T=150, gate="strong")
    _close(_run(_chunked(32, scalar=True), torch.float32, *inputs), _run(_reference, torch.float32, *inputs),
           torch.float32, "strong decays")


@pytest.mark.parametrize("light", [True, False], ids=["light", "autograd"])
def test_packed_sequences(monkeypatch, light):
    monkeypatch.setattr(chunked, "LIGHT_BACKWARD", light)
    q, k, v, g, _ = _inputs(B=1, T=90)
    cu = torch.tensor([0, 7, 40, 41, 90])
    s0 = torch.randn(4, 2, 8, 5)
    fast = _run(_chunked(16, scalar=True, cu_seqlens=cu), torch.float32, q, k, v, g, s0)
    want = _run(lambda *a: _reference(*a, cu_seqlens=cu), torch.float32, q, k, v, g, s0)
    _close(fast, want, torch.float32, "packed")


def test_chunk_sizes_agree():
    """The chunk length is a speed setting: C = 8, 64 and 1 give the reference's numbers."""
    inputs = _inputs(T=70)
    want = _run(_reference, torch.float32, *inputs)
    for C in (1, 8, 64):
        _close(_run(_chunked(C, scalar=True), torch.float32, *inputs), want, torch.float32, f"C={C}")


def test_no_initial_state_and_no_final_gradient():
    """Without an initial state and with only the output differentiated (the training case)."""
    q, k, v, g, _ = _inputs(T=80)
    grads = []
    for scalar in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        chunked.SCALAR_DECAY = scalar
        try:
            o, final = chunked.gated_linear_attention(*leaves, chunk_size=16)
        finally:
            chunked.SCALAR_DECAY = True
        assert final is None
        o.pow(2).sum().backward()
        grads.append([o] + [x.grad for x in leaves])
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], *grads):
        assert rel_rms(a, b) <= TOL[torch.float32], name


def test_record_and_replay_give_the_same_gradients():
    """Through ``reused_outputs`` (the mixer's recompute): the replayed segment hands back the first
    run's outputs bit for bit, runs no forward, and its backward gives the same gradients."""
    qf, kf, vf, g, s0 = _inputs(T=100, H=4, Hkv=2)
    qf = qf.reshape(2, 100, 2, 2, 8)  # [B, T, Hkv, G, K] as _gla_batched hands it over

    def segment(store=None, replay=False):
        leaves = [x.clone().requires_grad_() for x in (qf, kf, vf, g, s0)]
        with chunked_backward.reused_outputs(store, replay) if store is not None else _nothing():
            o, final = chunked_backward.gla_chunked_scalar(*leaves, 16)
        (o.pow(2).sum() + final.sum()).backward()
        return o, final, [x.grad for x in leaves]

    store = collections.deque()
    o0, f0, g0 = segment(store, replay=False)
    assert len(store) == 1
    calls = collections.Counter()
    forward = chunked_backward._gla_chunked_scalar
    chunked_backward._gla_chunked_scalar = lambda *a: calls.update(["forward"]) or forward(*a)
    try:
        o1, f1, g1 = segment(store, replay=True)
    finally:
        chunked_backward._gla_chunked_scalar = forward
    assert calls["forward"] == 0 and not store
    assert torch.equal(o0, o1) and torch.equal(f0, f1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    o2, f2, g2 = segment()
    assert torch.equal(o0, o2)
    for a, b in zip(g0, g2):
        assert torch.equal(a, b)
    with chunked_backward.reused_outputs(store, replay=False):
        chunked_backward.gla_chunked_scalar(qf.requires_grad_(), kf, vf, g, s0, 16)
    with chunked_backward.reused_outputs(store, replay=True), pytest.raises(RuntimeError, match="recorded with"):
        chunked_backward.gla_chunked_scalar(qf[:, :50], kf[:, :50], vf[:, :50], g[:, :50], s0, 16)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------
# The dispatcher: g [.., 1] on every backend and op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_dispatcher_takes_one_decay_per_head(backend):
    q, k, v, g, s0 = _inputs(T=30)
    g_full = g.expand(-1, -1, -1, 8)
    o1, f1 = kernels.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend=backend)
    o2, f2 = kernels.gated_linear_attention(q, k, v, g_full, initial_state=s0, output_final_state=True, backend=backend)
    assert rel_rms(o1, o2) <= TOL[torch.float32] and rel_rms(f1, f2) <= TOL[torch.float32]
    for T in (1, 3):  # the in-place single-token step and the few-token path
        states = [s0.clone(), s0.clone()]
        outs = [kernels.gla_decode_step(q[:, :T], k[:, :T], v[:, :T], gg[:, :T], s, backend=backend)
                for gg, s in zip((g, g_full), states)]
        assert rel_rms(outs[0], outs[1]) <= TOL[torch.float32] and rel_rms(*states) <= TOL[torch.float32]
    qr, kr = torch.randn(2, 30, 6, 4), torch.randn(2, 30, 2, 4)
    vr = torch.randn(2, 30, 2, 5)
    fused = [kernels.fused_liger_attention(q, k, gg, qr, kr, vr, window=4, initial_state=s0, output_final_state=True,
                                           backend=backend) for gg in (g, g_full)]
    assert rel_rms(fused[0][0], fused[1][0]) <= TOL[torch.float32]
    assert rel_rms(fused[0][1], fused[1][1]) <= TOL[torch.float32]


def test_bad_decay_shape_raises():
    q, k, v, g, s0 = _inputs(T=10)
    with pytest.raises(ValueError, match="one decay per head"):
        kernels.gated_linear_attention(q, k, v, torch.zeros(2, 10, 2, 3), backend="chunked")
    with pytest.raises(ValueError, match="last dim must be 1"):
        chunked.gated_linear_attention(q, k, v, torch.zeros(2, 10, 2, 3))
    # the shared check takes [.., 1] only where the caller handles it (not the Triton kernels)
    from linearize.kernels.validate import check_gla_inputs
    per_head = torch.zeros(*k.shape[:3], 1)
    check_gla_inputs(q, k, v, per_head, per_head_decay=True)
    with pytest.raises(ValueError, match=r"k and g must be \[B, T, Hkv, \d+\], got"):
        check_gla_inputs(q, k, v, per_head)


# ------------------------------------------------------------------------------------------------
# A converted model with the default recipe's conversion
# ------------------------------------------------------------------------------------------------

DEFAULT = {"mixer": "lizard", "normalizer": "shared", "linear_span": "beyond_window", "sink_tokens": 2,
           "window": 8, "chunk_size": 16}
"""The default recipe's conversion (learned gate, Hedgehog maps, shared denominator, linear span
beyond the window, sink tokens), at tiny sizes."""
T = 100  # several chunks and (SEGMENT_TOKENS patched to 32) several segments per op


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = linearize.convert(tiny_model("llama"), ConversionConfig(**DEFAULT))
    for _, p in conversion_parameters(model):  # away from the init, as after training
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def _lora_step(model, ids):
    peft_model = _get_peft_model(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for _, p in conversion_parameters(model):  # the attention-transfer parameters too
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: its gradients would not reach A
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recompute", [True, False], ids=["mixer-recompute", "mixer-keep"])
def test_model_gives_the_same_logits_and_gradients(monkeypatch, counted, recompute):
    from linearize.mixers import hybrid

    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 32)
    monkeypatch.setattr(hybrid, "RECOMPUTE_IN_BACKWARD", recompute)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    results = {}
    for scalar in (True, False):
        monkeypatch.setattr(chunked, "SCALAR_DECAY", scalar)
        counted.clear()
        results[scalar] = _lora_step(_model(), ids)
        used = "_gla_chunked_scalar" if scalar else "_gla_chunked"
        assert counted[used] > 0 and sum(counted.values()) == counted[used], dict(counted)
    (logits1, grads1), (logits0, grads0) = results[True], results[False]
    assert rel_rms(logits1, logits0) <= TOL[torch.float32]
    assert grads1.keys() == grads0.keys()
    assert any("lora_A" in n for n in grads1) and any("gate" in n for n in grads1), sorted(grads1)
    for n in grads1:
        if grads0[n] is None:
            assert grads1[n] is None, n
            continue
        assert grads0[n].abs().sum() > 0, f"{n}: no gradient to compare"
        assert rel_rms(grads1[n], grads0[n]) <= 1e-4, n  # sums over the whole model: a few fp32 roundings more


def test_prefill_and_decode_equal_the_full_forward(counted):
    """With the scalar-decay form (prefill) and the per-head decay in the cache's delay line and the
    decode steps: the logits of one full forward."""
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    prompt = 30
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert counted["_gla_chunked_scalar"] > 0 and counted["_gla_chunked"] == 0
        out = model(ids[:, :prompt], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
            cache = output_cache(out)
            logits.append(out.logits)
    stepped = torch.cat(logits, dim=1)
    assert rel_rms(stepped, full) <= RTOL[torch.float32]
    layer = next(l for l in cache.layers if getattr(l, "delayed", None) is not None)
    assert layer.delayed[2].shape[-1] == 1, "the delay line keeps one decay per head"


def test_in_place_decode_step_takes_one_decay_per_head():
    """A conversion the in-place step covers (no sinks, linear span all), learned gate: generation with
    the cache equals the full forward."""
    torch.manual_seed(0)
    model = linearize.convert(tiny_model("llama"), ConversionConfig(mixer="lizard", normalizer="separate", num_sinks=0,
                                                                    window=8, chunk_size=16))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :10], use_cache=True)
        cache, logits = output_cache(out), [out.logits]
        for t in range(10, 24):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
            cache = output_cache(out)
            logits.append(out.logits)
    assert rel_rms(torch.cat(logits, dim=1), full) <= RTOL[torch.float32]


def test_exported_code_runs_the_scalar_form_in_a_fresh_process(tmp_path):
    """The checkpoint's flat runtime files (``linearize.export``) carry the scalar-decay form: a
    model with the default recipe's conversion reloads through ``trust_remote_code`` in a process
    without the package and gives identical logits (T spans several chunks)."""
    from test_convert import logits_in_fresh_process

    model = _model().eval()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    folder = linearize.save_converted(model, tmp_path / "ckpt")
    torch.testing.assert_close(logits_in_fresh_process(folder, ids, tmp_path), expected, atol=0, rtol=0)
