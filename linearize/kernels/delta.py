"""Gated delta rule (Gated DeltaNet / Kimi KDA): the op and its decode step, one dispatcher.

    S'_t = diag(exp(g_t)) S_{t-1}                       g_t <= 0: log decay per key channel [K]
                                                        (KDA) or one scalar per head (Gated DeltaNet)
    S_t  = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ            the error-correcting write, β_t in (0, 1)
    o_t  = scale · q_t S_t                              scale defaults to K**-0.5

The state is [K, V] per key/value head (fp32); query head h reads key/value head
``h // (H // Hkv)`` (GQA). **The op does not normalise k**: the caller L2-normalises the keys
(after any feature map, per head over K), because ``‖k_t‖ <= 1`` with ``0 < β_t <= 1`` is what keeps
``I − β_t k_t k_tᵀ`` a contraction and the state bounded. ``beta`` is one value per token and
key/value head (``σ`` of a projection).

Backends, chosen like ``linearize.kernels.resolve_backend``: ``reference`` (``delta_reference.py``,
naive fp32 loop), ``chunked`` (``delta_chunked.py``, the WY / UT-transform form in PyTorch) and
``triton`` (``linearize.kernels.triton.delta``: chunked forward and backward, decode step).
Under autocast q, k, v run in autocast's dtype;
beta, g and the state keep theirs. Outputs come back in q's (possibly autocast) dtype.
"""

from __future__ import annotations

import functools
import importlib
from functools import lru_cache
from types import ModuleType

import torch

from . import _autocast, resolve_backend
from .delta_chunked import gated_delta_rule as chunked_delta
from .delta_reference import gated_delta_rule_ref
from .delta_validate import check_chunk_size, check_delta_inputs


@lru_cache(maxsize=1)
def _triton_delta() -> ModuleType:
    return importlib.import_module("linearize.kernels.triton.delta")


def _op(backend: str, chunk_size: int | None):
    """The function of ``backend``; ``chunk_size`` goes to the chunked path (the Triton kernels keep
    their own chunk of 16, the reference has none)."""
    if backend == "triton":
        return _triton_delta().gated_delta_rule
    if backend == "chunked":
        return functools.partial(chunked_delta, chunk_size=chunk_size)
    return gated_delta_rule_ref


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences (see the module docstring for the recurrence).

    q: [B, T, H, K]; k: [B, T, Hkv, K], L2-normalised by the caller; v: [B, T, Hkv, V];
    beta: [B, T, Hkv] in (0, 1); g: [B, T, Hkv, K] (per key channel) or [B, T, Hkv] (scalar) log
    decay <= 0; initial_state: [N, Hkv, K, V] fp32; cu_seqlens: [N + 1] offsets of packed sequences
    (B == 1, the state restarts at each). Returns o [B, T, H, V] (q.dtype) and the fp32 final state
    [N, Hkv, K, V] when ``output_final_state``. ``chunk_size``: chunk length of the chunked backend
    (None: ``delta_chunked.CHUNK_SIZE``; the Triton kernels always use 16, the reference has none).
    Differentiable in q, k, v, beta, g and initial_state on every backend.
    """
    check_delta_inputs(q, k, v, beta, g, initial_state, cu_seqlens)
    check_chunk_size(chunk_size)
    q, k, v = _autocast(q, k, v)
    fn = _op(resolve_backend(backend, q), chunk_size)
    return fn(
        q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


def delta_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Advance the recurrent ``state`` [B, Hkv, K, V] (fp32) by 1..few tokens, in place.

    q: [B, Tn, H, K]; k: [B, Tn, Hkv, K]; v: [B, Tn, Hkv, V]; beta: [B, Tn, Hkv]; g: [B, Tn, Hkv, K]
    or [B, Tn, Hkv]. Returns o [B, Tn, H, V] (q.dtype). The Triton kernel has no backward; the other
    backends go through ``gated_delta_rule`` (differentiate through ``initial_state`` there).
    """
    check_delta_inputs(q, k, v, beta, g, state, None)
    q, k, v = _autocast(q, k, v)
    name = resolve_backend(backend, q)
    if name == "triton":
        return _triton_delta().delta_decode_step(q, k, v, beta, g, state, scale=scale)
    o, new_state = _op(name, None)(q, k, v, beta, g, scale=scale, initial_state=state, output_final_state=True)
    with torch.no_grad():
        state.copy_(new_state)
    return o


__all__ = ["delta_decode_step", "gated_delta_rule"]
