"""Optimiser, schedule and step count of a stage."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import get_scheduler

from ..recipe import Recipe, StageOptim
from .state import stage_total

# Recipe schedule name -> transformers.get_scheduler name (both warm up linearly first).
SCHEDULERS = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}


def schedule_plan(num_blocks: int, recipe: Recipe, cfg: StageOptim) -> tuple[int, int]:
    """(optimiser steps per epoch, total optimiser steps) of a stage."""
    tc = recipe.train
    per_epoch = num_blocks // tc.batch_size // tc.grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"the data packs into {num_blocks} blocks of {recipe.data.seq_len} tokens, fewer than one optimiser "
            f"step takes (train.batch_size × train.grad_accum = {tc.batch_size * tc.grad_accum}); "
            "add data or lower the batch"
        )
    return per_epoch, stage_total(per_epoch, cfg.epochs, cfg.max_steps)


def optimizer_and_scheduler(params: list[nn.Parameter], cfg: StageOptim, total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULERS[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps
    )
    return optimizer, scheduler


__all__ = ["SCHEDULERS", "optimizer_and_scheduler", "schedule_plan"]
