"""The layering rule of DESIGN.md §2 (kernels <- core <- evals / bench <- cli), as import-linter checks it
with the contract in pyproject.toml (also run on its own by .ci/run)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_layers_are_kept():
    run = subprocess.run([sys.executable, "-c", LINT], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout
