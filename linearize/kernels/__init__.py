"""Ops for the converted layers, as functions; one dispatcher per op.

Backends:
    ``reference``  naive fp32 loops (``reference.py``), the ground truth for tests
    ``chunked``    chunked PyTorch (``chunked.py``), the path everywhere without a GPU
    ``triton``     Triton kernels (``linearize.kernels.triton``), picked for CUDA tensors

``backend=None`` picks Triton for CUDA tensors when Triton imports, else chunked. The environment
variable ``LINEARIZE_KERNEL_BACKEND`` overrides the automatic choice (for tests and benchmarks).

This package imports only torch (and Triton, lazily): nothing from transformers.
"""

from __future__ import annotations

import functools
import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch

from .chunked import RECURRENT_MAX_T
from .chunked import gated_linear_attention as chunked_gla
from .chunked import gla_step_ as chunked_gla_step_
from .chunked import sliding_window_attention as chunked_swa
from .reference import gated_linear_attention_ref, sliding_window_attention_ref
from .validate import check_gla_inputs, check_swa_inputs

BACKENDS = ("reference", "chunked", "triton")
BACKEND_ENV = "LINEARIZE_KERNEL_BACKEND"


@lru_cache(maxsize=1)
def _triton_ops() -> ModuleType | None:
    """The Triton ops module, or None where Triton (or the module) is not importable.

    Imported by name so a checkpoint's exported modeling code (which has no Triton files of its
    own) picks the kernels up from an installed ``linearize`` and falls back to chunked without it.
    """
    try:
        return importlib.import_module("linearize.kernels.triton")
    except ImportError:
        return None


def resolve_backend(backend: str | None, like: torch.Tensor) -> str:
    """The backend an op runs on: the explicit one, the environment's, or the automatic choice."""
    backend = backend or os.environ.get(BACKEND_ENV) or None
    if backend is None:
        return "triton" if like.is_cuda and _triton_ops() is not None else "chunked"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and _triton_ops() is None:
        raise ImportError("the 'triton' kernel backend needs the triton package: pip install triton")
    return backend


def _gla(backend: str, chunk_size: int | None):
    """The GLA function of ``backend``; ``chunk_size`` goes to the chunked path (the Triton kernels
    keep their own, the reference has none)."""
    fn = _op(backend, "gla")
    return functools.partial(fn, chunk_size=chunk_size) if backend == "chunked" and chunk_size else fn


def _op(backend: str, op: str):
    """The function implementing ``op`` ("gla" or "swa") on ``backend``."""
    if backend == "triton":
        return getattr(_triton_ops(), {"gla": "gated_linear_attention", "swa": "sliding_window_attention"}[op])
    table = {
        ("chunked", "gla"): chunked_gla,
        ("chunked", "swa"): chunked_swa,
        ("reference", "gla"): gated_linear_attention_ref,
        ("reference", "swa"): sliding_window_attention_ref,
    }
    return table[backend, op]


