"""Export a trained run as a SavedModel that TensorFlow Serving loads as it is.

`python -m tfseg.export --run runs/NAME --out saved_models/NAME/1` writes `saved_model.pb` +
`variables/` with five signatures, plus `assets.extra/` (warm-up requests and tfseg.json).
`--run A --run B` (or `--cv runs/NAME`) exports a fusion that averages the runs' probabilities at each
scan's size before the threshold and gating (`--weight 0.6 --weight 0.4`: one weight per member, in the
order of --run then the --cv folds; default equal). Members must have tfseg's classes; 2.5D members
alone also share their input (data.offsets, image_size, clip_percentiles, resize, interpolation), which
the per-slice signatures give them all: otherwise the export names the member and the setting, exit 2,
nothing written. A 3D run (model.kind 3d), alone or in a fusion, is served through the two whole-volume
signatures only, each member normalising and resizing the volume its own way.
`--tta hflip` adds flip test-time augmentation (refused for a run not trained with that flip, see
augment.flip_horizontal / flip_vertical, unless `--allow-untrained-tta`). The signatures:

- `serving_default`: `slices` string [N, K], each a 16-bit greyscale PNG (K = len(data.offsets) context
  slices, all of one size) -> `probabilities` float32 [N, H, W, 3] and `masks` uint8 [N, H, W, 3] at the
  PNGs' resolution. Decoding, normalisation, resizing and the threshold all happen in the graph.
- `masks_png`: `slices` as serving_default -> `masks_png` string [N], one RGB PNG per slice (255 where
  large bowel (R), small bowel (G), stomach (B)): a small answer for REST.
- `predict_float`: `scans` float32 [N, h, w, K], already normalised and at the model size ->
  `probabilities` float32 [N, h, w, 3].
- `serving_volume`: `slices` string [D], every slice of one volume once, in slice order -> `masks_png`
  string [D]. The graph builds the K-slice contexts itself.
- `volume_probabilities`: `slices` as serving_volume -> `probabilities` float32 [D, H, W, 3] and `masks`
  uint8 [D, H, W, 3] (what `evaluate --model` scores).

Normalisation rule: intensities are clipped to percentiles over every slice a request holds. A whole
volume (serving_volume, or serving_default with every slice's context row) gets training's numbers
exactly; a request holding part of a volume is normalised over that part only, so its masks can differ.
Before decoding, every PNG header is checked: 16-bit greyscale, width and height at most
--max-image-size (recorded in tfseg.json), else INVALID_ARGUMENT.
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
    parser.add_argument("--weight", type=float, action="append", metavar="W",
                        help="weight of a member in the fusion, repeated once per member in the order of --run "
                             "then the --cv folds (default: equal weights); weights are scaled to sum to 1")
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
    parser.add_argument("--max-image-size", type=cli.at_least(1), default=layout.MAX_IMAGE_SIZE, metavar="PX",
                        help="largest width or height a scan PNG may declare; larger ones are refused before "
                             "decoding (default: %(default)s)")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.run]
    if args.cv:
        runs += layout.fold_runs(args.cv)
    if not runs:
        parser.error("give --run RUN (repeatable) or --cv DIR")
    if args.weight is not None and (len(args.weight) != len(runs) or min(args.weight) <= 0):
        parser.error(f"--weight: give one positive weight per member ({len(runs)}), got {args.weight}")
    name = Path(args.cv).resolve().name if args.cv else runs[0].resolve().name
    out = Path(args.out) if args.out else Path(layout.SAVED_MODELS_DIR) / name
    if not args.out:
        out = out / str(layout.next_version(out))
    from tfseg.serving.savedmodel import export  # TensorFlow loads here

    export(runs, out, overwrite=args.overwrite, chunk=args.chunk, tta=args.tta, weights=args.weight,
           allow_untrained_tta=args.allow_untrained_tta, max_image_size=args.max_image_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
