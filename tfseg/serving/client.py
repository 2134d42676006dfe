"""Clients of TensorFlow Serving's REST and gRPC predict APIs for tfseg SavedModels, and mask files."""

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from tfseg import files
from tfseg.data.context import context_rows
from tfseg.draw import color_labels, labels_from_colors
from tfseg.errors import DataError
from tfseg.kaggle.scans import encode_png
from tfseg.labels import label_map, one_hot
from tfseg.layout import MASKS_PNG, PREDICT_FLOAT, SIGNATURE, VOLUME_SIGNATURE
from tfseg.serving.api import GRPC_OPTIONS, reason


class ServingError(RuntimeError):
    """The server could not be reached or rejected the request."""


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


PNG_ANSWERS = (MASKS_PNG, VOLUME_SIGNATURE)  # signatures answering one mask PNG per slice


def _b64(item):
    return [_b64(i) for i in item] if isinstance(item, list) else {"b64": base64.b64encode(item).decode()}


def predict_rest(url: str, model_name: str, slices: list, timeout: float, signature: str = MASKS_PNG) -> np.ndarray:
    """POST /v1/models/NAME:predict in the row ("instances") format; returns masks uint8 [N, H, W, 3].

    `slices`: K-slice context rows for masks_png (the default: a PNG per slice, as REST has no output
    filter and serving_default's answer carries every probability as a JSON number) or serving_default;
    one volume's PNGs in slice order for serving_volume.
    """
    base = url if url.startswith(("http://", "https://")) else f"http://{url}"
    body = {"signature_name": signature, "instances": [{"slices": _b64(item)} for item in slices]}
    request = urllib.request.Request(f"{base.rstrip('/')}/v1/models/{model_name}:predict",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = reason(json.loads(detail)["error"])
        except (ValueError, KeyError, TypeError, IndexError):
            pass
        raise ServingError(f"{base} answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ServingError(f"{base}: cannot reach the REST API ({getattr(err, 'reason', err)})") from None
    if signature in PNG_ANSWERS:
        return np.stack([png_mask(base64.b64decode(p["b64"])) for p in answer["predictions"]])
    return np.asarray([p["masks"] for p in answer["predictions"]], np.uint8)


def png_mask(png: bytes) -> np.ndarray:
    """A masks_png answer (RGB PNG, 255 where an organ is) -> mask uint8 [H, W, 3] of 0/1 in CLASSES order."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise ServingError("the server's masks_png answer is not an RGB PNG")
    return (image[..., ::-1] > 127).astype(np.uint8)  # cv2 decodes BGR


def predict_grpc(url: str, model_name: str, slices: list, timeout: float, signature: str = SIGNATURE) -> np.ndarray:
    """PredictionService.Predict; returns masks uint8 [N, H, W, 3]. serving_default (context rows) is
    asked only for its `masks` output; serving_volume (one volume's PNGs) answers mask PNGs."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    output = "masks_png" if signature in PNG_ANSWERS else "masks"
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature),
                                         output_filter=[output])
    request.inputs["slices"].CopyFrom(tf.make_tensor_proto(slices, dtype=tf.string))
    with grpc.insecure_channel(url, options=GRPC_OPTIONS) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
        except grpc.RpcError as err:
            raise ServingError(f"{url} answered {err.code().name}: {reason(err.details() or '')}") from None
    answer = tf.make_ndarray(response.outputs[output])
    return np.stack([png_mask(p) for p in answer]) if output == "masks_png" else answer.astype(np.uint8)


def metadata_signatures(protocol: str, url: str, model_name: str, timeout: float) -> dict:
    """The served model's SignatureDefs as JSON (TF Serving's field names): REST GET
    /v1/models/NAME/metadata, or gRPC GetModelMetadata(signature_def)."""
    if protocol == "rest":
        base = url if url.startswith(("http://", "https://")) else f"http://{url}"
        try:
            address = f"{base.rstrip('/')}/v1/models/{model_name}/metadata"
            with urllib.request.urlopen(address, timeout=timeout) as answer:
                return json.load(answer)["metadata"]["signature_def"]["signature_def"]
        except urllib.error.HTTPError as err:
            raise ServingError(f"{base} answered HTTP {err.code} to the metadata request: "
                               f"{err.read().decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ServingError(f"{base}: cannot reach the REST API ({getattr(err, 'reason', err)})") from None
    import grpc
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, prediction_service_pb2_grpc

    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name=model_name),
                                                             metadata_field=["signature_def"])
    with grpc.insecure_channel(url, options=GRPC_OPTIONS) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request,
                                                                                                   timeout=timeout)
        except grpc.RpcError as err:
            raise ServingError(f"{url} answered {err.code().name}: {err.details()}") from None
    defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(defs)
    return json_format.MessageToDict(defs, preserving_proto_field_name=True)["signature_def"]


