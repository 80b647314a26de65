"""`linearize` command line: parses a verb and calls one library function. No logic of its own.

``VERBS`` maps each verb to its ``verbs.add_<verb>(parser)`` (declares its arguments) and its
``verbs.run_<verb>(args)`` (calls the library). A verb's arguments are declared when that verb is
parsed, and every heavy import sits inside a run function, so ``linearize --help`` stays fast
(no torch, no transformers).

Errors: ``main`` is the one error boundary. An expected failure (bad input, missing file, full
disk, missing optional extra) prints one line ``linearize VERB: error: what went wrong and how to
fix it`` and exits 2; ``--debug`` adds the traceback. Anything else is a bug: its traceback is
shown with a request to report it, exit 1.
"""

from __future__ import annotations

import argparse
import re
import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from .allocator import keep_freed_memory
from .boundary import one_line, user_message
from .verbs import (
    add_bench, add_convert, add_eval, add_finetune, add_generate, add_push, finetune_epilog, run_bench,
    run_convert, run_eval, run_finetune, run_generate, run_push,
)



@dataclass(frozen=True)
class Verb:
    help: str
    add: Callable[[argparse.ArgumentParser], None]
    """Declares the verb's arguments (called when the verb is parsed or its help is shown)."""
    run: Callable[[argparse.Namespace], None]
    description: str | None = None
    epilog: Callable[[], str] | None = None
    """Builds the help epilog, only when the help is shown."""


VERBS: dict[str, Verb] = {
    "convert": Verb(
        "replace every attention layer of a model with a gated linear + sliding-window hybrid",
        add_convert, run_convert, "Convert a pretrained decoder into a linearized checkpoint folder.",
    ),
    "generate": Verb("stream text from a converted (or any) checkpoint", add_generate, run_generate),
    "bench": Verb("prefill/decode speed and memory of a converted model against its teacher", add_bench, run_bench),
    "finetune": Verb(
        "convert a teacher and recover its quality as a recipe YAML says (attention transfer, LoRA)",
        add_finetune, run_finetune,
        "Run a finetuning recipe: `linearize finetune RECIPE.yaml [key=value ...]`. Several processes: "
        "`accelerate launch [--config_file recipes/accelerate/X.yaml] -m linearize finetune ...` (or torchrun). "
        "Recipe keys (override any with dotted.key=value, e.g. lora.r=16 train.seed=1):",
        epilog=finetune_epilog,
    ),
    "eval": Verb(
        "evaluate a converted checkpoint and its teacher with lm-eval; write the recovery report",
        add_eval, run_eval, "Run the same lm-eval tasks on the teacher and the converted checkpoint and write "
        "the recovery report (Markdown, JSON, PNG) into --out and DIR/eval_report.json.",
    ),
    "push": Verb(
        "upload a converted checkpoint (with a model card) to the Hugging Face Hub", add_push, run_push,
        "Stage the checkpoint with a generated model card, validate it, then upload it as one commit. The token "
        "comes from `hf auth login` or HF_TOKEN.",
    ),
}

# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, and whose arguments (``add``) and help epilog
    (``epilog_factory``) are only built when this parser is used."""

    def __init__(self, *args, add: Callable | None = None, epilog_factory: Callable[[], str] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_add = add
        self._epilog_factory = epilog_factory

    def _declare(self) -> None:
        if self._pending_add is not None:
            add, self._pending_add = self._pending_add, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._declare()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._declare()
        if self._epilog_factory is not None:
            self.epilog, self._epilog_factory = self._epilog_factory(), None
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("linearize")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"


def _global_flags(parser: argparse.ArgumentParser, default) -> None:
    """-v/--debug before or after the verb (after it, SUPPRESS keeps a value given before)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error (with its one-line message)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="linearize",
        description="Convert pretrained Hugging Face LLMs into gated linear-recurrent hybrids, "
        "finetune, evaluate and publish them.",
    )
    parser.add_argument("--version", action="version", version=f"linearize {_version()}")
    _global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        p = sub.add_parser(name, help=verb.help, description=verb.description or verb.help, add=verb.add,
                           epilog_factory=verb.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter if verb.epilog else
                           argparse.HelpFormatter)
        _global_flags(p, default=argparse.SUPPRESS)
        p.set_defaults(run=verb.run)
    return parser

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. ``finetune``'s ``key=value`` overrides may come on either side of its
    options (``finetune r.yaml --resume lora.max_steps=8``), which argparse alone does not allow."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb == "finetune" and all(_OVERRIDE.match(x) for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "system_allocator", False):
        keep_freed_memory()  # before the verb allocates anything large (see allocator.py)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"linearize {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one error boundary: see the module docstring
        message = user_message(err, args.verb)
        if message is None:
            traceback.print_exc()
            print(f"linearize {args.verb}: internal error: {type(err).__name__}: {one_line(err)}. This is a bug: "
                  "please report it with the command you ran and the traceback above.", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(f"linearize {args.verb}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
