"""A few LoRA steps of each CPU recipe: peak RSS, tokens/s and CPU time, before / after by code tree.

    python -m benchmarks.recipe_steps [RECIPE ...] [--steps 4] [--max-tokens 40000] [--rounds 1]
        [--code before=/tmp/before --code after=.] [--set KEY=VALUE ...] [--breakdown] [--out runs.json]

RECIPE defaults to every ``recipes/*-cpu*.yaml``. Each run is

    linearize finetune RECIPE 'stages=[lora]' lora.max_steps=STEPS data.max_tokens=MAX_TOKENS
        train.eval_batches=1 train.tensorboard=false output_dir=<a temporary folder> [--set overrides]

in a fresh process whose working directory is a temporary folder (``python -c`` puts the working
directory first on ``sys.path``) and whose ``PYTHONPATH`` is the code tree of its variant: another
commit is a worktree, ``git worktree add --detach /tmp/before COMMIT``. A tree that has its own copy
of the recipe (same path under ``recipes/``) runs it, so each commit runs its own recipe. Peak RSS is
the child's ``ru_maxrss`` (``os.wait4``): model loading, conversion, the held-out evaluation and the
steps; tokens/s is the LoRA stage's, from the run's ``training_summary.json``. Within a round the
variants alternate, recipe by recipe (a shared machine's load drifts: compare within a round).
``--breakdown`` adds, per recipe, where one step's memory goes in the current tree
(``benchmarks.memory_breakdown --mixer keep recompute`` at the recipe's block length).

Prints a Markdown table (recorded in benchmarks/results/memory_cpu.md) and writes every run's numbers
to ``--out`` as JSON. Memory: one finetune at a time, so the machine needs the recipe's peak free.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = "import sys; from linearize.cli import main; sys.exit(main())"


@dataclass
class Run:
    recipe: str
    variant: str
    round: int
    peak_rss_gb: float
    tokens_per_s: float
    lora_time_s: float
    first_ce: float
    final_ce: float
    finetuned_perplexity: float
    user_s: float
    sys_s: float
    wall_s: float
    load_before: str
    load_after: str


def parse_code(specs: list[str] | None) -> dict[str, Path]:
    """``NAME=PATH`` pairs, in order; the current tree as ``current`` when none is given."""
    if not specs:
        return {"current": REPO}
    code = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--code takes NAME=PATH (a checkout of the code to run), got {spec!r}")
        tree = Path(path).resolve()
        if not (tree / "linearize" / "__init__.py").is_file():
            raise SystemExit(f"--code {spec}: {tree} holds no linearize package (a checkout of this repository?)")
        if name in code:
            raise SystemExit(f"--code: the name {name!r} is given twice")
        code[name] = tree
    return code


def recipe_in_tree(recipe: Path, tree: Path) -> Path:
    """The tree's own copy of a recipe under recipes/ when it has one, else the recipe given."""
    try:
        relative = recipe.resolve().relative_to(REPO)
    except ValueError:
        return recipe.resolve()
    own = tree / relative
    return own if own.is_file() else recipe.resolve()


def run_once(recipe: Path, variant: str, tree: Path, round_: int, steps: int, max_tokens: int,
             python: str = sys.executable, log_dir: Path | None = None, extra: tuple[str, ...] = ()) -> Run:
    """One finetune of ``steps`` LoRA steps in a fresh process running ``tree``'s code."""
    with tempfile.TemporaryDirectory(prefix="recipe-steps-") as work:
        out = Path(work) / "run"
        cmd = [python, "-c", CLI, "finetune", str(recipe_in_tree(recipe, tree)), "stages=[lora]",
               f"lora.max_steps={steps}", f"data.max_tokens={max_tokens}", "train.eval_batches=1",
               "train.tensorboard=false", f"output_dir={out}", *extra]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        log_path = (log_dir or Path(work)) / f"{Path(recipe).stem}-{variant}-{round_}.log"
        load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"{variant} on {recipe} exited with {code}; the end of its log ({log_path}):\n{tail}")
        summary = json.loads((out / "training_summary.json").read_text())
    lora = summary["stages"]["lora"]
    return Run(recipe=str(recipe), variant=variant, round=round_, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9,
               tokens_per_s=lora["tokens"] / lora["train_time_s"], lora_time_s=lora["train_time_s"],
               first_ce=lora.get("first_ce", float("nan")), final_ce=lora.get("final_ce", float("nan")),
               finetuned_perplexity=summary["perplexity"]["finetuned"], user_s=usage.ru_utime,
               sys_s=usage.ru_stime, wall_s=wall, load_before=load_before,
               load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()))


