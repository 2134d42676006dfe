"""Export a trained run as a SavedModel that TensorFlow Serving loads as it is.

`python -m tfseg.export --run runs/NAME --out saved_models/NAME/1` writes `saved_model.pb` +
`variables/` with two signatures, plus `assets.extra/` (a warm-up request and tfseg.json):

- `serving_default`: `slices` string [N, K], each a 16-bit greyscale PNG (K = len(data.offsets) context
  slices, all of one size) -> `probabilities` float32 [N, H, W, 3] and `masks` uint8 [N, H, W, 3] at the
  PNGs' resolution. Decoding, normalisation (over the distinct slices of the whole request, as training
  does over a volume), resizing and the threshold all happen in the graph; bad input fails with an
  InvalidArgumentError naming the problem.
- `predict_float`: `scans` float32 [N, h, w, K], already normalised and at the model size ->
  `probabilities` float32 [N, h, w, 3].
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfseg import CLASSES, __version__, cli, data, features, files, paths, records
from tfseg import config as config_lib
from tfseg.client import context_rows
from tfseg.errors import DataError
from tfseg.loop import BEST_WEIGHTS, FINAL_MODEL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A PNG starts with its 8-byte signature, then the IHDR chunk: length (4), "IHDR" (4), width (4),
# height (4), bit depth (1, offset 24), colour type (1, offset 25; 0 = greyscale).
HEADER_BYTES = 26
WARMUP_FILE = "tf_serving_warmup_requests"
INFO_FILE = "tfseg.json"


# ---- the run's model -------------------------------------------------------------------------------

def load_run_model(run_dir: str | os.PathLike) -> tuple[config_lib.Config, keras.Model, Path]:
    """(config, float32 Keras model, weights file used) of a run folder: the architecture of its
    model.keras with the best validation weights (best.weights.h5) when the run wrote them."""
    run_dir = Path(run_dir)
    config = config_lib.load_config(run_dir / "config.yaml")
    source = run_dir / FINAL_MODEL
    if not source.exists():
        raise DataError(f"{source}: missing; not a finished tfseg run folder (train it, or resume it)")
    model = float32_model(keras.models.load_model(source, compile=False))
    if (run_dir / BEST_WEIGHTS).exists():
        source = run_dir / BEST_WEIGHTS
        model.load_weights(source)
    return config, model, source


def _float32_config(node):
    """A model config with every mixed-precision dtype policy replaced by float32."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and str(node.get("config", {}).get("name", "")).startswith(
                "mixed_"):
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {key: _float32_config(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_config(value) for value in node]
    return node


def float32_model(model: keras.Model) -> keras.Model:
    """The same model computing in float32 (a mixed_float16 model is slow and less exact on CPUs)."""
    if not any(layer.dtype_policy.name.startswith("mixed_") for layer in model._flatten_layers()):
        return model
    clone = model.__class__.from_config(_float32_config(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


# ---- the serving graph ------------------------------------------------------------------------------

def _check_all(ok, message: str):
    """Assert a [N, K] boolean table; the error names the first failing (request row, context slot)."""
    first = tf.where(tf.logical_not(ok))[:1]
    return tf.debugging.Assert(tf.reduce_all(ok), [message, "first failing [row, slot]:", first])


def decode_slices(slices, num_context: int, centre: int):
    """Check and decode a [N, K] string tensor of 16-bit greyscale PNGs.

    Returns (distinct slices uint16 [U, H, W], index int32 [N, K] into them). Identical bytes decode
    once: a whole volume's K-slice contexts then decode K times fewer PNGs, and percentiles over the
    distinct slices are those of the volume, in slice order (the centre column is listed first), as
    in training.
    """
    shape = tf.shape(slices)
    # Padding makes every string long enough to slice the header from, so short junk fails our checks.
    head = tf.strings.substr(tf.strings.join([slices, tf.constant(b"\0" * HEADER_BYTES)]), 0, HEADER_BYTES)
    width_height = tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.int32, little_endian=False)
    width_height = tf.reshape(width_height, tf.concat([shape, [2]], 0))
    checks = [
        tf.debugging.assert_positive(tf.size(slices), message="the request holds no slices"),
        tf.debugging.assert_equal(shape[1], num_context, message=(
            f"each row of `slices` must hold K = {num_context} PNGs, the context slices the model was trained with")),
    ]
    with tf.control_dependencies(checks[:2]):
        checks += [
            _check_all(tf.equal(tf.strings.substr(head, 0, 8), PNG_MAGIC), "a slice is not a PNG file"),
            _check_all(tf.equal(tf.strings.substr(head, 24, 1), b"\x10"),
                       "a slice is not a 16-bit PNG (scans are 16-bit greyscale; 8-bit would lose intensities)"),
            _check_all(tf.equal(tf.strings.substr(head, 25, 1), b"\x00"),
                       "a slice is not a greyscale PNG (PNG colour type must be 0)"),
            _check_all(tf.reduce_all(tf.equal(width_height, width_height[:1, :1]), axis=-1),
                       "the slices of one request must all have the same width and height"),
        ]
    with tf.control_dependencies(checks):
        order = tf.concat([slices[:, centre:centre + 1], slices], axis=1)  # centre column first
        distinct, index = tf.unique(tf.reshape(order, [-1]))
    index = tf.reshape(index, [shape[0], num_context + 1])[:, 1:]
    images = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1, dtype=tf.uint16)[..., 0], distinct,
                       fn_output_signature=tf.TensorSpec([None, None], tf.uint16))
    return tf.ensure_shape(images, [None, None, None]), index


