"""Evaluation: lm-eval integration, offline tasks, teacher-vs-student recovery report.

- ``evals.data.prepare_tasks``: build the offline tasks (held-out Wikipedia perplexity, capital
  analogies, passkey retrieval) for lm-eval's ``include_path``.
- ``evals.runner.evaluate``: one model through lm-eval in-process (``HFLM``).
- ``evals.recovery.run_recovery``: teacher and student with the same settings, then
  ``evals.report`` writes the recovery report (JSON, Markdown, PNG).
"""

from .config import OFFLINE_TAG, OFFLINE_TASKS, OfflineTaskConfig
from .data import prepare_tasks
from .recovery import run_recovery
from .report import build_report, render_markdown, write_report
from .runner import evaluate

__all__ = [
    "OFFLINE_TAG", "OFFLINE_TASKS", "OfflineTaskConfig", "build_report", "evaluate", "prepare_tasks",
    "render_markdown", "run_recovery", "write_report",
]
