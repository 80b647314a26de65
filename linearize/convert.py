"""``convert()``: turn a loaded (or named) teacher into a converted model; save it self-contained."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch.nn as nn
from transformers import PreTrainedModel

from .arch import arch_spec
from .config import ConversionConfig, torch_dtype
from .export import AUTO_MAP, write_remote_code
from .mixers import iter_mixers
from .modeling import MODEL_TYPE_PREFIX, base_model_type, linearized_classes, linearized_config
from .outputs import atomic_folder, check_output_dir
from .surgery import build_converted, snapshot

logger = logging.getLogger(__name__)

def convert(model_or_source=None, config: ConversionConfig | None = None, *, tokenizer=None,
            **overrides) -> PreTrainedModel:
    """Replace every attention layer of a causal LM as ``config`` says; returns the converted model.

    ``model_or_source`` is a loaded ``PreTrainedModel`` (converted in place: weights are shared, not
    copied) or anything ``linearize.sources`` resolves (hub id, folder, .gguf, ``smollm2-135m``,
    ``None`` for the offline default). ``overrides`` replace fields of ``config``.
    ``keep_softmax_layers='auto:N'`` probes the teacher first (:func:`resolve_auto_layers`; it reads
    text through ``tokenizer``, by default the one of the source the teacher was loaded from).
    """
    if config is None:
        config = ConversionConfig(**overrides)  # the chosen mixer's defaults fill in the rest
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if isinstance(model_or_source, nn.Module):
        model = model_or_source
    else:
        from .sources import load_model

        model = load_model(model_or_source)
    model_type = model.config.model_type
    if model_type.startswith(MODEL_TYPE_PREFIX):
        raise ValueError(f"this model is already converted ({model_type}); convert the teacher instead")
    check_conversion(model.config, config)  # every error before anything changes
    config, probe = resolve_auto_layers(model, config, tokenizer)
    _, model_cls = linearized_classes(model_type)
    new_config = linearized_config(model.config, config)
    if probe is not None:
        new_config.linearize_layer_probe = probe  # why these layers: saved in config.json beside `linearize`
    # The converted class is a subclass of the teacher's with the same parameters: re-class the
    # instance and build its mixers, instead of building a second model and copying weights. All or
    # nothing: on any error the model is put back as it was, so the caller can retry.
    restore = snapshot(model, model_type)
    try:
        old_config = model.config
        model.__class__ = model_cls
        for module in model.modules():  # submodules keep a reference to the config they were built with
            if getattr(module, "config", None) is old_config:
                module.config = new_config
        build_converted(model, model_type)
    except BaseException:
        restore()
        raise
    converted = sum(1 for _ in iter_mixers(model))
    logger.info("converted %d attention layers of %s to %s", converted, model_type, config.mixer)
    return model


def resolve_auto_layers(model: nn.Module, config: ConversionConfig, tokenizer=None
                        ) -> tuple[ConversionConfig, dict | None]:
    """``config`` with ``keep_softmax_layers='auto:N'`` replaced by the N layers the retrieval probe
    suggests for the teacher ``model`` (:func:`linearize.layer_probe.probe_layers`, far attention
    beyond ``config.window``), and the probe's record; ``(config, None)`` when the layers are given."""
    count = config.auto_layer_count()
    if count is None:
        return config, None
    if tokenizer is None:
        tokenizer = _source_tokenizer(model)
    if tokenizer is None:
        raise ValueError(f"keep_softmax_layers={config.keep_softmax_layers!r} probes the teacher on text: "
                         "pass convert(..., tokenizer=...) (this model was not loaded by linearize.sources)")
    from .layer_probe import probe_layers

    probe = probe_layers(model, tokenizer, count, window=config.window)
    probe["request"] = config.keep_softmax_layers
    return dataclasses.replace(config, keep_softmax_layers=probe["suggested"]), probe


def _source_tokenizer(model: nn.Module):
    """The tokenizer of the source ``model`` was loaded from by :mod:`linearize.sources`, or None."""
    source = getattr(model, "linearize_source", None)
    if source is None:
        return None
    from .sources import load_tokenizer

    return load_tokenizer(source)


def check_conversion(model_config, config: ConversionConfig) -> None:
    """Refuse, before any weight is loaded or changed, a conversion that cannot fit this model: an
    unsupported architecture, a window longer than its context, kept layers it does not have."""
    arch_spec(model_config.model_type)
    config.check_model(model_config.num_hidden_layers, getattr(model_config, "max_position_embeddings", None))


def conversion_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the conversion added: gates, mix weights, sinks, feature maps."""
    added = {id(p) for _, mixer in iter_mixers(model) for p in mixer.new_parameters()}
    for name, param in model.named_parameters():
        if id(param) in added:
            yield name, param


def save_converted(model: PreTrainedModel, out_dir: str | os.PathLike, tokenizer=None, *,
                   overwrite: bool = False) -> Path:
    """Save a converted model as a self-contained folder, atomically (temp folder, then rename).

    The folder holds safetensors weights, ``config.json`` with ``auto_map``, the exported modeling
    code, the tokenizer and the generation config. ``tokenizer`` defaults to the one of the source
    the teacher was loaded from (``linearize.convert("smollm2-135m")``), when known.

    ``out_dir`` follows :mod:`linearize.outputs`: a new or empty folder, or (with ``overwrite``) a
    folder linearize wrote before, which is replaced only once the new one is complete. A folder
    with anything else in it, ``.``, or an existing file is refused with :class:`OutputError`.
    """
    model_type = model.config.model_type
    if not model_type.startswith(MODEL_TYPE_PREFIX):
        raise ValueError(f"save_converted expects a converted model, got model_type {model_type!r}")
    source = getattr(model, "linearize_source", None)
    source_path = getattr(source, "path", None)
    out = check_output_dir(out_dir, what="converted checkpoint", overwrite=overwrite, sources=[source_path])
    if tokenizer is None:
        tokenizer = _source_tokenizer(model)
    with atomic_folder(out, kind="converted-model", overwrite=overwrite) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp, safe_serialization=True)
        write_remote_code(tmp, base_model_type(model_type))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def convert_to_folder(source, out_dir, config: ConversionConfig | None = None, dtype: str = "float32", *,
                      overwrite: bool = False) -> Path:
    """Load a teacher, convert it and save the converted checkpoint folder.

    Cheapest checks first: the output folder (:func:`linearize.outputs.check_output_dir`) before the
    source is resolved (a hub id may be looked up), the settings against the model's config before
    its weights load; so a refused ``out_dir`` or setting costs no time.
    """
    from .sources import load_config, load_teacher, resolve_source

    torch_dtype_ = torch_dtype(dtype)
    check_output_dir(out_dir, what="converted checkpoint", overwrite=overwrite, sources=[source])
    resolved = resolve_source(source)  # (save_converted checks the output against its path again)
    check_conversion(load_config(resolved), config or ConversionConfig())  # seconds, before the weights
    model, tokenizer = load_teacher(resolved, dtype=torch_dtype_)
    model = convert(model, config, tokenizer=tokenizer)
    return save_converted(model, out_dir, tokenizer, overwrite=overwrite)
