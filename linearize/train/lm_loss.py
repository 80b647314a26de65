"""Next-token cross-entropy (+ KL to a teacher) through the LM head, a chunk of positions at a time.

The plain path, ``lm_head(hidden)`` then ``cross_entropy(logits.float())``, holds the [T, vocab]
logits, their fp32 copy and log-softmax for autograd, and with a KL term the teacher's logits and
both log-softmaxes as well: at SmolLM2's vocabulary (49,152) that is 0.4 GB per [2048, vocab] fp32
tensor, several of them alive at the peak. :func:`chunked_lm_loss` never holds more than one chunk's
[chunk, vocab] logits: its forward computes the loss *and* the gradients with respect to the hidden
states (and the LM-head weight when it requires grad) chunk by chunk, keeps those ([T, d], [V, d]),
and its backward only scales them by the incoming gradient (Liger-Kernel's fused linear
cross-entropy, in plain PyTorch). Values and gradients equal the plain path up to fp32 summation
order (tests/test_lm_loss.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
# Positions per chunk: [256, 49152] fp32 logits are 50 MB; a few such buffers are alive per chunk.
DEFAULT_CHUNK = 256
# ``logits_to_keep`` that makes a transformers causal LM apply its LM head to no position.
NO_LOGITS = torch.empty(0, dtype=torch.long)


class _ChunkedLMLoss(torch.autograd.Function):
    """(sum of CE over labelled positions, sum of KL(teacher ‖ student) over all positions)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, teacher_hidden, temperature: float, chunk: int):
        # hidden [N, d], weight [V, d], labels [N] (IGNORE_INDEX: not scored), teacher_hidden [N, d] | None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with_kl = teacher_hidden is not None
        n = hidden.shape[0]
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w32 = weight.float()
        g_h = [torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
               for _ in range(1 + with_kl)] if need_h else None  # per loss: [N, d]
        g_w = [torch.zeros_like(w32) for _ in range(1 + with_kl)] if need_w else None  # per loss: [V, d]
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            logits = F.linear(h, weight).float()  # [c, V]
            lab = labels[s : s + chunk]
            ce_sum += F.cross_entropy(logits, lab, ignore_index=IGNORE_INDEX, reduction="sum")
            grads = []
            if need_h or need_w:
                valid = lab != IGNORE_INDEX  # [c]
                g = torch.softmax(logits, dim=-1)  # [c, V]: d(sum CE)/d logits = softmax - onehot
                g[valid, lab[valid]] -= 1.0
                g[~valid] = 0.0
                grads.append(g)
            if with_kl:
                t_logits = F.linear(teacher_hidden[s : s + chunk], weight).float()  # [c, V]
                log_t = F.log_softmax(t_logits / temperature, dim=-1)
                del t_logits
                log_s = F.log_softmax(logits / temperature, dim=-1)
                kl_sum += F.kl_div(log_s, log_t, log_target=True, reduction="sum")
                if need_h or need_w:  # d(sum KL)/d logits = (softmax(s/T) - softmax(t/T)) / T
                    grads.append((log_s.exp_() - log_t.exp_()) / temperature)
                del log_t, log_s
            del logits
            for i, g in enumerate(grads):
                if need_h:
                    g_h[i][s : s + chunk] = g @ w32  # [c, d]
                if need_w:
                    g_w[i].addmm_(g.t(), h.float())  # [V, d]
        ctx.save_for_backward(*(g_h or []), *(g_w or []))
        ctx.layout = (need_h, need_w, 1 + with_kl, hidden.dtype, weight.dtype)
        return ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        need_h, need_w, n_loss, h_dtype, w_dtype = ctx.layout
        saved = list(ctx.saved_tensors)
        scales = [grad_ce, grad_kl][:n_loss]
        g_h = g_w = None
        if need_h:
            parts, saved = saved[:n_loss], saved[n_loss:]
            g_h = sum(sc * p for sc, p in zip(scales, parts)).to(h_dtype)
        if need_w:
            g_w = sum(sc * p for sc, p in zip(scales, saved[:n_loss])).to(w_dtype)
        return g_h, g_w, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    teacher_hidden: torch.Tensor | None = None, temperature: float = 1.0,
                    chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean CE over labelled positions, KL(teacher ‖ student) · T² averaged over all positions or None).

    ``hidden`` [..., d]: the LM head's input (after the final norm); ``weight`` [V, d]: the LM head
    (no bias); ``labels`` [...]: the target of each position (``IGNORE_INDEX``: not scored — shift
    before calling); ``teacher_hidden`` [..., d]: the teacher's LM-head input (no grad), scored
    through the same ``weight`` and treated as a constant (no gradient flows through it). The same numbers as ``F.cross_entropy(logits.float(),
    ignore_index=-100)`` and ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
    reduction="batchmean") · T²`` on the flattened positions.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: need at least one position per chunk")
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)  # [N, d]
    lab = labels.reshape(-1).to(hidden.device)  # [N]
    th = None if teacher_hidden is None else teacher_hidden.reshape(-1, d).detach()  # [N, d]
    ce_sum, kl_sum = _ChunkedLMLoss.apply(h, weight, lab, th, float(temperature), int(chunk))
    ce = ce_sum / (lab != IGNORE_INDEX).sum()
    kl = None if th is None else kl_sum * (temperature * temperature) / h.shape[0]
    return ce, kl


@torch.no_grad()
def chunked_nll_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-row sums of the next-token NLL [b] (no grad), ``chunk`` positions of logits at a time.

    ``hidden`` [b, T, d]: the LM head's input; ``weight`` [V, d]; ``labels`` [b, T] (``IGNORE_INDEX``:
    not scored). Each row's sum is ``F.cross_entropy(logits.float(), reduction="sum")`` over its
    labelled positions, accumulated per chunk (fp32 summation order aside, the same number)."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: need at least one position per chunk")
    return torch.stack([_ChunkedLMLoss.apply(h, weight, lab.to(h.device), None, 1.0, int(chunk))[0]
                        for h, lab in zip(hidden, labels)])


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels of ``ids`` [b, T]: ids shifted left, the last position not scored ([b, T])."""
    return F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)


def lm_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The LM head's weight [V, d] when the chunked loss reproduces the model's logits exactly: a
    plain bias-free ``nn.Linear`` head (not a LoRA-wrapped one) and no final logit soft-capping or
    scaling; else None (use the model's own logits)."""
    head = model.get_output_embeddings()
    cfg = model.config
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head.weight


@contextlib.contextmanager
def capture_lm_head_input(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``box["hidden"]`` [b, T, d] is the decoder's last hidden state (the LM
    head's input) of the latest forward pass of ``model`` (a transformers causal LM)."""
    box: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        box["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = model.get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


__all__ = ["DEFAULT_CHUNK", "IGNORE_INDEX", "NO_LOGITS", "capture_lm_head_input", "chunked_lm_loss", "chunked_nll_sums",
           "lm_head_weight", "shifted_labels"]
