"""Which softmax layers to keep: probe a teacher for the layers that retrieve beyond the window.

The probes and the suggestion are :mod:`linearize.layer_probe` (what ``linearize convert
--keep-softmax auto:N`` runs): induction heads at distance 512 on random tokens, and attention mass
beyond the window on training text; the suggestion is the layer with the most far attention plus
the layers with the strongest induction heads. ``--probe`` checks candidate sets on the teacher itself: every layer not in the
set attends only to its window and the first ``sinks`` tokens (StreamingLLM's attention, what a
converted layer's window branch can do exactly), and the passkey accuracy of that teacher says
whether the kept set can still retrieve.

    python -m benchmarks.retrieval_layers --model smollm2-135m --probe even:3,9,15,21,27 --out docs/recovery
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from linearize.layer_probe import (
    INDUCTION_LENGTH,
    PROBE_SINKS,
    TEXT_TOKENS,
    attention_modules,
    far_attention,
    induction_scores,
    probe_text_ids,
    random_token_range,
    suggest_layers,
)
from linearize.outputs import atomic_write_json

logger = logging.getLogger(__name__)


def streaming_mask(T: int, window: int, sinks: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, T, T] additive mask: causal, within ``window`` (the current token included) or among
    the first ``sinks`` positions."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None]
    allowed = (j <= i) & (((i - j) < window) | (j < sinks))
    return torch.zeros(T, T, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@contextlib.contextmanager
def streaming_attention(model: nn.Module, keep: list[int], window: int, sinks: int):
    """Every attention layer not in ``keep`` attends only to its window and the sinks (full-sequence
    forwards without a cache, eager or SDPA attention)."""
    patched = []
    for module in attention_modules(model):
        if module.layer_idx in keep:
            continue
        original = module.forward

        def forward(hidden_states, *args, _original=original, **kwargs):
            kwargs["attention_mask"] = streaming_mask(hidden_states.shape[1], window, sinks,
                                                      hidden_states.dtype, hidden_states.device)
            return _original(hidden_states, *args, **kwargs)

        patched.append((module, module.__dict__.get("forward")))
        module.forward = forward
    try:
        yield model
    finally:
        for module, own_forward in patched:
            if own_forward is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own_forward


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, length: int, docs: int, seed: int = 0) -> float:
    """Exact-match passkey retrieval (greedy reproduces every digit) over ``docs`` depths 0..1."""
    from linearize.evals.data import passkey_doc

    rng = random.Random(seed)
    hits = 0
    for n in range(docs):
        doc = passkey_doc(tokenizer, length, n / max(docs - 1, 1), rng.randint(10000, 99999))
        context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        target = tokenizer(doc["target"], add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([context + target])).logits[0, len(context) - 1:-1]
        hits += int(torch.equal(logits.argmax(-1), torch.tensor(target)))
    return hits / docs


def _parse_probe(text: str) -> tuple[str, list[int]]:
    name, sep, layers = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--probe wants NAME:L1,L2,... (or NAME: for none), got {text!r}")
    try:
        return name, [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--probe {text!r}: layers must be integers") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval_layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="teacher (any linearize source; default smollm2-135m)")
    p.add_argument("--window", type=int, default=128, help="the converted layers' window (default 128)")
    p.add_argument("--sinks", type=int, default=PROBE_SINKS, help=f"initial positions not counted as far (default {PROBE_SINKS})")
    p.add_argument("--count", type=int, default=6, help="layers to suggest (default 6)")
    p.add_argument("--induction-length", type=int, default=INDUCTION_LENGTH,
                   help=f"random block length (default {INDUCTION_LENGTH})")
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="training-text tokens for far attention")
    p.add_argument("--probe", type=_parse_probe, action="append", default=[],
                   help="NAME:L1,L2,... a kept set to check with streaming attention (repeatable); "
                        "'suggested' is always checked")
    p.add_argument("--passkey-length", type=int, default=2048, help="passkey prompt tokens (default 2048)")
    p.add_argument("--passkey-docs", type=int, default=8, help="passkey prompts per set (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="docs/recovery", help="folder for retrieval_layers.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from linearize.sources import load_teacher

    model, tokenizer = load_teacher(args.model)
    model.eval()
    start = time.perf_counter()
    induction = induction_scores(model, args.induction_length,
                                 vocab=random_token_range(tokenizer, model.config.vocab_size))
    ids = probe_text_ids(tokenizer, args.text_tokens)
    far = far_attention(model, ids, args.window, args.sinks)
    suggested = suggest_layers(induction, far, args.count)
    logger.info("suggested kept layers: %s (probes took %.0f s)", suggested, time.perf_counter() - start)

    probes = {"teacher": None, "suggested": suggested, **dict(args.probe)}
    passkey = {}
    for name, keep in probes.items():
        t0 = time.perf_counter()
        ctx = contextlib.nullcontext() if keep is None else streaming_attention(model, keep, args.window, args.sinks)
        with ctx:
            acc = passkey_accuracy(model, tokenizer, args.passkey_length, args.passkey_docs)
        passkey[name] = {"keep": keep, "passkey_acc": acc}
        logger.info("passkey %d tokens, %s %s: %.3f (%.0f s)", args.passkey_length, name, keep, acc,
                    time.perf_counter() - t0)

    result = {
        "command": "python -m benchmarks.retrieval_layers " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "window": args.window, "sinks": args.sinks,
        "induction_length": args.induction_length, "text_tokens": int(ids.shape[-1]),
        "induction_max_head": [round(v, 4) for v in induction.amax(dim=1).tolist()],
        "far_attention_max_head": [round(v, 4) for v in far.amax(dim=1).tolist()],
        "suggested": suggested,
        "passkey_length": args.passkey_length, "passkey_docs": args.passkey_docs,
        "streaming_passkey": passkey,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "retrieval_layers.json", result)
    logger.info("wrote %s", out / "retrieval_layers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
