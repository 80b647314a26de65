"""Each verb's ``add_<verb>(parser)`` (declares its arguments) and ``run_<verb>(args)`` (calls the
library). Heavy imports sit inside the functions, so building the parser stays cheap."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from linearize.config import DTYPE_NAMES


logger = logging.getLogger("linearize")

# Argument types: a bad value is one line that names the option (argparse adds "argument --flag:").


def _number(kind: type, low: float | None = None, high: float | None = None, above_low: bool = False):
    """An argparse ``type`` for an int/float within [low, high] (``above_low``: low excluded)."""
    what = "an integer" if kind is int else "a finite number"
    rule = what
    if low is not None and high is not None:
        rule += f" {'above' if above_low else 'from'} {low:g} {'up ' if above_low else ''}to {high:g}"
    elif low is not None:
        rule += f" {'>' if above_low else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value < low or (above_low and value == low)))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


def _setting(name: str, kind: type):
    """The argparse ``type`` of a numeric ``ConversionConfig`` field: ``config.check_setting``'s rule."""
    from linearize.config import check_setting

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text  # check_setting then says what the field accepts
        try:
            return check_setting(name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give the text to continue, e.g. --prompt 'The capital of France is'")
    return text


_POSITIVE_INT = _number(int, low=1)

def add_convert(p: argparse.ArgumentParser) -> None:
    from linearize.config import conversion_arguments

    p.add_argument(
        "model", nargs="?", default=None,
        help="hub id, local HF folder, .gguf file, or 'smollm2-135m' (the offline default, used when left out)",
    )
    p.add_argument("--out", required=True, help="output folder for the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a folder this tool wrote before")
    for flag, kwargs in conversion_arguments():  # one per ConversionConfig field, dest = the field's name
        if kwargs.get("type") in (int, float):  # range-checked while parsing: the error names the option
            kwargs = {**kwargs, "type": _setting(kwargs["dest"], kwargs["type"])}
        p.add_argument(flag, **kwargs)
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the saved weights (default: float32)")


def run_convert(args) -> None:
    from linearize.config import SETTINGS, ConversionConfig

    config = ConversionConfig(**{name: getattr(args, name) for name in SETTINGS})
    import linearize

    # convert_to_folder checks the output folder before it resolves or loads the teacher
    out = linearize.convert_to_folder(args.model, args.out, config, dtype=args.dtype, overwrite=args.overwrite)
    logger.info("converted checkpoint written to %s", out)


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, hub id, .gguf or 'smollm2-135m'")
    p.add_argument("--prompt", required=True, type=_text, help="the prompt text")
    p.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=_number(float, low=0.0), default=0.0,
                   help="0 means greedy decoding (default)")
    p.add_argument("--top-p", type=_number(float, low=0.0, high=1.0, above_low=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--num-beams", type=_POSITIVE_INT, default=1, help="beam search width (default 1: no beams)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0)


def run_generate(args) -> None:
    import linearize

    text = ""
    for piece in linearize.generate_stream(
        args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, num_beams=args.num_beams, chat=args.chat, seed=args.seed,
    ):
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not text.strip():
        logger.warning(
            "the model %s at once; an untrained conversion often does: finetune it first (linearize finetune)%s",
            "ended its turn" if args.chat else "produced no text", " or drop --chat" if args.chat else "",
        )


def add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="converted checkpoint folder (from `linearize convert`)")
    p.add_argument("--teacher", default=None, help="the teacher: hub id, folder, .gguf or 'smollm2-135m' (default)")
    p.add_argument("--contexts", default="1k,2k,4k,8k,16k,32k", help="context lengths, e.g. 512,1k,2k (k = 1024)")
    p.add_argument("--batch", type=_POSITIVE_INT, default=1, help="batch of the prefill/decode-latency grid (default 1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--decode-steps", type=_POSITIVE_INT, default=16, help="timed single-token steps per context")
    p.add_argument("--warmup-steps", type=_number(int, low=0), default=2, help="untimed decode steps before them")
    p.add_argument("--throughput-context", type=_POSITIVE_INT, default=None,
                   help="context of the decode-throughput test (default: largest grid context the teacher allows)")
    p.add_argument("--max-batch", type=_number(int, low=0), default=None,
                   help="largest batch tried for throughput (default 256 on cuda, 4 on cpu; 0 skips the test)")
    p.add_argument("--threads", type=_POSITIVE_INT, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--retain-freed-memory", action="store_true",
                   help="CPU (glibc): keep freed memory in the process instead of page-faulting large tensors "
                   "in again at every forward (both models); every linearize command now does this by default")
    p.add_argument("--system-allocator", action="store_true",
                   help="CPU (glibc): keep glibc's defaults instead (freed large tensors go back to the OS and are "
                   "page-faulted in again), as in a Python process that imports linearize; recorded in the results")
    p.add_argument("--teacher-beyond-limit", action="store_true",
                   help="time the teacher past its declared context limit too (random tokens: only the cost counts)")
    p.add_argument("--out", default="bench.json", help="JSON results file; the PNG goes beside it (default bench.json)")


