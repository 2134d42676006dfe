"""`python -m tfseg.make_records`: a Kaggle-layout folder -> sharded TFRecords (tfseg.records.writer)."""

import argparse
import os
import sys
from pathlib import Path

from tfseg import cli, layout
from tfseg.kaggle.constants import KNOWN_MISLABELLED


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.make_records",
        description="Turn a Kaggle-layout folder (train.csv + train/caseC/caseC_dayD/scans/*.png) into "
                    "sharded TFRecords for training: one example per case-day volume, shards grouped by "
                    "cross-validation fold (whole cases per fold), manifest.json written last. Safe to "
                    "interrupt: rerun the same command to finish; on complete output it does nothing.")
    parser.add_argument("--data-dir", help="Kaggle-layout data folder (default: the built-in synthetic "
                                           f"dataset in {layout.SYNTH_DATA_DIR}, made first if missing)")
    parser.add_argument("--out", default=layout.RECORDS_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--num-folds", type=cli.at_least(1), default=5, metavar="N",
                        help="how many cross-validation folds to make (default: %(default)s)")
    cli.add_renamed(parser, "--folds", "--num-folds", type=cli.at_least(1))
    parser.add_argument("--workers", type=cli.at_least(1),
                        help=f"worker processes (default: all cores, {len(os.sched_getaffinity(0))} here)")
    parser.add_argument("--shard-mb", type=cli.positive, default=150,
                        help="about this many MB per shard; a volume is never split (default: %(default)s)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="bad input: fail (stop, write nothing) or skip (leave it out, list it in the "
                             "manifest) (default: %(default)s)")
    parser.add_argument("--keep-mislabelled", action="store_true",
                        help="keep the case-days known to be mislabelled in the competition data "
                             f"({', '.join(KNOWN_MISLABELLED)}); by default they are left out and listed "
                             "under 'excluded' in the manifest")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace records in --out made from other data or with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    args = parser.parse_args(argv)
    from tfseg.kaggle import synth
    from tfseg.records import inspect
    from tfseg.records.writer import build_records

    data_dir = synth.ensure_dataset() if args.data_dir is None else Path(args.data_dir)
    manifest = build_records(data_dir, args.out, folds=args.num_folds, workers=args.workers,
                             shard_mb=args.shard_mb, on_error=args.on_error, overwrite=args.overwrite,
                             keep_mislabelled=args.keep_mislabelled, progress=not args.no_progress)
    print(inspect.summary(manifest))
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        print(f"warning: {len(manifest['skipped'])} item(s) skipped as bad input (listed under 'skipped' in "
              f"{Path(args.out) / layout.MANIFEST}); first: {first['id']}: {first['reason']}", file=sys.stderr)
    if manifest.get("excluded"):
        print(f"note: left out {len(manifest['excluded'])} case-day(s) known to be mislabelled in the "
              f"competition data ({', '.join(e['id'] for e in manifest['excluded'])}); --keep-mislabelled "
              "keeps them", file=sys.stderr)
    if manifest.get("kept_mislabelled"):
        print(f"warning: kept case-day(s) known to be mislabelled ({', '.join(manifest['kept_mislabelled'])}) "
              "because of --keep-mislabelled", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
