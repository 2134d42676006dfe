"""Serving speed on this CPU: latency at batch 1 and throughput at batch 32 for the SavedModel's PNG
signature (decode, normalise, resize, model, resize back, threshold: all in the graph), its float
signature (model only) and the Keras model (predict_on_batch), on synthetic 16-bit scans.

With --run the run's model is measured; otherwise the model of --config (configs/cpu.yaml) with
random weights, which is as fast as a trained one.
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfseg.config import load_config
from tfseg.data.context import context_rows
from tfseg.kaggle import synth
from tfseg.kaggle.scans import encode_png
from tfseg.layout import PREDICT_FLOAT, SIGNATURE
from tfseg.serving.savedmodel import write_saved_model
from tfseg.training.run_folder import load_run_model

BATCH = 32


def add_arguments(parser) -> None:
    parser.add_argument("--run", metavar="DIR", help="run folder whose model to measure (default: random weights)")
    parser.add_argument("--config", default="configs/cpu.yaml",
                        help="config of the random-weights model when there is no --run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, metavar="N",
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


def _scans(offsets) -> tuple[list[list[bytes]], tuple[int, int]]:
    """K-slice contexts of a 32-slice synthetic volume as the PNG bytes a client sends, and its (H, W)."""
    volume = synth.plan_volumes(cases=1, seed=0, days=1, num_slices=BATCH)[0]
    image, _ = synth.render_volume(volume, seed=0)
    pngs = [encode_png(s) for s in image]
    return context_rows(pngs, offsets), image.shape[1:]


def run(args) -> dict:
    if args.run:
        config, model, _ = load_run_model(args.run)
        print(f"model of {args.run}")
    else:
        from tfseg.model.build import build_model

        config = load_config(args.config if Path(args.config).exists() else None, ["train.precision=float32"])
        model = build_model(config)
        print(f"model of {args.config} with random weights (float32; speed does not depend on the weights)")
    rows, scan_hw = _scans(config.data.offsets)
    height, width = config.data.image_size
    print(f"scans {scan_hw[1]} x {scan_hw[0]} px, model input {width} x {height} x {len(config.data.offsets)}, "
          f"{model.count_params():,} parameters")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_saved_model(model, config, Path(tmp) / "1", verbose=False)
        loaded = tf.saved_model.load(str(path))
    png = loaded.signatures[SIGNATURE]
    floats = loaded.signatures[PREDICT_FLOAT]
    rng = np.random.default_rng(0)
    scans = {n: rng.random((n, height, width, len(config.data.offsets)), dtype=np.float32) for n in (1, BATCH)}
    requests = {1: tf.constant(rows[BATCH // 2:BATCH // 2 + 1]), BATCH: tf.constant(rows)}
    calls = {
        "png": lambda n: png(slices=requests[n])["masks"].numpy(),
        "float": lambda n: floats(scans=tf.constant(scans[n]))["probabilities"].numpy(),
        "keras": lambda n: model.predict_on_batch(scans[n]),
    }
    figures = {}
    for name, call in calls.items():
        figures[f"{name}_latency_ms_b1"] = 1000 * _seconds(lambda call=call: call(1), args.repeats)
        figures[f"{name}_img_per_s_b{BATCH}"] = BATCH / _seconds(lambda call=call: call(BATCH), args.repeats)
    return figures