def run_bench(args) -> None:
    from linearize.bench.report import plot_available

    if not plot_available():  # said now, not after the run: the table and JSON are still written
        logging.getLogger("linearize").warning(
            "matplotlib is not installed: no PNG chart will be drawn (pip install 'linearize[bench]')")
    import torch
    from rich.progress import Progress

    from linearize import bench as mb

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    cfg = mb.BenchConfig(
        contexts=mb.parse_contexts(args.contexts), batch=args.batch, device=device,
        dtype=args.dtype or ("bfloat16" if cuda else "float32"), decode_steps=args.decode_steps,
        warmup_steps=args.warmup_steps, throughput_context=args.throughput_context,
        max_batch=args.max_batch if args.max_batch is not None else (256 if cuda else 4), threads=args.threads,
        teacher_beyond_limit=args.teacher_beyond_limit,
        retain_freed_memory=args.retain_freed_memory and not args.system_allocator,
    )
    out = mb.check_report_path(args.out)  # before minutes of measuring
    if args.out == "bench.json":
        logger.info("results go to %s and %s (choose with --out)", out, out.with_suffix(".png"))
    teacher, converted = mb.load_pair(args.dir, args.teacher, cfg)
    with Progress(transient=True) as bar:
        task = bar.add_task("bench", total=mb.grid_size(cfg))
        report = mb.run_bench(teacher, converted, cfg,
                              progress=lambda what: bar.update(task, advance=1, description=what))
    report["command"] = "linearize bench " + " ".join(_argv_of(args))
    json_path, png_path = mb.write_report(report, out)
    print(mb.format_table(report))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))


_GLOBAL_KEYS = ("dir", "verb", "run", "verbose", "debug")


def _argv_of(args) -> list[str]:
    out = [args.dir]
    for key, value in vars(args).items():
        if key in _GLOBAL_KEYS or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        out += [flag] if value is True else [flag, str(value)]
    return out


def finetune_epilog() -> str:
    from linearize.recipe import recipe_help

    return recipe_help()


def add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. lora.r=16 data.max_tokens=100000 output_dir=runs/x")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in output_dir/checkpoints (same data order, "
                   "optimiser and scheduler state)")


def run_finetune(args) -> None:
    from linearize.recipe import load_recipe
    from linearize.train import finetune

    recipe = load_recipe(args.recipe, args.overrides)
    result = finetune(recipe, resume=args.resume)
    logger.info("the finetuned checkpoint is in %s", result.model_dir)


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="converted checkpoint folder")
    p.add_argument("--teacher", default=None, help="the teacher: hub id, folder, .gguf or 'smollm2-135m' (default)")
    p.add_argument("--tasks", default="linearize_offline",
                   help="comma-separated lm-eval tasks. Offline (no hub needed): linearize_wiki, linearize_wiki512, "
                   "linearize_capitals, linearize_passkey, linearize_pydoc (out of domain), or linearize_offline for all "
                   "of them (default). Standard "
                   "names (piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu, ...) go to lm-eval unchanged")
    p.add_argument("--limit", default=None,
                   help="documents per task: N, a fraction below 1, or per task, e.g. 8,linearize_capitals=100 "
                   "(a bare number covers the tasks not named)")
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--num-fewshot", type=_number(int, low=0), default=None,
                   help="few-shot examples (default: each task's own)")
    p.add_argument("--max-length", type=_POSITIVE_INT, default=None, help="context cap in tokens (default: the model's)")
    p.add_argument("--passkey-lengths", default=None,
                   help="token lengths of the passkey documents (default 1024,2048,4096,8192; 1024 with --limit)")
    p.add_argument("--passkey-depths", default=None, help="key positions in [0, 1] (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--out", default=None, help="report folder (default DIR/eval)")
    p.add_argument("--teacher-cache", default=None,
                   help="folder that keeps the teacher's answers (lm-eval's request cache), so that evaluating "
                   "the next student against the same teacher skips the teacher's run")


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 1024,2048") from None


def run_eval(args) -> None:
    from linearize.evals.runner import require_eval_dependencies

    require_eval_dependencies()
    import datasets
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from linearize.config import torch_dtype
    from linearize.evals import render_markdown, run_recovery
    from linearize.evals.config import task_config_for
    from linearize.evals.runner import parse_limit

    limit = parse_limit(args.limit)
    task_config = task_config_for(limit, passkey_lengths=_numbers(args.passkey_lengths, int, "--passkey-lengths"),
                                  passkey_depths=_numbers(args.passkey_depths, float, "--passkey-depths"))
    datasets.disable_progress_bars()  # one overall line below (lm-eval's request bars go with the callback)
    columns = (TextColumn("eval: {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("loading", total=None)
        report, paths = run_recovery(
            args.dir, args.teacher, args.tasks.split(","), out_dir=args.out, limit=limit, batch_size=args.batch_size,
            max_length=args.max_length, num_fewshot=args.num_fewshot, task_config=task_config, device=args.device,
            dtype=torch_dtype(args.dtype), teacher_cache=args.teacher_cache,
            progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what),
        )
    print(render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def add_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="converted checkpoint folder")
    p.add_argument("repo_id", help="target repository, 'user/name'")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to upload to (created if missing; default main)")
    p.add_argument("--base-model", default=None,
                   help="hub id of the teacher for the card (default: from eval_report.json / training_summary.json)")
    p.add_argument("--dry-run", metavar="OUT", default=None,
                   help="write the exact folder that would be uploaded to OUT and validate it; upload nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier --dry-run folder at OUT")


def run_push(args) -> None:
    from linearize.hub import push

    where = push(args.dir, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
                 base_model=args.base_model, overwrite=args.overwrite)
    print(f"dry run, nothing uploaded: {where}" if args.dry_run else f"uploaded: {where}")


