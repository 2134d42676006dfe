"""Shared command-line plumbing: clear one-line errors and exit codes instead of tracebacks, and the
argument types every command shares (counts with a minimum, which folds). TensorFlow-free, like every
command's parser: `--help` and argument errors never wait for TensorFlow to load."""

import argparse
import functools
import sys
from collections.abc import Callable

from tfseg.errors import ConfigError, DataError, TrainingStopped

Main = Callable[[list[str] | None], int | None]


def run(main: Main, argv: list[str] | None = None) -> int:
    """Run a command's main(); bad input becomes 'error: ...' on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except (DataError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # not bad input: the run stopped part-way, and resumes
        print(f"error: {err}", file=sys.stderr)
        return 1
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


def at_least(minimum: int):
    """argparse type: an integer >= minimum (a count or size); anything else is an argument error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive(text: str) -> float:
    """argparse type: a number > 0 (a size or duration)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _fold_list(text: str) -> list[int]:
    parts = [p for p in text.replace(",", " ").split()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,1, got {text!r}")
    return [int(p) for p in parts]


class _Folds(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [f for part in values for f in part])


def add_folds(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs) -> None:
    """A which-folds option, the same on every command: `0,1` (or `0 1`)."""
    parser.add_argument(flag, nargs="+", type=_fold_list, action=_Folds, metavar="K", help=f"{help}, e.g. 0,1",
                        **kwargs)


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated, use {self.new} (same value); {option_string} will go away",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """The old spelling of option `new`: still accepted (hidden from --help), with a deprecation warning."""
    dest = next(a.dest for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, dest=dest, action=_Renamed, new=new, help=argparse.SUPPRESS, **kwargs)
