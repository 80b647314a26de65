"""The finetuning recipe: one typed dataclass tree (:mod:`.schema`); YAML keys and ``key=value``
overrides (:mod:`.parse`) and the ``linearize finetune --help`` text (:mod:`.help`) all come from it.

    recipe = load_recipe("recipes/smollm2-135m-cpu.yaml", ["lora.r=16", "train.seed=1"])
"""

from ..config import field_docs
from .help import recipe_help
from .parse import apply_overrides, load_recipe, parse_override, recipe_from_dict
from .schema import (
    REQUIRED_KEYS, AttentionTransferConfig, DataConfig, LoraConfig, Recipe, RecipeError, StageOptim, TrainConfig,
)

__all__ = [
    "AttentionTransferConfig", "DataConfig", "LoraConfig", "REQUIRED_KEYS", "Recipe", "RecipeError", "StageOptim",
    "TrainConfig", "apply_overrides", "field_docs", "load_recipe", "parse_override", "recipe_from_dict",
    "recipe_help",
]