def _run_chunked(model: keras.Model, scans, chunk: int):
    """model(scans) `chunk` slices at a time: a whole-volume request needs no more memory than a batch."""
    count = (tf.shape(scans)[0] + chunk - 1) // chunk
    outputs = tf.TensorArray(tf.float32, size=count, infer_shape=False)

    def step(i, outputs):
        part = scans[i * chunk:(i + 1) * chunk]
        return i + 1, outputs.write(i, tf.cast(model(part, training=False), tf.float32))

    _, outputs = tf.while_loop(lambda i, _: i < count, step, (tf.constant(0), outputs), parallel_iterations=1)
    return tf.ensure_shape(outputs.concat(), [None, *model.output_shape[1:]])


def serving_functions(model: keras.Model, config: config_lib.Config, chunk: int = 16):
    """Signature name -> (function, input signature) of the SavedModel."""
    d = config.data
    height, width = d.image_size
    num_context = len(d.offsets)
    centre = d.offsets.index(0) if 0 in d.offsets else num_context // 2
    threshold = config.train.threshold

    def predict_png(slices):
        images, index = decode_slices(slices, num_context, centre)
        orig_hw = tf.unstack(tf.shape(images)[1:3])
        scans = data.normalize(images, d.clip_percentiles)
        scans = data.resize_images(scans[..., None], (height, width), d)[..., 0]
        scans = tf.ensure_shape(tf.transpose(tf.gather(scans, index), [0, 2, 3, 1]),
                                [None, height, width, num_context])
        probabilities = data.restore_size(_run_chunked(model, scans, chunk), orig_hw, d)
        return {"probabilities": probabilities, "masks": to_masks(probabilities, threshold)}

    def predict_float(scans):
        return {"probabilities": _run_chunked(model, scans, chunk)}

    signatures = {
        "serving_default": (predict_png, [tf.TensorSpec([None, None], tf.string, name="slices")]),
        "predict_float": (predict_float, [tf.TensorSpec([None, height, width, num_context], tf.float32,
                                                        name="scans")]),
    }
    return signatures


def to_masks(probabilities, threshold: float):
    """Probabilities -> uint8 0/1 masks (the one threshold rule of serving, evaluate and predict)."""
    return tf.cast(probabilities > threshold, tf.uint8)


# ---- warm-up request and metadata ------------------------------------------------------------------

