"""Send scans to a running TensorFlow Serving (REST or gRPC) and write the masks it returns.

    python -m tfseg.client grpc --url 127.0.0.1:8500 --out masks/ data/test/case1/case1_day2/scans
    python -m tfseg.client rest --url 127.0.0.1:8501 --out masks/ slice_0040.png slice_0041.png ...

The SCANs are slices of one volume in slice order (a folder stands for its *.png files, sorted). Each
slice gets its K-slice context from --offsets (the model's data.offsets; clamped at the ends) and one
mask PNG: SCAN stem + "_mask.png", RGB with red = large bowel, green = small bowel, blue = stomach.
The model normalises intensities over each request, so by default one request carries all the
given slices (a whole volume gives exactly the training normalisation); --batch-size N splits them.
"""

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tfseg import CLASSES, cli, files, scans

SIGNATURE = "serving_default"
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class ServingError(RuntimeError):
    """The server could not be reached or rejected the request."""


def context_rows(items: list, offsets) -> list[list]:
    """Row i = items[i + o] for each offset o, clamped to the ends (tfseg.data.context_stack's rule)."""
    last = len(items) - 1
    return [[items[min(max(i + o, 0), last)] for o in offsets] for i in range(len(items))]


def scan_files(paths: list[str]) -> list[Path]:
    """PNG files in the order given; a folder stands for its *.png files, sorted by name."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.png"))
            if not found:
                raise FileNotFoundError(f"{path}: no .png files in this folder")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such scan file or folder")
    return out


def predict_rest(url: str, model_name: str, rows: list[list[bytes]], timeout: float) -> np.ndarray:
    """POST /v1/models/NAME:predict in the row ("instances") format; returns masks uint8 [N, H, W, 3]."""
    base = url if url.startswith(("http://", "https://")) else f"http://{url}"
    body = {"signature_name": SIGNATURE,
            "instances": [{"slices": [{"b64": base64.b64encode(png).decode()} for png in row]} for row in rows]}
    request = urllib.request.Request(f"{base.rstrip('/')}/v1/models/{model_name}:predict",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ServingError(f"{base} answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ServingError(f"{base}: cannot reach the REST API ({getattr(err, 'reason', err)})") from None
    return np.asarray([p["masks"] for p in answer["predictions"]], np.uint8)


def predict_grpc(url: str, model_name: str, rows: list[list[bytes]], timeout: float) -> np.ndarray:
    """PredictionService.Predict asking only for the `masks` output; returns masks uint8 [N, H, W, 3]."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE),
                                         output_filter=["masks"])
    request.inputs["slices"].CopyFrom(tf.make_tensor_proto(rows, dtype=tf.string))
    with grpc.insecure_channel(url, options=GRPC_OPTIONS) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
        except grpc.RpcError as err:
            raise ServingError(f"{url} answered {err.code().name}: {err.details()}") from None
    return tf.make_ndarray(response.outputs["masks"]).astype(np.uint8)


def mask_image(mask: np.ndarray) -> np.ndarray:
    """0/1 mask [H, W, 3] in CLASSES order -> RGB uint8 with 255 where an organ is."""
    return np.asarray(mask, np.uint8) * np.uint8(255)


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
                        help="context offsets of the model, its data.offsets; write --offsets=-1,1 when the first "
                             "is negative (default: %(default)s)")
    parser.add_argument("--out", default="masks", help="folder for the mask PNGs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="slices per request; 0 (default) sends them all in one request")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait per request (default: 300)")
    args = parser.parse_args(argv)
    try:
        offsets = [int(o) for o in args.offsets.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--offsets: expected integers like -2,0,2, got {args.offsets!r}")
    url = args.url or ("127.0.0.1:8501" if args.protocol == "rest" else "127.0.0.1:8500")
    paths = scan_files(args.scans)
    rows = context_rows([p.read_bytes() for p in paths], offsets)
    send = predict_rest if args.protocol == "rest" else predict_grpc
    step = args.batch_size if args.batch_size > 0 else len(rows)
    out = Path(args.out)
    try:
        masks = np.concatenate([send(url, args.model_name, rows[i:i + step], args.timeout)
                                for i in range(0, len(rows), step)])
    except ServingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, mask in zip(paths, masks, strict=True):
        target = out / f"{path.stem}_mask.png"
        files.write_bytes(target, scans.encode_png(mask_image(mask)))
        counts = ", ".join(f"{name} {int(mask[..., c].sum())}" for c, name in enumerate(CLASSES))
        print(f"{path} -> {target} ({counts} px)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
