"""linearize: convert pretrained Hugging Face LLMs into gated linear-recurrent hybrids.

Importing the package registers the converted model classes with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(converted_dir)`` works.
"""

from .arch import ARCHITECTURES
from .config import ConversionConfig
from .convert import conversion_parameters, convert, convert_to_folder, save_converted
from .errors import LinearizeError, SourceNotFoundError, UnsupportedArchitectureError
from .generation import generate_stream
from .mixers import iter_mixers, teacher_attention
from .modeling import register_auto_classes

__version__ = "0.1.0"

register_auto_classes(ARCHITECTURES)

__all__ = [
    "ConversionConfig",
    "LinearizeError",
    "SourceNotFoundError",
    "UnsupportedArchitectureError",
    "conversion_parameters",
    "convert",
    "convert_to_folder",
    "generate_stream",
    "iter_mixers",
    "save_converted",
    "teacher_attention",
]
