"""Which layers to keep as softmax attention: probe a teacher for the layers that look far back.

A converted layer sees exact attention only inside its window; anything further away goes through
the linear branch's fixed-size state. The layers worth keeping as softmax are the ones whose heads
look far back. Two probes of the teacher find them, neither on any evaluation data:

- **induction**: a block of random tokens repeated once; a head's score is its mean attention from
  each token of the second copy to the token after the same token in the first copy, ``length``
  positions back (Olsson et al. 2022's induction-head score, at a distance beyond the window);
- **far attention**: on training text (the first articles of the Wikipedia sample's train split,
  :mod:`linearize.offline_text`), a head's mean attention mass further than ``window`` back, the
  first ``sinks`` positions (attention sinks) not counted.

:func:`suggest_layers` takes the layer with the most far attention plus the layers with the
strongest induction heads; :func:`probe_layers` runs both probes and suggests (what
``keep_softmax_layers: auto:N`` of :class:`~linearize.config.ConversionConfig` runs in ``convert()``).
``python -m benchmarks.retrieval_layers`` adds a passkey check of candidate sets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

INDUCTION_LENGTH = 512
"""Random block length of the induction probe: the distance looked back (beyond a 128-token window)."""
TEXT_TOKENS = 2048
"""Tokens of training text for the far-attention probe."""
TEXT_ARTICLES = 3
"""The far-attention text: the first this-many articles of the Wikipedia sample's train split."""
PROBE_SINKS = 4
"""Initial positions not counted as far (attention sinks)."""


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules in layer order (every HF attention module has ``layer_idx``)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx")
    return sorted(found, key=lambda m: m.layer_idx)


@torch.no_grad()
def attention_scores(model: nn.Module, input_ids: torch.Tensor,
                     reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``reduce`` of each layer's attention probabilities [B, H, T, T] (eager attention) to [H],
    stacked to [layers, H] on the CPU in float32. One layer's probabilities live at a time: a
    forward hook reduces them as each attention module returns them."""
    modules = attention_modules(model)
    scores: dict[int, torch.Tensor] = {}

    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise ValueError(f"{type(module).__name__} returned no attention probabilities under eager attention")
        scores[module.layer_idx] = reduce(weights.float()).cpu()
        return (output[0], None, *output[2:])

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        model(input_ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return torch.stack([scores[m.layer_idx] for m in modules])


def induction_scores(model: nn.Module, length: int = INDUCTION_LENGTH, batch: int = 2, seed: int = 0,
                     vocab: tuple[int, int] | None = None) -> torch.Tensor:
    """[layers, heads]: attention from token i of the second copy to token i + 1 of the first."""
    low, high = vocab or (0, model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(low, high, (batch, length), generator=g)  # [B, L]
    q = torch.arange(length, 2 * length)  # queries of the second copy

    def reduce(a: torch.Tensor) -> torch.Tensor:  # [B, H, 2L, 2L] -> [H]
        return a[:, :, q, q - length + 1].mean(dim=(0, 2))

    return attention_scores(model, torch.cat([block, block], dim=1), reduce)


def far_attention(model: nn.Module, input_ids: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """[layers, heads]: mean attention mass further than ``window`` back, sinks excluded, over the
    queries that have such positions at all."""
    T = input_ids.shape[-1]
    if T <= window + sinks:
        raise ValueError(f"far attention needs more than window + sinks = {window + sinks} tokens, got {T}")
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    far = ((i - j) >= window) & (j >= sinks)  # [T, T]

    def reduce(a: torch.Tensor) -> torch.Tensor:  # [B, H, T, T] -> [H]
        return (a * far.to(a.device))[:, :, window + sinks:].sum(-1).mean(dim=(0, 2))

    return attention_scores(model, input_ids, reduce)


def suggest_layers(induction: torch.Tensor, far: torch.Tensor, count: int, far_count: int = 1) -> list[int]:
    """The ``far_count`` layers with the most far attention (strongest head), then the strongest
    induction layers until ``count`` layers are chosen; sorted."""
    if not 0 <= far_count <= count <= induction.shape[0]:
        raise ValueError(f"need 0 <= far_count ({far_count}) <= count ({count}) <= layers ({induction.shape[0]})")
    chosen = far.amax(dim=1).argsort(descending=True)[:far_count].tolist()
    for layer in induction.amax(dim=1).argsort(descending=True).tolist():
        if len(chosen) == count:
            break
        if layer not in chosen:
            chosen.append(layer)
    return sorted(chosen)


def random_token_range(tokenizer, vocab_size: int) -> tuple[int, int]:
    """Ids for the random blocks: above the special tokens when they sit at the start of the vocabulary."""
    special = set(tokenizer.all_special_ids)
    low = max(special) + 1 if special and max(special) < vocab_size // 2 else 0
    return low, vocab_size


def probe_text_ids(tokenizer, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """[1, T] the far-attention text: the first :data:`TEXT_ARTICLES` train articles, ``tokens`` long."""
    from . import offline_text

    text = " ".join(a.text for a in offline_text.wiki_articles(split="train")[:TEXT_ARTICLES])
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]])


def probe_layers(model: nn.Module, tokenizer, count: int, window: int, sinks: int = PROBE_SINKS,
                 induction_length: int = INDUCTION_LENGTH, text_tokens: int = TEXT_TOKENS) -> dict[str, Any]:
    """Run both probes on ``model`` and suggest ``count`` layers. Lengths are capped to the model's
    context (``max_position_embeddings``). Returns a JSON-ready record: the settings, each layer's
    strongest-head scores and ``suggested`` (sorted layer indices)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        induction_length = min(induction_length, context // 2)
        text_tokens = min(text_tokens, context)
    start = time.perf_counter()
    induction = induction_scores(model, induction_length, vocab=random_token_range(tokenizer, model.config.vocab_size))
    ids = probe_text_ids(tokenizer, text_tokens)
    far = far_attention(model, ids, window, sinks)
    suggested = suggest_layers(induction, far, count, far_count=min(1, count))
    logger.info("layer probe: keep %s of %d layers (%.0f s)", suggested, induction.shape[0],
                time.perf_counter() - start)
    return {
        "count": count, "suggested": suggested, "window": window, "sinks": sinks,
        "induction_length": induction_length, "text_tokens": int(ids.shape[-1]),
        "text": f"offline_text.wiki_articles('train')[:{TEXT_ARTICLES}]",
        "induction_max_head": induction.amax(dim=1).tolist(),
        "far_attention_max_head": far.amax(dim=1).tolist(),
    }
