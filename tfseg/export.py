"""Export a trained run as a SavedModel that TensorFlow Serving loads as it is.

`python -m tfseg.export --run runs/NAME --out saved_models/NAME/1` writes `saved_model.pb` +
`variables/` with two signatures, plus `assets.extra/` (a warm-up request and tfseg.json):

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
from tfseg.serving.savedmodel import export


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by tfseg.train (config.yaml + model)")
    parser.add_argument("--out", help=f"version folder to write, e.g. {layout.SAVED_MODELS_DIR}/NAME/1 "
                                      f"(default: {layout.SAVED_MODELS_DIR}/<run name>/<next version>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the version folder if it exists")
    parser.add_argument("--chunk", type=int, default=16,
                        help="slices the model processes at once inside the graph; bounds memory for "
                             "whole-volume requests (default: 16)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else Path(layout.SAVED_MODELS_DIR) / run.resolve().name
    if not args.out:
        out = out / str(layout.next_version(out))
    export(run, out, overwrite=args.overwrite, chunk=args.chunk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
