"""The TFRecord feature spec: one tf.train.Example per case-day volume.

Writer (make_records), reader (records, data) and tests all use this module, so the format is
defined in one place. Slices are stored once, as PNG bytes: scans 16-bit single channel, masks
uint8 with 3 channels in tfseg.CLASSES order (0/1 values; organs may overlap).

The writer needs no TensorFlow: encode_volume writes the Example's protobuf wire format itself
(a test checks TensorFlow reads back the same Example, of the same size), so make_records'
worker processes build whole records without importing TensorFlow, and the parent only writes them.
"""

import struct

import numpy as np

# name -> (kind, shape): shape None is a variable-length list
SPEC = {
    "case_day": ("bytes", []),
    "case": ("int64", []),
    "day": ("int64", []),
    "fold": ("int64", []),
    "height": ("int64", []),
    "width": ("int64", []),
    "spacing": ("float", [2]),  # (pw, ph) in mm, as in the scan file name
    "slices": ("int64", None),
    "image_png": ("bytes", None),
    "mask_png": ("bytes", None),
}
_KIND_FIELD = {"bytes": 1, "float": 2, "int64": 3}  # Feature's oneof: bytes_list, float_list, int64_list


def feature_spec() -> dict:
    """SPEC as tf.io parsing features."""
    import tensorflow as tf

    dtypes = {"bytes": tf.string, "float": tf.float32, "int64": tf.int64}
    return {name: tf.io.VarLenFeature(dtypes[kind]) if shape is None
            else tf.io.FixedLenFeature(shape, dtypes[kind]) for name, (kind, shape) in SPEC.items()}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes of two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(kind: str, values) -> bytes:
    """A tf.train.Feature: BytesList repeats field 1; Float/Int64List pack it (omitted when empty)."""
    if kind == "bytes":
        body = b"".join(_field(1, bytes(v)) for v in values)
    else:
        packed = (struct.pack(f"<{len(values)}f", *values) if kind == "float"
                  else b"".join(_varint(int(v)) for v in values))
        body = _field(1, packed) if packed else b""
    return _field(_KIND_FIELD[kind], body)


def encode_volume(*, case_day: str, case: int, day: int, fold: int, height: int, width: int,
                  spacing: tuple[float, float], slices, image_png, mask_png) -> bytes:
    """Serialize one volume; image_png / mask_png are lists of already-encoded PNG bytes."""
    if not (len(slices) == len(image_png) == len(mask_png)):
        raise ValueError("slices, image_png and mask_png must have the same length")
    values = {"case_day": [case_day.encode()], "case": [case], "day": [day], "fold": [fold],
              "height": [height], "width": [width], "spacing": list(spacing), "slices": list(slices),
              "image_png": image_png, "mask_png": mask_png}
    # Features.feature is a map: entries (key 1, value 2) in key order, as C++ protobuf's deterministic
    # serialization writes them (make_records promises identical bytes across runs and worker counts).
    entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, _feature(SPEC[name][0], values[name])))
                       for name in sorted(SPEC))
    return _field(1, entries)


def parse_volume(serialized) -> dict:
    """Parse without decoding PNGs (cheap: lets a pipeline filter or shard before decoding)."""
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec())
    for key in ("slices", "image_png", "mask_png"):
        ex[key] = tf.sparse.to_dense(ex[key])
    return ex


def decode_volume(serialized) -> dict:
    """Parse and decode: image uint16 [D, H, W], mask uint8 [D, H, W, 3], plus metadata."""
    import tensorflow as tf

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
