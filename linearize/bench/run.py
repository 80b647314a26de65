"""One ``linearize bench`` run: load the teacher and its converted model (checked to be a pair
before the converted weights load), measure both over the grid, record the environment."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from linearize.checkpoint_files import CONFIG_FILE, verify_checkpoint_files
from linearize.config import torch_dtype
from linearize.errors import LinearizeError

from . import measure
from .measure import (
    STATUS_LIMIT,
    BenchConfig,
    PeakMemory,
    allocator_mode,
    measure_context,
    measure_throughput,
    retain_freed_memory,
)

logger = logging.getLogger(__name__)

CONVERTED_PREFIX = "linearize_"  # model_type of a converted checkpoint: this + the teacher's model_type


class PairMismatchError(LinearizeError, ValueError):
    """The converted checkpoint was not made from the given teacher (another family or shape)."""


def environment(device: torch.device) -> dict:
    """Hardware and library versions recorded with every result."""
    import transformers

    import linearize

    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import psutil

        hardware["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware["gpu"] = props.name
        hardware["gpu_memory_bytes"] = props.total_memory
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "linearize": linearize.__version__,
    }
    return {"hardware": hardware, "versions": versions}


def load_pair(converted_dir: str | os.PathLike, teacher: str | os.PathLike | None, cfg: BenchConfig):
    """``(teacher_model, converted_model)`` on ``cfg.device`` in ``cfg.dtype``, eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401  (registers the converted classes with AutoModelForCausalLM)
    from linearize.sources import load_model

    if not (Path(converted_dir) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{converted_dir} is not a converted checkpoint folder (no {CONFIG_FILE}; make one "
                                "with `linearize convert`)")
    verify_checkpoint_files(converted_dir)  # a truncated copy fails here, not after loading the teacher
    converted_config = _read_config(Path(converted_dir))
    dtype = torch_dtype(cfg.dtype)
    teacher_model = load_model(teacher, dtype=dtype, device=cfg.device)
    check_pair(teacher_model.config, converted_config, teacher=str(teacher or "the default teacher"),
               converted=str(converted_dir))
    converted = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=dtype, device_map={"": torch.device(cfg.device)})
    return teacher_model.eval(), converted.eval()


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise LinearizeError(f"{folder / CONFIG_FILE} does not parse ({err}): re-run `linearize convert`") from None
    if not isinstance(config, dict) or not str(config.get("model_type", "")).startswith(CONVERTED_PREFIX):
        raise LinearizeError(f"{folder} is not a converted checkpoint (its model_type is not linearize_*): "
                             "pass a folder written by `linearize convert`")
    return config


_PAIR_FIELDS = ("num_hidden_layers", "hidden_size", "vocab_size")


def check_pair(teacher_config, converted_config: dict, teacher: str = "the teacher", converted: str = "the converted model") -> None:
    """Raise :class:`PairMismatchError` (one line) unless ``converted_config`` (a converted
    checkpoint's config.json) was made from a model like ``teacher_config``: same family
    (``model_type``), layers, hidden size and vocabulary. Cheap: runs before the converted weights load."""
    text = teacher_config.get_text_config() if hasattr(teacher_config, "get_text_config") else teacher_config
    family = str(converted_config.get("model_type", "")).removeprefix(CONVERTED_PREFIX)
    have = {"model_type": getattr(text, "model_type", None), **{f: getattr(text, f, None) for f in _PAIR_FIELDS}}
    want = {"model_type": family, **{f: converted_config.get(f) for f in _PAIR_FIELDS}}
    differ = [k for k in want if want[k] is not None and have[k] is not None and want[k] != have[k]]
    if differ:
        show = lambda d: ", ".join(f"{k} {d[k]}" for k in differ)  # noqa: E731
        raise PairMismatchError(f"{converted} was converted from another model than the teacher {teacher} "
                                f"({show(want)} vs the teacher's {show(have)}): pass the model it was converted "
                                "from with --teacher")


def run_bench(
    teacher_model,
    converted_model,
    cfg: BenchConfig,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure both models over the grid; ``progress(description)`` is called after each cell."""
    from linearize.sources import model_max_length

    device = torch.device(cfg.device)
    load_start = _load_average()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.retain_freed_memory and device.type == "cpu":
        retain_freed_memory()
    limit = model_max_length(teacher_model.config)
    vocab = teacher_model.config.get_text_config().vocab_size
    models = {"teacher": teacher_model, "converted": converted_model}

    def over(context: int) -> bool:
        return limit is not None and context + cfg.warmup_steps + cfg.decode_steps > limit

    fits = [c for c in cfg.contexts if cfg.teacher_beyond_limit or not over(c)]
    throughput_context = cfg.throughput_context or (max(fits) if fits else None)

    results: dict = {"teacher": [], "converted": [], "throughput": {}}
    for name, model in models.items():
        # one short forward first, so one-off costs (allocator, kernel choice) miss the first cell
        with torch.inference_mode():
            measure._prefill(model, torch.zeros(1, 8, dtype=torch.long, device=device))
        for context in cfg.contexts:
            if name == "teacher" and over(context) and not cfg.teacher_beyond_limit:
                row = {"context": context, "batch": cfg.batch, "status": STATUS_LIMIT, "model_limit": limit}
            else:
                row = measure_context(model, context, cfg, device, vocab)
                if over(context):
                    row["beyond_teacher_limit"] = True
            results[name].append(row)
            logger.debug("%s @ %d: %s", name, context, row)
            if progress is not None:
                progress(f"{name} {context}")
        if cfg.max_batch > 0 and throughput_context is not None:
            results["throughput"][name] = measure_throughput(model, throughput_context, cfg, device, vocab)
            if progress is not None:
                progress(f"{name} throughput")
    return {
        "settings": asdict(cfg),
        "teacher_limit": limit,
        "memory_kind": PeakMemory.kind(device) + (
            "; freed memory handed back to the OS (malloc_trim) before each measurement" if device.type == "cpu" else ""),
        "allocator": allocator_mode(cfg),
        "load_average": {"start": load_start, "end": _load_average()},  # 1/5/15-minute: was the machine shared?
        **environment(device),
        "results": results,
    }


def _load_average() -> list[float] | None:
    """The system's 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def grid_size(cfg: BenchConfig) -> int:
    """Number of ``progress`` calls ``run_bench`` makes (for a progress bar's total)."""
    return 2 * (len(cfg.contexts) + (1 if cfg.max_batch > 0 else 0))


