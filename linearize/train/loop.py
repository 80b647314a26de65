"""The optimiser-step loop shared by the stages, against a small :class:`Stage` interface.

A stage says how to take one micro-step (forward + backward, returning its metrics), one optimiser
step, how to write its part of a checkpoint, what to evaluate and what to record once done.
:func:`run_stage` does everything else: the data order (resumable mid-epoch), gradient
accumulation, metric averaging across processes, logging, periodic evaluation and checkpoints,
and a checkpoint on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import PackedData, iter_batches
from ..recipe import Recipe
from .state import Checkpoints, RunState

# Without a validation split, held-out metrics are measured on this many batches of training blocks.
TRAIN_EVAL_BATCHES = 8
# accelerate logs ~6 INFO lines (and a tied-weights warning) per checkpoint save/load.
_NOISY_LOGGERS = ("accelerate",)

StepCallback = Callable[[str, int, dict[str, float]], None]


class Stage(Protocol):
    """One training stage as :func:`run_stage` drives it."""

    name: str

    def micro_step(self, ids: torch.Tensor, sync: bool) -> dict[str, torch.Tensor]:
        """Forward and backward on a batch [b, T]; ``sync``: the last micro-step before an optimiser step."""

    def optimizer_step(self) -> None: ...

    def save(self, folder: Path) -> None:
        """Write this stage's weights and optimiser state into a checkpoint folder (every process)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics during training ({} when there is nothing to measure)."""

    def finish(self) -> None:
        """Record end-of-stage results in the state (before the stage's last checkpoint)."""


class RunLogger(logging.LoggerAdapter):
    """Logs on the main process only; prefixes the rank only when there are several processes."""

    def __init__(self, logger: logging.Logger, accelerator):
        super().__init__(logger, {})
        self.acc = accelerator

    def log(self, level, msg, *args, **kwargs):
        if self.acc.is_main_process:
            super().log(level, msg, *args, **kwargs)

    def process(self, msg, kwargs):
        if self.acc.num_processes > 1:
            msg = f"[rank {self.acc.process_index}/{self.acc.num_processes}] {msg}"
        return msg, kwargs


