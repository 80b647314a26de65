"""Config and model classes of converted checkpoints, built from the teacher's own classes.

A converted Llama is a ``LinearizeLlamaForCausalLM``: a subclass of ``LlamaForCausalLM`` whose
``__init__`` builds the conversion stored in ``config.linearize`` (``surgery.build_converted``, the
same step ``convert()`` runs on a teacher). Parameter names, tied weights and generation stay the
teacher's; only the attention modules differ. The config's model type is
``linearize_<base>`` so ``AutoModelForCausalLM`` picks the converted class, never silently the
teacher's.
"""

from __future__ import annotations

from functools import lru_cache

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from .config import ConversionConfig

MODEL_TYPE_PREFIX = "linearize_"


def base_model_type(model_type: str) -> str:
    return model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def _base_classes(base_type: str) -> tuple[type[PreTrainedConfig], type[PreTrainedModel]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_cls = AutoConfig.for_model(base_type).__class__
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_type])
    return config_cls, model_cls


@lru_cache(maxsize=None)
def linearized_classes(base_type: str) -> tuple[type[PreTrainedConfig], type[PreTrainedModel]]:
    """(config class, causal-LM class) of converted ``base_type`` models, made once per type."""
    base_config_cls, base_model_cls = _base_classes(base_type)
    model_type = MODEL_TYPE_PREFIX + base_type

    config_cls = type(
        f"Linearize{base_config_cls.__name__}",
        (base_config_cls,),
        {"model_type": model_type, "__module__": __name__,
         "__doc__": f"Config of a linearized {base_type} model; conversion settings in `linearize`."},
    )

    def __init__(self, config):
        # imported here: this module is loaded by the hook that runs when transformers is first
        # imported, possibly from inside linearize.cache, which surgery's imports need complete
        from .surgery import build_converted

        base_model_cls.__init__(self, config)
        build_converted(self, base_type)

    model_cls = type(
        f"Linearize{base_model_cls.__name__}",
        (base_model_cls,),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__,
         "__doc__": f"{base_model_cls.__name__} with linearized attention."},
    )
    return config_cls, model_cls


def linearized_config(base_config: PreTrainedConfig, conversion: ConversionConfig) -> PreTrainedConfig:
    """The converted model's config: the teacher's settings plus ``linearize``."""
    config_cls, _ = linearized_classes(base_config.model_type)
    data = base_config.to_dict()
    data.pop("model_type", None)
    data["linearize"] = conversion.to_dict()
    return config_cls(**data)


def register_auto_classes(base_types) -> None:
    """Make ``AutoConfig``/``AutoModelForCausalLM`` load converted checkpoints of these types."""
    for base_type in base_types:
        config_cls, model_cls = linearized_classes(base_type)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
