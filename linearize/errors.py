"""Errors a user can act on; the CLI shows their message as one line."""


class LinearizeError(Exception):
    """Base class for errors that carry a message telling the user what to do."""


class UnsupportedArchitectureError(LinearizeError, ValueError):
    """The model's architecture has no entry in ``linearize.arch``."""


class SourceNotFoundError(LinearizeError, FileNotFoundError):
    """A model source (hub id, folder, gguf) could not be resolved offline."""


class OutputError(LinearizeError):
    """An output path a verb may not write: not ours, in use, a file, or overlapping its input."""


class ModelLoadError(LinearizeError, ValueError):
    """A model source exists but its files cannot be read: missing weights, a truncated or corrupt
    safetensors or GGUF file, a ``config.json`` that does not parse."""
