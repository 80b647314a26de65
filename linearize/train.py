"""Finetune a converted model as a recipe says: attention transfer, then LoRA, through accelerate.

``finetune(recipe)`` loads the teacher, converts it, packs the data and runs the recipe's stages:

- ``attention_transfer`` trains only ``conversion_parameters(model)``. Per batch, one teacher pass
  (under ``teacher_attention``) records every converted layer's attention input and output with
  forward hooks; each mixer's hybrid forward then runs on those inputs, and the loss is the sum of
  the per-layer MSEs (layers are independent). The parameters are tiny, so the model is not
  wrapped for data parallelism: the gradients are averaged across processes by hand.
- ``lora`` wraps the model with peft LoRA (plus the conversion parameters, if asked), trains
  next-token cross-entropy (+ optional KL to the teacher's logits: the same model with adapters
  disabled under ``teacher_attention``) on the ``accelerator.prepare``-d model (DDP or FSDP).

The batch of a micro-step is global (split between processes), so a recipe takes the same optimiser
steps on one or several processes. Checkpoints are written atomically (temp folder, then rename)
and ``resume=True`` continues from the last one with the same data order, optimiser and scheduler
state. At the end the LoRA weights are merged and the model is saved with
``linearize.save_converted`` in ``output_dir/model``, the adapter in ``output_dir/adapter``, and a
``training_summary.json`` in both ``output_dir`` and ``output_dir/model``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger

from .data import PackedData, build_data, iter_batches
from .recipe import LoraConfig, Recipe, StageOptim

# accelerate's logger: records go out on the main process only (one line per event, not per process).
logger = get_logger(__name__)

SUMMARY_FILE = "training_summary.json"
STATE_FILE = "trainer_state.json"
TRANSFER_STATE_FILE = "transfer_state.pt"
RECIPE_FILE = "recipe.yaml"
MODEL_DIR, ADAPTER_DIR, CHECKPOINT_DIR, LOG_DIR = "model", "adapter", "checkpoints", "logs"
CONVERSION_PARAMS_FILE = "conversion_parameters.safetensors"
CHECKPOINT_PREFIX = "step-"
# Recipe schedule name -> transformers.get_scheduler name (both warm up linearly first).
SCHEDULERS = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}
# Recipe precision -> accelerate mixed_precision.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Without a validation split, per-layer transfer errors are measured on this many batches of training blocks.
TRAIN_EVAL_BATCHES = 8
# Tokens of the probe sequence on which merged and unmerged logits are compared.
MERGE_PROBE_TOKENS = 64
# Keyword arguments of an attention call that belong to the cache, dropped when a mixer is re-run.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")

StepCallback = Callable[[str, int, dict[str, float]], None]


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


# --- shared helpers ------------------------------------------------------------------------------


def _decoder(model: nn.Module) -> nn.Module:
    """The model without its LM head (``model.model`` for Llama-style causal LMs)."""
    return getattr(model, model.base_model_prefix, model)


def _eval_rows(num_rows: int, rank: int, world: int) -> tuple[list[int], list[float]]:
    """Row indices and weights of this process; every process gets the same count (pads weigh 0)."""
    mine = list(range(rank, num_rows, world))
    per = math.ceil(num_rows / world)
    weights = [1.0] * len(mine) + [0.0] * (per - len(mine))
    return mine + [0] * (per - len(mine)), weights


def _eval_batches(blocks: torch.Tensor, accelerator, batch_size: int, max_batches: int | None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rows, weights = _eval_rows(len(blocks), accelerator.process_index, accelerator.num_processes)
    count = 0
    for start in range(0, len(rows), batch_size):
        if max_batches is not None and count >= max_batches:
            return
        idx = torch.tensor(rows[start : start + batch_size])
        w = torch.tensor(weights[start : start + batch_size], device=accelerator.device)
        yield blocks[idx].long().to(accelerator.device), w  # [b, T], [b]
        count += 1


@torch.no_grad()
def held_out_nll(model: nn.Module, blocks: torch.Tensor, accelerator, batch_size: int,
                 max_batches: int | None = None) -> float:
    """Mean next-token negative log-likelihood per token over ``blocks``, all processes together."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [nll sum, tokens]
    for ids, w in _eval_batches(blocks, accelerator, batch_size, max_batches):
        logits = model(input_ids=ids, use_cache=False).logits  # [b, T, V]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        ).view(ids.shape[0], -1)  # [b, T-1]
        total[0] += (nll.sum(1).double() * w).sum()
        total[1] += (w * nll.shape[1]).sum()
    model.train(was_training)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def _schedule_plan(num_blocks: int, recipe: Recipe, cfg: StageOptim) -> tuple[int, int]:
    """(optimiser steps per epoch, total optimiser steps) of a stage."""
    tc = recipe.train
    per_epoch = num_blocks // tc.batch_size // tc.grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"the data packs into {num_blocks} blocks of {recipe.data.seq_len} tokens, fewer than one optimiser "
            f"step takes (train.batch_size × train.grad_accum = {tc.batch_size * tc.grad_accum}); "
            "add data or lower the batch"
        )
    total = max(1, round(cfg.epochs * per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return per_epoch, total


def _optimizer_and_scheduler(params: list[nn.Parameter], cfg: StageOptim, total_steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULERS[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
    )
    return optimizer, scheduler


def _flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


# --- checkpoints ---------------------------------------------------------------------------------


class _Checkpoints:
    """``output_dir/checkpoints/step-NNNNNNN`` folders, written atomically, the last k kept."""

    def __init__(self, root: Path, keep: int, accelerator):
        self.root, self.keep, self.accelerator = root, keep, accelerator

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, global_step: int, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
        acc = self.accelerator
        name = f"{CHECKPOINT_PREFIX}{global_step:07d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write(tmp)
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        logger.info("checkpoint written: %s", final)
        return final


# --- attention transfer --------------------------------------------------------------------------


class _LayerCapture:
    """Forward hooks recording each mixer's call (args, kwargs) and output during a teacher pass."""

    def __init__(self, mixers: list[tuple[int, nn.Module]]):
        self.mixers = mixers
        self.records: dict[int, tuple[tuple, dict, torch.Tensor]] = {}
        self.handles: list = []

    def _hook(self, layer: int, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        self.records[layer] = (args, kwargs, out)

    def __enter__(self):
        self.records.clear()
        self.handles = [m.register_forward_hook(partial(self._hook, i), with_kwargs=True) for i, m in self.mixers]
        return self.records

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


def transfer_errors(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer attention-transfer error of one batch.

    Returns (mse [L, B], teacher power [L, B]): per converted layer and row, the mean squared error
    between the hybrid's and the teacher's attention outputs on the teacher's hidden states, and the
    teacher output's mean square (to make the error relative). Gradients flow into the hybrid.
    """
    from .mixers import iter_mixers, teacher_attention

    mixers = list(iter_mixers(model))
    capture = _LayerCapture(mixers)
    with torch.no_grad(), teacher_attention(model), capture as records:
        _decoder(model)(input_ids=input_ids, use_cache=False)
    mse, power = [], []
    for i, mixer in mixers:
        args, kwargs, target = records[i]
        out = mixer(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # [B, T, hidden]
        target = target.float()
        mse.append((out.float() - target).pow(2).mean(dim=(1, 2)))  # [B]
        power.append(target.pow(2).mean(dim=(1, 2)))  # [B]
    return torch.stack(mse), torch.stack(power)  # [L, B], [L, B]


@torch.no_grad()
def _layer_errors(model, blocks, accelerator, batch_size, max_batches, autocast) -> dict[str, list[float]]:
    from .mixers import iter_mixers

    layers = [i for i, _ in iter_mixers(model)]
    sums = torch.zeros(3, len(layers), dtype=torch.float64, device=accelerator.device)  # mse, power, rows
    for ids, w in _eval_batches(blocks, accelerator, batch_size, max_batches):
        with autocast():
            mse, power = transfer_errors(model, ids)
        sums[0] += (mse.double() * w).sum(1)
        sums[1] += (power.double() * w).sum(1)
        sums[2] += w.sum()
    sums = accelerator.reduce(sums, "sum")
    mse, power = sums[0] / sums[2], sums[1] / sums[2]
    return {"layers": layers, "mse": mse.tolist(), "relative_mse": (mse / power.clamp_min(1e-30)).tolist()}


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                          bias="none", task_type="CAUSAL_LM")


# --- the runner ----------------------------------------------------------------------------------


class _Run:
    """State shared by the stages of one :func:`finetune` call."""

    def __init__(self, recipe: Recipe, accelerator, model, tokenizer, data: PackedData, state: dict,
                 checkpoints: _Checkpoints, callback: StepCallback | None, elapsed_before: float,
                 session_start: float):
        self.recipe, self.acc, self.model, self.tokenizer, self.data = recipe, accelerator, model, tokenizer, data
        self.state, self.checkpoints, self.callback = state, checkpoints, callback
        self.session_start = session_start
        self.elapsed_before = elapsed_before
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

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.trackers:
            self.acc.log(metrics, step=step)

    def checkpoint_state(self) -> dict[str, Any]:
        self.state["wall_time_s"] = self.elapsed()
        return self.state

    def run_steps(self, name: str, cfg: StageOptim, micro_step, optimizer_step, write_checkpoint,
                  evaluate=None, on_done=None) -> None:
        """The optimiser-step loop of one stage: batches, logging, eval, checkpoints, Ctrl-C."""
        from tqdm.auto import tqdm

        recipe, tc, acc = self.recipe, self.recipe.train, self.acc
        st = self.state["stages"][name]
        per_epoch, total = st["steps_per_epoch"], st["total_steps"]
        tokens_per_step = tc.batch_size * tc.grad_accum * recipe.data.seq_len
        step = st["steps"]
        last_saved = step
        base_step = self.state["global_step"] - step  # global step at the start of this stage
        bar = tqdm(total=total, initial=step, desc=name, unit="step", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        train_time = 0.0
        steps_timed = 0

        def save() -> None:
            nonlocal last_saved
            self.state["checkpoint_stage"] = name
            self.checkpoints.save(base_step + step, write_checkpoint, self.checkpoint_state())
            last_saved = step

        try:
            while step < total:
                epoch = step // per_epoch
                batches = iter_batches(
                    self.data.train, tc.batch_size, tc.seed, epoch, start=(step % per_epoch) * tc.grad_accum,
                    rank=acc.process_index, world_size=acc.num_processes,
                )
                while step < total and step // per_epoch == epoch:
                    t0 = time.perf_counter()
                    sums: dict[str, torch.Tensor] = {}
                    for j in range(tc.grad_accum):
                        ids = next(batches).to(acc.device)  # [b, T]
                        metrics = micro_step(ids, j == tc.grad_accum - 1)
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0) + v.detach().float() / tc.grad_accum
                    optimizer_step()
                    keys = sorted(sums)
                    values = acc.reduce(torch.stack([sums[k] for k in keys]), "mean").tolist()
                    metrics_now = dict(zip(keys, values))
                    train_time += time.perf_counter() - t0
                    steps_timed += 1
                    step += 1
                    st["steps"] = step
                    st["tokens"] = step * tokens_per_step
                    self.state["global_step"] = base_step + step
                    self.state["tokens_seen"] += tokens_per_step
                    for k, v in metrics_now.items():
                        st["history"].setdefault(k, []).append(v)
                    st["train_time_s"] += time.perf_counter() - t0
                    tok_s = steps_timed * tokens_per_step / max(train_time, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics_now['loss']:.4g}", tok_s=f"{tok_s:.0f}")
                    self.log({f"{name}/{k}": v for k, v in metrics_now.items()} | {f"{name}/tokens_per_s": tok_s},
                             self.state["global_step"])
                    if step % tc.log_every == 0 or step == total:
                        logger.info("%s step %d/%d %s, %.0f tokens/s", name, step, total,
                                    ", ".join(f"{k} {v:.4g}" for k, v in metrics_now.items()), tok_s)
                    if evaluate is not None and tc.eval_every and step % tc.eval_every == 0 and step < total:
                        val = evaluate()
                        st["validation"].append([step, val])
                        self.log({f"{name}/{k}": v for k, v in val.items()}, self.state["global_step"])
                        logger.info("%s step %d validation %s", name, step,
                                    ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
                    if tc.save_every and step % tc.save_every == 0 and step < total:
                        save()
                    if self.callback is not None:
                        self.callback(name, step, metrics_now)
        except KeyboardInterrupt:
            bar.close()
            if step > last_saved:
                save()
            logger.warning("interrupted in stage %s at step %d/%d; the last checkpoint is in %s: continue with "
                           "resume (linearize finetune ... --resume)", name, step, total, self.checkpoints.root)
            raise
        bar.close()
        if not st["done"]:
            st["done"] = True
            for key, values in st["history"].items():
                window = values[-min(tc.log_every, len(values)):]
                st[f"final_{key}"] = sum(window) / len(window)
                st[f"first_{key}"] = values[0]
            st["tokens_per_s"] = st["tokens"] / st["train_time_s"] if st["train_time_s"] else None
            if on_done is not None:
                on_done()  # before the stage's last checkpoint, so that it holds the results
            save()

    # --- stage 1 ---------------------------------------------------------------------------------
    def attention_transfer(self, resume_dir: Path | None) -> None:
        from .convert import conversion_parameters

        recipe, acc, model = self.recipe, self.acc, self.model
        cfg = recipe.attention_transfer
        st = self.state["stages"]["attention_transfer"]
        named = list(conversion_parameters(model))
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        optimizer, scheduler = _optimizer_and_scheduler(params, cfg, st["total_steps"])
        if resume_dir is not None:
            saved = torch.load(resume_dir / TRANSFER_STATE_FILE, map_location=acc.device, weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        model.train()
        # fp16 without a loss scaler is unsafe; the trained parameters are tiny, so fp16 recipes run this
        # stage in fp32.
        autocast = partial(self.autocast, allow_fp16=False)
        tc = recipe.train
        eval_batches = tc.eval_batches

        def errors() -> dict[str, list[float]]:
            return _layer_errors(model, self.eval_blocks(), acc, self.per_device_batch, eval_batches, autocast)

        if "per_layer_before" not in st:
            st["per_layer_before"] = errors()

        def micro_step(ids: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
            with autocast():
                mse, _ = transfer_errors(model, ids)
            loss = mse.mean(dim=1).sum()  # sum over layers of each layer's MSE
            (loss / tc.grad_accum).backward()
            return {"loss": loss}

        def optimizer_step() -> None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if acc.num_processes > 1:
                flat = acc.reduce(torch.cat([g.flatten() for g in grads]), "mean")
                for p, g in zip(params, flat.split([g.numel() for g in grads])):
                    p.grad = g.view_as(p).clone()
            if tc.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        def write(folder: Path) -> None:
            if acc.is_main_process:
                torch.save({
                    "params": {n: p.detach().cpu() for n, p in named},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                }, folder / TRANSFER_STATE_FILE)

        def evaluate() -> dict[str, float]:
            e = errors()
            return {"val_transfer_mse": sum(e["mse"])}

        def on_done() -> None:
            st["per_layer_after"] = errors()

        self.run_steps("attention_transfer", cfg, micro_step, optimizer_step, write, evaluate, on_done)
        after = st["per_layer_after"]
        worst = sorted(zip(after["relative_mse"], after["layers"]), reverse=True)[:4]
        logger.info("attention transfer: relative MSE per layer %s; highest in layers %s (candidates for "
                    "conversion.keep_softmax_layers)",
                    " ".join(f"{e:.3g}" for e in after["relative_mse"]), [layer for _, layer in worst])
        for p in params:
            p.requires_grad_(False)
        model.eval()

    # --- stage 2 ---------------------------------------------------------------------------------
    def lora(self, resume_dir: Path | None):
        from peft import get_peft_model

        from .convert import conversion_parameters
        from .mixers import teacher_attention

        recipe, acc = self.recipe, self.acc
        cfg: LoraConfig = recipe.lora
        tc = recipe.train
        st = self.state["stages"]["lora"]
        extra = list(conversion_parameters(self.model)) if cfg.train_conversion_parameters else []
        peft_model = get_peft_model(self.model, _peft_config(cfg))
        for _, p in extra:
            p.requires_grad_(True)
        if tc.gradient_checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        st["trainable_parameters"] = trainable
        logger.info("lora: %d trainable parameters (%d from the conversion)", trainable,
                    sum(p.numel() for _, p in extra))
        optimizer, scheduler = _optimizer_and_scheduler(params, cfg, st["total_steps"])
        acc.free_memory()
        prepared, optimizer, scheduler = acc.prepare(peft_model, optimizer, scheduler)
        if resume_dir is not None:
            acc.load_state(str(resume_dir))
        prepared.train()

        def micro_step(ids: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
            sync = contextlib.nullcontext() if last else acc.no_sync(prepared)
            with sync:
                out = prepared(input_ids=ids, labels=ids, use_cache=False)
                ce = out.loss
                metrics = {"ce": ce}
                loss = ce
                if cfg.kl_weight:
                    with torch.no_grad(), peft_model.disable_adapter(), teacher_attention(peft_model):
                        teacher_logits = prepared(input_ids=ids, use_cache=False).logits  # [b, T, V]
                    t = cfg.kl_temperature
                    kl = F.kl_div(
                        F.log_softmax(out.logits.float().flatten(0, 1) / t, dim=-1),
                        F.log_softmax(teacher_logits.float().flatten(0, 1) / t, dim=-1),
                        log_target=True, reduction="batchmean",
                    ) * (t * t)
                    loss = ce + cfg.kl_weight * kl
                    metrics["kl"] = kl
                acc.backward(loss)  # divided by grad_accum inside
            metrics["loss"] = loss
            return metrics

        def optimizer_step() -> None:
            if tc.max_grad_norm is not None:
                acc.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        def write(folder: Path) -> None:
            acc.save_state(str(folder))

        def evaluate() -> dict[str, float]:
            nll = held_out_nll(prepared, self.eval_blocks(), acc, self.per_device_batch, tc.eval_batches)
            return {"val_loss": nll}

        self.run_steps("lora", cfg, micro_step, optimizer_step, write, evaluate if self.data.validation is not None else None)
        return prepared, peft_model, extra


# --- entry point ---------------------------------------------------------------------------------


def _make_accelerator(recipe: Recipe, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

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
    from .convert import conversion_parameters
    from .mixers import iter_mixers

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


def _new_state(recipe: Recipe, accelerator, data: PackedData, plans: dict[str, tuple[int, int]]) -> dict[str, Any]:
    stages = {}
    for name in recipe.stages:
        per_epoch, total = plans[name]
        stages[name] = {"done": False, "steps": 0, "steps_per_epoch": per_epoch, "total_steps": total,
                        "tokens": 0, "train_time_s": 0.0, "history": {}, "validation": []}
    return {
        "recipe": recipe.to_dict(),
        "world_size": accelerator.num_processes,
        "data": {
            "format": data.format, "seq_len": recipe.data.seq_len,
            "train_blocks": len(data.train), "train_tokens": data.train_tokens,
            "train_documents": data.train_documents,
            "validation_blocks": 0 if data.validation is None else len(data.validation),
            "validation_documents": data.validation_documents,
        },
        "perplexity": {},
        "stages": stages,
        "global_step": 0,
        "tokens_seen": 0,
        "wall_time_s": 0.0,
    }


def _recipe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    changed = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _recipe_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changed.append(f"{prefix}{k}")
    return changed


def finetune(recipe: Recipe, *, resume: bool = False, model: nn.Module | None = None, tokenizer=None,
             callback: StepCallback | None = None) -> FinetuneResult:
    """Run a recipe: load and convert the teacher, train its stages, merge and save.

    ``model``/``tokenizer``: a loaded teacher to use instead of ``recipe.model`` (it is converted in
    place). ``resume``: continue from the last checkpoint in ``output_dir/checkpoints``.
    ``callback(stage, step, metrics)`` runs after every optimiser step on every process.
    """
    from accelerate.utils import set_seed

    from .convert import convert
    from .mixers import teacher_attention
    from .sources import load_teacher, model_max_length

    start = time.perf_counter()
    tc = recipe.train
    out = Path(recipe.output_dir)
    accelerator = _make_accelerator(recipe, out)
    if tc.batch_size % accelerator.num_processes:
        raise ValueError(
            f"train.batch_size={tc.batch_size} is not a multiple of the {accelerator.num_processes} processes; "
            "the batch of a micro-step is split between them"
        )
    if recipe.accelerate_config and accelerator.num_processes == 1:
        logger.warning("this recipe is meant for `accelerate launch --config_file %s`; running it in one process",
                       recipe.accelerate_config)
    checkpoints = _Checkpoints(out / CHECKPOINT_DIR, tc.keep_checkpoints, accelerator)
    resume_dir = checkpoints.latest() if resume else None
    if resume and resume_dir is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {checkpoints.root}")
    if not resume and checkpoints.latest() is not None:
        raise ValueError(
            f"{out} holds checkpoints of an earlier run: resume it (--resume) or choose another output_dir"
        )

    if model is None:
        model, tokenizer = load_teacher(recipe.model, dtype=DTYPES[recipe.model_dtype])
    elif tokenizer is None:
        raise ValueError("finetune(model=...) needs the teacher's tokenizer as well")
    max_length = model_max_length(model.config)
    set_seed(tc.seed)
    model = convert(model, recipe.conversion)
    check_stages(recipe, model)
    data = build_data(recipe.data, tokenizer, seed=tc.seed, max_length=max_length)
    plans = {name: _schedule_plan(len(data.train), recipe, getattr(recipe, name)) for name in recipe.stages}
    model.to(accelerator.device)
    model.eval()

    if resume_dir is not None:
        state = json.loads((resume_dir / STATE_FILE).read_text())
        changed = _recipe_changes(state["recipe"], recipe.to_dict())
        if changed:
            logger.warning("resuming with a recipe that differs from the checkpoint's in: %s", ", ".join(changed))
        if state["world_size"] != accelerator.num_processes:
            logger.info("resuming on %d processes (checkpoint: %d)", accelerator.num_processes, state["world_size"])
        if list(state["stages"]) != list(recipe.stages):
            raise ValueError(
                f"the checkpoint {resume_dir} was written by a recipe with stages {list(state['stages'])}, "
                f"this recipe has {recipe.stages}: use the same stages or another output_dir"
            )
        elapsed_before = state["wall_time_s"]
        logger.info("resuming from %s (stage step %s)", resume_dir, state["global_step"])
    else:
        state = _new_state(recipe, accelerator, data, plans)
        elapsed_before = 0.0
    run = _Run(recipe, accelerator, model, tokenizer, data, state, checkpoints, callback, elapsed_before, start)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe.to_yaml())
    if accelerator.log_with:
        run.trackers = True
        accelerator.init_trackers("linearize", config=_flat_scalars(recipe.to_dict()))

    batch = run.per_device_batch
    if data.validation is not None and "teacher" not in state["perplexity"]:
        with teacher_attention(model):
            state["perplexity"]["teacher"] = math.exp(held_out_nll(model, data.validation, accelerator, batch, tc.eval_batches))
        state["perplexity"]["converted"] = math.exp(held_out_nll(model, data.validation, accelerator, batch, tc.eval_batches))
        logger.info("held-out perplexity: teacher %.3f, converted before training %.3f",
                    state["perplexity"]["teacher"], state["perplexity"]["converted"])

    # The checkpoint's stage loads its state; stages before it are done (their weights are in it).
    resume_stage = state.get("checkpoint_stage") if resume_dir is not None else None
    if resume_stage == "attention_transfer":
        _load_transfer_params(model, resume_dir / TRANSFER_STATE_FILE, accelerator.device)

    prepared = peft_model = None
    extra: list = []
    for index, name in enumerate(recipe.stages):
        stage_resume = resume_dir if resume_stage == name else None
        if state["stages"][name]["done"] and name == "attention_transfer":
            continue
        set_seed(tc.seed + 1 + index)  # LoRA init etc. do not depend on where a run was resumed
        if name == "attention_transfer":
            run.attention_transfer(stage_resume)
        else:
            prepared, peft_model, extra = run.lora(stage_resume)

    return _finish(run, prepared, peft_model, extra, out)


def _load_transfer_params(model: nn.Module, path: Path, device) -> None:
    from .convert import conversion_parameters

    saved = torch.load(path, map_location=device, weights_only=True)["params"]
    named = dict(conversion_parameters(model))
    missing = sorted(set(named) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} lacks conversion parameters {missing[:3]}...: was the recipe changed?")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(saved[name])


def _rebuild_peft_model(recipe: Recipe, full_state: dict[str, torch.Tensor]):
    """A CPU copy of the trained peft model from a gathered state dict (used after FSDP training)."""
    from peft import get_peft_model

    from .convert import convert
    from .sources import load_teacher

    model, _ = load_teacher(recipe.model, dtype=DTYPES[recipe.model_dtype])
    model = convert(model, recipe.conversion)
    peft_model = get_peft_model(model, _peft_config(recipe.lora))
    peft_model.load_state_dict(full_state, strict=True)
    return peft_model


def _save_adapter_and_merge(peft_model, adapter_dir: Path, probe: torch.Tensor, write: bool):
    """Save the adapter (+ trained conversion parameters), merge LoRA; returns (merged, relative RMS
    difference of the logits before and after merging on ``probe``)."""
    from safetensors.torch import save_file

    from .convert import conversion_parameters

    if write:
        peft_model.save_pretrained(str(adapter_dir))
        extra = {n: p.detach().cpu().contiguous() for n, p in conversion_parameters(peft_model.get_base_model())}
        if extra:
            save_file(extra, str(adapter_dir / CONVERSION_PARAMS_FILE))
    device = next(peft_model.parameters()).device
    probe = probe[:, :MERGE_PROBE_TOKENS].long().to(device)  # [1, T]
    with torch.no_grad():
        before = peft_model(input_ids=probe, use_cache=False).logits.double()
        merged = peft_model.merge_and_unload()
        after = merged(input_ids=probe, use_cache=False).logits.double()
    return merged, ((after - before).norm() / before.norm()).item()


def _finish(run: _Run, prepared, peft_model, extra, out: Path) -> FinetuneResult:
    from accelerate.utils import DistributedType

    from .convert import save_converted

    acc, state, recipe = run.acc, run.state, run.recipe
    batch = run.per_device_batch
    tc = recipe.train
    adapter_dir = None
    if peft_model is not None:
        if run.data.validation is not None:
            state["perplexity"]["finetuned"] = math.exp(
                held_out_nll(prepared, run.data.validation, acc, batch, tc.eval_batches))
        if acc.distributed_type == DistributedType.FSDP:
            # Sharded weights: gather the full state on the main process and merge a CPU copy there.
            full_state = acc.get_state_dict(prepared)
            peft_model = _rebuild_peft_model(recipe, full_state) if acc.is_main_process else None
        else:
            peft_model = acc.unwrap_model(prepared, keep_fp32_wrapper=False)
        adapter_dir = out / ADAPTER_DIR
        if peft_model is not None:
            peft_model.eval()
            merged, state["merge_check_relative_rms"] = _save_adapter_and_merge(
                peft_model, adapter_dir, run.eval_blocks()[:1], write=acc.is_main_process)
        else:
            merged = None
    else:
        merged = run.model
        merged.eval()
        if run.data.validation is not None:
            state["perplexity"]["finetuned"] = math.exp(
                held_out_nll(merged, run.data.validation, acc, batch, tc.eval_batches))
    if merged is not None:
        for p in merged.parameters():
            p.requires_grad_(False)
    if run.trackers:
        acc.end_training()
    state["wall_time_s"] = run.elapsed()
    state["tokens_per_s"] = state["tokens_seen"] / max(
        sum(s["train_time_s"] for s in state["stages"].values()), 1e-9)
    model_dir = out / MODEL_DIR
    state["output"] = {"model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir)}
    if acc.is_main_process:
        save_converted(merged, model_dir, run.tokenizer)
        text = json.dumps(state, indent=1)
        (out / SUMMARY_FILE).write_text(text)
        (model_dir / SUMMARY_FILE).write_text(text)
    acc.wait_for_everyone()
    p = state["perplexity"]
    logger.info(
        "finetuned in %.0f s: %d tokens, %.0f tokens/s%s; model in %s",
        state["wall_time_s"], state["tokens_seen"], state["tokens_per_s"],
        "" if "finetuned" not in p else
        f"; held-out perplexity teacher {p['teacher']:.3f}, converted {p['converted']:.3f}, finetuned {p['finetuned']:.3f}",
        model_dir,
    )
    return FinetuneResult(out, model_dir, adapter_dir, state, merged, run.tokenizer)


__all__ = ["FinetuneResult", "check_stages", "finetune", "held_out_nll", "transfer_errors"]
