"""Long context, teacher beside students: passkey, multi-needle passkey, perplexity by position.

Issue 16 item 3. For every model and every length (default 2K, 4K, 8K, 16K, 32K tokens):

- **passkey**: the eval's single-needle documents (``linearize.evals.data.passkey_doc``: the
  Landmark-Attention format) at ``--depths``; a hit is greedy decoding reproducing every token of
  the key (scored from one forward pass over prompt + key: the argmax at each key position);
- **multi-needle**: ``--needles`` keys in a format neither the layer probe nor the eval uses
  ("The code of the red locker is 48213."), spread through filler prose of another kind, and the
  question asks for one of them (rotating over documents); a hit as above;
- **perplexity by position**: one long document (the held-out Wikipedia articles, never trained
  on, concatenated) of the longest length, per-token negative log-likelihood averaged in buckets of
  position ([0, 1K), [1K, 2K), [2K, 4K), ...): where a model trained to 8K stops predicting.

The LM head runs on the scored positions only (``linearize.train.lm_loss``), so a 32K-token pass
never holds [T, vocab] logits. Models are anything ``linearize`` loads (``smollm2-135m``, a
converted folder, a finetune's ``model/``)::

    python -m benchmarks.long_context --model teacher=smollm2-135m --model student=runs/x/model \\
        --lengths 2048,4096,8192,16384,32768 --out docs/recovery/long-context

``--rope-scaling dynamic:4`` (any of transformers' ``rope_type``s with a factor: ``dynamic``,
``yarn``, ``linear``) gives the softmax attention layers (``--rope-layers kept``: the layers the
conversion left as the teacher's attention, every layer of a teacher; ``all``: the converted layers'
window branch too) position embeddings from a scaled rotary embedding, the rest of the model
unchanged: the study of whether the kept layers' positions are what breaks beyond the teacher's
trained length.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.outputs import atomic_write_json, atomic_write_text
from linearize.train.lm_loss import NO_LOGITS, capture_lm_head_input, lm_head_weight

logger = logging.getLogger("long_context")

LENGTHS = (2048, 4096, 8192, 16384, 32768)
DEPTHS = (0.1, 0.5, 0.9)
NEEDLES = 4
SCORE_CHUNK = 512
# Multi-needle pieces: a format of its own (not the eval's or the layer probe's passkey sentences).
LOCKERS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
MULTI_INTRO = "Below is a long log from the locker room. Several locker codes appear in it; remember all of them."
MULTI_FILLER = (" A visitor walked past the lockers and checked the time.", " Someone mopped the floor again.",
                " The lights flickered once and came back.", " Two students argued about the schedule.")
MULTI_NEEDLE = " Note: the code of the {color} locker is {key}."
MULTI_QUESTION = " Question: what is the code of the {color} locker? Answer: the code of the {color} locker is"


def scale_rope(model, spec: str, layers: str = "kept") -> int:
    """Give ``layers`` (``kept``: attention modules that are not linearize mixers; ``all``) RoPE from
    a rotary embedding with ``rope_type:factor`` (``spec``, e.g. ``dynamic:4``) over the model's own
    RoPE parameters, at the positions the decoder layer passes (``position_ids``). Returns how many
    attention modules now use it."""
    import copy

    from linearize.mixers.hybrid import HybridAttention

    rope_type, _, factor = spec.partition(":")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    rotary = getattr(base, "rotary_emb", None)
    params = getattr(model.config, "rope_parameters", None)
    if rotary is None or not isinstance(params, dict) or "rope_type" not in params:
        raise ValueError(f"--rope-scaling needs one model-level rotary embedding ({type(model).__name__} has none, "
                         "or per-layer-type RoPE parameters)")
    config = copy.deepcopy(model.config)
    config.rope_parameters = {**params, "rope_type": rope_type, "factor": float(factor),
                              "original_max_position_embeddings": config.max_position_embeddings}
    scaled = type(rotary)(config=config)

    def use_scaled(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, d]
        positions = kwargs.get("position_ids")  # [B, T]; None: a forward pass from position 0
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        kwargs["position_embeddings"] = scaled(hidden, positions)
        return args, kwargs

    hooked = 0
    for name, module in model.named_modules():
        if name.endswith("self_attn") and (layers == "all" or not isinstance(module, HybridAttention)):
            module.register_forward_pre_hook(use_scaled, with_kwargs=True)
            hooked += 1
    return hooked


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def hidden_states(model, ids: list[int]) -> torch.Tensor:
    """The LM head's input [T, d] for one sequence (no logits are computed)."""
    batch = torch.tensor([ids], dtype=torch.long)  # [1, T]
    with capture_lm_head_input(model) as box:
        model(batch, logits_to_keep=NO_LOGITS, use_cache=False)
        return box.pop("hidden")[0]


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[n, vocab] fp32 logits of ``hidden`` [n, d] (the plain head's weight, else the model's head)."""
    weight = lm_head_weight(model)
    return (F.linear(hidden, weight) if weight is not None else model.get_output_embeddings()(hidden)).float()


@torch.no_grad()
def next_token_nll(model, ids: list[int], chunk: int = SCORE_CHUNK) -> torch.Tensor:
    """-log p(ids[t+1] | ids[:t+1]) for t = 0..T-2: [T - 1] fp32, ``chunk`` positions per head call."""
    hidden = hidden_states(model, ids)[:-1]  # [T-1, d]
    target = torch.tensor(ids[1:], dtype=torch.long)  # [T-1]
    return torch.cat([F.cross_entropy(_logits(model, hidden[s : s + chunk]), target[s : s + chunk], reduction="none")
                      for s in range(0, hidden.shape[0], chunk)])  # [T-1]


@torch.no_grad()
def greedy_hit(model, context: list[int], target: list[int]) -> bool:
    """Whether greedy decoding after ``context`` gives ``target`` (its argmax at every target position)."""
    hidden = hidden_states(model, context + target)[len(context) - 1 : -1]  # [C, d]: the positions predicting target
    return bool(torch.equal(_logits(model, hidden).argmax(-1), torch.tensor(target)))


def multi_needle_doc(tokenizer, length: int, keys: list[int], asked: int, seed: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of at most ``length`` tokens: ``len(keys)`` needles at evenly spread
    depths of seeded filler, then the question for needle ``asked``."""
    rng = random.Random(seed)
    colors = LOCKERS[: len(keys)]
    needles = [_tokens(tokenizer, MULTI_NEEDLE.format(color=c, key=k)) for c, k in zip(colors, keys)]
    question = _tokens(tokenizer, MULTI_QUESTION.format(color=colors[asked]))
    answer = _tokens(tokenizer, f" {keys[asked]}")
    intro = _tokens(tokenizer, MULTI_INTRO)
    budget = length - len(intro) - sum(map(len, needles)) - len(question) - len(answer)
    if budget < len(keys) + 1:
        raise ValueError(f"multi-needle length {length} is too short for {len(keys)} needles")
    filler: list[int] = []
    while len(filler) < budget:
        filler += _tokens(tokenizer, rng.choice(MULTI_FILLER))
    filler = filler[:budget]
    cuts = [round(budget * (i + 1) / (len(keys) + 1)) for i in range(len(keys))]
    ids, prev = list(intro), 0
    for cut, needle in zip(cuts, needles):
        ids += filler[prev:cut] + needle
        prev = cut
    return ids + filler[prev:] + question, answer


