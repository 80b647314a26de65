"""``finetune(recipe)``: check the output folder, load and convert the teacher, pack the data, run the
recipe's stages, merge and save.

Order of work, cheapest checks first: the output-folder policy and the lock (two runs cannot share
an ``output_dir``), the resume decision (a changed recipe is refused before anything is written),
then the slow parts. At the end the LoRA weights are merged and the model is saved with
``linearize.save_converted`` in ``output_dir/model``, the adapter in ``output_dir/adapter`` (both
atomically), and ``training_summary.json`` in both ``output_dir`` and ``output_dir/model``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import torch_dtype
from ..convert import conversion_parameters, convert, save_converted
from ..errors import LinearizeError
from ..mixers import iter_mixers, teacher_attention
from ..data import build_data
from ..outputs import (
    FolderLock, atomic_write_json, atomic_write_text, check_output_dir, write_marker, written_by_linearize,
)
from ..recipe import Recipe
from ..environment import trim_heap
from ..sources import load_teacher, model_max_length
from .loop import Run, RunLogger, StepCallback, flat_scalars, run_stage
from .lora import Lora, merge, rebuild_peft_model, save_adapter
from .metrics import held_out_nll
from .optim import schedule_plan
from .state import (
    ADAPTER_DIR, CHECKPOINT_DIR, LOG_DIR, MODEL_DIR, RECIPE_FILE, RUN_KIND, SUMMARY_FILE, TRANSFER_STATE_FILE,
    Checkpoints, RunState, apply_stage_lengths, new_state, plan_resume,
)
from .transfer import AttentionTransfer, load_transfer_params

logger = logging.getLogger(__name__)

# Recipe precision -> accelerate mixed_precision.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced."""

    output_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    summary: dict[str, Any]
    model: nn.Module
    """The merged converted model (eval mode, on the training device)."""
    tokenizer: Any


def _make_accelerator(recipe: Recipe, out: Path) -> Accelerator:
    tc = recipe.train
    log_with = None
    if tc.tensorboard and (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        log_with = "tensorboard"
    return Accelerator(
        gradient_accumulation_steps=tc.grad_accum,
        mixed_precision=MIXED_PRECISION[tc.precision],
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOG_DIR)),
    )


def check_stages(recipe: Recipe, model: nn.Module) -> None:
    """Raise if a requested stage would train nothing on this converted model."""
    if "attention_transfer" in recipe.stages:
        if not any(True for _ in iter_mixers(model)):
            raise ValueError(
                "stage attention_transfer trains nothing: no layer was converted "
                f"(conversion.mixer={recipe.conversion.mixer!r}, keep_softmax_layers="
                f"{recipe.conversion.keep_softmax_layers}); drop the stage or convert some layers"
            )
        if not any(True for _ in conversion_parameters(model)):
            c = recipe.conversion
            raise ValueError(
                f"stage attention_transfer trains nothing: this conversion (mixer={c.mixer}, gate={c.gate}, "
                f"feature_map={c.feature_map}, mix={c.mix}, num_sinks={c.num_sinks}) adds no parameters; "
                "remove attention_transfer from stages, or add learned parts (e.g. conversion.mix=learned, "
                "conversion.mixer=lizard)"
            )


def _on_main(acc: Accelerator, fn):
    """Run ``fn`` on the main process; if it raises, every process raises (none waits forever)."""
    error, value, failure = None, None, None
    if acc.is_main_process:
        try:
            value = fn()
        except Exception as err:
            failure, error = err, str(err)
    if acc.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise LinearizeError(f"the main process failed: {error}")
    return value


def _run_before_markers(out: Path) -> bool:
    """A run folder written before output folders carried a marker: recipe.yaml + checkpoints/summary."""
    return (out.is_dir() and not written_by_linearize(out) and (out / RECIPE_FILE).is_file()
            and ((out / CHECKPOINT_DIR).is_dir() or (out / SUMMARY_FILE).is_file()))


def _claim_output_dir(out: Path) -> FolderLock:
    """Refuse a folder that is not a finetune run of ours; lock it for this run; mark it ours."""
    if _run_before_markers(out):
        write_marker(out, RUN_KIND)
    check_output_dir(out, what="finetune run", flag="output_dir", reuse_kind=RUN_KIND)
    kind = written_by_linearize(out) if out.is_dir() and any(out.iterdir()) else None
    lock = FolderLock(out).acquire()
    out.mkdir(parents=True, exist_ok=True)
    if kind is None:
        write_marker(out, RUN_KIND)
    return lock


