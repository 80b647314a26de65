"""Runs lm-eval in-process (``HFLM`` around an already loaded model) on offline and standard tasks.

Standard task names (piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu, ...) pass to
lm-eval unchanged; the offline tasks (``evals.config.OFFLINE_TASKS`` or the tag
``linearize_offline``) are built by ``evals.data.prepare_tasks`` first (see ``evaluate``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

from typing import Callable

from linearize.environment import hub_unavailable, require_extra

from .config import METRIC_PREFERENCE, OFFLINE_TAG, OFFLINE_TASKS, PRIMARY_METRIC, OfflineTaskConfig
from .data import prepare_tasks

logger = logging.getLogger(__name__)

# What `linearize eval` imports beyond the core install (the `eval` extra of pyproject.toml).
EVAL_MODULES = {"lm_eval": "lm-eval", "matplotlib": "matplotlib", "gensim": "gensim"}
OFFLINE_HINT = f"offline tasks are {', '.join(OFFLINE_TASKS)} (or {OFFLINE_TAG} for all of them)"


def require_eval_dependencies(what: str = "linearize eval") -> None:
    """One line with the install command when lm-eval (or the report's matplotlib, the offline
    tasks' gensim) is missing, before anything slow starts."""
    require_extra("eval", EVAL_MODULES, what)


class UnknownTaskError(ValueError):
    """A task name neither offline nor known to lm-eval, or a standard task while the hub is unusable."""


def check_tasks(tasks, manager=None) -> tuple[list[str], list[str]]:
    """:func:`split_tasks`, then check every name before any model loads: offline names exist; for
    standard names the hub their data comes from can be used, and lm-eval knows them (its task
    index: ~10 s, only when standard names are given). Raises :class:`UnknownTaskError` (one line).
    ``manager``: an lm-eval ``TaskManager`` to reuse."""
    offline, standard = split_tasks(tasks)
    mistyped = [t for t in standard if t.startswith("linearize_")]
    if mistyped:
        raise UnknownTaskError(f"unknown task {', '.join(mistyped)}: {OFFLINE_HINT}")
    if not standard:
        return offline, standard
    reason = hub_unavailable()  # first: instant with the offline variables, and no index is needed then
    if reason is not None:
        raise UnknownTaskError(f"task {', '.join(standard)} is not an offline task, and standard lm-eval tasks "
                               f"download their data from the Hugging Face Hub, which is {reason}: standard tasks "
                               f"need hub access; {OFFLINE_HINT}")
    if manager is None:
        from lm_eval.tasks import TaskManager

        logger.info("checking task names against lm-eval's task index")
        manager = TaskManager()
    known = set(manager.all_tasks)
    unknown = [t for t in standard if t not in known]
    if unknown:
        raise UnknownTaskError(f"unknown task {', '.join(unknown)}: not an lm-eval task; {OFFLINE_HINT}; "
                               "standard tasks are lm-eval's names (piqa, arc_easy, hellaswag, mmlu, ...)")
    return offline, standard


def split_tasks(tasks) -> tuple[list[str], list[str]]:
    """Expand the offline tag and split names into (offline, standard), order kept, no repeats."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names: list[str] = []
    for task in tasks:
        task = task.strip()
        expanded = list(OFFLINE_TASKS) if task == OFFLINE_TAG else [task]
        names.extend(t for t in expanded if t and t not in names)
    if not names:
        raise ValueError("no tasks given; e.g. --tasks linearize_offline or --tasks piqa,arc_easy")
    offline = [t for t in names if t in OFFLINE_TASKS]
    standard = [t for t in names if t not in OFFLINE_TASKS]
    return offline, standard


def make_lm(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None, request_bars: bool = True):
    """lm-eval's ``HFLM`` around a loaded model (no reload, no device move), scoring only the
    continuation's positions (``scoring.SlicedScoring``). ``request_bars=False`` turns off lm-eval's progress bar per request type (the caller shows one overall line)."""
    from .scoring import sliced_hflm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need a positive batch size")
    cls = sliced_hflm() if request_bars else _quiet_hflm()
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _quiet_hflm():
    from .scoring import sliced_hflm

    class QuietHFLM(sliced_hflm()):
        """``HFLM`` whose request methods run without their own progress bars."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    return QuietHFLM


def evaluate(
    model,
    tokenizer,
    tasks,
    *,
    limit: int | float | dict | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    task_config: OfflineTaskConfig | None = None,
    include_path: str | Path | None = None,
    lm=None,
    use_cache: str | Path | None = None,
    on_task_done: Callable[[str], None] | None = None,
    request_bars: bool = True,
) -> dict:
    """Evaluate one model; returns lm-eval's results dict (``results``, ``n-samples``, ...).

    ``limit``: documents per task (an int, a fraction below 1, or None for all), or a dict
    ``{task: limit}`` whose key ``"*"`` covers the tasks it does not name (see :func:`parse_limit`);
    tasks with different limits run as separate lm-eval calls and their results are merged.

    ``include_path``: a folder written by ``evals.data.prepare_tasks`` for this tokenizer and
    ``task_config`` (if None and offline tasks are asked for, they are built in a temporary folder).
    ``lm``: an already built lm-eval ``LM`` to use instead of wrapping ``model`` (tests, custom
    wrappers).
    ``use_cache``: lm-eval's request cache (``CachingLM``: a sqlite file per rank at this path
    prefix). It keys on the requests only, so one path must hold one model's answers.
    ``on_task_done(task)``: called after each task (tasks run one lm-eval call each), for progress.
    ``request_bars``: lm-eval's own progress bar per request type (off when the caller shows one line).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    offline, standard = split_tasks(tasks)
    lm = lm if lm is not None else make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length,
                                           request_bars=request_bars)
    _check_passkey_fits(lm, offline, task_config or OfflineTaskConfig())
    with tempfile.TemporaryDirectory(prefix="linearize-tasks-") as tmp:
        include = str(include_path) if include_path is not None else None
        if offline and include is None:
            include = str(prepare_tasks(tmp, tokenizer, task_config, offline))
        # Indexing lm-eval's ~15K built-in task files takes ~10 s: skip it for offline-only runs.
        manager = TaskManager(include_path=include, include_defaults=bool(standard))
        merged: dict = {}
        for task_limit, group in _limit_groups(offline + standard, limit):
            for task in group:
                results = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    num_fewshot=num_fewshot,
                    limit=task_limit,
                    task_manager=manager,
                    bootstrap_iters=0,  # stderr by bootstrap spawns worker pools; the report computes acc stderr
                    log_samples=False,
                    use_cache=None if use_cache is None else str(use_cache),
                )
                if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
                    raise RuntimeError("lm-eval returned no results (not rank 0 of a distributed run?)")
                _merge_results(merged, results)
                if on_task_done is not None:
                    on_task_done(task)
    return merged


def task_limit(limit, task: str):
    """The documents limit of one task under ``limit`` (see :func:`parse_limit`)."""
    return limit.get(task, limit.get("*")) if isinstance(limit, dict) else limit


def parse_limit(text: str | None) -> int | float | dict | None:
    """``"20"`` -> 20, ``"0.1"`` -> 0.1, ``"8,linearize_capitals=100"`` -> {"*": 8, "linearize_capitals": 100}."""
    if text is None or not str(text).strip():
        return None
    per_task: dict = {}
    for item in str(text).split(","):
        name, _, value = item.strip().rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--limit item {item!r}: expected N, a fraction below 1, or task=N") from None
        if number <= 0 or (number >= 1 and not number.is_integer()):
            raise ValueError(f"--limit item {item!r}: use a whole number of documents or a fraction in (0, 1)")
        per_task[name.strip() or "*"] = int(number) if number >= 1 else number
    return per_task["*"] if list(per_task) == ["*"] else per_task


def _limit_groups(tasks: list[str], limit) -> list[tuple[int | float | None, list[str]]]:
    if not isinstance(limit, dict):
        return [(limit, tasks)]
    unknown = set(limit) - set(tasks) - {"*"}
    if unknown:
        raise ValueError(f"--limit names tasks that are not evaluated: {sorted(unknown)}")
    groups: dict = {}
    for task in tasks:
        groups.setdefault(limit.get(task, limit.get("*")), []).append(task)
    return list(groups.items())


def _merge_results(into: dict, results: dict) -> None:
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        else:
            into.setdefault(key, value)


def _check_passkey_fits(lm, offline: list[str], config: OfflineTaskConfig) -> None:
    from .config import PASSKEY

    if PASSKEY in offline and max(config.passkey_lengths) > lm.max_length:
        raise ValueError(
            f"passkey length {max(config.passkey_lengths)} exceeds the model's max length {lm.max_length}: "
            "lm-eval would cut the prompt from the left (and the key with it); pass shorter "
            "--passkey-lengths or a larger --max-length"
        )


def task_metrics(results: dict, task: str) -> dict[str, float]:
    """``{metric: value}`` of one task from lm-eval's results (filter suffix dropped, no stderr)."""
    if task not in results.get("results", {}):
        raise KeyError(f"lm-eval results have no task {task!r}; got {sorted(results.get('results', {}))}")
    out = {}
    for key, value in results["results"][task].items():
        metric, _, _filter = key.partition(",")
        if metric.endswith("_stderr") or metric == "alias" or not isinstance(value, (int, float)):
            continue
        out.setdefault(metric, float(value))
    return out


def primary_metric(task: str, metrics: dict[str, float]) -> str:
    """The metric reported for ``task``: PRIMARY_METRIC, else the first of METRIC_PREFERENCE found."""
    if task in PRIMARY_METRIC and PRIMARY_METRIC[task] in metrics:
        return PRIMARY_METRIC[task]
    for metric in METRIC_PREFERENCE:
        if metric in metrics:
            return metric
    if not metrics:
        raise ValueError(f"task {task!r} reported no numeric metric")
    return sorted(metrics)[0]


def higher_is_better(results: dict, task: str, metric: str) -> bool:
    """lm-eval's direction for a metric (perplexities: False)."""
    hib = results.get("higher_is_better", {}).get(task, {})
    if metric in hib and hib[metric] is not None:
        return bool(hib[metric])
    return not ("perplexity" in metric or metric == "bits_per_byte")


def n_samples(results: dict, task: str) -> int | None:
    n = results.get("n-samples", {}).get(task)
    return int(n["effective"]) if isinstance(n, dict) and "effective" in n else None


def accuracy_stderr(value: float, n: int | None) -> float | None:
    """Standard error of a mean of 0/1 scores (lm-eval's ``mean_stderr`` for accuracies)."""
    if n is None or n < 2 or not 0.0 <= value <= 1.0:
        return None
    return math.sqrt(value * (1.0 - value) / (n - 1))