def sample_context(config: config_lib.Config) -> list[bytes]:
    """K PNGs forming a real context: the middle slice of the first validation volume (or, without
    records, a synthetic 16-bit scan repeated K times)."""
    offsets = config.data.offsets
    try:
        shards = records.shard_files(config.data.records, config.data.val_folds)
    except DataError:
        shards = []
    for serialized in tf.data.TFRecordDataset(shards).take(1):
        pngs = features.parse_volume(serialized)["image_png"].numpy().tolist()
        return context_rows(pngs, offsets)[len(pngs) // 2]
    y, x = np.mgrid[:266, :266]
    scan = (2000 + 1500 * np.sin(x / 20.0) * np.cos(y / 30.0)).astype(np.uint16)
    return [tf.io.encode_png(scan[..., None]).numpy()] * len(offsets)


def warmup_record(pngs: list[bytes], model_name: str = "tfseg") -> bytes:
    """One serialized PredictionLog holding a serving_default PredictRequest for `pngs` ([1, K])."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
    request.inputs["slices"].CopyFrom(tf.make_tensor_proto([pngs], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return log.SerializeToString()


def export_info(config: config_lib.Config, source: Path | None, chunk: int) -> dict:
    d = config.data
    return {
        "tfseg_version": __version__,
        "classes": list(CLASSES),
        "offsets": list(d.offsets),
        "threshold": config.train.threshold,
        "min_component": config.train.min_component,
        "min_component_fraction": config.train.min_component_fraction,
        "input_size": list(d.image_size),
        "clip_percentiles": list(d.clip_percentiles),
        "resize": d.resize,
        "chunk": chunk,
        "source": {"path": str(source), "sha256": files.sha256(source)} if source else None,
        "signatures": {
            "serving_default": "slices string [N, K] 16-bit PNGs -> probabilities float32 [N, H, W, 3], "
                               "masks uint8 [N, H, W, 3]",
            "predict_float": "scans float32 [N, h, w, K] normalised -> probabilities float32 [N, h, w, 3]",
        },
        "config": config_lib.to_dict(config),
    }


def reason(message: str) -> str:
    """The line of a TensorFlow error message that says what is wrong with the request."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    asserted = [line for line in lines if "assertion failed" in line]
    return (asserted or lines[-2:-1] or lines)[0].strip()


def read_info(saved_model: str | os.PathLike) -> dict:
    """The tfseg.json written beside a SavedModel by export (classes, offsets, threshold, config)."""
    path = Path(saved_model) / "assets.extra" / INFO_FILE
    if not path.exists():
        raise DataError(f"{saved_model}: no assets.extra/{INFO_FILE}; not a SavedModel written by tfseg.export")
    return json.loads(path.read_text())


# ---- writing ---------------------------------------------------------------------------------------

def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def _check_target(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if not out.name.isdigit():
        raise DataError(f"{out}: TF Serving needs a numbered version folder, e.g. {out}/1")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it, or export a new version "
                        f"({out.parent / str(next_version(out.parent))})")
    return out


@contextlib.contextmanager
def _atomic_dir(out: Path, overwrite: bool):
    """Yield a temporary folder beside `out`; it becomes `out` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            if not overwrite:  # appeared while we worked
                raise DataError(f"{out}: already exists; pass --overwrite to replace it")
            old = out.parent / f"{tmp.name}.old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_saved_model(model: keras.Model, config: config_lib.Config, out: str | os.PathLike, *,
                      overwrite: bool = False, chunk: int = 16, source: Path | None = None,
                      verbose: bool = True) -> Path:
    """Write `model` (float32) as the SavedModel version folder `out`, atomically; returns `out`."""
    out = _check_target(out, overwrite)
    if chunk < 1:
        raise DataError(f"--chunk must be >= 1, got {chunk}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (fn, signature) in serving_functions(model, config, chunk).items():
        archive.add_endpoint(name, fn, input_signature=signature)
    warmup = sample_context(config)
    with _atomic_dir(out, overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
        extra = tmp / "assets.extra"
        extra.mkdir()
        with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
            writer.write(warmup_record(warmup))
        files.write_json(extra / INFO_FILE, export_info(config, source, chunk))
        # Answer the warm-up request from the written files before publishing them.
        answer = tf.saved_model.load(str(tmp)).signatures["serving_default"](slices=tf.constant([warmup]))
        if verbose:
            print(f"warm-up request answered: masks {answer['masks'].shape}, "
                  f"{int(tf.reduce_sum(tf.cast(answer['masks'], tf.int32)))} organ pixels")
    return out


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
           chunk: int = 16, verbose: bool = True) -> Path:
    """Write the run's model as the SavedModel `out` (a numbered version folder); returns `out`."""
    _check_target(out, overwrite)  # fail before loading anything
    config, model, source = load_run_model(run_dir)
    write_saved_model(model, config, out, overwrite=overwrite, chunk=chunk, source=source, verbose=verbose)
    if verbose:
        print(f"exported {source} -> {out} (signatures serving_default, predict_float)")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by tfseg.train (config.yaml + model)")
    parser.add_argument("--out", help=f"version folder to write, e.g. {paths.SAVED_MODELS_DIR}/NAME/1 "
                                      f"(default: {paths.SAVED_MODELS_DIR}/<run name>/<next version>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the version folder if it exists")
    parser.add_argument("--chunk", type=int, default=16,
                        help="slices the model processes at once inside the graph; bounds memory for "
                             "whole-volume requests (default: 16)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else Path(paths.SAVED_MODELS_DIR) / run.resolve().name
    if not args.out:
        out = out / str(next_version(out))
    export(run, out, overwrite=args.overwrite, chunk=args.chunk)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
