"""Whole-volume inference for 3D models: overlapping windows, Gaussian-weighted (nnU-Net's rule).

One implementation, written in TensorFlow ops so that evaluate, predict and a SavedModel signature
(a volume of any depth) run the same graph. The windows are evaluated window_batch at a time, so
memory grows with the window batch and the volume, not with the number of windows.
"""

import numpy as np
import tensorflow as tf

from tfseg import CLASSES
from tfseg.data.pipeline import window_corners

SIGMA_SCALE = 1 / 8  # nnU-Net: sigma of the window weighting = 1/8 of the patch size per axis


def gaussian_weights(patch_size, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """[d, h, w, 1] float32 weights of a window's voxels: a Gaussian centred on the window with sigma =
    sigma_scale x the patch size per axis, 1 at the centre. Voxels near a window's border, which see
    little context, count less where windows overlap."""
    weights = np.ones((), np.float64)
    for size in patch_size:
        offsets = np.arange(size) - (size - 1) / 2
        weights = np.multiply.outer(weights, np.exp(-0.5 * (offsets / (sigma_scale * size)) ** 2))
    return (weights / weights.max()).astype(np.float32)[..., None]


def sliding_window_probabilities(predict_fn, volume, patch_size, *, overlap: float = 0.5, window_batch: int = 4,
                                 num_classes: int = len(CLASSES), sigma_scale: float = SIGMA_SCALE) -> tf.Tensor:
    """Probabilities float32 [D, H, W, num_classes] of a volume float32 [D, H, W, C] (normalised and resized as
    training does), from windows of patch_size (d, h, w) that overlap by `overlap` of the patch along each
    axis, each window's output weighted by gaussian_weights and the weighted outputs averaged per voxel.

    predict_fn maps windows [n, d, h, w, C] (n <= window_batch) to probabilities [n, d, h, w, num_classes].
    A volume that is one window gives exactly predict_fn's output; the result does not depend on
    window_batch (up to float rounding of the sums). A volume smaller than the patch along any axis is an
    error (tf.errors.InvalidArgumentError; INVALID_ARGUMENT in serving): the caller pads or refuses it.
    Runs eagerly or inside a tf.function / SavedModel with D, H, W unknown until run time.
    """
    volume = tf.convert_to_tensor(volume, tf.float32)
    if volume.shape.rank != 4:
        raise ValueError(f"sliding_window_probabilities: volume must be [D, H, W, C], got shape {volume.shape}")
    patch = [int(s) for s in patch_size]
    if len(patch) != 3 or min(patch) < 1 or window_batch < 1 or not 0 <= overlap < 1:
        raise ValueError(f"sliding_window_probabilities: need patch_size (d, h, w) >= 1, window_batch >= 1 and "
                         f"overlap in [0, 1), got {patch_size}, {window_batch}, {overlap}")
    shape = tf.shape(volume)
    with tf.control_dependencies([tf.debugging.assert_greater_equal(
            shape[:3], tf.constant(patch), message=f"the volume [D, H, W] is smaller than the patch {patch} "
                                                   "(data.patch_size) along some axis")]):
        shape = tf.identity(shape)
    corners, grid = window_corners(shape[:3], patch, overlap)  # [M, 3], [d, h, w, 3]
    weights = tf.constant(gaussian_weights(patch, sigma_scale))
    count = tf.shape(corners)[0]

    def add_windows(first, total):
        index = corners[first:first + window_batch][:, None, None, None, :] + grid  # [n, d, h, w, 3]
        probabilities = tf.cast(predict_fn(tf.gather_nd(volume, index)), tf.float32)
        probabilities = tf.ensure_shape(probabilities, [None, *patch, num_classes])
        weighted = tf.concat([probabilities * weights, tf.broadcast_to(weights, tf.shape(probabilities[..., :1]))], -1)
        return first + window_batch, tf.tensor_scatter_nd_add(total, index, weighted)

    # Channels 0..K-1 sum the weighted probabilities, channel K the weights.
    total = tf.zeros(tf.concat([shape[:3], [num_classes + 1]], 0))
    _, total = tf.while_loop(lambda first, _: first < count, add_windows, (tf.constant(0), total))
    return total[..., :num_classes] / total[..., num_classes:]