def long_document(tokenizer, tokens: int) -> list[int]:
    """``tokens`` ids of the held-out Wikipedia articles, concatenated (repeated if too short)."""
    from linearize.offline_text import wiki_articles

    ids: list[int] = []
    articles = wiki_articles("heldout")
    while len(ids) < tokens:
        for art in articles:
            ids += _tokens(tokenizer, art.text + "\n\n")
            if len(ids) >= tokens:
                break
    return ids[:tokens]


def buckets(length: int) -> list[tuple[int, int]]:
    """Position buckets [0, 1K), [1K, 2K), [2K, 4K), ... up to ``length``."""
    edges, e = [0], 1024
    while e < length:
        edges.append(e)
        e *= 2
    edges.append(length)
    return list(itertools.pairwise(edges))


def bucket_perplexity(nll: torch.Tensor) -> dict[str, float]:
    """exp(mean NLL) per position bucket of a T-token document; ``nll`` [T - 1]: position p scores the
    token at p + 1 (the last position scores nothing)."""
    return {f"{a}-{b}": math.exp(float(nll[a:b].mean())) for a, b in buckets(nll.shape[0] + 1)}


TASKS = ("passkey", "multi_needle", "perplexity")


def evaluate_model(model, tokenizer, lengths, depths, needles: int, seed: int, tasks=TASKS) -> dict:
    """The ``tasks`` of one model at every length (perplexity: one document of the longest length)."""
    from linearize.evals.data import passkey_doc

    rng = random.Random(seed)
    out: dict = {"passkey": {}, "multi_needle": {}, "seconds": {}}
    for length in lengths:
        start = time.perf_counter()
        keys = {depth: rng.randint(10000, 99999) for depth in depths}  # drawn whether or not the task runs
        multi = [[rng.randint(10000, 99999) for _ in range(needles)] for _ in depths]
        if "passkey" in tasks:
            hits = []
            for depth in depths:
                doc = passkey_doc(tokenizer, length, depth, keys[depth])
                hits.append(greedy_hit(model, _tokens(tokenizer, doc["context"]), _tokens(tokenizer, doc["target"])))
            out["passkey"][str(length)] = sum(hits) / len(hits)
        if "multi_needle" in tasks:
            hits = []
            for i, needle_keys in enumerate(multi):
                prompt, answer = multi_needle_doc(tokenizer, length, needle_keys, i % needles, seed + length + i)
                hits.append(greedy_hit(model, prompt, answer))
            out["multi_needle"][str(length)] = sum(hits) / len(hits)
        out["seconds"][str(length)] = round(time.perf_counter() - start, 1)
        logger.info("length %d: passkey %s, multi-needle %s (%.0f s)", length, out["passkey"].get(str(length), "-"),
                    out["multi_needle"].get(str(length), "-"), out["seconds"][str(length)])
    if "perplexity" in tasks:
        start = time.perf_counter()
        out["perplexity_by_position"] = bucket_perplexity(next_token_nll(model, long_document(tokenizer, max(lengths))))
        out["seconds"]["perplexity"] = round(time.perf_counter() - start, 1)
        logger.info("perplexity by position: %s", out["perplexity_by_position"])
    return out


