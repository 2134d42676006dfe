"""Score a trained run on its validation volumes with the competition metric, comparable to Kaggle's.

`python -m tfseg.evaluate --run runs/NAME` predicts every volume of the validation folds, takes the
probabilities back to each scan's original size, thresholds them (train.threshold), drops small
components (train.min_component pixels per slice, then 3D pieces under train.min_component_fraction of
each organ's largest), scores them with the leaderboard's metric (0.4 x mean 2D Dice per slice and
class + 0.6 x (1 - mean 3D Hausdorff per case-day in the unit cube); tfseg's per-organ 3D metric
beside it as organ3d) and writes eval/per_volume.csv, eval/summary.json and eval/scores.png. The
score of an all-empty prediction is reported beside it: what a model that finds nothing would get.
"""

import argparse
import sys

from tfseg import cli
from tfseg.evaluation.metric import EMPTY_DICE, HAUSDORFF_MODES


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by tfseg.train")
    cli.add_folds(parser, "--folds", help="folds to score (default: the run's data.val_folds)")
    parser.add_argument("--model", help="evaluate this SavedModel (its predict_float signature) instead of the "
                                         "run's Keras model, e.g. saved_models/NAME/1")
    parser.add_argument("--batch-size", type=cli.at_least(1), default=16, help="slices per model call (default: 16)")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the run's train.threshold)")
    parser.add_argument("--min-component", type=cli.at_least(0),
                        help="drop predicted components smaller than this many pixels per slice "
                             "(default: the run's train.min_component)")
    parser.add_argument("--min-component-fraction", type=float,
                        help="drop predicted 3D components smaller than this fraction of the organ's largest "
                             "(default: the run's train.min_component_fraction)")
    parser.add_argument("--presence-threshold", type=float,
                        help="with a presence head: zero a class on slices whose presence is below this "
                             "(default: the run's train.presence_threshold)")
    parser.add_argument("--min-pixels", type=cli.at_least(0),
                        help="pixel rule: zero a class on a slice unless more than this many pixels reach "
                             "--min-pixel-probability; 0 is off (default: the run's train.min_pixels)")
    parser.add_argument("--min-pixel-probability", type=float,
                        help="the pixel rule's probability (default: the run's train.min_pixel_probability)")
    parser.add_argument("--tta", default="", metavar="MODES",
                        help="flip test-time augmentation of the run's model: hflip, vflip or hflip,vflip "
                             "(an exported --model keeps its own); the run must have been trained with the flip "
                             "(augment.flip_horizontal / flip_vertical)")
    parser.add_argument("--allow-untrained-tta", action="store_true",
                        help="apply --tta even if the run was not trained with that flip (a warning, not an error)")
    parser.add_argument("--empty-dice", choices=tuple(EMPTY_DICE), default="skip",
                        help="leaderboard Dice of rows empty in both: skip (the host's ruling, default), zero or one")
    parser.add_argument("--hausdorff", choices=HAUSDORFF_MODES, default="joined",
                        help="leaderboard Hausdorff of the class-joined volume (default) or per class")
    parser.add_argument("--limit", type=cli.at_least(1),
                        help="score only the first LIMIT volumes (a quick look), reported in RUN/eval-limitLIMIT")
    parser.add_argument("--out", help="report folder (default: RUN/eval)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from tfseg.evaluation.report import describe_folds, format_table, report_files  # TensorFlow loads here
    from tfseg.evaluation.scoring import evaluate_run

    overrides = {"threshold": args.threshold, "min_component": args.min_component,
                 "min_component_fraction": args.min_component_fraction, "presence_threshold": args.presence_threshold,
                 "min_pixels": args.min_pixels, "min_pixel_probability": args.min_pixel_probability}
    summary, out = evaluate_run(args.run, folds=args.folds, model=args.model, out=args.out, batch_size=args.batch_size,
                                post_overrides=overrides, tta=args.tta, allow_untrained_tta=args.allow_untrained_tta,
                                limit=args.limit, empty_dice=args.empty_dice, hausdorff=args.hausdorff,
                                progress=not args.no_progress)
    print(f"\n{summary['model']}, {describe_folds(summary)}:")
    print(format_table(summary))
    print(f"wrote {', '.join(map(str, report_files(out)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