def _finished_outputs(out: Path, state: RunState):
    """(model dir, adapter dir, summary, model, tokenizer) of a run whose outputs match its last
    checkpoint, or None when they are missing (e.g. killed while saving them)."""
    summary_path, model_dir = out / SUMMARY_FILE, out / MODEL_DIR
    if not (summary_path.is_file() and (model_dir / SUMMARY_FILE).is_file()):
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("global_step") != state.global_step or written_by_linearize(model_dir) is None:
        return None
    adapter_dir = out / ADAPTER_DIR
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model_dir, adapter_dir if adapter_dir.is_dir() else None, summary, model, AutoTokenizer.from_pretrained(model_dir)


def finetune(recipe: Recipe, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None,
             callback: StepCallback | None = None) -> FinetuneResult:
    """Run a recipe: load and convert the teacher, train its stages, merge and save.

    ``model``/``tokenizer``: a loaded teacher to use instead of ``recipe.model`` (it is converted in
    place). ``resume``: continue from the last checkpoint in ``output_dir/checkpoints``; a finished
    run is extended when the recipe raises a stage's ``max_steps``/``epochs``.
    ``callback(stage, step, metrics)`` runs after every optimiser step on every process.
    """
    tc = recipe.train
    out = Path(recipe.output_dir).expanduser().resolve()
    if model is not None and tokenizer is None:
        raise ValueError("finetune(model=...) needs the teacher's tokenizer as well")
    accelerator = _make_accelerator(recipe, out)
    log = RunLogger(logger, accelerator)
    if tc.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size={tc.batch_size} is not a multiple of the {accelerator.num_processes} processes; "
            "the batch of a micro-step is split between them"
        )
    lock = _on_main(accelerator, lambda: _claim_output_dir(out))
    try:
        checkpoints = Checkpoints(out / CHECKPOINT_DIR, tc.keep_checkpoints)
        plan = plan_resume(checkpoints, recipe.to_dict(), resume)  # reads only; may refuse the recipe
        if accelerator.is_main_process:
            checkpoints.clean_leftovers()
        if plan.nothing_to_do:
            done = _finished_outputs(out, plan.state)
            if done is not None:
                log.info("the run in %s is already finished (%d steps); nothing to do: to train longer, resume "
                         "with a higher <stage>.max_steps or <stage>.epochs", out, plan.state.global_step)
                return FinetuneResult(out, *done)
        if recipe.accelerate_config and accelerator.num_processes == 1:
            log.warning("this recipe is meant for `accelerate launch --config_file %s`; running it in one process",
                        recipe.accelerate_config)
        return _train(recipe, accelerator, log, out, checkpoints, plan, model, tokenizer, callback)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe, accelerator, log, out, checkpoints, plan, model, tokenizer, callback) -> FinetuneResult:
    tc = recipe.train
    if model is None:
        model, tokenizer = load_teacher(recipe.model, dtype=torch_dtype(recipe.model_dtype))
    max_length = model_max_length(model.config)
    set_seed(tc.seed)
    model = convert(model, recipe.conversion, tokenizer=tokenizer)  # auto:N probes with it
    check_stages(recipe, model)
    data = build_data(recipe.data, tokenizer, seed=tc.seed, max_length=max_length)
    plans = {name: schedule_plan(len(data.train), recipe, getattr(recipe, name)) for name in recipe.stages}
    model.to(accelerator.device)
    model.eval()

    if plan.checkpoint is not None:
        state = plan.state
        apply_stage_lengths(state, plans)  # the data packs as it did (else a clear error)
        if plan.changed:
            log.info("resuming with changed %s", ", ".join(plan.changed))
        if plan.extended:
            log.info("extending %s", ", ".join(f"{n} to {state.stages[n].total_steps} steps" for n in plan.extended))
        if state.world_size != accelerator.num_processes:
            log.info("resuming on %d processes (checkpoint: %d)", accelerator.num_processes, state.world_size)
        log.info("resuming from %s (step %d)", plan.checkpoint, state.global_step)
    else:
        state = new_state(recipe, accelerator.num_processes, data, plans)
    run = Run(recipe, accelerator, data, state, checkpoints, callback, log)
    if accelerator.is_main_process:
        atomic_write_text(out / RECIPE_FILE, recipe.to_yaml())
    if accelerator.log_with:
        run.trackers = True
        accelerator.init_trackers("linearize", config=flat_scalars(recipe.to_dict()))

    batch = run.per_device_batch
    if data.validation is not None and "teacher" not in state.perplexity:
        with teacher_attention(model):
            state.perplexity["teacher"] = math.exp(held_out_nll(model, data.validation, accelerator, batch,
                                                                tc.eval_batches))
        state.perplexity["converted"] = math.exp(held_out_nll(model, data.validation, accelerator, batch,
                                                              tc.eval_batches))
        log.info("held-out perplexity: teacher %.3f, converted before training %.3f",
                 state.perplexity["teacher"], state.perplexity["converted"])

    # The checkpoint's stage loads its state; stages before it are done (their weights are in it).
    resume_stage = state.checkpoint_stage if plan.checkpoint is not None else None
    if resume_stage == "attention_transfer":
        load_transfer_params(model, plan.checkpoint / TRANSFER_STATE_FILE, accelerator.device)
    model_cls, model_config = type(model), model.config  # for the FSDP rebuild at the end
    lora = None
    for index, name in enumerate(recipe.stages):
        stage_resume = plan.checkpoint if resume_stage == name else None
        if state.stages[name].done and name == "attention_transfer":
            continue
        set_seed(tc.seed + 1 + index)  # LoRA init etc. do not depend on where a run was resumed
        if tc.malloc_trim_every:
            trim_heap()  # the stage starts from the bytes in use, not the last phase's free pages
        if name == "attention_transfer":
            stage = AttentionTransfer(run, model, stage_resume)
            run_stage(run, stage)
            stage.close()
        else:
            lora = Lora(run, model, stage_resume)
            run_stage(run, lora)
    return _finish(run, model, lora, tokenizer, out, model_cls, model_config)


