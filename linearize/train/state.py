"""The typed state of a finetune run, its checkpoints, and what a resume may change.

:class:`RunState` is what a checkpoint's ``trainer_state.json`` and the run's
``training_summary.json`` hold (the same JSON layout as before this module existed, so old
checkpoints still resume). :class:`Checkpoints` writes ``checkpoints/step-NNNNNNN`` folders
atomically and keeps the last k. :func:`plan_resume` decides, from files alone and before anything
is loaded or written, whether a run may resume with a given recipe and what it will train.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint_files import TRAINING_SUMMARY
from ..errors import LinearizeError
from ..outputs import give_normal_permissions

logger = logging.getLogger(__name__)

SUMMARY_FILE = TRAINING_SUMMARY  # (linearize.checkpoint_files: push and the model card read it too)
STATE_FILE = "trainer_state.json"
TRANSFER_STATE_FILE = "transfer_state.pt"
RECIPE_FILE = "recipe.yaml"
MODEL_DIR, ADAPTER_DIR, CHECKPOINT_DIR, LOG_DIR = "model", "adapter", "checkpoints", "logs"
CONVERSION_PARAMS_FILE = "conversion_parameters.safetensors"
CHECKPOINT_PREFIX = "step-"
RUN_KIND = "finetune-run"
"""Marker kind (``linearize.outputs.write_marker``) of a finetune's ``output_dir``."""

# Recipe keys a resumed run may change: they alter neither shapes, data order nor optimiser state
# (the loss's chunk changes only the fp32 summation order).
# ``<stage>.max_steps``/``<stage>.epochs`` extend (or shorten, if not yet reached) a stage.
RESUMABLE_KEYS = (
    "output_dir", "accelerate_config", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.save_every", "train.keep_checkpoints", "train.tensorboard", "train.gradient_checkpointing",
    "train.malloc_trim_every", "lora.lm_loss_chunk",
)
STAGE_LENGTH_KEYS = ("max_steps", "epochs")

# Fields of a stage's JSON that are not results (everything else is a result, e.g. final_loss).
_STAGE_FIELDS = ("done", "steps", "steps_per_epoch", "total_steps", "tokens", "train_time_s", "history",
                 "validation")


class ResumeError(LinearizeError, ValueError):
    """A run cannot resume as asked; the message says why and what to do."""


@dataclass
class StageState:
    """Progress of one stage: steps taken, metric history, results once done."""

    steps_per_epoch: int
    total_steps: int
    done: bool = False
    steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)
    validation: list = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    """``first_<metric>``, ``final_<metric>``, ``tokens_per_s``, per-layer errors, ... (flat in JSON)."""

    def to_dict(self) -> dict[str, Any]:
        return {"done": self.done, "steps": self.steps, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "tokens": self.tokens, "train_time_s": self.train_time_s,
                "history": self.history, "validation": self.validation, **self.results}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageState:
        return cls(**{k: data[k] for k in _STAGE_FIELDS},
                   results={k: v for k, v in data.items() if k not in _STAGE_FIELDS})


