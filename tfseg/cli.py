"""Shared command-line plumbing: clear one-line errors and exit codes instead of tracebacks."""

import sys
from collections.abc import Callable

from tfseg.errors import ConfigError, DataError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's main(); bad input becomes 'error: ...' on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except (DataError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
