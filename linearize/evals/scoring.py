"""Loglikelihood scoring that applies the LM head to the scored positions only.

lm-eval's ``HFLM._loglikelihood_tokens`` runs the model to full logits and takes ``log_softmax`` of
the whole padded batch in fp32 ([batch, T, vocab]: 1.6 GB for one 8K-token document at SmolLM2's
49,152-token vocabulary, with the model's own logits beside it), then keeps the continuation's
positions. :class:`SlicedScoring` runs the model to its last hidden states ([batch, T, d]), applies
the LM head to the continuation's positions only, ``chunk`` positions at a time, and sums the same
fp32 log-probabilities: the same requests, truncation, ordering and batches as ``HFLM``, the same
numbers (tests/test_eval_scoring.py), never logits for a position that is not scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linearize.train.lm_loss import NO_LOGITS, capture_lm_head_input, lm_head_weight

# Positions scored per LM-head call: [512, vocab] fp32 log-probs at a time.
SCORE_CHUNK = 512


class SlicedScoring:
    """Mixin for lm-eval's ``HFLM``: ``_loglikelihood_tokens`` (loglikelihood and
    loglikelihood_rolling both end there) without logits for unscored positions. Falls back to
    ``HFLM``'s own for seq2seq models and heads the hidden states cannot reproduce exactly."""

    score_chunk: int = SCORE_CHUNK

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        weight = lm_head_weight(self.model) if self.backend == "causal" else None
        if weight is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # HFLM's order: longest first (ties by tokens), so batches pad as little as they do there.
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1] + requests[i][2]),
                                                            tuple(requests[i][1] + requests[i][2])))
        size = self.batch_size if self.batch_size != "auto" else (override_bs or 1)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            for i in idx:
                if not requests[i][1] or not requests[i][2] or len(requests[i][2]) > self.max_length:
                    raise ValueError(f"request {requests[i][0]!r}: need a non-empty context and a non-empty "
                                     f"continuation of at most max_length={self.max_length} tokens")
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in idx]
            batch = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # [b, T], right-padded
            for r, toks in enumerate(rows):
                batch[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            hidden = self._hidden_states(batch.to(self.device))  # [b, T, d]
            for r, i in enumerate(idx):
                (request_str, _, cont) = requests[i]
                answer = self._score_row(hidden[r], weight, len(rows[r]), cont)
                results[i] = answer
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            del hidden
        return results

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    @torch.no_grad()
    def _hidden_states(self, batch: torch.Tensor) -> torch.Tensor:
        """The LM head's input [b, T, d] of ``batch`` [b, T]; the head itself scores no position."""
        with self._autocast(), capture_lm_head_input(self.model) as box:
            self.model(batch, logits_to_keep=NO_LOGITS.to(batch.device))
            return box.pop("hidden")

    @torch.no_grad()
    def _score_row(self, hidden: torch.Tensor, weight: torch.Tensor, length: int, cont: list[int]
                   ) -> tuple[float, bool]:
        """(sum of log p(continuation), whether greedy decoding gives it) from one row's hidden states."""
        target = torch.tensor(cont, dtype=torch.long, device=hidden.device)  # [C]
        lo = length - len(cont)
        picked, greedy = [], True
        for s in range(0, len(cont), self.score_chunk):
            e = min(len(cont), s + self.score_chunk)
            with self._autocast():
                logits = F.linear(hidden[lo + s : lo + e], weight)  # [c, V]
            logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # [c, V]
            greedy = greedy and bool((logp.argmax(-1) == target[s:e]).all())
            picked.append(logp.gather(1, target[s:e, None])[:, 0])  # [c]
            del logits, logp
        return float(torch.cat(picked).sum()), greedy


def sliced_hflm() -> type:
    """lm-eval's ``HFLM`` with :class:`SlicedScoring` (imported on call: lm-eval is an extra)."""
    from lm_eval.models.huggingface import HFLM

    return _sliced(HFLM)


_CLASSES: dict[type, type] = {}


def _sliced(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type("Sliced" + base.__name__, (SlicedScoring, base), {"__doc__": SlicedScoring.__doc__})
    return _CLASSES[base]


__all__ = ["SCORE_CHUNK", "SlicedScoring", "sliced_hflm"]
