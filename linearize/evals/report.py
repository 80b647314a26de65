"""The recovery report: teacher vs student per task, as JSON, Markdown and a PNG bar chart.

Per task the report keeps one primary metric (``evals.config.PRIMARY_METRIC``) with the teacher's
score, the student's score and the recovery

    recovery = student / teacher   for higher-is-better scores (accuracies),
    recovery = teacher / student   for lower-is-better scores (perplexities),

so 1.0 means nothing was lost and 0.8 means 20 % was lost, whatever the metric's direction.
The average row holds the mean teacher and student score over the higher-is-better tasks (the
"avg" column of the linearization papers) and the mean recovery over all tasks with one.
Every metric lm-eval reported is kept in the JSON under ``metrics``.

The JSON schema (``schema: linearize-eval-report/1``) is what ``linearize.hub`` reads to write the
model card; the schema id and the file names live in ``linearize.checkpoint_files``, imported by both
sides, so keep the field names stable.

The report folder goes through the output policy of ``linearize.outputs`` (:func:`check_report_dir`
up front, then an atomic folder marked ``eval-report``): a new or empty folder, or an earlier report
of ours, which a new run replaces; anything else is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from linearize.checkpoint_files import (
    EVAL_FOLDER, EVAL_REPORT, EVAL_REPORT_KIND, EVAL_REPORT_SCHEMA, REPORT_CHART, REPORT_JSON, REPORT_MARKDOWN,
)
from linearize.errors import OutputError
from linearize.outputs import atomic_folder, atomic_write_json, check_output_dir, write_marker, written_by_linearize

from .runner import accuracy_stderr, higher_is_better, n_samples, primary_metric, task_metrics

logger = logging.getLogger(__name__)

SCHEMA = EVAL_REPORT_SCHEMA
# File name of the report inside a checkpoint folder (read by `linearize push` for the model card).
CHECKPOINT_REPORT = EVAL_REPORT


def _ratio(num: float, den: float) -> float | None:
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def build_report(teacher_results: dict, student_results: dict, tasks: list[str], *,
                 teacher: str, student: str, settings: dict | None = None) -> dict:
    """Recovery report (a JSON-ready dict) from two lm-eval results dicts over the same tasks."""
    rows = []
    metrics = {"teacher": {}, "student": {}}
    for task in tasks:
        t_metrics, s_metrics = task_metrics(teacher_results, task), task_metrics(student_results, task)
        metrics["teacher"][task], metrics["student"][task] = t_metrics, s_metrics
        metric = primary_metric(task, t_metrics)
        if metric not in s_metrics:
            raise ValueError(f"student results for {task} lack metric {metric!r}; were both run with the same tasks?")
        hib = higher_is_better(teacher_results, task, metric)
        t, s = t_metrics[metric], s_metrics[metric]
        n = n_samples(student_results, task)
        rows.append({
            "task": task,
            "metric": metric,
            "higher_is_better": hib,
            "teacher": t,
            "student": s,
            "recovery": _ratio(s, t) if hib else _ratio(t, s),
            "n": n,
            "teacher_stderr": accuracy_stderr(t, n) if hib else None,
            "student_stderr": accuracy_stderr(s, n) if hib else None,
        })
    scored = [r for r in rows if r["higher_is_better"]]
    recovered = [r["recovery"] for r in rows if r["recovery"] is not None]
    average = {
        "teacher": sum(r["teacher"] for r in scored) / len(scored) if scored else None,
        "student": sum(r["student"] for r in scored) / len(scored) if scored else None,
        "recovery": sum(recovered) / len(recovered) if recovered else None,
        "tasks": [r["task"] for r in scored],
    }
    return {
        "schema": SCHEMA,
        "teacher": teacher,
        "student": student,
        "settings": settings or {},
        "tasks": rows,
        "average": average,
        "metrics": metrics,
        "versions": {"lm_eval": _lm_eval_version()},
    }


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return "n/a"
    if "perplexity" in metric or metric == "bits_per_byte":
        return f"{value:.3f}" if value < 1000 else f"{value:.4g}"
    return f"{value:.4f}"


def _fmt_score(value: float, stderr: float | None, metric: str) -> str:
    return _fmt(value, metric) + (f" ± {stderr:.4f}" if stderr is not None else "")


def render_markdown(report: dict) -> str:
    """The report as a Markdown table with a short header."""
    s = report.get("settings", {})
    lines = [
        "# Recovery report",
        "",
        f"- teacher: `{report['teacher']}`",
        f"- student: `{report['student']}`",
        f"- lm-eval {report.get('versions', {}).get('lm_eval')}, limit {s.get('limit')}, "
        f"num_fewshot {s.get('num_fewshot')}, batch size {s.get('batch_size')}",
        "",
        "recovery = student/teacher for accuracies, teacher/student for perplexities (1.0 = nothing lost).",
        "",
        "| task | metric | n | teacher | student | recovery |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["tasks"]:
        arrow = "↑" if r["higher_is_better"] else "↓"
        lines.append(
            f"| {r['task']} | {r['metric']} {arrow} | {r['n'] if r['n'] is not None else ''} | "
            f"{_fmt_score(r['teacher'], r['teacher_stderr'], r['metric'])} | "
            f"{_fmt_score(r['student'], r['student_stderr'], r['metric'])} | {_fmt(r['recovery'])} |"
        )
    avg = report["average"]
    lines.append(
        f"| **average** | {', '.join(avg['tasks']) or '-'} (↑ tasks) | | {_fmt(avg['teacher'])} | "
        f"{_fmt(avg['student'])} | {_fmt(avg['recovery'])} |"
    )
    return "\n".join(lines) + "\n"


def save_chart(report: dict, path: str | Path) -> Path:
    """PNG: recovery per task (left) and teacher vs student scores of the ↑ tasks (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["tasks"]
    scored = [r for r in rows if r["higher_is_better"]]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = [r["task"] for r in rows]
    values = [r["recovery"] if r["recovery"] is not None else 0.0 for r in rows]
    bars = ax.bar(range(len(rows)), values, color="tab:green")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    for bar, r in zip(bars, rows):
        ax.annotate(_fmt(r["recovery"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("recovery (1.0 = teacher)")
    ax.set_title("Recovery per task")
    if scored:
        ax = axes[0][1]
        x = range(len(scored))
        width = 0.4
        ax.bar([i - width / 2 for i in x], [r["teacher"] for r in scored], width, label="teacher", color="tab:blue")
        ax.bar([i + width / 2 for i in x], [r["student"] for r in scored], width, label="student", color="tab:orange")
        ax.set_xticks(list(x), [f"{r['task']}\n({r['metric']})" for r in scored], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        ax.set_title("Scores (higher is better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['student']} vs {report['teacher']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _is_earlier_report(folder: Path) -> bool:
    """A report folder written before the output marker existed (its report.json has our schema)."""
    try:
        return json.loads((folder / REPORT_JSON).read_text(encoding="utf-8")).get("schema") == EVAL_REPORT_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_report_dir(out_dir: str | os.PathLike | None, checkpoint: str | os.PathLike | None = None,
                     sources=(), flag: str = "--out") -> Path:
    """Where the report folder goes (default ``<checkpoint>/eval``), resolved; :class:`OutputError`
    (one line) when it may not be written: an existing file, the checkpoint itself or a folder
    holding it, one of ``sources`` (the teacher), a non-empty folder linearize did not write, or
    one that holds something other than an eval report. An earlier report is replaced."""
    if out_dir is None:
        if checkpoint is None:
            raise ValueError("give out_dir, or the checkpoint whose eval/ folder takes the report")
        out_dir = Path(checkpoint) / EVAL_FOLDER
    out = Path(out_dir).expanduser()
    if checkpoint is not None and str(out_dir).strip():
        ckpt = Path(checkpoint).resolve()
        resolved = out.resolve()
        if resolved == ckpt or ckpt.is_relative_to(resolved):
            raise OutputError(f"{flag} {out_dir} is the checkpoint folder (or holds it): give the report a "
                              f"folder of its own, e.g. {flag} {Path(checkpoint) / EVAL_FOLDER} (the default)")
    if out.is_dir() and written_by_linearize(out) is None and _is_earlier_report(out):
        write_marker(out, EVAL_REPORT_KIND)  # adopt a report folder from before the marker existed
    return check_output_dir(out, what="eval report", sources=sources, reuse_kind=EVAL_REPORT_KIND, flag=flag)


def write_report_files(report: dict, folder: str | Path) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``report.png`` into ``folder`` (no output policy: the
    folder is the temporary one of :func:`linearize.outputs.atomic_folder`)."""
    folder = Path(folder)
    paths = {"json": folder / REPORT_JSON, "markdown": folder / REPORT_MARKDOWN, "chart": folder / REPORT_CHART}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    save_chart(report, paths["chart"])
    return paths


def write_checkpoint_report(report: dict, checkpoint_dir: str | Path) -> Path:
    """``<checkpoint_dir>/eval_report.json`` (for the model card), written atomically."""
    return atomic_write_json(Path(checkpoint_dir) / EVAL_REPORT, report)


def write_report(report: dict, out_dir: str | Path, checkpoint_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into the report folder ``out_dir``
    (through the output policy: see :func:`check_report_dir`); with ``checkpoint_dir`` also
    ``<checkpoint_dir>/eval_report.json`` (for the model card)."""
    out = check_report_dir(out_dir, checkpoint_dir)
    with atomic_folder(out, kind=EVAL_REPORT_KIND, overwrite=True) as tmp:
        names = {key: path.name for key, path in write_report_files(report, tmp).items()}
    paths = {key: out / name for key, name in names.items()}
    if checkpoint_dir is not None:
        paths["checkpoint"] = write_checkpoint_report(report, checkpoint_dir)
    return paths
