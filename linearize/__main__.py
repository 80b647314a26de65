"""`python -m linearize ...` (used by `accelerate launch -m linearize`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
