"""The Triton gated delta rule equals the naive reference: outputs, final states and every gradient. On CPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); ``TRITON_INTERPRET=0 pytest -m gpu`` runs the same tests compiled on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import assert_close_rms

from linearize.kernels import delta
from linearize.kernels.delta_reference import gated_delta_rule_ref
from linearize.kernels.triton import delta as td
from linearize.kernels.triton._utils import INTERPRET

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
GATES = ["channel", "scalar"]


def _inputs(B, T, H, Hkv, K, V, gate, dtype, device, n_state=None, decay=0.25):
    q = torch.randn(B, T, H, K, device=device)
    k = F.normalize(torch.randn(B, T, Hkv, K, device=device), dim=-1)
    v = torch.randn(B, T, Hkv, V, device=device)
    beta = torch.randn(B, T, Hkv, device=device).sigmoid()
    g = F.logsigmoid(torch.randn((B, T, Hkv, K) if gate == "channel" else (B, T, Hkv), device=device)) * decay
    h0 = None if n_state is None else torch.randn(n_state, Hkv, K, V, device=device)
    return [x.to(dtype) for x in (q, k, v, beta, g)], h0


def _check_forward(xs, h0, dtype, cu_seqlens=None):
    o, ht = td.gated_delta_rule(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    ro, rht = gated_delta_rule_ref(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    assert o.dtype == xs[0].dtype and o.shape == ro.shape
    assert ht.dtype == torch.float32 and ht.shape == rht.shape
    assert_close_rms(o, ro, dtype, "o")
    assert_close_rms(ht, rht, dtype, "final state")


def _check_grads(xs, h0, dtype, cu_seqlens=None, final=True):
    """Output, final state and the gradients of q, k, v, beta, g and the initial state."""
    ours = [x.detach().requires_grad_() for x in xs] + ([] if h0 is None else [h0.clone().requires_grad_()])
    ref = [x.detach().float().requires_grad_() for x in ours]
    state = (lambda t: None if h0 is None else t[5])
    o, ht = td.gated_delta_rule(*ours[:5], initial_state=state(ours), output_final_state=final, cu_seqlens=cu_seqlens)
    ro, rht = gated_delta_rule_ref(*ref[:5], initial_state=state(ref), output_final_state=final, cu_seqlens=cu_seqlens)
    assert o.dtype == dtype
    assert_close_rms(o, ro, dtype, "o")
    do = torch.randn_like(ro)
    loss, rloss = (o.float() * do).sum(), (ro * do).sum()
    if final:
        assert_close_rms(ht, rht, dtype, "final state")
        dht = torch.randn_like(rht)
        loss, rloss = loss + (ht * dht).sum(), rloss + (rht * dht).sum()
    else:
        assert ht is None
    names = ["q", "k", "v", "beta", "g", "initial_state"]
    for name, a, b in zip(names, torch.autograd.grad(loss, ours), torch.autograd.grad(rloss, ref)):
        assert a.dtype == (torch.float32 if name == "initial_state" else dtype)
        assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
        assert_close_rms(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_reference(dtype, gate, device):
    # B = 2, GQA 2 on 1, K = 20 (two key blocks of 16 in the interpreter), T = 36 ragged in chunks of 16
    xs, h0 = _inputs(2, 36, 2, 1, 20, 16, gate, dtype, device, n_state=2)
    _check_grads(xs, h0, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_packed_sequences(device):
    cu = torch.tensor([0, 5, 5, 6, 40], dtype=torch.int32, device=device)  # empty and one-token sequences
    xs, h0 = _inputs(1, 40, 2, 1, 16, 16, "channel", torch.float32, device, n_state=4)
    _check_grads(xs, h0, torch.float32, cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", GATES)
def test_gradients_strong_decay_without_states(gate, device):
    xs, _ = _inputs(1, 33, 2, 2, 16, 16, gate, torch.float32, device)
    xs[4] = -20 * torch.rand_like(xs[4])  # down to -20 per step (a single -1e4 step is not exact: see delta.py)
    _check_grads(xs, None, torch.float32, final=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, gate", [(torch.float32, "channel"), (torch.bfloat16, "scalar")], ids=str)
def test_forward_matches_reference(dtype, gate, device):
    # GQA 4 on 2; K = 20 and V = 24 not multiples of the 16-blocks; T = 40 ragged in chunks of 16
    xs, h0 = _inputs(2, 40, 4, 2, 20, 24, gate, dtype, device, n_state=2)
    _check_forward(xs, h0, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", GATES)
def test_forward_packed_sequences(gate, device):
    cu = torch.tensor([0, 5, 5, 6, 40, 57], dtype=torch.int32, device=device)  # empty and one-token sequences
    xs, h0 = _inputs(1, 57, 2, 1, 16, 16, gate, torch.float32, device, n_state=5)
    _check_forward(xs, h0, torch.float32, cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_strong_decay_without_initial_state(device):
    xs, _ = _inputs(1, 33, 2, 2, 16, 16, "channel", torch.float32, device, decay=20.0)
    o, ht = td.gated_delta_rule(*xs)
    ro, _ = gated_delta_rule_ref(*xs)
    assert ht is None
    assert torch.isfinite(o).all()
    assert_close_rms(o, ro, torch.float32, "o")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_matches_reference_in_place(dtype, gate, device):
    xs, h0 = _inputs(2, 3, 4, 2, 20, 40, gate, dtype, device, n_state=2)
    ro, rht = gated_delta_rule_ref(*xs, initial_state=h0, output_final_state=True)
    state = h0.clone()
    o = delta.delta_decode_step(*xs, state, backend="triton")
    assert o.dtype == dtype
    assert_close_rms(o, ro, dtype, "o")
    assert_close_rms(state, rht, torch.float32, "state")


def test_decode_step_refuses_gradients():
    xs, h0 = _inputs(1, 2, 2, 1, 16, 16, "channel", torch.float32, "cpu", n_state=1)
    xs[0].requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        delta.delta_decode_step(*xs, h0.clone(), backend="triton")


def test_dispatcher_runs_triton_by_name():
    xs, h0 = _inputs(1, 20, 2, 1, 16, 16, "scalar", torch.float32, "cpu", n_state=1)
    o, ht = delta.gated_delta_rule(*xs, initial_state=h0, output_final_state=True, backend="triton")
    ro, rht = gated_delta_rule_ref(*xs, initial_state=h0, output_final_state=True)
    assert_close_rms(o, ro, torch.float32, "o")
    assert_close_rms(ht, rht, torch.float32, "final state")
