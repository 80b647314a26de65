"""The files of a checkpoint folder: their names (one definition, imported by every reader and
writer) and a check that the weights on disk are whole before anything uses or uploads them.

Names: ``linearize eval`` writes :data:`EVAL_REPORT` (schema :data:`EVAL_REPORT_SCHEMA`) into the
checkpoint and its report folder :data:`EVAL_FOLDER`; ``linearize finetune`` writes
:data:`TRAINING_SUMMARY`; ``linearize push`` reads them for the model card. Core code (``hub``)
and the evaluation layer (``linearize.evals``) both import the names from here.

:func:`verify_checkpoint_files` reads only headers (no tensor data): every ``*.safetensors`` file
must hold an 8-byte little-endian header length, a JSON header, and exactly the bytes the header's
tensors end at (a truncated copy or an interrupted download fails); every shard named by
``model.safetensors.index.json`` must be there; ``config.json`` must parse.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import LinearizeError

CONFIG_FILE = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIX = ".safetensors"
# The recovery report inside a checkpoint folder (written by `linearize eval`, read by `push`).
EVAL_REPORT = "eval_report.json"
EVAL_REPORT_SCHEMA = "linearize-eval-report/1"
# The report folder `linearize eval` writes by default inside the checkpoint, and its files.
EVAL_FOLDER = "eval"
EVAL_REPORT_KIND = "eval-report"  # marker kind of that folder (linearize.outputs.write_marker)
REPORT_JSON, REPORT_MARKDOWN, REPORT_CHART = "report.json", "report.md", "report.png"
EVAL_CHART = Path(EVAL_FOLDER) / REPORT_CHART
# Written into the checkpoint by `linearize finetune`.
TRAINING_SUMMARY = "training_summary.json"

# A safetensors header is JSON; anything above this is not a header but garbage (safetensors' own cap).
MAX_HEADER_BYTES = 100_000_000
FIX = "re-save the checkpoint or re-run `linearize convert`"


class CheckpointError(LinearizeError, ValueError):
    """A checkpoint folder's files are missing, truncated or corrupt."""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None if its header and size agree."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is truncated or corrupt ({size} bytes, not even a header)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            return f"{path.name} is truncated or corrupt (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return f"{path.name} is corrupt (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is corrupt (its header is not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"{path.name} is corrupt (tensor {name!r} has no valid data_offsets)"
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size < expected:
        return f"{path.name} is truncated ({size} bytes; its header says {expected})"
    if size > expected:
        return f"{path.name} is corrupt ({size} bytes; its header says {expected})"
    return None


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """Every problem :func:`verify_checkpoint_files` would report (empty when the folder is whole)."""
    folder = Path(folder)
    problems: list[str] = []
    config = folder / CONFIG_FILE
    if not config.is_file():
        problems.append(f"{CONFIG_FILE} is missing")
    else:
        try:
            if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                problems.append(f"{CONFIG_FILE} is not a JSON object")
        except (UnicodeDecodeError, ValueError) as err:
            problems.append(f"{CONFIG_FILE} does not parse ({err})")
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            shards = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as err:
            problems.append(f"{WEIGHTS_INDEX} does not parse or has no weight_map ({err})")
        else:
            problems += [f"weight shard {s} (named in {WEIGHTS_INDEX}) is missing" for s in shards
                         if not (folder / s).is_file()]
    for weights in sorted(folder.glob(f"*{WEIGHT_SUFFIX}")):
        problem = safetensors_problem(weights)
        if problem:
            problems.append(problem)
    return problems


def verify_checkpoint_files(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` (one line: every problem, then the fix) unless the folder's
    config parses and its safetensors weights are whole. Reads headers only: fast on any size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass a converted checkpoint folder")
    problems = checkpoint_problems(folder)
    if problems:
        raise CheckpointError(f"{folder}: " + "; ".join(problems) + f": {FIX}")


__all__ = [
    "CONFIG_FILE", "EVAL_CHART", "EVAL_FOLDER", "EVAL_REPORT", "EVAL_REPORT_KIND", "EVAL_REPORT_SCHEMA",
    "REPORT_CHART", "REPORT_JSON", "REPORT_MARKDOWN", "TRAINING_SUMMARY", "WEIGHTS_INDEX", "WEIGHT_SUFFIX",
    "CheckpointError", "checkpoint_problems", "safetensors_problem", "verify_checkpoint_files",
]
