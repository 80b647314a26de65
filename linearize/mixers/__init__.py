"""Modules that replace attention, and helpers to find them in a converted model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from .delta import DeltaAttention
from .hybrid import PADDING_MASK_KWARG, HybridAttention
from .window_only import WindowOnlyAttention


def iter_mixers(model: nn.Module) -> Iterator[tuple[int, HybridAttention]]:
    """(layer index, mixer) for every converted attention layer (``DeltaAttention`` included), in layer order."""
    for module in model.modules():
        if isinstance(module, HybridAttention):
            yield module.layer_idx, module


@contextmanager
def teacher_attention(model: nn.Module):
    """Within this block every converted layer computes the teacher's softmax attention."""
    mixers = [m for _, m in iter_mixers(model)]
    previous = [m.run_as_teacher for m in mixers]
    for m in mixers:
        m.run_as_teacher = True
    try:
        yield model
    finally:
        for m, was in zip(mixers, previous):
            m.run_as_teacher = was


__all__ = ["PADDING_MASK_KWARG", "DeltaAttention", "HybridAttention", "WindowOnlyAttention", "iter_mixers",
           "teacher_attention"]
