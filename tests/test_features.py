"""features.encode_volume writes the Example wire format itself: TensorFlow must read it as its own."""

import numpy as np
import pytest
import tensorflow as tf

from tfseg.records import features


def _tensorflow_example(volume: dict) -> tf.train.Example:
    def feature(name, values):
        kind = features.SPEC[name][0]
        if kind == "bytes":
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))
        if kind == "float":
            return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    values = {**volume, "case_day": [volume["case_day"].encode()], "spacing": volume["spacing"],
              **{k: [volume[k]] for k in ("case", "day", "fold", "height", "width")}}
    return tf.train.Example(features=tf.train.Features(feature={k: feature(k, values[k]) for k in features.SPEC}))


def _volume(seed: int, depth: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"case_day": f"case{seed}_day{depth}", "case": int(rng.integers(0, 2**40)), "day": -3, "fold": 0,
            "height": 360, "width": 310, "spacing": (1.5, float(rng.normal())),
            "slices": [int(s) for s in rng.integers(-5, 300, depth)],
            "image_png": [rng.bytes(int(n)) for n in rng.integers(0, 200_000, depth)],
            "mask_png": [rng.bytes(int(n)) for n in rng.integers(0, 300, depth)]}


@pytest.mark.parametrize(("seed", "depth"), [(0, 1), (1, 144), (2, 0)])
def test_tensorflow_reads_the_same_example(seed, depth):
    volume = _volume(seed, depth)
    ours = features.encode_volume(**volume)
    reference = _tensorflow_example(volume)
    assert tf.train.Example.FromString(ours) == reference
    assert len(ours) == len(reference.SerializeToString(deterministic=True))


def test_map_entries_in_key_order():
    """A fixed entry order is what makes the bytes the same in every process (issue: make_records)."""
    a = features.encode_volume(**_volume(1, 5))
    names = [name.encode() for name in sorted(features.SPEC)]
    positions = [a.index(b"\n" + bytes([len(n)]) + n) for n in names]
    assert positions == sorted(positions)
