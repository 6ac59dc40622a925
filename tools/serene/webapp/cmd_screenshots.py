"""serene screenshots (serene.cli's contract: add_arguments, run): see webapp/cli.py."""

from .cli import add_screenshots_arguments as add_arguments  # noqa: F401
from .cli import run_screenshots as run  # noqa: F401
