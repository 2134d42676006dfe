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
from pathlib import Path

from tfseg import CLASSES, cli
from tfseg.errors import DataError
from tfseg.layout import read_info, versions


def newest_version(path: str) -> Path:
    """A SavedModel version folder as given, or the newest version under a model folder."""
    found = versions(path)
    return Path(path) / str(found[-1]) if found and not (Path(path) / "saved_model.pb").exists() else Path(path)


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
    parser.add_argument("--model", metavar="SAVED_MODEL",
                        help="the served SavedModel (version folder, or its parent: the newest version); its "
                             "tfseg.json gives K, the offsets and the model size (default: the server's metadata, "
                             "which gives K and the size but not the offsets)")
    parser.add_argument("--offsets",
                        help="context offsets of the model, e.g. -2,0,2 (write --offsets=-2,0,2): checked against "
                             "the model's and an error if they differ; needed with --batch-size only when neither "
                             "--model nor the server tells them (default: the model's)")
    parser.add_argument("--out", default="masks", help="folder for the mask PNGs (default: %(default)s)")
    parser.add_argument("--batch-size", type=cli.at_least(0), default=0,
                        help="slices per request to the per-slice signature; 0 (default) sends them all in one "
                             "serving_volume request")
    parser.add_argument("--timeout", type=cli.positive, default=300, help="seconds to wait per request (default: 300)")
    args = parser.parse_args(argv)
    offsets = None
    if args.offsets is not None:
        try:
            offsets = [int(o) for o in args.offsets.replace(",", " ").split()]
        except ValueError:
            parser.error(f"--offsets: expected integers like -2,0,2, got {args.offsets!r}")
    from tfseg.serving.client import (
        ServingError,
        facts_from_info,
        facts_from_signatures,
        metadata_signatures,
        model_offsets,
        segment,
    )

    url = args.url or ("127.0.0.1:8501" if args.protocol == "rest" else "127.0.0.1:8500")
    try:
        served = facts_from_signatures(metadata_signatures(args.protocol, url, args.model_name, args.timeout))
        facts, where = served, f"the served model {args.model_name}"
        if args.model:
            facts, where = facts_from_info(read_info(newest_version(args.model))), args.model
            if (facts["k"], facts["input_size"]) != (served["k"], served["input_size"]):
                raise DataError(f"--model {args.model} takes K = {facts['k']} at {facts['input_size']}, but the "
                                f"served model {args.model_name} takes K = {served['k']} at {served['input_size']}: "
                                "not the model the server serves")
        offsets = model_offsets(facts, offsets, where, args.batch_size)
        print("model: whole volumes only (a 3D member)" if facts["k"] is None else
              f"model: K = {facts['k']} slices per context row"
              + (f" (offsets {','.join(map(str, offsets))})" if offsets else "")
              + f", model size {facts['input_size'][0]} x {facts['input_size'][1]}")
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