def table(runs: list[Run]) -> str:
    """Markdown: one row per recipe and variant (medians over rounds), the ratio to the first variant."""
    rows = ["| recipe | code | rounds | peak RSS (GB) | tokens/s (LoRA) | x first | user / sys CPU s | CE first / last | held-out ppl after |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for recipe in dict.fromkeys(r.recipe for r in runs):
        base = None
        for variant in dict.fromkeys(r.variant for r in runs if r.recipe == recipe):
            mine = [r for r in runs if r.recipe == recipe and r.variant == variant]
            tps = statistics.median(r.tokens_per_s for r in mine)
            base = tps if base is None else base
            rows.append(
                f"| {Path(recipe).name} | {variant} | {len(mine)} | {statistics.median(r.peak_rss_gb for r in mine):.2f} | "
                f"{tps:.1f} | {tps / base:.2f} | {statistics.median(r.user_s for r in mine):.0f} / "
                f"{statistics.median(r.sys_s for r in mine):.0f} | {mine[-1].first_ce:.7f} / {mine[-1].final_ce:.7f} | "
                f"{mine[-1].finetuned_perplexity:.7g} |")
    return "\n".join(rows)


def breakdown(recipe: Path, python: str = sys.executable) -> str:
    """benchmarks.memory_breakdown's table for the recipe, at its block length, in the current tree."""
    from linearize.recipe import load_recipe

    seq_len = load_recipe(str(recipe)).data.seq_len
    cmd = [python, "-m", "benchmarks.memory_breakdown", str(recipe), "--seq-len", str(seq_len), "--mixer", "keep", "recompute"]
    return subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("recipes", nargs="*", type=Path, help="recipes to run (default: recipes/*-cpu*.yaml)")
    p.add_argument("--steps", type=int, default=4, help="LoRA steps per run (default 4)")
    p.add_argument("--max-tokens", type=int, default=40000, help="tokens of training data to prepare (default 40000)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of alternated variants (default 1)")
    p.add_argument("--code", action="append", metavar="NAME=PATH", help="a code tree to run, repeatable (default: this one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every run, repeatable (e.g. data.seq_len=1024)")
    p.add_argument("--breakdown", action="store_true", help="also where one step's memory goes, per recipe (current tree)")
    p.add_argument("--logs", type=Path, help="keep each run's log in this folder")
    p.add_argument("--out", type=Path, help="write every run's numbers here (JSON)")
    args = p.parse_args(argv)
    recipes = args.recipes or sorted((REPO / "recipes").glob("*-cpu*.yaml"))
    for recipe in recipes:
        if not recipe.is_file():
            raise SystemExit(f"no recipe at {recipe}")
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1")
    code = parse_code(args.code)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for round_ in range(1, args.rounds + 1):
        for recipe in recipes:
            for variant, tree in code.items():
                run = run_once(recipe, variant, tree, round_, args.steps, args.max_tokens, log_dir=args.logs,
                               extra=tuple(args.set))
                print(f"round {round_} {recipe.name} {variant}: {run.peak_rss_gb:.2f} GB, {run.tokens_per_s:.1f} tokens/s, "
                      f"load {run.load_before} -> {run.load_after}", flush=True)
                runs.append(run)
    print(table(runs))
    if args.breakdown:
        for recipe in recipes:
            print(f"\n### {recipe.name}: saved for backward, one step\n\n{breakdown(recipe)}")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
