"""Benchmarks: `python -m tfseg.bench {records,data,train,serve}`; figures for the README.

Each benchmark module defines `add_arguments(parser)` and `run(args) -> dict` returning a flat
mapping of names to numbers; `--json FILE` writes that mapping.
"""
