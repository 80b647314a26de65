"""The recovery study: one recipe, many conversion/training variants, the same budget, one table.

Each variant is a list of recipe overrides on top of a base recipe (``recipes/smollm2-135m-cpu-liger.yaml``
by default). Every variant runs ``linearize.train.finetune`` with the same data, seed and number of
optimiser steps (``--steps``; variants with an attention-transfer stage spend ``--at-steps`` of them
there), and the study records from its summary: held-out perplexity of the teacher, of the
converted model before training and after, tokens, time, and the loss curve.

    python -m benchmarks.recovery_study --variants liger,lolcats,lizard --steps 44 --out docs/recovery

Results accumulate in ``OUT/results.json`` (a finished variant is not run again, so an interrupted
study continues where it stopped); the table goes to ``OUT/table.md`` and the loss-vs-tokens plot to
``OUT/loss.png``. Each variant trains in ``--runs/NAME`` (deleted once its row is recorded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from linearize.outputs import atomic_write_json

logger = logging.getLogger(__name__)

BASE_RECIPE = "recipes/smollm2-135m-cpu-liger.yaml"
# Evenly spaced softmax layers of a 30-layer model: 1 in 6 and 1 in 3 (the middle of each group).
KEEP_1_IN_6 = "[3,9,15,21,27]"
KEEP_1_IN_3 = "[1,4,7,10,13,16,19,22,25,28]"
ATTENTION_TRANSFER = ["stages=[attention_transfer,lora]", "attention_transfer.lr=1e-2",
                      "attention_transfer.schedule=constant"]
LIZARD = ["conversion.mixer=lizard", "lora.alpha=16"]
SEPARATE = ["conversion.normalizer=separate"]
SPLIT = ["conversion.normalizer=shared", "conversion.linear_span=beyond_window"]
# Every layer kept as the teacher's softmax attention: the conversion changes nothing.
TEACHER_ONLY = ["conversion.mixer=softmax"]

# name -> (what it tests, overrides on the base recipe: Liger-GLA, LoRA r=8 on q,k,v, lr 1e-3)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "liger": ("Liger: key-reused GLA gate, fixed 0.5/0.5, no normalizer", []),
    "liger-separate": ("Liger with a normalized linear branch", SEPARATE),
    "lolcats": ("one softmax denominator over window + linear part (LoLCATs-style)", ["conversion.normalizer=shared"]),
    "lolcats-at": ("LoLCATs: shared denominator, Hedgehog maps trained by attention transfer, then LoRA",
                   ["conversion.normalizer=shared", "conversion.feature_map=hedgehog", *ATTENTION_TRANSFER]),
    "lizard": ("Lizard: learned scalar gate, Hedgehog maps, 4 sinks, learned α, window 128; attention "
               "transfer, then LoRA (alpha 16)", [*LIZARD, *ATTENTION_TRANSFER]),
    "lizard-split": ("Lizard with LoLCATs' split: exact softmax over the window, linear attention only over "
                     "the tokens beyond it, one shared denominator", [*LIZARD, *ATTENTION_TRANSFER, *SPLIT]),
    "lizard-split-sink-tokens": ("lizard-split with the first 4 tokens kept in the softmax (StreamingLLM's "
                                 "sinks) instead of 4 learned sink logits",
                                 [*LIZARD, *ATTENTION_TRANSFER, *SPLIT, "conversion.sink_tokens=4",
                                  "conversion.num_sinks=0"]),
    "lizard-split-sink-tokens-window-64": ("lizard-split-sink-tokens with a 64-token window (half the exact span)",
                                           [*LIZARD, *ATTENTION_TRANSFER, *SPLIT, "conversion.sink_tokens=4",
                                            "conversion.num_sinks=0", "conversion.window=64"]),
    "lizard-no-at": ("Lizard without the attention-transfer stage (LoRA + new parameters only)", LIZARD),
    "lizard-window-64": ("Lizard with a 64-token window", [*LIZARD, *ATTENTION_TRANSFER, "conversion.window=64"]),
    "lizard-window-32": ("Lizard with a 32-token window", [*LIZARD, *ATTENTION_TRANSFER, "conversion.window=32"]),
    "lizard-qkvo": ("Lizard, LoRA on q,k,v,o", [*LIZARD, *ATTENTION_TRANSFER, "lora.targets=[q_proj,k_proj,v_proj,o_proj]"]),
    "lizard-kl": ("Lizard, LoRA loss + KL to the teacher (weight 1)", [*LIZARD, *ATTENTION_TRANSFER, "lora.kl_weight=1.0"]),
    "lizard-keep-1in6": ("Lizard, 1 in 6 layers kept softmax, evenly spaced",
                         [*LIZARD, *ATTENTION_TRANSFER, f"conversion.keep_softmax_layers={KEEP_1_IN_6}"]),
    "lizard-keep-1in6-worst": ("Lizard, 1 in 6 layers kept softmax: the 5 with the highest transfer error in "
                               "lizard", [*LIZARD, *ATTENTION_TRANSFER]),
    "lizard-keep-1in3": ("Lizard, 1 in 3 layers kept softmax, evenly spaced",
                         [*LIZARD, *ATTENTION_TRANSFER, f"conversion.keep_softmax_layers={KEEP_1_IN_3}"]),
    "gate-hgrn2": ("key-reused gate hgrn2 (normalized Liger)", [*SEPARATE, "conversion.gate=hgrn2"]),
    "gate-mamba2": ("key-reused gate mamba2 (normalized Liger)", [*SEPARATE, "conversion.gate=mamba2"]),
    "gate-rwkv6": ("key-reused gate rwkv6 (normalized Liger)", [*SEPARATE, "conversion.gate=rwkv6"]),
    "gate-scalar": ("key-reused gate pooled to a scalar per head (normalized Liger)", [*SEPARATE, "conversion.gate=scalar"]),
    "tau-4": ("τ = 4, faster forgetting (normalized Liger)", [*SEPARATE, "conversion.gate_logit_normalizer=4"]),
    "tau-64": ("τ = 64, slower forgetting (normalized Liger)", [*SEPARATE, "conversion.gate_logit_normalizer=64"]),
    # Controls (issue 16): what a row would get without the conversion. Every optimiser step of the
    # budget goes to LoRA on the unconverted teacher, the same data in the same order: the honest
    # recovery ratio is student / teacher-lora (it separates domain adaptation from recovery).
    "teacher-lora": ("control: the teacher itself (no conversion) finetuned with the same LoRA on the same "
                     "data and tokens", [*TEACHER_ONLY, "stages=[lora]"]),
    # ... and without the linear branch: window + sink tokens only (StreamingLLM), otherwise the
    # lizard-split-sink-tokens row (the default's conversion): does the linear branch earn its keep?
    # Nothing of it is left for attention transfer to train, so the whole budget is LoRA.
    "window-sinks-only": ("control: lizard-split-sink-tokens without the linear branch (softmax over the "
                          "window and the 4 sink tokens only), every step LoRA",
                          [*LIZARD, *SPLIT, "conversion.sink_tokens=4", "conversion.num_sinks=0",
                           "conversion.linear=none", "stages=[lora]"]),
}
# Variants whose kept layers come from another variant's per-layer transfer error: name -> (source, count).
KEEP_BY_ERROR = {"lizard-keep-1in6-worst": ("lizard", 5)}


def worst_layers(row: dict, count: int) -> list[int]:
    """The ``count`` layers with the highest relative attention-transfer MSE in a study row."""
    errors = row.get("transfer_relative_mse")
    if not errors:
        raise ValueError(f"variant {row['variant']} has no per-layer transfer error (it needs an attention_transfer stage)")
    ranked = sorted(zip(errors, row["transfer_layers"]), reverse=True)[:count]
    return sorted(layer for _, layer in ranked)


def run_variant(name: str, overrides: list[str], base_recipe: str, steps: int, at_steps: int, run_dir: Path) -> dict:
    """Finetune one variant in ``run_dir``; returns its row (perplexities, tokens, time, loss curve)."""
    from linearize.recipe import load_recipe
    from linearize.train import finetune

    with_transfer = load_recipe(base_recipe, overrides + [f"output_dir={run_dir}"]).stages[0] == "attention_transfer"
    if with_transfer and at_steps >= steps:
        raise ValueError(f"--at-steps {at_steps} leaves no LoRA steps of the {steps} in the budget")
    lora_steps = steps - at_steps if with_transfer else steps  # every variant: the same optimiser steps
    budget = [f"lora.max_steps={lora_steps}", f"attention_transfer.max_steps={at_steps}", f"output_dir={run_dir}",
              "train.save_every=0", "train.tensorboard=false"]
    recipe = load_recipe(base_recipe, overrides + budget)
    start = time.perf_counter()
    checkpoints = run_dir / "checkpoints"
    result = finetune(recipe, resume=checkpoints.is_dir() and any(checkpoints.iterdir()))
    row = row_from_summary(name, result.summary)
    row.update(overrides=overrides, wall_time_s=round(time.perf_counter() - start, 1))
    return row


def row_from_summary(name: str, s: dict) -> dict:
    """A study row from a finished finetune's ``training_summary.json`` (perplexities, tokens, time,
    LoRA loss against tokens, per-layer transfer error)."""
    train, data = s["recipe"]["train"], s["recipe"]["data"]
    tokens_per_step = train["batch_size"] * train["grad_accum"] * data["seq_len"] * s.get("world_size", 1)
    curve = []  # (tokens seen, LoRA loss) over the LoRA stage
    lora = s["stages"].get("lora", {})
    offset = s["stages"].get("attention_transfer", {}).get("tokens", 0)
    for i, loss in enumerate(lora.get("history", {}).get("loss", [])):
        curve.append([offset + (i + 1) * tokens_per_step, loss])
    p = s["perplexity"]
    transfer = s["stages"].get("attention_transfer", {}).get("per_layer_after", {})
    conv = s["recipe"]["conversion"]
    what = ", ".join(f"{k} {conv[k]}" for k in ("mixer", "normalizer", "linear_span", "sink_tokens", "num_sinks",
                                                "keep_softmax_layers") if k in conv)
    return {
        "variant": name, "what": f"{what}; {data['seq_len']}-token blocks",
        "tokens": s["tokens_seen"], "wall_time_s": round(s["wall_time_s"], 1),
        "train_time_s": round(sum(st["train_time_s"] for st in s["stages"].values()), 1),
        "ppl_teacher": p.get("teacher"), "ppl_start": p.get("converted"), "ppl_finetuned": p.get("finetuned"),
        "ppl_ratio": p["finetuned"] / p["teacher"] if p.get("finetuned") and p.get("teacher") else None,
        "transfer_layers": transfer.get("layers"),
        "transfer_relative_mse": transfer.get("relative_mse"),
        "loss_curve": curve,
    }


def render_table(rows: list[dict]) -> str:
    lines = ["| variant | what | tokens | train min | ppl start | ppl finetuned | × teacher |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["ppl_finetuned"] if r["ppl_finetuned"] else math.inf):
        what = VARIANTS[r["variant"]][0] if r["variant"] in VARIANTS else r.get("what", "")
        lines.append(f"| {r['variant']} | {what} | {r['tokens']} | {r['train_time_s'] / 60:.1f} | "
                     f"{r['ppl_start']:.1f} | {r['ppl_finetuned']:.2f} | {r['ppl_ratio']:.2f} |")
    teacher = next((r["ppl_teacher"] for r in rows if r["ppl_teacher"]), None)
    if teacher:
        lines.append(f"\nTeacher held-out perplexity on the same blocks: {teacher:.2f}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.tab20.colors
    for i, r in enumerate(rows):
        if r["loss_curve"]:
            tokens, loss = zip(*r["loss_curve"])
            ax.plot(tokens, loss, label=r["variant"], lw=1.2, color=colors[i % len(colors)],
                    ls="-" if i < len(colors) else "--")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("LoRA-stage training loss (next-token CE)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _from_summaries(spec: str, out: Path, parser) -> int:
    rows = []
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--summaries item {item!r}: expected NAME=PATH")
        path = Path(path.strip())
        if not path.is_file():
            parser.error(f"--summaries {name}: {path} is not a file (a finetune's training_summary.json)")
        rows.append(row_from_summary(name.strip(), json.loads(path.read_text())))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"rows": {r["variant"]: r for r in rows}})
    (out / "table.md").write_text(render_table(rows))
    plot(rows, out / "loss.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--recipe", default=BASE_RECIPE, help=f"base recipe (default {BASE_RECIPE})")
    p.add_argument("--steps", type=int, default=44,
                   help="optimiser steps of every variant, attention transfer included (default 44: 22.5K tokens)")
    p.add_argument("--at-steps", type=int, default=12,
                   help="of those, attention-transfer steps where a variant has that stage (default 12)")
    p.add_argument("--out", default="docs/recovery", help="results folder (default docs/recovery)")
    p.add_argument("--runs", default="runs/recovery_study", help="training folders (default runs/recovery_study)")
    p.add_argument("--summaries", default=None,
                   help="instead of training: NAME=training_summary.json,... of finished finetunes, written as "
                   "rows (results.json), table.md and loss.png into --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.summaries:
        return _from_summaries(args.summaries, Path(args.out), p)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    for name in names:
        key = f"{name}@{args.steps}"
        if key in results["rows"]:
            logger.info("%s: already measured, skipped", key)
            continue
        run_dir = Path(args.runs) / key
        overrides = list(VARIANTS[name][1])
        if name in KEEP_BY_ERROR:
            source, count = KEEP_BY_ERROR[name]
            if f"{source}@{args.steps}" not in results["rows"]:
                p.error(f"{name} keeps the layers {source} found hardest: run {source} first (same --steps)")
            kept = worst_layers(results["rows"][f"{source}@{args.steps}"], count)
            overrides.append(f"conversion.keep_softmax_layers=[{','.join(map(str, kept))}]")
        row = run_variant(name, overrides, args.recipe, args.steps, args.at_steps, run_dir)
        row["steps"] = args.steps
        results["rows"][key] = row
        results["command"] = "python -m benchmarks.recovery_study " + " ".join(sys.argv[1:] if argv is None else argv)
        atomic_write_json(results_path, results)
        shutil.rmtree(run_dir)  # the row holds what the study needs; the 0.5 GB checkpoint is not kept
        logger.info("%s: perplexity %.2f -> %.2f (teacher %.2f)", key, row["ppl_start"], row["ppl_finetuned"],
                    row["ppl_teacher"])
    rows = [r for r in results["rows"].values() if r.get("steps") == args.steps]
    (out / "table.md").write_text(render_table(rows))
    plot(rows, out / "loss.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
