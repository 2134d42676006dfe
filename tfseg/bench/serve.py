"""Serving speed on this CPU: latency and throughput of requests of 1, 8 and 32 slices and of a whole
144-slice volume for the SavedModel's PNG signature (decode, normalise, resize, model, resize back,
threshold: all in the graph) and its float signature (model only), the Keras model (predict_on_batch)
beside them, and the size of a whole volume's REST answer from the masks_png signature. The volume
case: a whole 144-slice volume in one serving_volume request (each slice sent once; the graph builds
the contexts) against the same volume through the per-slice masks_png signature, in one request of 144
context rows and in 144 one-row requests (what a client sending slice by slice does).

With --run the run's model is measured; otherwise the model of --config (configs/cpu.yaml) with
random weights, which is as fast as a trained one.
"""

import base64
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tfseg import cli
from tfseg.config import load_config
from tfseg.data.context import context_rows
from tfseg.kaggle.scans import encode_png
from tfseg.layout import MASKS_PNG, PREDICT_FLOAT, SIGNATURE, VOLUME_SIGNATURE

SIZES = (1, 8, 32)  # slices per request
VOLUME = 144  # slices of a whole-volume request (most real volumes)


def add_arguments(parser) -> None:
    parser.add_argument("--run", metavar="DIR", help="run folder whose model to measure (default: random weights)")
    parser.add_argument("--config", default="configs/cpu.yaml",
                        help="config of the random-weights model when there is no --run (default: %(default)s)")
    parser.add_argument("--repeats", type=cli.at_least(1), default=10, metavar="N",
                        help="timed calls per measurement, after two warm-up calls (default: %(default)s)")


def _seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after two warm-up calls (tracing, oneDNN primitive caches)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _scans(offsets) -> tuple[list[bytes], list[list[bytes]], tuple[int, int]]:
    """A synthetic volume's slices as the PNG bytes a client sends, their K-slice contexts, its (H, W)."""
    from tfseg.kaggle import synth  # SciPy and OpenCV: not for `python -m tfseg.bench --help`

    volume = synth.plan_volumes(cases=1, seed=0, days=1, num_slices=VOLUME)[0]
    image, _ = synth.render_volume(volume, seed=0)
    pngs = [encode_png(s) for s in image]
    return pngs, context_rows(pngs, offsets), image.shape[1:]


def run(args) -> dict:
    import tensorflow as tf  # here, not at import: `python -m tfseg.bench --help` lists every benchmark at once

    from tfseg.serving.savedmodel import write_saved_model
    from tfseg.training.run_folder import load_run_model

    if args.run:
        config, model, _ = load_run_model(args.run)
        print(f"model of {args.run}")
    else:
        from tfseg.model.build import build_model

        config = load_config(args.config if Path(args.config).exists() else None, ["train.precision=float32"])
        model = build_model(config)
        print(f"model of {args.config} with random weights (float32; speed does not depend on the weights)")
    pngs, rows, scan_hw = _scans(config.data.offsets)
    height, width = config.data.image_size
    print(f"scans {scan_hw[1]} x {scan_hw[0]} px, model input {width} x {height} x {len(config.data.offsets)}, "
          f"{model.count_params():,} parameters")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_saved_model(model, config, Path(tmp) / "1", verbose=False)
        loaded = tf.saved_model.load(str(path))
    png, floats = loaded.signatures[SIGNATURE], loaded.signatures[PREDICT_FLOAT]
    masks_png, serving_volume = loaded.signatures[MASKS_PNG], loaded.signatures[VOLUME_SIGNATURE]
    rng = np.random.default_rng(0)
    sizes = (*SIZES, VOLUME)
    scans = {n: rng.random((n, height, width, len(config.data.offsets)), dtype=np.float32) for n in sizes}
    middle = VOLUME // 2
    requests = {n: tf.constant(rows[middle:middle + n]) for n in SIZES} | {VOLUME: tf.constant(rows)}
    calls = {
        "png": lambda n: png(slices=requests[n])["masks"].numpy(),
        "float": lambda n: floats(scans=tf.constant(scans[n]))["probabilities"].numpy(),
        "keras": lambda n: model.predict_on_batch(scans[n]),
    }
    figures = {}
    for name, call in calls.items():
        for n in sizes:
            label = "volume" if n == VOLUME else f"b{n}"
            repeats = args.repeats if n < VOLUME else max(2, args.repeats // 4)
            seconds = _seconds(lambda call=call, n=n: call(n), repeats)
            figures[f"{name}_latency_ms_{label}"] = 1000 * seconds
            figures[f"{name}_slices_per_s_{label}"] = n / seconds
    figures["png_over_float_latency_b1"] = figures["png_latency_ms_b1"] / figures["float_latency_ms_b1"]
    figures["png_over_float_latency_volume"] = figures["png_latency_ms_volume"] / figures["float_latency_ms_volume"]
    figures |= _volume_case(serving_volume, masks_png, pngs, rows, max(1, args.repeats // 4))
    answer = masks_png(slices=requests[VOLUME])["masks_png"].numpy()
    rest = json.dumps({"predictions": [{"b64": base64.b64encode(b).decode()} for b in answer]})
    figures["rest_masks_png_volume_kb"] = len(rest) / 1000
    one = png(slices=requests[1])
    figures["rest_serving_default_slice_kb"] = len(json.dumps({"predictions": [
        {key: value[0].numpy().tolist() for key, value in one.items()}]})) / 1000
    return figures


def _volume_case(serving_volume, masks_png, pngs: list[bytes], rows: list[list[bytes]], repeats: int) -> dict:
    """One volume's mask PNGs three ways: one serving_volume request, one masks_png request of every
    context row, one masks_png request per slice."""
    import tensorflow as tf
    volume, all_rows = tf.constant(pngs), tf.constant(rows)
    one_by_one = [tf.constant([row]) for row in rows]
    seconds = {
        "serving_volume": _seconds(lambda: serving_volume(slices=volume)["masks_png"].numpy(), repeats),
        "masks_png": _seconds(lambda: masks_png(slices=all_rows)["masks_png"].numpy(), repeats),
        "masks_png_one_by_one": _seconds(lambda: [masks_png(slices=r)["masks_png"].numpy() for r in one_by_one],
                                         repeats),
    }
    figures = {f"{name}_latency_ms_volume": 1000 * value for name, value in seconds.items()}
    figures |= {f"{name}_slices_per_s_volume": len(pngs) / value for name, value in seconds.items()}
    figures["masks_png_over_serving_volume_latency"] = seconds["masks_png"] / seconds["serving_volume"]
    figures["one_by_one_over_serving_volume_latency"] = seconds["masks_png_one_by_one"] / seconds["serving_volume"]
    figures["serving_volume_request_mb"] = sum(map(len, pngs)) / 1e6
    figures["masks_png_request_mb_volume"] = sum(len(p) for row in rows for p in row) / 1e6
    return figures
