"""Command line of the benchmarks: one sub-command per module in tfseg.bench."""

import argparse
import importlib
import os
import platform
import sys

from tfseg import cli, files

BENCHMARKS = {
    "records": "make_records speed: slices/s with 1 and 2 workers on full-scale synthetic data",
    "data": "input pipeline images/s and CPU ms per image on 1 and 2 cores: decode only, host, cached, "
            "augmentation on the device, a notebook loader; per-stage CPU ms",
    "train": "training images/s of every precision x XLA combination; real pipeline vs cached batches",
    "serve": "SavedModel latency and throughput: PNG signature, float signature, Keras model; a whole volume "
             "through serving_volume against the per-slice signature",
}


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", metavar="FILE", help="also write the figures as a flat JSON object of numbers")
        try:
            importlib.import_module(f"tfseg.bench.{name}").add_arguments(p)
        except ModuleNotFoundError:
            p.set_defaults(missing=True)
    args = parser.parse_args(argv)
    if getattr(args, "missing", False):
        parser.error(f"benchmark {args.name!r} is not implemented yet")
    figures = importlib.import_module(f"tfseg.bench.{args.name}").run(args)
    figures = {k: float(v) for k, v in figures.items()}
    machine = f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}"
    print(f"\n{args.name} benchmark ({machine}):")
    for key, value in figures.items():
        print(f"  {key:<36} {value:12.3f}")
    if args.json:
        files.write_json(args.json, figures)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
