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


def _device_arg(argv: list[str]) -> str | None:
    """The value of lm-eval's ``--device`` in ``argv`` (None when not given)."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.partition("=")[2]
    return None


def main() -> None:
    """Expected failures (a missing package, a device this machine lacks, a bad source or task
    name) end as one line ``python -m linearize.evals: error: ...`` and exit status 2, as
    ``linearize`` verbs do. ``--device`` is checked before lm-eval indexes its tasks (minutes)."""
    from linearize.environment import check_device
    from linearize.errors import LinearizeError

    from .runner import require_eval_dependencies

    try:
        require_eval_dependencies("python -m linearize.evals")
        if sys.argv[1:2] == ["prepare-tasks"]:
            _prepare(sys.argv[2:])
            return
        device = _device_arg(sys.argv[1:])
        if device is not None:
            check_device(device)
        from . import lm_model  # noqa: F401  (registers --model linearize)
        from lm_eval.__main__ import cli_evaluate

        sys.argv[0] = "python -m linearize.evals"
        cli_evaluate()
    except (LinearizeError, ValueError) as err:  # lm-eval raises ValueError for unknown tasks, bad arguments
        print(f"python -m linearize.evals: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