def facts_from_signatures(signature_defs: dict) -> dict:
    """{"k", "input_size", "offsets"} from SignatureDefs: predict_float's `scans` [N, h, w, K] gives the
    model size and K. TF Serving's metadata holds only SignatureDefs, so the offsets are None."""
    if PREDICT_FLOAT not in signature_defs and VOLUME_SIGNATURE in signature_defs:
        return {"k": None, "input_size": None, "offsets": None}  # whole volumes only: a fusion with a 3D model
    try:
        dims = signature_defs[PREDICT_FLOAT]["inputs"]["scans"]["tensor_shape"]["dim"]
        _, height, width, k = (int(d["size"]) for d in dims)
    except (KeyError, ValueError, TypeError):
        raise ServingError(f"the served model has no {PREDICT_FLOAT} signature with scans [N, h, w, K]; "
                           "not a tfseg export (its metadata says what it expects)") from None
    return {"k": k, "input_size": [height, width], "offsets": None}


def facts_from_info(info: dict) -> dict:
    """{"k", "input_size", "offsets"} from an export's tfseg.json (None for a model of whole volumes only)."""
    if PREDICT_FLOAT not in info.get("signatures", {PREDICT_FLOAT: ""}):
        return {"k": None, "input_size": None, "offsets": None}
    return {"k": len(info["offsets"]), "input_size": list(info["input_size"]), "offsets": list(info["offsets"])}


def model_offsets(facts: dict, offsets: list[int] | None, where: str, batch_size: int) -> list[int] | None:
    """The context offsets to build rows with: the model's; a user's `offsets` must agree with them (or,
    when the model's are unknown, have its K entries). DataError naming both values otherwise."""
    said = ",".join(map(str, offsets or []))
    if facts["k"] is None:  # no per-slice signature to send rows to
        if batch_size > 0 or offsets is not None:
            raise DataError(f"{where} serves whole volumes only (a 3D model is among its members): leave out "
                            "--batch-size and --offsets")
        return None
    if offsets is not None and len(offsets) != facts["k"]:
        raise DataError(f"--offsets {said}: {len(offsets)} slices per row, but {where} takes K = {facts['k']}"
                        + (f" (offsets {','.join(map(str, facts['offsets']))})" if facts["offsets"] else "")
                        + "; leave --offsets out to use the model's")
    if offsets is not None and facts["offsets"] is not None and list(offsets) != facts["offsets"]:
        raise DataError(f"--offsets {said}, but {where} was trained with offsets "
                        f"{','.join(map(str, facts['offsets']))}; leave --offsets out to use the model's")
    chosen = facts["offsets"] if facts["offsets"] is not None else offsets
    if batch_size > 0 and chosen is None:
        raise DataError(f"--batch-size builds context rows, but {where}'s metadata (TF Serving's SignatureDefs) "
                        f"gives K = {facts['k']}, not the offsets: pass --model SAVED_MODEL (its tfseg.json) or "
                        f"--offsets with {facts['k']} values")
    return chosen


def mask_image(mask: np.ndarray) -> np.ndarray:
    """0/1 mask [H, W, 3] in CLASSES order -> the picture a person opens: RGB uint8, black background, each
    organ in tfseg.draw.CLASS_COLORS (large bowel gold, small bowel green, stomach red); where organs
    overlap the higher tfseg.labels number wins (stomach over small bowel over large bowel)."""
    return color_labels(label_map(mask))


def read_mask_image(path: str | Path) -> np.ndarray:
    """A written mask file -> 0/1 mask uint8 [H, W, 3] in CLASSES order (overlaps as mask_image resolved them)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 3:
        raise ValueError(f"{path}: not an RGB mask PNG")
    return one_hot(labels_from_colors(image[..., ::-1]))  # cv2 reads BGR


def segment(protocol: str, url: str, scans: list[str], offsets, out: str | Path, *, model_name: str = "tfseg",
            batch_size: int = 0, timeout: float = 300) -> list[tuple[Path, Path, np.ndarray]]:
    """Send the scans (one volume, slice order); write one mask PNG per scan. batch_size 0: all in one
    serving_volume request (the model builds the contexts); N > 0: requests of N context rows (from
    `offsets`) to the per-slice signature. Returns (scan, mask file, mask) per scan."""
    paths = scan_files(scans)
    pngs = [p.read_bytes() for p in paths]
    send = predict_rest if protocol == "rest" else predict_grpc
    if batch_size <= 0:
        masks = send(url, model_name, pngs, timeout, signature=VOLUME_SIGNATURE)
    else:
        rows = context_rows(pngs, offsets)
        masks = np.concatenate([send(url, model_name, rows[i:i + batch_size], timeout)
                                for i in range(0, len(rows), batch_size)])
    written = []
    for path, mask in zip(paths, masks, strict=True):
        target = Path(out) / f"{path.stem}_mask.png"
        files.write_bytes(target, encode_png(mask_image(mask)))
        written.append((path, target, mask))
    return written
