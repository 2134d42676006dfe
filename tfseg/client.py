"""Send scans to a running TensorFlow Serving (REST or gRPC) and write the masks it returns.

    python -m tfseg.client grpc --url 127.0.0.1:8500 --out masks/ data/test/case1/case1_day2/scans
    python -m tfseg.client rest --url 127.0.0.1:8501 --out masks/ slice_0040.png slice_0041.png ...

The SCANs are slices of one volume in slice order (a folder stands for its *.png files, sorted); each
gets one mask PNG: SCAN stem + "_mask.png", black with each organ in the colours of every tfseg
picture: large bowel gold, small bowel green, stomach red (tfseg.draw.CLASS_COLORS); where organs
overlap the stomach is drawn over the small bowel over the large bowel (tfseg.labels). The printed
pixel counts are the model's masks before that choice.

By default one serving_volume request carries all the given slices, each once: the model builds
the K-slice contexts (clamped at the ends of what was sent) and normalises intensities over them, so
a whole volume gets exactly training's numbers. --batch-size N sends N slices per request to the
per-slice signature instead, each with its context from the model's offsets, normalised over that
request's slices only (the masks can then differ a little from training's).
"""

import argparse
import sys

from tfseg import CLASSES, cli
from tfseg.serving.client import ServingError, segment


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=("rest", "grpc"), help="TF Serving API to call")
    parser.add_argument("scans", nargs="+", metavar="SCAN",
                        help="16-bit PNG slices of one volume in slice order, or a folder of them")
    parser.add_argument("--url", help="HOST:PORT of the server (default: 127.0.0.1:8501 for rest, "
                                      "127.0.0.1:8500 for grpc)")
    parser.add_argument("--model-name", default="tfseg", help="MODEL_NAME the server serves (default: %(default)s)")
    parser.add_argument("--offsets", default="-2,0,2",
                        help="with --batch-size: context offsets of the model, its data.offsets; write "
                             "--offsets=-1,1 when the first is negative (default: %(default)s)")
    parser.add_argument("--out", default="masks", help="folder for the mask PNGs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="slices per request to the per-slice signature; 0 (default) sends them all in one "
                             "serving_volume request")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait per request (default: 300)")
    args = parser.parse_args(argv)
    try:
        offsets = [int(o) for o in args.offsets.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--offsets: expected integers like -2,0,2, got {args.offsets!r}")
    url = args.url or ("127.0.0.1:8501" if args.protocol == "rest" else "127.0.0.1:8500")
    try:
        written = segment(args.protocol, url, args.scans, offsets, args.out, model_name=args.model_name,
                          batch_size=args.batch_size, timeout=args.timeout)
    except ServingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, target, mask in written:
        counts = ", ".join(f"{name} {int(mask[..., c].sum())}" for c, name in enumerate(CLASSES))
        print(f"{path} -> {target} ({counts} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
