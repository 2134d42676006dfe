"""`python -m tfseg.inspect_records`: a records folder's manifest as tables, overlays (tfseg.records.inspect)."""

import argparse
import sys

from tfseg import cli, layout
from tfseg.layout import read_manifest
from tfseg.records import inspect
from tfseg.records.reader import check_shards


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.inspect_records",
        description="Print a records folder's manifest (folds, organ content, image sizes, skipped input) as "
                    "tables; optionally draw a few slices per fold with their mask contours.")
    parser.add_argument("records", nargs="?", default=layout.RECORDS_DIR,
                        help="records folder written by make_records (default: %(default)s)")
    parser.add_argument("--overlays", metavar="DIR", help="write DIR/fold{k}.png: slices with mask contours")
    parser.add_argument("--slices", type=cli.at_least(1), default=4,
                        help="slices per fold in the overlays (default: 4)")
    parser.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    args = parser.parse_args(argv)
    print(inspect.summary(read_manifest(args.records)))
    if args.verify:
        check_shards(args.records)
        print("\nevery shard matches its sha256 in the manifest")
    if args.overlays:
        for path in inspect.write_overlays(args.records, args.overlays, args.slices):
            print(f"overlay: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
