"""The Triton kernels equal the naive references: outputs, final states and every gradient.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny. The same tests run compiled on a GPU with
``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_triton.py`` (the ``cuda`` parametrisation).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import assert_close_rms, rel_rms  # noqa: E402

import linearize.kernels as kernels  # noqa: E402
from linearize.kernels import triton as tk  # noqa: E402
from linearize.kernels.reference import gated_linear_attention_ref, sliding_window_attention_ref  # noqa: E402
from linearize.kernels.triton._utils import INTERPRET  # noqa: E402

DEVICES = [
    pytest.param("cpu", id="interp"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            pytest.mark.skipif(INTERPRET, reason="set TRITON_INTERPRET=0 to run the compiled kernels"),
        ],
    ),
]
DTYPES = [torch.float32, torch.bfloat16]


def leaf(x, dtype):
    return x.to(dtype).detach().requires_grad_()


def grads_of(loss, tensors):
    out = torch.autograd.grad(loss, tensors)
    return [g.float() for g in out]


def gla_inputs(B, T, H, Hkv, K, V, dtype, device, n_state=None, decay=1.0):
    q = leaf(torch.randn(B, T, H, K, device=device), dtype)
    k = leaf(torch.randn(B, T, Hkv, K, device=device), dtype)
    v = leaf(torch.randn(B, T, Hkv, V, device=device), dtype)
    g = leaf(F.logsigmoid(torch.randn(B, T, Hkv, K, device=device)) * decay, dtype)
    h0 = None if n_state is None else leaf(torch.randn(n_state, Hkv, K, V, device=device), torch.float32)
    return q, k, v, g, h0


def check_gla(q, k, v, g, h0, dtype, cu_seqlens=None, chunk_size=32, final=True):
    o, ht = tk.gated_linear_attention(
        q, k, v, g, initial_state=h0, output_final_state=final, cu_seqlens=cu_seqlens, chunk_size=chunk_size
    )
    ro, rht = gated_linear_attention_ref(q, k, v, g, initial_state=h0, output_final_state=final, cu_seqlens=cu_seqlens)
    assert o.dtype == q.dtype and o.shape == ro.shape
    assert_close_rms(o, ro, dtype, "o")
    do = torch.randn_like(ro, dtype=torch.float32)
    inputs = [x for x in (q, k, v, g, h0) if x is not None]
    loss, rloss = (o.float() * do).sum(), (ro.float() * do).sum()
    if final:
        assert ht.dtype == torch.float32 and ht.shape == rht.shape
        assert_close_rms(ht, rht, dtype, "final state")
        dht = torch.randn_like(rht)
        loss, rloss = loss + (ht * dht).sum(), rloss + (rht * dht).sum()
    else:
        assert ht is None
    for name, a, b in zip("q k v g h0".split(), grads_of(loss, inputs), grads_of(rloss, inputs)):
        assert_close_rms(a, b, dtype, f"d{name}")


# ------------------------------------------------------------------------------------------------
# Chunked gated linear attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gla_matches_reference_gqa_states(device, dtype):
    # T = 37: two chunks of 32 (the second partial), two sub-chunks per chunk; GQA 4 -> 2 heads.
    q, k, v, g, h0 = gla_inputs(2, 37, 4, 2, 16, 16, dtype, device, n_state=2)
    check_gla(q, k, v, g, h0, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gla_varlen_matches_reference(device, dtype):
    cu = torch.tensor([0, 5, 30, 40], device=device)  # a sequence shorter than a sub-chunk, one crossing chunks
    q, k, v, g, h0 = gla_inputs(1, 40, 2, 1, 16, 16, dtype, device, n_state=3)
    check_gla(q, k, v, g, h0, dtype, cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
def test_gla_several_blocks_padding_no_state(device):
    # K = 20 and V = 24 are not powers of two (masked columns; two 16-blocks under the interpreter);
    # one chunk of 64 with four sub-chunks, the last one empty; no initial or final state.
    q, k, v, g, _ = gla_inputs(1, 40, 1, 1, 20, 24, torch.float32, device)
    check_gla(q, k, v, g, None, torch.float32, chunk_size=64, final=False)


@pytest.mark.parametrize("device", DEVICES)
def test_gla_strong_decay_is_stable(device):
    # log decays down to about -30 per step: exp(-cumsum) would overflow in a naive chunked form
    q, k, v, g, h0 = gla_inputs(1, 40, 2, 2, 16, 16, torch.float32, device, n_state=1, decay=12.0)
    assert g.min() < -20
    check_gla(q, k, v, g, h0, torch.float32)


def test_gla_fp16():
    q, k, v, g, h0 = gla_inputs(1, 37, 2, 1, 16, 16, torch.float16, "cpu", n_state=1)
    o, ht = tk.gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True)
    ro, rht = gated_linear_attention_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float16
    assert_close_rms(o, ro, torch.float16, "o")
    assert_close_rms(ht, rht, torch.float16, "final state")


def test_gla_dispatcher_uses_triton():
    q, k, v, g, h0 = gla_inputs(1, 20, 2, 2, 16, 16, torch.float32, "cpu", n_state=1)
    with torch.no_grad():
        o, ht = kernels.gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
        o2, ht2 = tk.gated_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(ht, ht2)


def test_gla_input_errors():
    q, k, v, g, _ = gla_inputs(1, 20, 2, 2, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        tk.gated_linear_attention(q, k, v, g, chunk_size=40)
    with pytest.raises(ValueError, match="share a dtype"):
        tk.gated_linear_attention(q, k.half(), v, g)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tk.gated_linear_attention(q.double(), k.double(), v.double(), g)
    with pytest.raises(ValueError, match="initial_state"):
        tk.gated_linear_attention(q, k, v, g, initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match="multiple"):
        tk.gated_linear_attention(q[:, :, :1].expand(1, 20, 3, 16), k, v, g)


# ------------------------------------------------------------------------------------------------
# Decode step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_matches_reference(device, dtype):
    B, H, Hkv, K, V = 2, 4, 2, 12, 20  # K, V not powers of two
    state = torch.randn(B, Hkv, K, V, device=device)
    expected_state = state.clone()
    for steps in (1, 3):
        q, k, v, g, _ = gla_inputs(B, steps, H, Hkv, K, V, dtype, device)
        with torch.no_grad():
            o = tk.gla_decode_step(q, k, v, g, state)
            ro, expected_state = gated_linear_attention_ref(
                q, k, v, g, initial_state=expected_state, output_final_state=True
            )
        assert o.shape == (B, steps, H, V) and o.dtype == dtype
        assert_close_rms(o, ro, dtype, f"o ({steps} tokens)")
        assert_close_rms(state, expected_state, dtype, f"state ({steps} tokens)")


def test_decode_step_errors():
    q, k, v, g, _ = gla_inputs(1, 1, 2, 2, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="float32"):
        tk.gla_decode_step(q.detach(), k.detach(), v.detach(), g.detach(), torch.zeros(1, 2, 16, 16).bfloat16())
    with pytest.raises(ValueError, match="no backward"):
        tk.gla_decode_step(q, k, v, g, torch.zeros(1, 2, 16, 16))


def test_decode_dispatcher_backends_agree():
    q, k, v, g, _ = gla_inputs(2, 2, 4, 2, 16, 16, torch.float32, "cpu")
    states = [torch.randn(2, 2, 16, 16)]
    states.append(states[0].clone())
    with torch.no_grad():
        o_t = kernels.gla_decode_step(q, k, v, g, states[0], backend="triton")
        o_c = kernels.gla_decode_step(q, k, v, g, states[1], backend="chunked")
    assert_close_rms(o_t, o_c, torch.float32, "o")
    assert_close_rms(states[0], states[1], torch.float32, "state")


# ------------------------------------------------------------------------------------------------
# Sliding-window attention
# ------------------------------------------------------------------------------------------------


def check_swa(q, k, v, window, dtype, key_mask=None, sinks=None, lse_grad=True):
    o, lse = tk.sliding_window_attention(q, k, v, window, key_mask=key_mask, sinks=sinks)
    ro, rlse = sliding_window_attention_ref(q, k, v, window, key_mask=key_mask, sinks=sinks)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rlse))
    seen = torch.isfinite(rlse)
    assert_close_rms(o, ro, dtype, "o")
    assert_close_rms(lse[seen], rlse[seen], torch.float32, "lse")
    do, dlse = torch.randn_like(ro, dtype=torch.float32), torch.randn_like(rlse)
    inputs = [x for x in (q, k, v, sinks) if x is not None]
    loss, rloss = (o.float() * do).sum(), (ro.float() * do).sum()
    if lse_grad:
        loss, rloss = loss + (lse[seen] * dlse[seen]).sum(), rloss + (rlse[seen] * dlse[seen]).sum()
    for name, a, b in zip("q k v sinks".split(), grads_of(loss, inputs), grads_of(rloss, inputs)):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert_close_rms(a, b, dtype, f"d{name}")
    return o, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swa_matches_reference_gqa(device, dtype):
    q = leaf(torch.randn(2, 37, 4, 16, device=device), dtype)
    k = leaf(torch.randn(2, 37, 2, 16, device=device), dtype)
    v = leaf(torch.randn(2, 37, 2, 16, device=device), dtype)
    check_swa(q, k, v, 8, dtype, lse_grad=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swa_prefix_mask_sinks(device, dtype):
    # 20 queries after 13 buffered keys, 4 query heads on 1 KV head, D = 12 and DV = 20, padding
    # keys, several sink logits per head, gradients through lse as well.
    Tq, Tk = 20, 33
    q = leaf(torch.randn(2, Tq, 4, 12, device=device), dtype)
    k = leaf(torch.randn(2, Tk, 1, 12, device=device), dtype)
    v = leaf(torch.randn(2, Tk, 1, 20, device=device), dtype)
    key_mask = torch.rand(2, Tk, device=device) > 0.3
    key_mask[0, 20:30] = False  # queries of row 0 at positions 20..29 see no key: only the sinks
    sinks = leaf(torch.randn(4, 3, device=device), torch.float32)
    check_swa(q, k, v, 6, dtype, key_mask=key_mask, sinks=sinks)


@pytest.mark.parametrize("device", DEVICES)
def test_swa_queries_that_see_nothing(device):
    q = leaf(torch.randn(1, 24, 2, 16, device=device), torch.float32)
    k = leaf(torch.randn(1, 24, 2, 16, device=device), torch.float32)
    v = leaf(torch.randn(1, 24, 2, 16, device=device), torch.float32)
    key_mask = torch.ones(1, 24, dtype=torch.bool, device=device)
    key_mask[0, 5:15] = False
    o, lse = check_swa(q, k, v, 4, torch.float32, key_mask=key_mask)
    assert torch.isinf(lse[0, 8:15]).all() and (o[0, 8:15] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swa_decode_from_ring_buffer(device, dtype):
    # One new token against a window buffer: 3 slots still empty, the newest key in slot 5 of a
    # ring (storage order != time order): equals the time-ordered buffer.
    W, B, H, Hkv, D = 16, 2, 4, 2, 16
    k_time = torch.randn(B, W, Hkv, D, device=device).to(dtype)
    v_time = torch.randn(B, W, Hkv, D, device=device).to(dtype)
    valid = torch.ones(B, W, dtype=torch.bool, device=device)
    valid[1, :3] = False
    q = torch.randn(B, 1, H, D, device=device).to(dtype)
    perm = (torch.arange(W, device=device) + (W - 6)) % W  # slot s holds time step perm[s]
    ro, rlse = sliding_window_attention_ref(q, k_time, v_time, W, key_mask=valid)
    o, lse = tk.sliding_window_attention(q, k_time[:, perm], v_time[:, perm], W, key_mask=valid[:, perm])
    assert_close_rms(o, ro, dtype, "o")
    assert_close_rms(lse, rlse, torch.float32, "lse")


def test_swa_dispatcher_and_errors():
    q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
    o, lse = kernels.sliding_window_attention(q, k, v, window=5, backend="triton")
    o2, lse2 = tk.sliding_window_attention(q, k, v, 5)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    with pytest.raises(ValueError, match="window"):
        tk.sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="key_mask"):
        tk.sliding_window_attention(q, k, v, 4, key_mask=torch.ones(1, 19, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# Fused Liger attention
# ------------------------------------------------------------------------------------------------


def liger_reference(q_lin, k_lin, g, q, k, v, window, w, h0=None, cu_seqlens=None, key_mask=None, sinks=None):
    """The composition the fused kernel must equal: reference GLA and reference SWA, mixed in fp32."""
    o_lin, ht = gated_linear_attention_ref(
        q_lin, k_lin, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
    )
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):  # the window never crosses a sequence boundary
        mask = None if key_mask is None else key_mask[:, a:b]
        o, _ = sliding_window_attention_ref(q[:, a:b], k[:, a:b], v[:, a:b], window, key_mask=mask, sinks=sinks)
        parts.append(o)
    o_swa = torch.cat(parts, dim=1)
    return w * o_swa.float() + (1 - w) * o_lin.float(), ht


def liger_inputs(B, T, H, Hkv, K, D, V, dtype, device, n_state):
    q_lin, k_lin, v, g, h0 = gla_inputs(B, T, H, Hkv, K, V, dtype, device, n_state=n_state)
    q = leaf(torch.randn(B, T, H, D, device=device), dtype)
    k = leaf(torch.randn(B, T, Hkv, D, device=device), dtype)
    return q_lin, k_lin, g, q, k, v, h0


def check_fused(inputs, dtype, window, w, cu_seqlens=None, key_mask=None, sinks=None):
    q_lin, k_lin, g, q, k, v, h0 = inputs
    o, ht = tk.fused_liger_attention(
        q_lin, k_lin, g, q, k, v, window, window_weight=w, initial_state=h0, output_final_state=True,
        cu_seqlens=cu_seqlens, key_mask=key_mask, sinks=sinks,
    )  # fmt: skip
    ro, rht = liger_reference(q_lin, k_lin, g, q, k, v, window, w, h0, cu_seqlens, key_mask, sinks)
    assert o.dtype == dtype
    assert_close_rms(o, ro, dtype, "o")
    assert_close_rms(ht, rht, dtype, "final state")
    do, dht = torch.randn_like(ro), torch.randn_like(rht)
    named = {"q_lin": q_lin, "k_lin": k_lin, "g": g, "q": q, "k": k, "v": v, "h0": h0, "sinks": sinks}
    names = [n for n, x in named.items() if x is not None]
    params = [named[n] for n in names]
    loss = (o.float() * do).sum() + (ht * dht).sum()
    rloss = (ro * do).sum() + (rht * dht).sum()
    for name, a, b in zip(names, grads_of(loss, params), grads_of(rloss, params)):
        assert_close_rms(a, b, dtype, f"d{name}")
    with torch.no_grad():  # inference path (no o_swa kept) gives the same output
        o2, _ = tk.fused_liger_attention(
            q_lin, k_lin, g, q, k, v, window, window_weight=w, initial_state=h0, cu_seqlens=cu_seqlens,
            key_mask=key_mask, sinks=sinks,
        )  # fmt: skip
    assert torch.equal(o2, o.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_liger_matches_composed_reference(device, dtype):
    inputs = liger_inputs(2, 37, 2, 1, 16, 16, 16, dtype, device, n_state=2)
    check_fused(inputs, dtype, window=8, w=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_liger_varlen_mask_sinks(device, dtype):
    cu = torch.tensor([0, 7, 29, 40], device=device)
    inputs = liger_inputs(1, 40, 2, 1, 16, 12, 20, dtype, device, n_state=3)
    key_mask = torch.rand(1, 40, device=device) > 0.2
    sinks = leaf(torch.randn(2, device=device), torch.float32)
    check_fused(inputs, dtype, window=6, w=0.3, cu_seqlens=cu, key_mask=key_mask, sinks=sinks)


def test_fused_liger_dispatcher_backends_agree():
    inputs = liger_inputs(1, 24, 2, 2, 16, 16, 16, torch.float32, "cpu", n_state=1)
    q_lin, k_lin, g, q, k, v, h0 = (x.detach() for x in inputs)
    cu = torch.tensor([0, 9, 24])
    h0 = torch.cat([h0, h0 * 0.5])
    outs = [
        kernels.fused_liger_attention(
            q_lin, k_lin, g, q, k, v, window=5, window_weight=0.25, initial_state=h0, output_final_state=True,
            cu_seqlens=cu, backend=backend,
        )
        for backend in ("triton", "chunked", "reference")
    ]  # fmt: skip
    for o, ht in outs[1:]:
        assert_close_rms(outs[0][0], o, torch.float32, "o")
        assert_close_rms(outs[0][1], ht, torch.float32, "final state")
    ro, rht = liger_reference(q_lin, k_lin, g, q, k, v, 5, 0.25, h0, cu)
    assert_close_rms(outs[0][0], ro, torch.float32, "o vs composed reference")


def test_fused_liger_errors():
    q_lin, k_lin, g, q, k, v, _ = (x.detach() for x in liger_inputs(1, 16, 2, 2, 16, 16, 16, torch.float32, "cpu", 1))
    with pytest.raises(ValueError, match="window_weight"):
        tk.fused_liger_attention(q_lin, k_lin, g, q, k, v, 4, window_weight=1.5)
    with pytest.raises(ValueError, match="batch, time and heads"):
        tk.fused_liger_attention(q_lin, k_lin, g, q[:, :8], k, v, 4)
    with pytest.raises(ValueError, match="window"):
        tk.fused_liger_attention(q_lin, k_lin, g, q, k, v, -1)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU (no GPU needed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_kernel_compiles_for_h100(tmp_path):
    """Triton's full compiler (and the ptxas in its wheel) accepts every kernel at a real model's
    shapes for sm_90, in bf16 and fp32, without spilling registers at 8 warps in bf16."""
    import json
    import subprocess
    import sys

    out = tmp_path / "compile.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "linearize.kernels.triton.compile_check", "--num-warps", "8", "--json", str(out)]
    proc = subprocess.run([*cmd, "--dtypes", "bf16", "fp32"], env=env, capture_output=True, text=True, timeout=900)
    records = json.loads(out.read_text())
    assert not [r for r in records if not r["ok"]]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(records) == 2 * 25  # 16 kernel variants per dtype, 9 of the gated delta rule
    spilling = [(r["kernel"], r["stack"]) for r in records if r["dtype"] == "bf16" and r["stack"] > 16]
    assert not spilling, spilling


# ------------------------------------------------------------------------------------------------
# A converted model on the Triton backend (fused Liger op for prefill, decode-step op for decoding)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["liger", "lizard"])
def test_converted_model_on_triton_backend_equals_chunked(mixer, monkeypatch):
    import linearize
    from test_convert import _prefill_then_decode
    from tiny_models import VOCAB, tiny_model

    model = linearize.convert(tiny_model("llama"), linearize.ConversionConfig(mixer=mixer, window=4))
    ids = torch.randint(0, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    with torch.no_grad():
        monkeypatch.setenv(kernels.BACKEND_ENV, "chunked")
        want = model(ids, attention_mask=mask).logits
        monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
        got = model(ids, attention_mask=mask).logits
        stepped, _ = _prefill_then_decode(model, ids[:1], split=7)
    assert_close_rms(got, want, torch.float32, f"{mixer} full forward, triton vs chunked")
    assert_close_rms(stepped, want[:1], torch.float32, f"{mixer} prefill + decode on triton vs chunked forward")



@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_ops_take_mixed_dtypes_under_autocast(backend):
    """CUDA autocast returns bf16 projections but fp32 softmax feature maps and RoPE'd q/k: a GPU
    finetune failed on "q, k, v must share a dtype". Under autocast every op runs in autocast's
    dtype, the same as when given that dtype; without autocast mixed dtypes are still refused."""
    B, T, H, Hkv, D = 1, 20, 4, 2, 8
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D)
    fq, fk = q.softmax(-1), k.softmax(-1)  # fp32, as CUDA autocast leaves them
    v = torch.randn(B, T, Hkv, D).bfloat16()
    g = -torch.rand(B, T, Hkv, D)
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        o_gla, _ = kernels.gated_linear_attention(fq, fk, v, g, scale=1.0, backend=backend)
        o_swa, _ = kernels.sliding_window_attention(q, k, v, window=4, backend=backend)
        o_fused, _ = kernels.fused_liger_attention(fq, fk, g, q, k, v, window=4, backend=backend)
        state = torch.zeros(B, Hkv, D, D)
        o_step = kernels.gla_decode_step(fq[:, :1], fk[:, :1], v[:, :1], g[:, :1], state, backend=backend)
    want_gla, _ = kernels.gated_linear_attention(fq.to(bf), fk.to(bf), v, g, scale=1.0, backend=backend)
    want_swa, _ = kernels.sliding_window_attention(q.to(bf), k.to(bf), v, window=4, backend=backend)
    want_fused, _ = kernels.fused_liger_attention(fq.to(bf), fk.to(bf), g, q.to(bf), k.to(bf), v, window=4,
                                                  backend=backend)
    want_step = kernels.gla_decode_step(fq[:, :1].to(bf), fk[:, :1].to(bf), v[:, :1], g[:, :1],
                                        torch.zeros(B, Hkv, D, D), backend=backend)
    for what, got, want in (("gla", o_gla, want_gla), ("swa", o_swa, want_swa), ("fused", o_fused, want_fused),
                            ("decode step", o_step, want_step)):
        assert got.dtype == bf, what
        assert_close_rms(got, want, bf, f"{what} under autocast")  # autocast also casts ops inside chunked
    if backend == "triton":
        with pytest.raises(ValueError, match="must share a dtype"):
            kernels.gated_linear_attention(fq, fk, v, g, backend=backend)
