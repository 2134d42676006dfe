"""The TFRecord feature spec: one tf.train.Example per case-day volume.

Writer (make_records), reader (records, data) and tests all use this module, so the format is
defined in one place. Slices are stored once, as PNG bytes: scans 16-bit single channel, masks
uint8 with 3 channels in tfseg.CLASSES order (0/1 values; organs may overlap).
"""

import numpy as np
import tensorflow as tf

FEATURES = {
    "case_day": tf.io.FixedLenFeature([], tf.string),
    "case": tf.io.FixedLenFeature([], tf.int64),
    "day": tf.io.FixedLenFeature([], tf.int64),
    "fold": tf.io.FixedLenFeature([], tf.int64),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "spacing": tf.io.FixedLenFeature([2], tf.float32),  # (pw, ph) in mm, as in the scan file name
    "slices": tf.io.VarLenFeature(tf.int64),
    "image_png": tf.io.VarLenFeature(tf.string),
    "mask_png": tf.io.VarLenFeature(tf.string),
}


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def encode_volume(*, case_day: str, case: int, day: int, fold: int, height: int, width: int,
                  spacing: tuple[float, float], slices, image_png, mask_png) -> bytes:
    """Serialize one volume; image_png / mask_png are lists of already-encoded PNG bytes."""
    if not (len(slices) == len(image_png) == len(mask_png)):
        raise ValueError("slices, image_png and mask_png must have the same length")
    feature = {
        "case_day": _bytes([case_day.encode()]),
        "case": _ints([case]),
        "day": _ints([day]),
        "fold": _ints([fold]),
        "height": _ints([height]),
        "width": _ints([width]),
        "spacing": _floats(spacing),
        "slices": _ints(slices),
        "image_png": _bytes(image_png),
        "mask_png": _bytes(mask_png),
    }
    # deterministic: the feature map's order otherwise depends on a per-process hash seed, and
    # make_records promises identical bytes across runs and worker counts.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def parse_volume(serialized: tf.Tensor) -> dict:
    """Parse without decoding PNGs (cheap: lets a pipeline filter or shard before decoding)."""
    ex = tf.io.parse_single_example(serialized, FEATURES)
    for key in ("slices", "image_png", "mask_png"):
        ex[key] = tf.sparse.to_dense(ex[key])
    return ex


def decode_volume(serialized: tf.Tensor) -> dict:
    """Parse and decode: image uint16 [D, H, W], mask uint8 [D, H, W, 3], plus metadata."""
    ex = parse_volume(serialized)
    h = tf.cast(ex["height"], tf.int32)
    w = tf.cast(ex["width"], tf.int32)
    image = tf.map_fn(lambda b: tf.io.decode_png(b, channels=1, dtype=tf.uint16)[..., 0],
                      ex.pop("image_png"), fn_output_signature=tf.TensorSpec([None, None], tf.uint16))
    mask = tf.map_fn(lambda b: tf.io.decode_png(b, channels=3, dtype=tf.uint8),
                     ex.pop("mask_png"), fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    ex["image"] = tf.reshape(image, tf.stack([-1, h, w]))
    ex["mask"] = tf.reshape(mask, tf.stack([-1, h, w, 3]))
    return ex


def numpy_volume(decoded: dict) -> dict:
    """Eager decoded volume -> plain Python/numpy values (what records.read_volumes yields)."""
    return {
        "case_day": decoded["case_day"].numpy().decode(),
        "case": int(decoded["case"]),
        "day": int(decoded["day"]),
        "fold": int(decoded["fold"]),
        "spacing": tuple(float(s) for s in decoded["spacing"].numpy()),
        "slices": decoded["slices"].numpy().astype(np.int64),
        "image": decoded["image"].numpy(),
        "mask": decoded["mask"].numpy(),
    }