def render(results: dict) -> str:
    models = list(results["models"])
    lengths = results["settings"]["lengths"]
    lines = ["| model | task | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for name in models:
        r = results["models"][name]
        for task in ("passkey", "multi_needle"):
            if r[task]:
                lines.append(f"| {name} | {task} | " + " | ".join(f"{r[task][str(n)]:.2f}" for n in lengths) + " |")
    with_ppl = [name for name in models if "perplexity_by_position" in results["models"][name]]
    if with_ppl:
        spans = list(results["models"][with_ppl[0]]["perplexity_by_position"])
        lines += ["", "| model | " + " | ".join(spans) + " |", "|---|" + "---:|" * len(spans)]
        for name in with_ppl:
            ppl = results["models"][name]["perplexity_by_position"]
            lines.append(f"| {name} | " + " | ".join(f"{ppl[s]:.2f}" for s in spans) + " |")
    return "\n".join(lines) + "\n"


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"--model wants NAME=SOURCE, e.g. teacher=smollm2-135m; got {text!r}")
    return name, source


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks or any(t not in TASKS for t in tasks):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated tasks of: {', '.join(TASKS)}")
    return tasks


def _rope_spec(text: str) -> str:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type, _, factor = text.partition(":")
    try:
        ok = rope_type in ROPE_INIT_FUNCTIONS and float(factor) >= 1.0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: give TYPE:FACTOR with TYPE one of {', '.join(ROPE_INIT_FUNCTIONS)} "
                                         "and FACTOR >= 1, e.g. dynamic:4")
    return text


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers") from None
    if not values or min(values) < 64:
        raise argparse.ArgumentTypeError(f"{text!r}: give lengths of at least 64 tokens")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers in [0, 1]") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers in [0, 1]")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=_model_arg, action="append", required=True, metavar="NAME=SOURCE",
                   help="a model to score (repeatable): smollm2-135m, a converted folder, a finetune's model/")
    p.add_argument("--lengths", type=_ints, default=list(LENGTHS), help="prompt lengths in tokens")
    p.add_argument("--depths", type=_floats, default=list(DEPTHS), help="passkey depths (documents per length)")
    p.add_argument("--needles", type=int, default=NEEDLES, help=f"keys per multi-needle document (default {NEEDLES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", type=_task_list, default=list(TASKS),
                   help=f"comma-separated, of: {', '.join(TASKS)} (default all)")
    p.add_argument("--rope-scaling", type=_rope_spec, default=None, metavar="TYPE:FACTOR",
                   help="scaled RoPE for the softmax layers, e.g. dynamic:4 or yarn:4 (default: the model's own)")
    p.add_argument("--rope-layers", choices=("kept", "all"), default="kept",
                   help="kept: the layers left as softmax attention (every layer of a teacher); all: the "
                        "converted layers' window branch too (default kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="folder for long_context.json and long_context.md")
    args = p.parse_args(argv)
    if not 1 <= args.needles <= len(LOCKERS):
        p.error(f"--needles {args.needles}: from 1 to {len(LOCKERS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from linearize.sources import load_teacher

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {"lengths": args.lengths, "depths": args.depths, "needles": args.needles,
                            "seed": args.seed, "threads": torch.get_num_threads(), "tasks": args.tasks,
                            "rope_scaling": args.rope_scaling, "rope_layers": args.rope_layers},
               "command": "python -m benchmarks.long_context " + " ".join(sys.argv[1:] if argv is None else argv),
               "models": {}}
    for name, source in args.model:
        model, tokenizer = load_teacher(source)
        logger.info("%s (%s)", name, source)
        if args.rope_scaling:
            logger.info("%s: %d attention layers use %s RoPE", name,
                        scale_rope(model, args.rope_scaling, args.rope_layers), args.rope_scaling)
        results["models"][name] = {"source": source,
                                   **evaluate_model(model, tokenizer, args.lengths, args.depths, args.needles, args.seed,
                                                   args.tasks)}
        del model
        atomic_write_json(out / "long_context.json", results)
    atomic_write_text(out / "long_context.md", render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
