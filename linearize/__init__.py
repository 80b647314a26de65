"""linearize: convert pretrained Hugging Face LLMs into gated linear-recurrent hybrids."""

from .config import ConversionConfig
from .errors import LinearizeError, SourceNotFoundError, UnsupportedArchitectureError

__version__ = "0.1.0"

__all__ = ["ConversionConfig", "LinearizeError", "SourceNotFoundError", "UnsupportedArchitectureError"]
