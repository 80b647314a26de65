"""Training-time memory savers that change no number.

The decoder's gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2/3,
Gemma3), leaves three [T, intermediate] tensors to autograd: ``gate`` (for the activation's
backward), ``act(gate)`` and ``up`` (for the product's). :func:`light_mlps` runs the activation and
the product as one autograd Function that keeps ``gate`` and ``up`` only and recomputes ``act(gate)``
in the backward (an elementwise op; the matmuls are not run again): a third of the MLPs' saved
bytes, 12.6 MB per SmolLM2 layer at T = 2048, with the same gradients bit for bit (the backward
applies autograd's own formulas to the same numbers: ``d_up = dy * act(gate)``, ``d_gate =
act'(gate) * (dy * up)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..environment import glibc

logger = logging.getLogger(__name__)

_GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
# Classes whose forward was checked to be the gated product (an exact match on a probe input).
_CHECKED: dict[type, bool] = {}


class _GatedProduct(torch.autograd.Function):
    """act(gate) * up, saving gate and up only. gate, up [..., I]."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            g = gate.detach().requires_grad_(need_gate)
            a = ctx.act(g)  # [..., I] recomputed
        d_up = dy * a.detach() if need_up else None
        d_gate = torch.autograd.grad(a, g, dy * up)[0] if need_gate else None
        return d_gate, d_up, None


def _light_forward(self, x):
    return self.down_proj(_GatedProduct.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def _is_gated_mlp(mlp: nn.Module) -> bool:
    """Whether ``mlp``'s class computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: it has the
    parts, and its forward gives the light forward's numbers on a probe input (once per class)."""
    if not all(hasattr(mlp, part) for part in _GATED_MLP_PARTS) or not isinstance(mlp.gate_proj, nn.Module):
        return False
    cls = type(mlp)
    if cls not in _CHECKED:
        weight = next(mlp.parameters())
        probe = torch.randn(1, 3, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=weight.device, dtype=weight.dtype)
        was_training = mlp.training
        mlp.eval()  # no dropout (a LoRA on the MLP): the probe neither differs by chance nor draws numbers
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                _CHECKED[cls] = torch.equal(cls.forward(mlp, probe), _light_forward(mlp, probe))
        finally:
            mlp.train(was_training)
        if not _CHECKED[cls]:
            logger.debug("%s is not a gated MLP of the expected form: autograd keeps its activations", cls.__name__)
    return _CHECKED[cls]


@contextlib.contextmanager
def light_mlps(model: nn.Module) -> Iterator[int]:
    """Within the block, every gated MLP of ``model`` saves ``gate`` and ``up`` only for the backward
    (an instance attribute ``forward``; removed on exit). Yields how many MLPs it covers."""
    mlps = [m for m in model.modules() if "forward" not in vars(m) and _is_gated_mlp(m)]
    for m in mlps:
        m.forward = types.MethodType(_light_forward, m)
    try:
        yield len(mlps)
    finally:
        for m in mlps:
            del m.forward


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    fn = getattr(glibc(), "malloc_trim", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
    return fn


@contextlib.contextmanager
def trimmed_forward(model: nn.Module, every: int) -> Iterator[int]:
    """Within the block, after every ``every``-th decoder layer's forward with grad enabled, glibc
    hands the free pages inside its heap back to the OS (``malloc_trim``). Yields how many layers
    trim (0 off glibc or with ``every`` 0).

    Why: a training forward frees each layer's transients (projections, the ops' intermediates, the
    MLP's product) between the tensors kept for the backward; later, larger requests do not fit the
    holes and the heap grows, so peak RSS is far above the bytes in use (SmolLM2 default recipe,
    T = 2048: 2.2 GB in use, 5.5 GB resident at the end of the forward). A trim costs the page
    faults of re-using the returned pages, so it runs a few times per forward, not per layer."""
    trim = _malloc_trim() if every else None
    layers = list(model.get_decoder().layers) if trim is not None else []
    chosen = layers[every - 1 :: every] if layers else []

    def hook(module, args, output):
        if torch.is_grad_enabled():
            trim(0)

    handles = [layer.register_forward_hook(hook) for layer in chosen]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


__all__ = ["light_mlps", "trimmed_forward"]
