"""Held-out evaluation shared by the stages: every process gets the same number of rows."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import DistributedType

from .lm_loss import (
    NO_LOGITS,
    capture_lm_head_input,
    chunked_nll_sums,
    lm_head_weight,
    shifted_labels,
)


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


def _causal_lm(model: nn.Module, accelerator) -> nn.Module | None:
    """The transformers causal LM inside ``model`` (accelerate / PEFT wrappers removed); None under
    FSDP (flat parameters are only whole inside the wrapped forward) or where it is not one."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    lm = accelerator.unwrap_model(model)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return lm if hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings") else None


@torch.no_grad()
def held_out_nll(model: nn.Module, blocks: torch.Tensor, accelerator, batch_size: int,
                 max_batches: int | None = None) -> float:
    """Mean next-token negative log-likelihood per token over ``blocks``, all processes together.

    Scored from the decoder's hidden states through the LM head a chunk of positions at a time
    (``lm_loss.chunked_nll_sums``): never the [b, T, vocab] logits and their fp32 / log-softmax
    copies, which at a 262K vocabulary are 2 GB per copy for one 2,048-token block. A model whose
    logits are not its LM head's plain product (soft-capping, a wrapped head) uses its own logits."""
    was_training = model.training
    model.eval()
    lm = _causal_lm(model, accelerator)
    weight = None if lm is None else lm_head_weight(lm)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [nll sum, tokens]
    for ids, w in eval_batches(blocks, accelerator, batch_size, max_batches):
        if weight is not None:
            with capture_lm_head_input(lm) as box:
                model(input_ids=ids, use_cache=False, logits_to_keep=NO_LOGITS.to(ids.device))
            nll_sum = chunked_nll_sums(box.pop("hidden"), weight, shifted_labels(ids))  # [b]
        else:
            logits = model(input_ids=ids, use_cache=False).logits  # [b, T, V]
            nll_sum = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
            ).view(ids.shape[0], -1).sum(1)  # [b]
        total[0] += (nll_sum.double() * w).sum()
        total[1] += (w * (ids.shape[1] - 1)).sum()
    model.train(was_training)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


__all__ = ["eval_batches", "eval_rows", "held_out_nll"]
