"""Reference behaviours the tests compare against, written here (not imported from a benchmark
script or the library) so that a test never uses the code it checks as its own oracle.

- :func:`streaming_attention`: a teacher whose attention layers (except ``keep``) see only the last
  ``window`` tokens (the current one included) and the first ``sinks`` tokens: StreamingLLM's
  attention, what a converted layer's window branch computes exactly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def streaming_allowed(T: int, window: int, sinks: int) -> torch.Tensor:
    """[T, T] bool, row i = query i: which keys it may see, spelled out one query at a time."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            allowed[i, j] = i - j < window or j < sinks
    return allowed


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    assert found, f"{type(model).__name__} has no attention modules with a layer_idx"
    return found


@contextlib.contextmanager
def streaming_attention(model: nn.Module, keep: list[int], window: int, sinks: int):
    """``model`` with every attention layer not in ``keep`` limited to its window and the sinks
    (full-sequence forwards without a cache, eager or SDPA attention); undone on exit."""
    patched = []
    for module in _attention_modules(model):
        if module.layer_idx in keep:
            continue

        def forward(hidden_states, *args, _original=module.forward, **kwargs):
            T, dtype = hidden_states.shape[1], hidden_states.dtype
            mask = torch.zeros(T, T, dtype=dtype, device=hidden_states.device)  # [T, T] additive
            mask.masked_fill_(~streaming_allowed(T, window, sinks).to(mask.device), torch.finfo(dtype).min)
            kwargs["attention_mask"] = mask[None, None]  # [1, 1, T, T]
            return _original(hidden_states, *args, **kwargs)

        patched.append((module, module.__dict__.get("forward")))
        module.forward = forward
    try:
        yield model
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own
