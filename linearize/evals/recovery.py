"""``linearize eval``: the same lm-eval run on teacher and student, then the recovery report."""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path

import torch

from .config import OfflineTaskConfig
from .data import prepare_tasks
from .report import build_report, write_report
from .runner import evaluate, split_tasks

logger = logging.getLogger(__name__)

# A string both tokenizers must split identically: the offline data is built with one of them.
_TOKENIZER_PROBE = "Athens is to Greece as Baghdad is to Iraq. The pass key is 68213.\n\n  Über naïve café 1,234.5"


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """Teacher and student must tokenize alike, or the comparison is not like for like."""
    a = teacher_tok(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    b = student_tok(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if a != b or len(teacher_tok) != len(student_tok):
        raise ValueError(
            "teacher and student tokenizers differ (vocabulary size or tokenization); evaluate the student "
            "against the model it was converted from"
        )


def _teacher_cache_path(folder: str | Path | None, teacher: str, dtype: torch.dtype,
                        max_length: int | None) -> Path | None:
    """lm-eval's cache keys on the requests alone: one file per teacher, dtype and context cap."""
    if folder is None:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(teacher).resolve()) if Path(teacher).exists() else teacher)
    return folder / f"{name.strip('_')}-{str(dtype).removeprefix('torch.')}-{max_length or 'max'}"


def run_recovery(
    student: str | Path,
    teacher: str | Path | None = None,
    tasks=("linearize_offline",),
    *,
    out_dir: str | Path | None = None,
    limit: int | float | dict | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    task_config: OfflineTaskConfig | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    write_to_checkpoint: bool = True,
    teacher_cache: str | Path | None = None,
) -> tuple[dict, dict[str, Path]]:
    """Evaluate ``teacher`` then ``student`` (a checkpoint folder) with identical settings.

    ``teacher``: anything ``linearize.sources`` resolves (None: the offline default, smollm2-135m).

    Writes ``report.{json,md,png}`` and the offline task folder (``tasks/``, usable as lm-eval's
    ``--include_path``) into ``out_dir`` (default ``<student>/eval``), and, if
    ``write_to_checkpoint``, ``<student>/eval_report.json`` for the model card.
    ``teacher_cache``: a folder where the teacher's answers are kept (lm-eval's request cache, one
    file per teacher, dtype and max length), so that the next student evaluated against the same
    teacher does not run it again.
    Returns ``(report, paths)``.
    """
    from linearize.sources import DEFAULT_MODEL, load_model, load_tokenizer

    student = Path(student)
    teacher = str(teacher) if teacher is not None else DEFAULT_MODEL
    if not (student / "config.json").is_file():
        raise FileNotFoundError(f"{student} is not a checkpoint folder (no config.json); pass a converted folder")
    task_config = task_config or OfflineTaskConfig()
    offline, standard = split_tasks(tasks)
    names = offline + standard
    out = Path(out_dir) if out_dir is not None else student / "eval"
    settings = {
        "tasks": names, "limit": limit, "batch_size": batch_size, "max_length": max_length,
        "num_fewshot": num_fewshot, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "offline_tasks": task_config.to_dict() if offline else None,
    }

    student_tok = load_tokenizer(str(student))
    teacher_tok = load_tokenizer(teacher)
    check_same_tokenizer(teacher_tok, student_tok)
    include = prepare_tasks(out / "tasks", student_tok, task_config, offline) if offline else None

    results = {}
    for role, source, tok in (("teacher", teacher, teacher_tok), ("student", str(student), student_tok)):
        logger.info("evaluating the %s %s on %s", role, source, ", ".join(names))
        cache = _teacher_cache_path(teacher_cache, teacher, dtype, max_length) if role == "teacher" else None
        model = load_model(source, dtype=dtype, device=device)
        results[role] = evaluate(model, tok, names, limit=limit, batch_size=batch_size, max_length=max_length,
                                 num_fewshot=num_fewshot, task_config=task_config, include_path=include,
                                 use_cache=cache)
        if role == "teacher":  # free the teacher before loading the student
            del model
            gc.collect()

    report = build_report(results["teacher"], results["student"], names, teacher=teacher,
                          student=str(student), settings=settings)
    paths = write_report(report, out, checkpoint_dir=student if write_to_checkpoint else None)
    logger.info("recovery report written to %s", paths["markdown"])
    return report, paths
