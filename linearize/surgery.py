"""Module surgery: swap each attention module of a loaded HF model for a converted mixer.

Per instance only (``setattr`` on the parent decoder layer); transformers' globals are untouched.
:func:`build_converted` is the one construction step of a converted model: ``convert()`` runs it on
a re-classed teacher, and the converted classes' ``__init__`` runs it when a checkpoint loads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from .arch import arch_spec, decoder_layers
from .config import ConversionConfig
from .mixers import PADDING_MASK_KWARG, DeltaAttention, HybridAttention, WindowOnlyAttention

# Attribute of the decoder stack holding the padding hook's handle (absent: no hook).
_HOOK_ATTR = "_linearize_padding_hook"


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


def _decoder_stack(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def conversion_settings(model_config) -> ConversionConfig:
    """The conversion a converted model's config stores under ``linearize`` (checked again)."""
    settings = getattr(model_config, "linearize", None)
    if settings is None:
        raise ValueError(f"a {model_config.model_type} config needs its `linearize` conversion settings")
    return ConversionConfig.from_dict(settings)


def build_converted(model: nn.Module, base_model_type: str) -> nn.Module:
    """Give ``model`` (a causal LM of ``base_model_type`` whose config holds ``linearize``) its
    converted attention: a mixer in every layer not kept as softmax, the padding hook, SDPA for the
    kept softmax layers (the converted layers ignore the mask transformers builds)."""
    config = conversion_settings(model.config)
    spec = arch_spec(base_model_type)
    layers = decoder_layers(model, spec)
    mixer_class = {"delta": DeltaAttention, "none": WindowOnlyAttention}.get(config.linear, HybridAttention)
    for idx, (layer, kind) in enumerate(zip(layers, config.layer_kinds(len(layers)))):
        if kind == "softmax":
            continue
        teacher = getattr(layer, spec.attention)
        setattr(layer, spec.attention, mixer_class(teacher, config, idx, qk_norm=spec.qk_norm))
    stack = _decoder_stack(model)
    if getattr(stack, _HOOK_ATTR, None) is None:
        setattr(stack, _HOOK_ATTR, stack.register_forward_pre_hook(_hand_down_padding_mask, with_kwargs=True))
    model.config._attn_implementation = "sdpa"
    return model


def snapshot(model: nn.Module, base_model_type: str) -> Callable[[], None]:
    """Remember everything a conversion of ``model`` changes; the returned function puts it back:
    the class, the config every submodule holds, each layer's attention module, the padding hook."""
    spec = arch_spec(base_model_type)
    cls = model.__class__
    configs = [(m, m.config) for m in model.modules() if "config" in vars(m)]
    attention = [(layer, getattr(layer, spec.attention)) for layer in decoder_layers(model, spec)]
    stack = _decoder_stack(model)
    had_hook = getattr(stack, _HOOK_ATTR, None) is not None

    def restore() -> None:
        model.__class__ = cls
        for module, config in configs:
            module.config = config
        for layer, module in attention:
            setattr(layer, spec.attention, module)
        handle = getattr(stack, _HOOK_ATTR, None)
        if not had_hook and handle is not None:
            handle.remove()
            delattr(stack, _HOOK_ATTR)

    return restore
