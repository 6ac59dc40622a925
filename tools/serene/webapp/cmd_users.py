"""serene users (serene.cli's contract: add_arguments, run): see webapp/cli.py."""

from .cli import add_users_arguments as add_arguments  # noqa: F401
from .cli import run_users as run  # noqa: F401
