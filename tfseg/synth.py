"""`python -m tfseg.synth`: write the built-in synthetic dataset in the Kaggle layout (tfseg.kaggle.synth)."""

import argparse
import sys
import time
from pathlib import Path

from tfseg import cli, layout
from tfseg.kaggle.constants import DIFFICULTIES, MAX_DAYS


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.synth",
        description="Write the built-in synthetic dataset (3D abdominal MRI phantoms with stomach, small "
                    "and large bowel masks) in exactly the Kaggle layout: DIR/train.csv and 16-bit PNG "
                    "scans under DIR/train/, and the options in DIR/synth.json. Does nothing if DIR/train.csv "
                    "exists (a complete dataset) made with the same options; refuses if they differ (--overwrite "
                    "replaces it).")
    parser.add_argument("--out", default=layout.SYNTH_DATA_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--cases", type=cli.at_least(1), default=6, help="number of cases (default: %(default)s)")
    parser.add_argument("--seed", type=cli.at_least(0), default=0,
                        help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument("--full", action="store_true",
                        help="full scale like the real data: 85 cases, 274 case-days, 38,496 slices "
                             "(ignores --cases)")
    parser.add_argument("--days", type=cli.at_least(1), choices=range(1, MAX_DAYS + 1), metavar="N",
                        help=f"days per case, 1..{MAX_DAYS} (default: random 1..{MAX_DAYS})")
    parser.add_argument("--slices", type=cli.at_least(1),
                        help="slices per volume (default: 144, or 80 for 276x276 scans, as in the real data)")
    parser.add_argument("--workers", type=cli.at_least(1), help="worker processes (default: all cores)")
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="standard",
                        help="hard: bowel look-alikes, overlapping intensities, several bowel pieces, gas, "
                             "tapered ends, stronger bias and noise, slice motion (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a dataset already in --out (its train.csv, synth.json and train/) and regenerate")
    parser.add_argument("--preview", metavar="FILE.png",
                        help="also draw a few slices with their mask contours to this PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from tfseg.kaggle import synth

    if args.full and (args.days or args.slices):
        parser.error("--full fixes days and slices; drop --days/--slices")
    out = Path(args.out)
    changed = synth.changed_options(out, args.cases, args.seed, full=args.full, days=args.days,
                                    num_slices=args.slices, difficulty=args.difficulty)
    if changed == [] and not args.overwrite:
        print(f"{out}: complete dataset with these options already there (train.csv exists), not regenerated")
    else:
        start = time.perf_counter()  # make_dataset refuses a dataset made with other options without --overwrite
        synth.make_dataset(out, args.cases, args.seed, full=args.full, days=args.days, num_slices=args.slices,
                           workers=args.workers, progress=not args.no_progress, difficulty=args.difficulty,
                           overwrite=args.overwrite)
        print(f"wrote {out}: {synth.count_slices(out)} slices in {time.perf_counter() - start:.1f} s")
    if args.preview:
        print(f"preview: {synth.preview(out, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