@contextlib.contextmanager
def quiet_accelerate(level: int = logging.ERROR) -> Iterator[None]:
    """Raise accelerate's log level for the duration (checkpoint save/load chatter)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)


class Run:
    """What the stages of one finetune share: recipe, accelerator, data, state, checkpoints."""

    def __init__(self, recipe: Recipe, accelerator, data: PackedData, state: RunState, checkpoints: Checkpoints,
                 callback: StepCallback | None = None, log: logging.LoggerAdapter | None = None):
        self.recipe, self.acc, self.data, self.state = recipe, accelerator, data, state
        self.checkpoints, self.callback = checkpoints, callback
        self.log = log or RunLogger(logging.getLogger(__name__), accelerator)
        self.session_start = time.perf_counter()
        self.elapsed_before = state.wall_time_s
        self.trackers = False

    @property
    def per_device_batch(self) -> int:
        return self.recipe.train.batch_size // self.acc.num_processes

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def autocast(self, allow_fp16: bool = True):
        precision = self.recipe.train.precision
        if precision == "fp32" or (precision == "fp16" and not allow_fp16):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.acc.device.type, dtype=dtype)

    def eval_blocks(self) -> torch.Tensor:
        """Validation blocks, or the first training blocks when there is no validation split."""
        if self.data.validation is not None:
            return self.data.validation
        return self.data.train[: TRAIN_EVAL_BATCHES * self.per_device_batch * self.acc.num_processes]

    def track(self, metrics: dict[str, float], step: int) -> None:
        if self.trackers:
            self.acc.log(metrics, step=step)

    def save_checkpoint(self, stage: Stage, step: int) -> Path:
        self.state.checkpoint_stage = stage.name
        self.state.wall_time_s = self.elapsed()
        acc = self.acc
        with quiet_accelerate():
            return self.checkpoints.save(step, stage.save, self.state, is_main=acc.is_main_process,
                                         barrier=acc.wait_for_everyone)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def run_stage(run: Run, stage: Stage) -> None:
    """Train ``stage`` from its current step to its total; checkpoint as the recipe says."""
    recipe, tc, acc = run.recipe, run.recipe.train, run.acc
    name = stage.name
    st = run.state.stages[name]
    per_epoch, total = st.steps_per_epoch, st.total_steps
    tokens_per_step = tc.batch_size * tc.grad_accum * recipe.data.seq_len
    step = last_saved = st.steps
    base_step = run.state.global_step - step  # global step at the start of this stage
    train_time, steps_timed = 0.0, 0

    def save() -> None:
        nonlocal last_saved
        run.save_checkpoint(stage, base_step + step)
        last_saved = step

    bar = tqdm(total=total, initial=step, desc=name, unit="step", disable=not acc.is_main_process,
               dynamic_ncols=True)
    try:
        with logging_redirect_tqdm():
            while step < total:
                epoch = step // per_epoch
                batches = iter_batches(run.data.train, tc.batch_size, tc.seed, epoch,
                                       start=(step % per_epoch) * tc.grad_accum,
                                       rank=acc.process_index, world_size=acc.num_processes)
                while step < total and step // per_epoch == epoch:
                    t0 = time.perf_counter()
                    sums: dict[str, torch.Tensor] = {}
                    for j in range(tc.grad_accum):
                        ids = next(batches).to(acc.device)  # [b, T]
                        for k, v in stage.micro_step(ids, j == tc.grad_accum - 1).items():
                            sums[k] = sums.get(k, 0) + v.detach().float() / tc.grad_accum
                    stage.optimizer_step()
                    keys = sorted(sums)
                    metrics = dict(zip(keys, acc.reduce(torch.stack([sums[k] for k in keys]), "mean").tolist()))
                    train_time += time.perf_counter() - t0
                    steps_timed += 1
                    step += 1
                    st.steps, st.tokens = step, step * tokens_per_step
                    run.state.global_step = base_step + step
                    run.state.tokens_seen += tokens_per_step
                    for k, v in metrics.items():
                        st.history.setdefault(k, []).append(v)
                    st.train_time_s += time.perf_counter() - t0
                    tok_s = steps_timed * tokens_per_step / max(train_time, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", tok_s=f"{tok_s:.0f}")
                    run.track({f"{name}/{k}": v for k, v in metrics.items()} | {f"{name}/tokens_per_s": tok_s},
                              run.state.global_step)
                    if step % tc.log_every == 0 or step == total:
                        run.log.info("%s step %d/%d %s, %.0f tokens/s", name, step, total, _fmt(metrics), tok_s)
                    if tc.eval_every and step % tc.eval_every == 0 and step < total:
                        val = stage.evaluate()
                        if val:
                            st.validation.append([step, val])
                            run.track({f"{name}/{k}": v for k, v in val.items()}, run.state.global_step)
                            run.log.info("%s step %d validation %s", name, step, _fmt(val))
                    if tc.save_every and step % tc.save_every == 0 and step < total:
                        save()
                    if run.callback is not None:
                        run.callback(name, step, metrics)
    except KeyboardInterrupt:
        bar.close()
        if step > last_saved:
            save()
        run.log.warning("interrupted in stage %s at step %d/%d; the last checkpoint is in %s: continue with "
                        "resume (linearize finetune ... --resume)", name, step, total, run.checkpoints.root)
        raise
    bar.close()
    if not st.done:
        st.done = True
        for key, values in st.history.items():
            window = values[-min(tc.log_every, len(values)):]
            st.results[f"final_{key}"] = sum(window) / len(window)
            st.results[f"first_{key}"] = values[0]
        st.results["tokens_per_s"] = st.tokens / st.train_time_s if st.train_time_s else None
        stage.finish()  # before the stage's last checkpoint, so that it holds the results
        save()


def flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys with scalar values (tracker hyper-parameters)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


__all__ = ["Run", "RunLogger", "Stage", "StepCallback", "TRAIN_EVAL_BATCHES", "flat_scalars", "quiet_accelerate",
           "run_stage"]
