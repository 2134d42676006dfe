"""Export a trained run as a SavedModel that TensorFlow Serving loads as it is.

`python -m tfseg.export --run runs/NAME --out saved_models/NAME/1` writes `saved_model.pb` +
`variables/` with two signatures, plus `assets.extra/` (a warm-up request and tfseg.json).
`--run A --run B` (or `--cv runs/NAME`) exports an ensemble that averages the runs' probabilities,
`--tta hflip` adds flip test-time augmentation (refused for a run not trained with that flip, see
augment.flip_horizontal / flip_vertical, unless `--allow-untrained-tta`); the signatures stay the same:

- `serving_default`: `slices` string [N, K], each a 16-bit greyscale PNG (K = len(data.offsets) context
  slices, all of one size) -> `probabilities` float32 [N, H, W, 3] and `masks` uint8 [N, H, W, 3] at the
  PNGs' resolution. Decoding, normalisation, resizing and the threshold all happen in the graph.
- `predict_float`: `scans` float32 [N, h, w, K], already normalised and at the model size ->
  `probabilities` float32 [N, h, w, 3].
"""

import argparse
import sys
from pathlib import Path

from tfseg import cli, layout


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[],
                        help="run folder written by tfseg.train (config.yaml + model); repeat it to export an "
                             "ensemble that averages the runs' probabilities")
    parser.add_argument("--cv", metavar="DIR", help="export the ensemble of every fold run of a cross-validation "
                                                    "folder written by tfseg.cv (DIR/fold*/)")
    parser.add_argument("--tta", default="", metavar="MODES",
                        help="test-time augmentation in the serving graph: hflip, vflip or hflip,vflip (average of "
                             "the flipped inputs' probabilities, flipped back); default none. Each run must "
                             "have been trained with the flip (augment.flip_horizontal / flip_vertical)")
    parser.add_argument("--allow-untrained-tta", action="store_true",
                        help="apply --tta even to runs not trained with that flip (a warning, not an error)")
    parser.add_argument("--out", help=f"version folder to write, e.g. {layout.SAVED_MODELS_DIR}/NAME/1 "
                                      f"(default: {layout.SAVED_MODELS_DIR}/<run name>/<next version>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the version folder if it exists")
    parser.add_argument("--chunk", type=cli.at_least(1), default=16,
                        help="slices the model processes at once inside the graph; bounds memory for "
                             "whole-volume requests (default: 16)")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.run]
    if args.cv:
        runs += layout.fold_runs(args.cv)
    if not runs:
        parser.error("give --run RUN (repeatable) or --cv DIR")
    name = Path(args.cv).resolve().name if args.cv else runs[0].resolve().name
    out = Path(args.out) if args.out else Path(layout.SAVED_MODELS_DIR) / name
    if not args.out:
        out = out / str(layout.next_version(out))
    from tfseg.serving.savedmodel import export  # TensorFlow loads here

    export(runs, out, overwrite=args.overwrite, chunk=args.chunk, tta=args.tta,
           allow_untrained_tta=args.allow_untrained_tta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
