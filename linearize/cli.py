"""`linearize` command line: parses a verb and calls one library function. No logic of its own.

Each verb has an ``_add_<verb>(subparsers)`` that declares its arguments and a ``_run_<verb>(args)``
that calls the library. Errors the user can fix (``ValueError``, ``FileNotFoundError``,
``linearize.errors.LinearizeError``) are shown as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="replace every attention layer of a model with a gated linear + sliding-window hybrid",
        description="Convert a pretrained decoder into a linearized checkpoint folder.",
    )
    p.add_argument(
        "model", nargs="?", default=None,
        help="hub id, local HF folder, .gguf file, or 'smollm2-135m' (the offline default, used when left out)",
    )
    p.add_argument("--out", required=True, help="output folder for the converted checkpoint")
    from linearize.config import ConversionConfig, FEATURE_MAPS, GATES, LINEAR_SPANS, MIXERS, MIXES, NORMALIZERS

    defaults = ConversionConfig.__dataclass_fields__
    p.add_argument("--mixer", choices=MIXERS, default="liger", help="mixer for converted layers (default: liger)")
    p.add_argument("--gate", choices=GATES, default=None, help="decay gate (default: the mixer's; liger: gla)")
    p.add_argument("--tau", dest="gate_logit_normalizer", type=float, default=None,
                   help="gate logit normalizer τ (default: 16 for liger)")
    p.add_argument("--feature-map", choices=FEATURE_MAPS, default=None, help="feature map of the linear branch")
    p.add_argument("--window", type=int, default=None, help="sliding window in tokens (liger 64, lizard 128)")
    p.add_argument("--no-window", dest="use_window", action="store_false", default=None,
                   help="drop the sliding-window branch (linear attention only)")
    p.add_argument("--mix", choices=MIXES, default=None, help="fixed or learned per-head branch weights")
    p.add_argument("--window-weight", type=float, default=None, help="weight of the window branch (liger 0.5)")
    p.add_argument("--normalizer", choices=NORMALIZERS, default=None, help="denominator of the linear branch")
    p.add_argument("--linear-span", choices=LINEAR_SPANS, default=defaults["linear_span"].default,
                   help="tokens the linear branch covers: all, or beyond_window (LoLCATs' split, "
                   "needs --normalizer shared; default %(default)s)")
    p.add_argument("--sink-tokens", type=int, default=defaults["sink_tokens"].default,
                   help="first tokens kept in the window's softmax for good (StreamingLLM; needs "
                   "--linear-span beyond_window; default %(default)s)")
    p.add_argument("--sinks", dest="num_sinks", type=int, default=None, help="learned sink logits per head")
    p.add_argument("--keep-softmax", dest="keep_softmax_layers", default="",
                   help="comma-separated layer indices kept as softmax attention, e.g. 0,6,12")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: float32)")
    del defaults


def _run_convert(args) -> None:
    import linearize
    from linearize.config import ConversionConfig

    keep = [int(x) for x in args.keep_softmax_layers.split(",") if x.strip()]
    fields = ("mixer", "gate", "gate_logit_normalizer", "feature_map", "window", "use_window", "mix",
              "window_weight", "normalizer", "num_sinks", "linear_span", "sink_tokens")
    config = ConversionConfig(keep_softmax_layers=keep, **{f: getattr(args, f) for f in fields})
    out = linearize.convert_to_folder(args.model, args.out, config, dtype=args.dtype)
    logging.getLogger("linearize").info("converted checkpoint written to %s", out)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream text from a converted (or any) checkpoint")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, hub id, .gguf or 'smollm2-135m'")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0)


def _run_generate(args) -> None:
    import linearize

    for piece in linearize.generate_stream(
        args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, num_beams=args.num_beams, chat=args.chat, seed=args.seed,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode speed and memory of a converted model against its teacher")
    p.add_argument("dir", help="converted checkpoint folder (from `linearize convert`)")
    p.add_argument("--teacher", default=None, help="the teacher: hub id, folder, .gguf or 'smollm2-135m' (default)")
    p.add_argument("--contexts", default="1k,2k,4k,8k,16k,32k", help="context lengths, e.g. 512,1k,2k (k = 1024)")
    p.add_argument("--batch", type=int, default=1, help="batch of the prefill/decode-latency grid (default 1)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--decode-steps", type=int, default=16, help="timed single-token steps per context")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps before them")
    p.add_argument("--throughput-context", type=int, default=None,
                   help="context of the decode-throughput test (default: largest grid context the teacher allows)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch tried for throughput (default 256 on cuda, 4 on cpu; 0 skips the test)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--retain-freed-memory", action="store_true",
                   help="CPU (glibc): keep freed memory in the process instead of page-faulting large tensors "
                   "in again at every forward, as jemalloc/tcmalloc servers do (both models)")
    p.add_argument("--teacher-beyond-limit", action="store_true",
                   help="time the teacher past its declared context limit too (random tokens: only the cost counts)")
    p.add_argument("--out", default="bench.json", help="JSON results file; the PNG goes beside it (default bench.json)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_bench(args) -> None:
    from rich.progress import Progress

    from linearize import bench as mb

    cuda = args.device.startswith("cuda")
    cfg = mb.BenchConfig(
        contexts=mb.parse_contexts(args.contexts), batch=args.batch, device=args.device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"), decode_steps=args.decode_steps,
        warmup_steps=args.warmup_steps, throughput_context=args.throughput_context,
        max_batch=args.max_batch if args.max_batch is not None else (256 if cuda else 4), threads=args.threads,
        teacher_beyond_limit=args.teacher_beyond_limit, retain_freed_memory=args.retain_freed_memory,
    )
    teacher, converted = mb.load_pair(args.dir, args.teacher, cfg)
    with Progress(transient=True) as bar:
        task = bar.add_task("bench", total=mb.grid_size(cfg))
        report = mb.run_bench(teacher, converted, cfg,
                              progress=lambda what: bar.update(task, advance=1, description=what))
    report["command"] = "linearize bench " + " ".join(_argv_of(args))
    json_path, png_path = mb.write_report(report, args.out)
    print(mb.format_table(report))
    print(f"\nwrote {json_path} and {png_path}")


def _argv_of(args) -> list[str]:
    out = [args.dir]
    for key, value in vars(args).items():
        if key in ("dir", "verb", "verbose") or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        out += [flag] if value is True else [flag, str(value)]
    return out


def _add_finetune(sub) -> None:
    from linearize.recipe import recipe_help

    p = sub.add_parser(
        "finetune",
        help="convert a teacher and recover its quality as a recipe YAML says (attention transfer, LoRA)",
        description="Run a finetuning recipe: `linearize finetune RECIPE.yaml [key=value ...]`. Several "
        "processes: `accelerate launch [--config_file recipes/accelerate/X.yaml] -m linearize finetune ...` "
        "(or torchrun). Recipe keys (override any with dotted.key=value, e.g. lora.r=16 train.seed=1):",
        epilog=recipe_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. lora.r=16 data.max_tokens=100000 output_dir=runs/x")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in output_dir/checkpoints (same data order, "
                   "optimiser and scheduler state)")


def _run_finetune(args) -> None:
    from linearize.recipe import load_recipe
    from linearize.train import finetune

    recipe = load_recipe(args.recipe, args.overrides)
    result = finetune(recipe, resume=args.resume)
    logging.getLogger("linearize").info("finetuned checkpoint written to %s", result.model_dir)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a converted checkpoint and its teacher with lm-eval; write the recovery report",
        description="Run the same lm-eval tasks on the teacher and the converted checkpoint and write the "
        "recovery report (Markdown, JSON, PNG) into --out and DIR/eval_report.json.",
    )
    p.add_argument("dir", help="converted checkpoint folder")
    p.add_argument("--teacher", default=None, help="the teacher: hub id, folder, .gguf or 'smollm2-135m' (default)")
    p.add_argument("--tasks", default="linearize_offline",
                   help="comma-separated lm-eval tasks. Offline (no hub needed): linearize_wiki, linearize_wiki512, "
                   "linearize_capitals, linearize_passkey, or linearize_offline for all four (default). Standard "
                   "names (piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu, ...) go to lm-eval unchanged")
    p.add_argument("--limit", default=None,
                   help="documents per task: N, a fraction below 1, or per task, e.g. 8,linearize_capitals=100 "
                   "(a bare number covers the tasks not named)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--max-length", type=int, default=None, help="context cap in tokens (default: the model's)")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8192",
                   help="token lengths of the passkey documents (default 1024,2048,4096,8192)")
    p.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1", help="key positions in [0, 1]")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="report folder (default DIR/eval)")
    p.add_argument("--teacher-cache", default=None,
                   help="folder that keeps the teacher's answers (lm-eval's request cache), so that evaluating "
                   "the next student against the same teacher skips the teacher's run")


def _run_eval(args) -> None:
    import torch

    from linearize.evals import OfflineTaskConfig, render_markdown, run_recovery

    from linearize.evals.runner import parse_limit

    limit = parse_limit(args.limit)
    task_config = OfflineTaskConfig(
        passkey_lengths=[int(x) for x in args.passkey_lengths.split(",") if x.strip()],
        passkey_depths=[float(x) for x in args.passkey_depths.split(",") if x.strip()],
    )
    report, paths = run_recovery(
        args.dir, args.teacher, args.tasks.split(","), out_dir=args.out, limit=limit, batch_size=args.batch_size,
        max_length=args.max_length, num_fewshot=args.num_fewshot, task_config=task_config, device=args.device,
        dtype=getattr(torch, args.dtype), teacher_cache=args.teacher_cache,
    )
    print(render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _add_push(sub) -> None:
    p = sub.add_parser(
        "push", help="upload a converted checkpoint (with a model card) to the Hugging Face Hub",
        description="Stage the checkpoint with a generated model card, validate it, then upload it as one "
        "commit. The token comes from `hf auth login` or HF_TOKEN.",
    )
    p.add_argument("dir", help="converted checkpoint folder")
    p.add_argument("repo_id", help="target repository, 'user/name'")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to upload to (created if missing; default main)")
    p.add_argument("--base-model", default=None,
                   help="hub id of the teacher for the card (default: from eval_report.json / training_summary.json)")
    p.add_argument("--dry-run", metavar="OUT", default=None,
                   help="write the exact folder that would be uploaded to OUT and validate it; upload nothing")


def _run_push(args) -> None:
    from linearize.hub import push

    where = push(args.dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
                 base_model=args.base_model)
    print(f"dry run, nothing uploaded: {where}" if args.dry_run else f"uploaded: {where}")


VERBS = ("convert", "generate", "bench", "finetune", "eval", "push")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linearize",
        description="Convert pretrained Hugging Face LLMs into gated linear-recurrent hybrids, "
        "finetune, evaluate and publish them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        globals()[f"_add_{verb}"](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from linearize.errors import LinearizeError

    try:
        globals()[f"_run_{args.verb}"](args)
    except (LinearizeError, ValueError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"linearize {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"linearize {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