def _finish(run: Run, model, lora: Lora | None, tokenizer, out: Path, model_cls, model_config) -> FinetuneResult:
    acc, state, recipe = run.acc, run.state, run.recipe
    batch, tc = run.per_device_batch, recipe.train
    adapter_dir = None
    if tc.malloc_trim_every:
        trim_heap()  # the final evaluation, merge and export start from the bytes in use
    if lora is not None:
        prepared = lora.prepared
        if run.data.validation is not None:
            state.perplexity["finetuned"] = math.exp(
                held_out_nll(prepared, run.data.validation, acc, batch, tc.eval_batches))
        if acc.distributed_type == DistributedType.FSDP:
            # Sharded weights: gather the full state on the main process and merge a CPU copy there.
            full_state = acc.get_state_dict(prepared)
            peft_model = (rebuild_peft_model(model_cls, model_config, torch_dtype(recipe.model_dtype), recipe.lora,
                                             full_state) if acc.is_main_process else None)
        else:
            peft_model = acc.unwrap_model(prepared, keep_fp32_wrapper=False)
        adapter_dir = out / ADAPTER_DIR
        merged = None
        if peft_model is not None:
            peft_model.eval()
            if acc.is_main_process:
                save_adapter(peft_model, adapter_dir, recipe)
            merged, state.extra["merge_check_relative_rms"] = merge(peft_model, run.eval_blocks()[:1])
    else:
        merged = model
        merged.eval()
        if run.data.validation is not None:
            state.perplexity["finetuned"] = math.exp(
                held_out_nll(merged, run.data.validation, acc, batch, tc.eval_batches))
    if merged is not None:
        for p in merged.parameters():
            p.requires_grad_(False)
    if run.trackers:
        acc.end_training()
    state.wall_time_s = run.elapsed()
    state.extra["tokens_per_s"] = state.tokens_seen / max(sum(s.train_time_s for s in state.stages.values()), 1e-9)
    model_dir = out / MODEL_DIR
    state.extra["output"] = {"model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir)}
    summary = state.to_dict()
    if acc.is_main_process:
        save_converted(merged, model_dir, tokenizer, overwrite=True)
        atomic_write_json(model_dir / SUMMARY_FILE, summary)
        atomic_write_json(out / SUMMARY_FILE, summary)  # last: its presence means the run's outputs are complete
    acc.wait_for_everyone()
    p = state.perplexity
    run.log.info(
        "finetuned in %.0f s: %d tokens, %.0f tokens/s%s; model in %s",
        state.wall_time_s, state.tokens_seen, state.extra["tokens_per_s"],
        "" if "finetuned" not in p else
        f"; held-out perplexity teacher {p['teacher']:.3f}, converted {p['converted']:.3f}, finetuned {p['finetuned']:.3f}",
        model_dir,
    )
    return FinetuneResult(out, model_dir, adapter_dir, summary, merged, tokenizer)


__all__ = ["FinetuneResult", "MIXED_PRECISION", "check_stages", "finetune"]
