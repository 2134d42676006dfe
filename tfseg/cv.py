"""K-fold cross-validation: train one run per validation fold, score each on its held-out fold, and
report the out-of-fold leaderboard score over every volume (per class, per fold, and their mean).

`python -m tfseg.cv --config configs/cpu.yaml --records records/synth --folds 0,1,2,3,4 --out runs/cv`
writes runs/cv/fold{k}/ (a run folder each, with eval/), runs/cv/cv.json and runs/cv/cv.txt. A rerun
skips finished folds and resumes an interrupted one. `python -m tfseg.export --cv runs/cv` then exports
the fold models as one ensemble SavedModel.
"""

import argparse
import sys

from tfseg import cli


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.cv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file of every fold's run")
    parser.add_argument("--records", help="records folder (default: the config's data.records)")
    cli.add_folds(parser, "--folds", required=True, help="validation folds, one run each")
    parser.add_argument("--out", required=True, help="cross-validation folder, e.g. runs/cv")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key for every fold (repeatable)")
    parser.add_argument("--fresh", action="store_true", help="retrain every fold from scratch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from tfseg.evaluation.cross_validation import cross_validate, format_cv  # TensorFlow loads here

    summary = cross_validate(args.config, args.folds, args.out, records=args.records, overrides=args.set,
                             fresh=args.fresh, progress=not args.no_progress)
    print(format_cv(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
