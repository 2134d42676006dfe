"""Score any Kaggle-format submission against labels with the leaderboard metric.

`python -m tfseg.score --submission submission.csv --labels train.csv --data-dir DIR` decodes every
row (id,class,predicted; RLE as in train.csv) at the size its scan's file name under DIR gives, and
prints the leaderboard score (0.4 x mean 2D Dice over rows + 0.6 x (1 - mean 3D Hausdorff per
case-day)) with its parts, per class, and tfseg's per-organ 3D metric beside it. Every labelled
(id, class) needs a row, and every row a label: --only-submitted-volumes scores just the case-days
the submission holds (a fold's predictions against the full train.csv).
"""

import argparse
import sys

from tfseg import cli, files
from tfseg.evaluation.metric import EMPTY_DICE, HAUSDORFF_MODES


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submission", required=True, help="submission CSV: id,class,predicted")
    parser.add_argument("--labels", required=True, help="labels CSV in train.csv's form: id,class,segmentation")
    parser.add_argument("--data-dir", required=True,
                        help="Kaggle-layout folder whose scan file names give each slice's size (train/ or test/)")
    parser.add_argument("--only-submitted-volumes", action="store_true",
                        help="score only the case-days the submission has (each still needs every slice)")
    parser.add_argument("--empty-dice", choices=tuple(EMPTY_DICE), default="skip",
                        help="rows empty in both prediction and truth: skip them (the host's ruling, default), "
                             "or count them as Dice 0 or 1 (the Evaluation text's literal reading)")
    parser.add_argument("--hausdorff", choices=HAUSDORFF_MODES, default="joined",
                        help="Hausdorff of the class-joined volume per case-day (default, as openai/mle-bench's "
                             "grader) or per (case-day, class)")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = parser.parse_args(argv)
    from tfseg.evaluation.report import format_table
    from tfseg.evaluation.submission import score_submission

    summary, _ = score_submission(args.submission, args.labels, args.data_dir,
                                  only_submitted_volumes=args.only_submitted_volumes, empty_dice=args.empty_dice,
                                  hausdorff=args.hausdorff)
    print(format_table(summary))
    print(f"\nscore {summary['score']:.4f}")
    if args.json:
        files.write_json(args.json, summary)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
