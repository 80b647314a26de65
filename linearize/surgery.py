"""Module surgery: swap each attention module of a loaded HF model for a converted mixer.

Per instance only (``setattr`` on the parent decoder layer); transformers' globals are untouched.
"""

from __future__ import annotations

import torch.nn as nn

from .arch import arch_spec, decoder_layers
from .config import ConversionConfig
from .mixers import PADDING_MASK_KWARG, HybridAttention


def _hand_down_padding_mask(module, args, kwargs):
    """Forward pre-hook on the decoder stack: pass the 2D padding mask on to the mixers.

    Decoder layers forward unknown keyword arguments to their attention module; the mixers read
    which tokens are padding from it (a 4D or missing mask means: no padding information).
    """
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        mask = args[1]
    if mask is not None and mask.dim() == 2 and not bool(mask.all()):
        kwargs[PADDING_MASK_KWARG] = mask
    else:
        kwargs.pop(PADDING_MASK_KWARG, None)
    return args, kwargs


def apply_conversion(model: nn.Module, config: ConversionConfig, base_model_type: str) -> nn.Module:
    """Replace attention in ``model`` (a causal LM of ``base_model_type``) as ``config`` says."""
    spec = arch_spec(base_model_type)
    layers = decoder_layers(model, spec)
    kinds = config.layer_kinds(len(layers))
    for idx, (layer, kind) in enumerate(zip(layers, kinds)):
        if kind == "softmax":
            continue
        teacher = getattr(layer, spec.attention)
        setattr(layer, spec.attention, HybridAttention(teacher, config, idx, qk_norm=spec.qk_norm))
    stack = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not getattr(stack, "_linearize_padding_hook", False):
        stack.register_forward_pre_hook(_hand_down_padding_mask, with_kwargs=True)
        stack._linearize_padding_hook = True
    return model
