"""Shared command-line plumbing: clear one-line errors and exit codes instead of tracebacks."""

import os
import sys
from collections.abc import Callable

from tfseg.errors import ConfigError, DataError


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) unless asked for."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
