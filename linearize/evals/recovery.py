"""``linearize eval``: the same lm-eval run on teacher and student, then the recovery report."""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path

from typing import Callable

import torch

from linearize.checkpoint_files import CONFIG_FILE, EVAL_REPORT_KIND, verify_checkpoint_files
from linearize.environment import check_device
from linearize.outputs import atomic_folder

from .config import OfflineTaskConfig, task_config_for
from .data import estimated_tokens, point_stubs_to, prepare_tasks
from .report import build_report, check_report_dir, write_checkpoint_report, write_report_files
from .runner import check_tasks, evaluate, require_eval_dependencies, task_limit

# Weight of one document of a standard lm-eval task in the progress estimate (tokens, rough).
STANDARD_DOC_TOKENS = 200
STANDARD_DOCS = 1000  # documents assumed for a standard task without a limit

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


def check_recovery_inputs(student: str | Path, teacher: str | None, tasks, out_dir, device: str):
    """Everything :func:`run_recovery` can check in seconds, before loading a model: the eval
    extra is installed, the device exists, the checkpoint's files are whole, the task names are
    known (and the hub usable for standard ones), the report folder may be written.
    Returns ``(offline, standard, report_dir)``."""
    require_eval_dependencies()
    check_device(device)
    student = Path(student)
    if not (student / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{student} is not a checkpoint folder (no config.json); pass a converted folder")
    verify_checkpoint_files(student)
    offline, standard = check_tasks(tasks)
    out = check_report_dir(out_dir, student, sources=[teacher] if teacher is not None else ())
    return offline, standard, out


def _progress_weights(include: Path | None, offline: list[str], standard: list[str], limit) -> dict[str, int]:
    """Estimated tokens per task (the progress bar's units)."""
    weights = {t: estimated_tokens(include, t, task_limit(limit, t)) for t in offline}
    for task in standard:
        n = task_limit(limit, task)
        docs = STANDARD_DOCS if n is None else (n if n >= 1 else max(1, int(n * STANDARD_DOCS)))
        weights[task] = int(docs) * STANDARD_DOC_TOKENS
    return weights


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
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict, dict[str, Path]]:
    """Evaluate ``teacher`` then ``student`` (a checkpoint folder) with identical settings.

    ``teacher``: anything ``linearize.sources`` resolves (None: the offline default, smollm2-135m).
    Cheap checks come first (:func:`check_recovery_inputs`), then the models load.

    Writes ``report.{json,md,png}`` and the offline task folder (``tasks/``, usable as lm-eval's
    ``--include_path``) into ``out_dir`` (default ``<student>/eval``; built under a temporary name
    and renamed into place when complete; an earlier report there is replaced), and, if
    ``write_to_checkpoint``, ``<student>/eval_report.json`` for the model card.
    ``task_config``: how the offline tasks are built (default: :func:`evals.config.task_config_for`
    ``(limit)``, which keeps a run with a limit short).
    ``teacher_cache``: a folder where the teacher's answers are kept (lm-eval's request cache, one
    file per teacher, dtype and max length), so that the next student evaluated against the same
    teacher does not run it again.
    ``progress(done, total, description)``: called as each model finishes each task; the units are
    estimated tokens read, so ``done / total`` suits an ETA.
    Returns ``(report, paths)``.
    """
    from linearize.sources import DEFAULT_MODEL, load_model, load_tokenizer

    student = Path(student)
    teacher = str(teacher) if teacher is not None else DEFAULT_MODEL
    offline, standard, out = check_recovery_inputs(student, teacher, tasks, out_dir, device)
    task_config = task_config or task_config_for(limit)
    names = offline + standard
    settings = {
        "tasks": names, "limit": limit, "batch_size": batch_size, "max_length": max_length,
        "num_fewshot": num_fewshot, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "offline_tasks": task_config.to_dict() if offline else None,
    }

    student_tok = load_tokenizer(str(student))
    teacher_tok = load_tokenizer(teacher)
    check_same_tokenizer(teacher_tok, student_tok)

    with atomic_folder(out, kind=EVAL_REPORT_KIND, overwrite=True) as tmp:
        include = prepare_tasks(tmp / "tasks", student_tok, task_config, offline) if offline else None
        weights = _progress_weights(include, offline, standard, limit)
        total, done = 2 * sum(weights.values()), 0
        results = {}
        for role, source, tok in (("teacher", teacher, teacher_tok), ("student", str(student), student_tok)):
            logger.info("evaluating the %s %s on %s", role, source, ", ".join(names))
            cache = _teacher_cache_path(teacher_cache, teacher, dtype, max_length) if role == "teacher" else None
            model = load_model(source, dtype=dtype, device=device)

            def task_done(task: str, _role: str = role) -> None:
                nonlocal done
                done += weights.get(task, 0)
                if progress is not None:
                    progress(done, total, f"{_role} {task}")

            results[role] = evaluate(model, tok, names, limit=limit, batch_size=batch_size, max_length=max_length,
                                     num_fewshot=num_fewshot, task_config=task_config, include_path=include,
                                     use_cache=cache, on_task_done=task_done, request_bars=progress is None)
            del model
            gc.collect()  # free each model before loading the next

        report = build_report(results["teacher"], results["student"], names, teacher=teacher,
                              student=str(student), settings=settings)
        names_of = {key: path.name for key, path in write_report_files(report, tmp).items()}
        if include is not None:
            point_stubs_to(include, out / "tasks")
    paths = {key: out / name for key, name in names_of.items()}
    if write_to_checkpoint:
        paths["checkpoint"] = write_checkpoint_report(report, student)
    logger.info("recovery report written to %s", paths["markdown"])
    return report, paths
