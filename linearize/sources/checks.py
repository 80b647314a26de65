"""Cheap checks that a local model's files are whole, and telling a damaged file from a bug.

A damaged source is a :class:`linearize.errors.ModelLoadError` that names the file and the fix,
raised before (or instead of) the traceback transformers, safetensors or gguf would give.
"""

from __future__ import annotations

import json
import struct
import traceback
from pathlib import Path

from ..checkpoint_files import CONFIG_FILE, checkpoint_problems
from ..errors import ModelLoadError

_GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """``path`` is not empty and starts like a GGUF file (the rest is checked as it is read)."""
    with open(path, "rb") as f:
        magic = f.read(len(_GGUF_MAGIC))
    if not magic:
        raise ModelLoadError(f"the GGUF file {path} is empty (0 bytes): download or copy it again")
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")


def check_config(folder: Path) -> None:
    """``config.json`` parses as a JSON object (read before anything else loads the folder)."""
    config = folder / CONFIG_FILE
    try:
        ok = isinstance(json.loads(config.read_text(encoding="utf-8")), dict)
        why = "is not a JSON object"
    except (UnicodeDecodeError, ValueError) as err:
        ok, why = False, f"does not parse ({err})"
    if not ok:
        raise ModelLoadError(f"cannot load the model in {folder}: {CONFIG_FILE} {why}: copy or download the "
                             "model again, or re-save it with save_pretrained")


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights(folder: Path) -> None:
    """The folder's weights are there and whole (safetensors headers against file sizes; no tensor is read)."""
    problems = checkpoint_problems(folder)
    if not problems and not any((folder / name).is_file() for name in _WEIGHT_FILES) and not any(
            folder.glob("*.safetensors")):
        problems = [f"it has a {CONFIG_FILE} but no weights ({' or '.join(_WEIGHT_FILES[::2])})"]
    if problems:
        raise ModelLoadError(f"cannot load the model in {folder}: {'; '.join(problems)}: copy or download the "
                             "model again, or re-save it with save_pretrained")


def raised_reading_gguf(error: BaseException) -> bool:
    """True when ``error`` came from parsing a GGUF file (gguf's or transformers' GGUF reader): the
    file, not the code, is at fault."""
    if isinstance(error, struct.error):
        return True
    if not isinstance(error, (ValueError, IndexError, KeyError, EOFError, OSError, UnicodeDecodeError)):
        return False
    return any("gguf" in Path(frame.filename).as_posix().rsplit("site-packages", 1)[-1]
               for frame in traceback.extract_tb(error.__traceback__))
