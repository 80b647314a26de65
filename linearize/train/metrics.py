"""Held-out evaluation shared by the stages: every process gets the same number of rows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def eval_rows(num_rows: int, rank: int, world: int) -> tuple[list[int], list[float]]:
    """Row indices and weights of this process; every process gets the same count (pads weigh 0)."""
    mine = list(range(rank, num_rows, world))
    per = math.ceil(num_rows / world)
    weights = [1.0] * len(mine) + [0.0] * (per - len(mine))
    return mine + [0] * (per - len(mine)), weights


def eval_batches(blocks: torch.Tensor, accelerator, batch_size: int, max_batches: int | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids [b, T], row weights [b]) of this process's share of ``blocks``."""
    rows, weights = eval_rows(len(blocks), accelerator.process_index, accelerator.num_processes)
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
    for ids, w in eval_batches(blocks, accelerator, batch_size, max_batches):
        logits = model(input_ids=ids, use_cache=False).logits  # [b, T, V]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        ).view(ids.shape[0], -1)  # [b, T-1]
        total[0] += (nll.sum(1).double() * w).sum()
        total[1] += (w * nll.shape[1]).sum()
    model.train(was_training)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


__all__ = ["eval_batches", "eval_rows", "held_out_nll"]