@dataclass
class RunState:
    """Everything a checkpoint needs besides weights and optimiser state; also the run's summary."""

    recipe: dict[str, Any]
    world_size: int
    data: dict[str, Any]
    stages: dict[str, StageState]
    perplexity: dict[str, float] = field(default_factory=dict)
    global_step: int = 0
    tokens_seen: int = 0
    wall_time_s: float = 0.0
    checkpoint_stage: str | None = None
    """The stage whose state the checkpoint holds (earlier stages are done)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """End-of-run fields: ``merge_check_relative_rms``, ``tokens_per_s``, ``output``."""

    def to_dict(self) -> dict[str, Any]:
        out = {"recipe": self.recipe, "world_size": self.world_size, "data": self.data,
               "perplexity": self.perplexity, "stages": {k: s.to_dict() for k, s in self.stages.items()},
               "global_step": self.global_step, "tokens_seen": self.tokens_seen, "wall_time_s": self.wall_time_s}
        if self.checkpoint_stage is not None:
            out["checkpoint_stage"] = self.checkpoint_stage
        return out | self.extra

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        known = {"recipe", "world_size", "data", "perplexity", "stages", "global_step", "tokens_seen",
                 "wall_time_s", "checkpoint_stage"}
        return cls(recipe=data["recipe"], world_size=data["world_size"], data=data["data"],
                   stages={k: StageState.from_dict(v) for k, v in data["stages"].items()},
                   perplexity=data.get("perplexity", {}), global_step=data["global_step"],
                   tokens_seen=data["tokens_seen"], wall_time_s=data["wall_time_s"],
                   checkpoint_stage=data.get("checkpoint_stage"),
                   extra={k: v for k, v in data.items() if k not in known})

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.stages.values())


def new_state(recipe, world_size: int, data, plans: dict[str, tuple[int, int]]) -> RunState:
    """The state of a fresh run of ``recipe`` (a Recipe) on packed ``data`` (a PackedData)."""
    return RunState(
        recipe=recipe.to_dict(),
        world_size=world_size,
        data={
            "format": data.format, "seq_len": recipe.data.seq_len,
            "train_blocks": len(data.train), "train_tokens": data.train_tokens,
            "train_documents": data.train_documents,
            "validation_blocks": 0 if data.validation is None else len(data.validation),
            "validation_documents": data.validation_documents,
        },
        stages={name: StageState(*plans[name]) for name in recipe.stages},
    )


def read_state(checkpoint: Path) -> RunState:
    return RunState.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))


# --- checkpoints ---------------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


class Checkpoints:
    """``root/step-NNNNNNN`` folders: each written under a hidden temporary name and renamed into
    place when complete (``trainer_state.json`` last), the last ``keep`` kept. A folder that is
    being removed is first renamed out of the ``step-`` namespace, so a kill at any point leaves
    every ``step-*`` folder complete."""

    def __init__(self, root: Path, keep: int = 1):
        self.root, self.keep = Path(root), keep

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
                 and (p / STATE_FILE).is_file()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def clean_leftovers(self) -> None:
        """Remove temporary and half-removed folders left by a killed run (main process only)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(p, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        doomed = path.with_name(f".old-{path.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        shutil.rmtree(doomed)

    def save(self, step: int, write: Callable[[Path], None], state: RunState, *, is_main: bool = True,
             barrier: Callable[[], None] = lambda: None) -> Path:
        """Write a checkpoint: ``write(folder)`` runs on every process (between barriers)."""
        name = f"{CHECKPOINT_PREFIX}{step:07d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        if is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=1))
            give_normal_permissions(tmp)
        barrier()
        if is_main:
            if final.exists():
                self._remove(final)
            tmp.rename(final)
            for old in self.all()[: -self.keep]:
                self._remove(old)
        barrier()
        logger.debug("checkpoint written: %s", final)
        return final


# --- resume --------------------------------------------------------------------------------------


def recipe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe mappings."""
    changed = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += recipe_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changed.append(f"{prefix}{k}")
    return changed


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _resumable(key: str, stages: list[str]) -> bool:
    stage, _, name = key.partition(".")
    return key in RESUMABLE_KEYS or (stage in stages and name in STAGE_LENGTH_KEYS)


@dataclass
class ResumePlan:
    """What :func:`plan_resume` decided."""

    checkpoint: Path | None
    """Checkpoint to load (None: a fresh run)."""
    state: RunState | None
    """Its state, with stage lengths updated to the new recipe."""
    changed: list[str] = field(default_factory=list)
    """Recipe keys that changed (all of them resumable)."""
    extended: list[str] = field(default_factory=list)
    """Stages that will train more steps than the checkpoint's run planned."""

    @property
    def nothing_to_do(self) -> bool:
        return self.state is not None and self.state.finished


def stage_total(steps_per_epoch: int, epochs: float, max_steps: int | None) -> int:
    """Optimiser steps of a stage: ``epochs`` passes, capped by ``max_steps``."""
    total = max(1, round(epochs * steps_per_epoch))
    return total if max_steps is None else min(total, max_steps)


def _with_current_defaults(saved: dict[str, Any], checkpoints: Checkpoints) -> dict[str, Any]:
    """The checkpoint's recipe as this version of linearize reads it: a setting added since the run
    started takes its default, as it would in the run's own recipe.yaml (so an upgrade between a
    crash and its resume does not read as a changed recipe)."""
    from ..recipe import RecipeError, recipe_from_dict

    try:
        return recipe_from_dict(saved, origin=f"the recipe of {checkpoints.root.parent}'s checkpoint").to_dict()
    except RecipeError as err:
        raise ResumeError(f"cannot resume: {err}; it was written by another version of linearize: use another "
                          "output_dir for a new run") from None


def plan_resume(checkpoints: Checkpoints, recipe: dict[str, Any], resume: bool) -> ResumePlan:
    """Decide how a run starts, from its checkpoints and the (new) recipe; loads and writes nothing.

    ``recipe`` is ``Recipe.to_dict()``. Stage lengths come from the checkpoint's steps per epoch
    and the new recipe's ``epochs``/``max_steps`` (the data may not change on resume, so this is
    known before the data is packed). Raises :class:`ResumeError`.
    """
    latest = checkpoints.latest()
    if not resume:
        if latest is not None:
            raise ResumeError(f"{checkpoints.root.parent} holds checkpoints of an earlier run: resume it "
                              "(--resume) or choose another output_dir")
        return ResumePlan(None, None)
    if latest is None:
        raise ResumeError(f"nothing to resume: no checkpoint in {checkpoints.root}")
    state = read_state(latest)
    if list(state.stages) != list(recipe["stages"]):
        raise ResumeError(f"cannot resume {checkpoints.root.parent}: the recipe's stages changed "
                          f"({list(state.stages)} -> {recipe['stages']}); use another output_dir for a new run")
    changed = recipe_changes(_with_current_defaults(state.recipe, checkpoints), recipe)
    blocked = [k for k in changed if not _resumable(k, list(state.stages))]
    if blocked:
        shown = ", ".join(f"{k} ({_get(state.recipe, k)!r} -> {_get(recipe, k)!r})" for k in blocked[:6])
        more = f" and {len(blocked) - 6} more" if len(blocked) > 6 else ""
        raise ResumeError(f"cannot resume {checkpoints.root.parent} with a changed {shown}{more}: these settings "
                          "must match the run's recipe.yaml (a resume may change only stage lengths "
                          "<stage>.max_steps/epochs and logging/checkpoint settings); use another output_dir "
                          "for a new run")
    plans = {name: (st.steps_per_epoch, stage_total(st.steps_per_epoch, recipe[name]["epochs"],
                                                   recipe[name]["max_steps"]))
             for name, st in state.stages.items()}
    return ResumePlan(latest, state, changed=changed, extended=apply_stage_lengths(state, plans))


def apply_stage_lengths(state: RunState, plans: dict[str, tuple[int, int]]) -> list[str]:
    """Set each stage's total steps from the new recipe's plan; a finished stage that gets more
    steps is reopened. Returns the reopened stages. Refuses to reopen a stage when a later stage
    has already started (its weights were trained on top of the earlier stage's result)."""
    names = list(state.stages)
    extended = []
    for i, name in enumerate(names):
        st = state.stages[name]
        per_epoch, total = plans[name]
        if per_epoch != st.steps_per_epoch:
            raise ResumeError(f"cannot resume: stage {name} has {per_epoch} steps per epoch now, "
                              f"{st.steps_per_epoch} in the checkpoint (did the data change?); use another output_dir")
        if total == st.total_steps:
            continue
        if total < st.steps:
            raise ResumeError(f"cannot resume: stage {name} already took {st.steps} steps, the recipe now asks "
                              f"for {total}; raise {name}.max_steps/{name}.epochs or use another output_dir")
        later = [n for n in names[i + 1:] if state.stages[n].steps > 0 or state.stages[n].done]
        if later and total > st.steps:
            raise ResumeError(f"cannot extend stage {name} to {total} steps: stage {later[0]} has trained on "
                              f"its result already; extend {later[-1]} instead or use another output_dir")
        st.total_steps = total
        if st.done and total > st.steps:
            st.done = False
            extended.append(name)
    return extended


__all__ = [
    "ADAPTER_DIR", "CHECKPOINT_DIR", "CONVERSION_PARAMS_FILE", "Checkpoints", "LOG_DIR", "MODEL_DIR",
    "RECIPE_FILE", "RESUMABLE_KEYS", "RUN_KIND", "ResumeError", "ResumePlan", "RunState", "STATE_FILE",
    "SUMMARY_FILE", "StageState", "TRANSFER_STATE_FILE", "apply_stage_lengths", "new_state", "plan_resume", "read_state",
    "recipe_changes", "stage_total",
]
