"""The gated delta rule: chunked PyTorch equals the naive fp32 reference (output, final state, every
gradient), the decode step equals the op, inputs are checked, and both agree with
flash-linear-attention's naive references where fla can be imported (``LINEARIZE_FLA_PATH``)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms

from linearize.kernels import delta, delta_chunked, delta_reference

DTYPES = [torch.float32, torch.bfloat16]
GATES = ["channel", "scalar"]


def _inputs(B=2, T=100, H=4, Hkv=2, K=8, V=6, gate="channel", n_states=None, decay="gdn"):
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, Hkv, K), dim=-1)  # the caller's job: ||k|| = 1
    v = torch.randn(B, T, Hkv, V)
    beta = torch.randn(B, T, Hkv).sigmoid()
    shape = (B, T, Hkv, K) if gate == "channel" else (B, T, Hkv)
    if decay == "gdn":  # mild, as a trained gate
        g = F.logsigmoid(torch.randn(shape)) / 4
    elif decay == "strong":  # down to -20 per step
        g = -20 * torch.rand(shape)
    elif decay == "spiky":  # huge forgetting steps between tiny ones: tests fp32 cancellation
        g = F.logsigmoid(torch.randn(shape)) / 16
        g[:, ::7] = -1e4
    s0 = torch.randn(n_states or B, Hkv, K, V)
    return q, k, v, beta, g, s0


def _leaves(dtype, tensors):
    """Kernel inputs (q, k, v rounded to ``dtype``; beta and g too) and fp32 copies for the reference."""
    ours = [t.to(dtype).requires_grad_() for t in tensors]
    ref = [t.detach().float().requires_grad_() for t in ours]
    return ours, ref


def _grads(outputs, cotangents, inputs):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def _check(dtype, q, k, v, beta, g, s0, cu_seqlens=None, fn=delta_chunked.gated_delta_rule, **kw):
    (q1, k1, v1, b1, g1), (q2, k2, v2, b2, g2) = _leaves(dtype, (q, k, v, beta, g))
    states = [None, None] if s0 is None else [s0.clone().requires_grad_(), s0.clone().requires_grad_()]
    o1, f1 = fn(q1, k1, v1, b1, g1, initial_state=states[0], output_final_state=True, cu_seqlens=cu_seqlens, **kw)
    o2, f2 = delta_reference.gated_delta_rule_ref(
        q2, k2, v2, b2, g2, initial_state=states[1], output_final_state=True, cu_seqlens=cu_seqlens
    )
    assert o1.dtype == dtype and f1.dtype == torch.float32
    assert o1.shape == o2.shape and f1.shape == f2.shape
    assert torch.isfinite(o1).all() and torch.isfinite(f1).all()
    assert_close_rms(o1, o2, dtype, "o")
    assert_close_rms(f1, f2, dtype, "final state")
    do, dS = torch.randn_like(o2).to(dtype).float(), torch.randn_like(f2)
    ins1 = [q1, k1, v1, b1, g1] + ([] if s0 is None else [states[0]])
    ins2 = [q2, k2, v2, b2, g2] + ([] if s0 is None else [states[1]])
    names = ["q", "k", "v", "beta", "g", "initial_state"]
    for name, a, b in zip(names, _grads([o1, f1], [do, dS], ins1), _grads([o2, f2], [do, dS], ins2)):
        assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
        assert_close_rms(a, b, dtype, f"d{name}")


# ------------------------------------------------------------------------------------------------
# Chunked equals the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_matches_reference(dtype, gate):
    _check(dtype, *_inputs(T=100, gate=gate))  # GQA (4 on 2); one full chunk of 64 and a ragged one


@pytest.mark.parametrize("chunk_size", [48, 8, 1])
def test_chunk_sizes(chunk_size):
    # 48: three sub-chunks of 16; 8: one sub-chunk per chunk; 1: every token its own chunk
    _check(torch.float32, *_inputs(T=37), chunk_size=chunk_size)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("decay", ["strong", "spiky"])
def test_strong_decay_is_exact(decay, gate):
    q, k, v, beta, g, s0 = _inputs(T=70, gate=gate, decay=decay)
    assert g.min() <= -19.0
    _check(torch.float32, q, k, v, beta, g, s0)


def test_mha_without_initial_state():
    q, k, v, beta, g, _ = _inputs(B=1, T=20, H=2, Hkv=2, K=4, V=4)
    _check(torch.float32, q, k, v, beta, g, None, chunk_size=16)
    o, final = delta_chunked.gated_delta_rule(q, k, v, beta, g)
    assert final is None and o.shape == (1, 20, 2, 4)


def test_scale():
    q, k, v, beta, g, s0 = _inputs(B=1, T=9)
    o1, _ = delta_chunked.gated_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=s0)
    o2, _ = delta_reference.gated_delta_rule_ref(q, k, v, beta, g, scale=0.3, initial_state=s0)
    assert_close_rms(o1, o2, torch.float32, "o with scale 0.3")


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences(dtype, gate):
    cu = torch.tensor([0, 5, 5, 6, 75, 90])  # an empty and a one-token sequence included
    _check(dtype, *_inputs(B=1, T=90, n_states=5, gate=gate), cu_seqlens=cu, chunk_size=32)


def test_packed_equals_separate_calls():
    cu = [0, 17, 60]
    q, k, v, beta, g, s0 = _inputs(B=1, T=60, n_states=2)
    o, final = delta_chunked.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, cu_seqlens=torch.tensor(cu))
    for n in range(2):
        a, b = cu[n], cu[n + 1]
        o_n, f_n = delta_chunked.gated_delta_rule(
            q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b], initial_state=s0[n : n + 1], output_final_state=True
        )
        assert_close_rms(o[:, a:b], o_n, torch.float32, f"o of sequence {n}")
        assert_close_rms(final[n : n + 1], f_n, torch.float32, f"state of sequence {n}")


def test_long_sequence_in_segments(monkeypatch):
    """Sequences longer than SEGMENT_TOKENS run segment by segment (state carried): still exact."""
    monkeypatch.setattr(delta_chunked.chunked, "SEGMENT_TOKENS", 20)  # chunk 8 -> segments of 16 tokens
    _check(torch.float32, *_inputs(T=53, gate="scalar"), chunk_size=8)


@pytest.mark.parametrize("T", [1, 3])
def test_few_tokens_run_the_recurrence(T):
    _check(torch.float32, *_inputs(T=T))


def test_state_stays_bounded_with_normalised_keys():
    """β = 1, no decay, unit keys: each write is a projection, so the state norm never grows past
    what the values put in (here ||S|| <= sqrt(T)·max||v||), over a long sequence."""
    q, k, v, _, _, _ = _inputs(B=1, T=400, H=2, Hkv=2, K=8, V=4, gate="scalar")
    beta, g = torch.ones(1, 400, 2), torch.zeros(1, 400, 2)
    _, final = delta_chunked.gated_delta_rule(q, k, v, beta, g, output_final_state=True)
    assert torch.isfinite(final).all()
    bound = 400**0.5 * v.norm(dim=-1).max()
    assert final.norm(dim=(-2, -1)).max() <= bound
    # the delta rule overwrites: writing the same key twice keeps only the second value
    k1 = F.normalize(torch.randn(1, 1, 1, 8), dim=-1).expand(1, 2, 1, 8)
    v2 = torch.randn(1, 2, 1, 4)
    _, S = delta_chunked.gated_delta_rule(
        torch.zeros(1, 2, 1, 8), k1, v2, torch.ones(1, 2, 1), torch.zeros(1, 2, 1), output_final_state=True
    )
    torch.testing.assert_close(torch.einsum("k,kv->v", k1[0, 0, 0], S[0, 0]), v2[0, 1, 0])


@pytest.mark.parametrize("split", [37, 64, 97])
def test_prefill_then_continue_equals_one_call(split):
    q, k, v, beta, g, s0 = _inputs(T=100)
    o, final = delta_chunked.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    parts = [[x[:, :split] for x in (q, k, v, beta, g)], [x[:, split:] for x in (q, k, v, beta, g)]]
    o_a, s_a = delta_chunked.gated_delta_rule(*parts[0], initial_state=s0, output_final_state=True)
    o_b, s_b = delta_chunked.gated_delta_rule(*parts[1], initial_state=s_a, output_final_state=True)
    assert_close_rms(torch.cat([o_a, o_b], dim=1), o, torch.float32, "o")
    assert_close_rms(s_b, final, torch.float32, "final state")


# ------------------------------------------------------------------------------------------------
# Dispatcher and decode step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gate", GATES)
def test_decode_step_equals_the_op_and_updates_state_in_place(backend, gate):
    q, k, v, beta, g, s0 = _inputs(B=2, T=30, gate=gate)
    o, final = delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, backend="reference")
    state = s0.clone()
    ptr, outs = state.data_ptr(), []
    for a, b in [(0, 20), (20, 21), (21, 24), (24, 30)]:  # a prefill, one token, a few, the rest
        outs.append(delta.delta_decode_step(*(x[:, a:b] for x in (q, k, v, beta, g)), state, backend=backend))
    assert state.data_ptr() == ptr
    assert_close_rms(torch.cat(outs, dim=1), o, torch.float32, "o")
    assert_close_rms(state, final, torch.float32, "state")


def test_dispatcher_backends_agree_and_cpu_defaults_to_chunked():
    q, k, v, beta, g, s0 = _inputs(T=40)
    o1, f1 = delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, backend="chunked")
    o2, f2 = delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, backend="reference")
    assert_close_rms(o1, o2, torch.float32, "o")
    assert_close_rms(f1, f2, torch.float32, "final state")
    o3, _ = delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0)
    assert torch.equal(o3, o1)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        delta.gated_delta_rule(q, k, v, beta, g, backend="cuda")


def test_autocast_runs_in_autocast_dtype():
    q, k, v, beta, g, s0 = _inputs(B=1, T=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, final = delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, b, g, s: (q[0], k, v, b, g, s), "q must have shape"),
        (lambda q, k, v, b, g, s: (q, k[..., :4], v, b, g, s), "k must be"),
        (lambda q, k, v, b, g, s: (q, k, v, b, g[..., :4], s), "g must be"),
        (lambda q, k, v, b, g, s: (q, k, v, b[..., None], g, s), "beta must have shape"),
        (lambda q, k, v, b, g, s: (q, k, v, b[:, :, :1], g, s), "v and beta must have 2 heads"),
        (lambda q, k, v, b, g, s: (q[:, :, :3], k, v, b, g, s), "multiple of key/value heads"),
        (lambda q, k, v, b, g, s: (q, k, v[:, :5], b, g, s), "share batch and time"),
        (lambda q, k, v, b, g, s: (q, k, v, b, g, s[:, :, :2]), "initial_state must be"),
        (lambda q, k, v, b, g, s: (q, k, v, b, g[..., 0, None, None], s), "g must have shape"),
    ],
)
def test_bad_shapes_raise(change, message):
    q, k, v, beta, g, s0 = change(*_inputs(T=6))
    with pytest.raises(ValueError, match=message):
        delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0, backend="chunked")


def test_bad_packing_and_chunk_size_raise():
    q, k, v, beta, g, _ = _inputs(B=2, T=6)
    with pytest.raises(ValueError, match="batch must be 1"):
        delta.gated_delta_rule(q, k, v, beta, g, cu_seqlens=torch.tensor([0, 6]))
    one = [x[:1] for x in (q, k, v, beta, g)]
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        delta.gated_delta_rule(*one, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        delta.gated_delta_rule(*one, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        delta.gated_delta_rule(q, k, v, beta, g, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state must be"):
        delta.delta_decode_step(q, k, v, beta, g, torch.zeros(1, 2, 8, 6))


# ------------------------------------------------------------------------------------------------
# Cross-check with flash-linear-attention's naive references (never a dependency)
# ------------------------------------------------------------------------------------------------


def _fla_naive(op: str):
    """fla's ``ops/<op>/naive.py`` imported by file (``import fla`` fails with triton 3.9).

    fla comes from ``LINEARIZE_FLA_PATH`` (a ``pip install --no-deps --target DIR
    flash-linear-attention==0.5.2 fla-core==0.5.2 einops`` folder) or the environment."""
    roots = [Path(p) for p in os.environ.get("LINEARIZE_FLA_PATH", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("fla") if not roots else None
    roots += [Path(p).parent for p in (spec.submodule_search_locations if spec else [])]
    for root in roots:
        path = root / "fla" / "ops" / op / "naive.py"
        if not path.exists():
            continue
        sys.path.insert(0, str(root))  # for einops installed beside it
        try:
            file_spec = importlib.util.spec_from_file_location(f"_fla_naive_{op}", path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            return module
        except ImportError as e:
            pytest.skip(f"fla's {path} does not import: {e}")
        finally:
            sys.path.remove(str(root))
    pytest.skip("flash-linear-attention not found: set LINEARIZE_FLA_PATH to a pip --target folder holding fla and einops")


@pytest.mark.parametrize("gate", GATES)
def test_matches_flash_linear_attention_naive(gate):
    """Ours (GQA: 4 query heads on 2 kv heads) equals fla's recurrent and chunk naive references run
    with every head's k, v, beta, g repeated per query head (fla: [B, T, H, .], g natural-log decay,
    per channel in ``kda``, per head in ``gated_delta_rule``, default scale K^-0.5)."""
    fla = _fla_naive("kda" if gate == "channel" else "gated_delta_rule")
    q, k, v, beta, g, s0 = _inputs(B=2, T=128, gate=gate)  # fla's chunk naive needs T % 64 == 0
    group = q.shape[2] // k.shape[2]
    kr, vr, br, gr = (x.repeat_interleave(group, dim=2) for x in (k, v, beta, g))
    s0r = s0.repeat_interleave(group, dim=1)
    o, final = delta.gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, backend="chunked")
    if gate == "channel":
        runs = {
            "naive_recurrent_kda": fla.naive_recurrent_kda(q, kr, vr, gr, br, initial_state=s0r, output_final_state=True),
            "naive_chunk_kda": fla.naive_chunk_kda(q, kr, vr, gr, br, initial_state=s0r, output_final_state=True),
        }
    else:
        runs = {
            "naive_recurrent_gated_delta_rule": fla.naive_recurrent_gated_delta_rule(
                q, kr, vr, br, gr, initial_state=s0r, output_final_state=True
            ),
            "naive_chunk_gated_delta_rule": fla.naive_chunk_gated_delta_rule(
                q, kr, vr, gr, br, initial_state=s0r, output_final_state=True
            ),
        }
    for name, (o_fla, s_fla) in runs.items():
        assert_close_rms(o, o_fla, torch.float32, f"o vs fla {name}")
        assert_close_rms(final.repeat_interleave(group, dim=1), s_fla, torch.float32, f"state vs fla {name}")