def _per_key(g: torch.Tensor, K: int, backend: str) -> torch.Tensor:
    """g as ``backend`` takes it: the chunked backend takes a per-head decay [.., 1] as it is (its
    scalar-decay form, ``chunked.SCALAR_DECAY``); the reference and Triton see it expanded to K
    (their per-key semantics, unchanged; autograd sums the gradient back to [.., 1])."""
    return g if backend == "chunked" or g.shape[-1] == K else g.expand(*g.shape[:-1], K)


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The activations in autocast's dtype where autocast is on for their device, else unchanged.

    Under mixed precision the projections come out in bf16/fp16 while softmax feature maps and
    RoPE come out in fp32; the ops (like any custom op under autocast) run in autocast's dtype.
    Decays, states and masks are not passed here: they keep their own dtypes.
    """
    like = next(t for t in tensors if t is not None)
    device_type = like.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``, ``o_t = scale·q_t S_t``.

    q: [B, T, H, K]; k: [B, T, Hkv, K]; g: [B, T, Hkv, K] (log decay per key dimension) or
    [B, T, Hkv, 1] (one log decay per token and head, the same on every key dimension: Lizard's
    learned gate; the chunked backend then takes its matmul-only scalar-decay form, the other
    backends see g expanded); v: [B, T, Hkv, V]; initial_state: [N, Hkv, K, V]; cu_seqlens: [N + 1]
    (B == 1). Returns o [B, T, H, V] (q.dtype) and the fp32 final state [N, Hkv, K, V] when
    ``output_final_state``. ``scale`` defaults to K**-0.5. ``chunk_size``: chunk length of the
    chunked backend (None: ``chunked.CHUNK_SIZE``).
    """
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens, per_head_decay=True)
    q, k, v = _autocast(q, k, v)
    name = resolve_backend(backend, q)
    fn = _gla(name, chunk_size)
    return fn(
        q, k, v, _per_key(g, q.shape[-1], name), scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens
    )


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention over the last ``window`` keys, the query's own included.

    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D], Tk >= Tq (queries are the last Tq positions);
    key_mask: [B, Tk] bool; sinks: [H] or [H, M] denominator-only logits.
    Returns o [B, Tq, H, D] (q.dtype) and lse [B, Tq, H] (fp32).
    """
    check_swa_inputs(q, k, v, window, key_mask, sinks)
    q, k, v = _autocast(q, k, v)
    fn = _op(resolve_backend(backend, q), "swa")
    return fn(q, k, v, window=window, scale=scale, key_mask=key_mask, sinks=sinks)


__all__ = ["BACKENDS", "RECURRENT_MAX_T", "gated_linear_attention", "resolve_backend", "sliding_window_attention"]


# ------------------------------------------------------------------------------------------------
# Decode step and fused Liger attention (Triton kernels in ``linearize.kernels.triton``; elsewhere
# composed from the ops above).
# ------------------------------------------------------------------------------------------------


def gla_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Advance the recurrent ``state`` [B, Hkv, K, V] (fp32) by 1..few tokens, in place.

    q: [B, Tn, H, K]; k: [B, Tn, Hkv, K]; g: [B, Tn, Hkv, K] or [B, Tn, Hkv, 1] (one decay per head,
    as in ``gated_linear_attention``); v: [B, Tn, Hkv, V]. Returns o [B, Tn, H, V] (q.dtype).
    The Triton kernel has no backward. On the chunked backend one token without autograd takes
    ``chunked.gla_step_`` (the state updated in place, three ops); otherwise the backends go through
    ``gated_linear_attention`` and copy the new state back.
    """
    check_gla_inputs(q, k, v, g, state, None, per_head_decay=True)
    q, k, v = _autocast(q, k, v)
    name = resolve_backend(backend, q)
    g = _per_key(g, q.shape[-1], name)
    if name == "triton":
        return _triton_ops().gla_decode_step(q, k, v, g, state, scale=scale)
    if name == "chunked" and q.shape[1] == 1 and not torch.is_grad_enabled() and _in_place_ok(state):
        return chunked_gla_step_(q, k, v, g, state, scale=q.shape[-1] ** -0.5 if scale is None else scale).to(q.dtype)
    o, new_state = _op(name, "gla")(q, k, v, g, scale=scale, initial_state=state, output_final_state=True)
    with torch.no_grad():
        state.copy_(new_state)
    return o


def _in_place_ok(state: torch.Tensor) -> bool:
    """Whether the single-token step may update ``state`` in place: fp32 and contiguous."""
    return state.dtype == torch.float32 and state.is_contiguous()


def fused_liger_attention(
    q_lin: torch.Tensor,
    k_lin: torch.Tensor,
    g: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    window_weight: float = 0.5,
    scale_lin: float | None = None,
    scale_swa: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Liger attention ``o = w·SWA(q, k, v) + (1 − w)·GLA(q_lin, k_lin, v, g)``, w = window_weight.

    q_lin [B, T, H, K], k_lin [B, T, Hkv, K] and g [B, T, Hkv, K or 1] (linear branch, no RoPE); q [B, T, H, D] and
    k [B, T, Hkv, D] (window branch, RoPE'd); v [B, T, Hkv, V] shared. The window never crosses a
    ``cu_seqlens`` boundary. Returns o [B, T, H, V] (q.dtype) and the linear branch's fp32 final
    state (or None). One Triton kernel on CUDA; elsewhere the two ops run and are mixed.
    """
    check_gla_inputs(q_lin, k_lin, v, g, initial_state, cu_seqlens, per_head_decay=True)
    check_swa_inputs(q, k, v, window, key_mask, sinks)
    q_lin, k_lin, q, k, v = _autocast(q_lin, k_lin, q, k, v)
    name = resolve_backend(backend, q)
    g = _per_key(g, q_lin.shape[-1], name)
    if name == "triton":
        return _triton_ops().fused_liger_attention(
            q_lin, k_lin, g, q, k, v, window, window_weight=window_weight, scale_lin=scale_lin,
            scale_swa=scale_swa, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, key_mask=key_mask, sinks=sinks,
        )  # fmt: skip
    o_lin, final = _gla(name, chunk_size)(
        q_lin, k_lin, v, g, scale=scale_lin, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    swa = _op(name, "swa")
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask = None if key_mask is None else key_mask[:, a:b]
        o, _ = swa(q[:, a:b], k[:, a:b], v[:, a:b], window=window, scale=scale_swa, key_mask=mask, sinks=sinks)
        parts.append(o)
    o_swa = torch.cat(parts, dim=1)
    return (window_weight * o_swa.float() + (1.0 - window_weight) * o_lin.float()).to(q.dtype), final


__all__ += ["fused_liger_attention", "gla_decode_step"]
