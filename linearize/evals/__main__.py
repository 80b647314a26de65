"""``python -m linearize.evals``: lm-eval's own command line with ``--model linearize`` registered, plus
``python -m linearize.evals prepare-tasks OUT [--tokenizer SOURCE]`` to write the offline tasks for
``--include_path OUT``.

    python -m linearize.evals prepare-tasks /tmp/tasks --tokenizer DIR
    python -m linearize.evals run --model linearize --model_args pretrained=DIR \\
        --include_path /tmp/tasks --tasks linearize_capitals --limit 100
"""

from __future__ import annotations

import argparse
import sys


def _prepare(argv: list[str]) -> None:
    from linearize.sources import load_tokenizer

    from .config import OFFLINE_TASKS, OfflineTaskConfig
    from .data import prepare_tasks

    p = argparse.ArgumentParser(prog="python -m linearize.evals prepare-tasks",
                                description="write the offline lm-eval tasks into a folder for --include_path")
    p.add_argument("out", help="folder to write (task stubs + data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: smollm2-135m)")
    p.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="offline tasks to build")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8192")
    args = p.parse_args(argv)
    config = OfflineTaskConfig(passkey_lengths=[int(x) for x in args.passkey_lengths.split(",")])
    out = prepare_tasks(args.out, load_tokenizer(args.tokenizer), config, args.tasks.split(","))
    print(out)


def main() -> None:
    if sys.argv[1:2] == ["prepare-tasks"]:
        _prepare(sys.argv[2:])
        return
    from . import lm_model  # noqa: F401  (registers --model linearize)
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "python -m linearize.evals"
    cli_evaluate()


if __name__ == "__main__":
    main()
