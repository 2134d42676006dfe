"""Shared command-line plumbing: clear one-line errors and exit codes instead of tracebacks."""

import functools
import sys
from collections.abc import Callable

from tfseg.errors import ConfigError, DataError

Main = Callable[[list[str] | None], int | None]


def run(main: Main, argv: list[str] | None = None) -> int:
    """Run a command's main(); bad input becomes 'error: ...' on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except (DataError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def command(main: Main) -> Callable[..., int]:
    """A command's main(argv=None) -> exit code, with run()'s error handling: what `python -m` and the
    installed `tfseg-*` entry points call."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        return run(main, argv)

    return wrapped
