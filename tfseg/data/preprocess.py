"""Preprocessing shared by training, evaluation and the serving graph: per-volume intensity
normalisation, resizing to the model size and back. One implementation, so a SavedModel sees its
inputs exactly as training did."""

import tensorflow as tf
from keras import ops

from tfseg.config import DataConfig

# Percentiles are read off a strided subsample of at most this many values: ordering a whole
# 144 x 360 x 310 volume (16 M values) would dominate the pipeline, and 2^18 evenly spread values pin
# the 0.5 / 99.5 percentiles to well under 1 % of the intensity range.
PERCENTILE_SAMPLES = 1 << 18


def percentiles(values, qs) -> tf.Tensor:
    """Percentiles (numpy's linear interpolation) of a strided subsample of `values`; deterministic.

    For uint16 scans the order statistics come from a histogram of the 65,536 possible values (one
    pass, exact); for other dtypes from top_k of the tail. Both give the same numbers.
    """
    flat = tf.reshape(values, [-1])
    stride = tf.maximum(1, -(-tf.size(flat) // PERCENTILE_SAMPLES))
    sample = tf.reshape(flat[::stride], [-1])  # reshape keeps the rank known
    last = tf.size(sample) - 1
    ranks = []
    for q in qs:
        pos = q / 100 * tf.cast(last, tf.float32)
        below = tf.cast(tf.floor(pos), tf.int32)
        ranks.append((pos, below, tf.minimum(below + 1, last)))
    if values.dtype == tf.uint16:
        # cumulative[v] = how many sample values are <= v; the value of rank r is the first v past r
        cumulative = tf.cumsum(tf.math.bincount(tf.cast(sample, tf.int32), minlength=65536, maxlength=65536))
        wanted = tf.stack([r for _, below, above in ranks for r in (below, above)])
        found = tf.cast(tf.searchsorted(cumulative, wanted, side="right"), tf.float32)
        pairs = [(found[2 * i], found[2 * i + 1]) for i in range(len(qs))]
    else:
        sample = tf.cast(sample, tf.float32)
        pairs = []
        for q, (_, below, above) in zip(qs, ranks, strict=True):
            # top_k of the tail instead of a full sort: clip percentiles sit near the ends, so k is small
            if q <= 50:
                ascending = -tf.math.top_k(-sample, above + 1).values
                pairs.append((tf.gather(ascending, below), tf.gather(ascending, above)))
            else:
                descending = tf.math.top_k(sample, last + 1 - below).values
                pairs.append((tf.gather(descending, last - below), tf.gather(descending, last - above)))
    return tf.stack([low + (high - low) * (pos - tf.floor(pos)) for (pos, _, _), (low, high) in zip(ranks, pairs,
                                                                                                      strict=True)])


def normalize(images, clip_percentiles) -> tf.Tensor:
    """Clip to the given percentiles of the whole tensor (a volume, or a serving request) and scale
    to float32 [0, 1]. Intensities differ a lot between scans, so this is per volume, not global."""
    low, high = tf.unstack(percentiles(images, clip_percentiles), num=2)
    scale = 1.0 / tf.maximum(high - low, 1e-6)
    return tf.clip_by_value(tf.cast(images, tf.float32) * scale - low * scale, 0.0, 1.0)


def resize_images(images, size, data_config: DataConfig) -> tf.Tensor:
    """Scans [N, H, W, C] in [0, 1] to `size`: interpolated (bilinear/area) or centre pad-and-crop."""
    if data_config.resize == "pad_crop":
        return tf.image.resize_with_crop_or_pad(images, size[0], size[1])
    resized = ops.image.resize(images, tuple(size), interpolation=data_config.interpolation)
    return ops.clip(resized, 0.0, 1.0)  # area sums can overshoot 1 by rounding


def resize_masks(masks, size, data_config: DataConfig) -> tf.Tensor:
    """Masks [N, H, W, K] to `size` with nearest neighbour (or centre pad-and-crop): values stay 0/1."""
    if data_config.resize == "pad_crop":
        return tf.image.resize_with_crop_or_pad(masks, size[0], size[1])
    return ops.image.resize(masks, tuple(size), interpolation="nearest")


def restore_size(pred, orig_hw, data_config: DataConfig) -> tf.Tensor:
    """Invert resize_images for predictions [N, h, w, K]: bilinear on probabilities back to the original
    (height, width) for `resize`; crop or pad back (same centre offsets) for `pad_crop`."""
    height, width = orig_hw
    if data_config.resize == "pad_crop":
        return tf.image.resize_with_crop_or_pad(pred, height, width)
    # tf.image.resize: in the serving graph orig_hw are tensors, which ops.image.resize rejects.
    return tf.image.resize(tf.cast(pred, tf.float32), tf.stack([height, width]), method="bilinear")
