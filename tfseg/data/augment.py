"""Training augmentation, driven by AugmentConfig and stateless seeds (same seed, same result).

- augment_batch: geometry per example (flips, rotation, scale, shift, grid distortion), the SAME
  sampling coordinates for scan and mask: bilinear for the scan, nearest for the mask, so masks stay
  0/1 and aligned; then coarse dropout on the scan only.
- augment_volume: intensity (gamma, contrast, brightness, Gaussian noise) on the scan only, one draw
  per volume: scans differ in intensity from scan to scan, not from slice to slice, and a volume's
  single channel costs a third of its 2.5D copies. It stays in the input pipeline.
- finish_batch: a batch as the pipeline holds it (uint16 scans, packed masks) -> the model's floats,
  through augment_batch; in the pipeline (augment.device: host) or in the train step (accelerator).

Why not Keras' layers: RandomRotation/RandomZoom/RandomTranslation would resample three times, and
RandomElasticTransform warps image and mask with different fields. Why not
keras.ops.image.affine_transform (ImageProjectiveTransformV3): it cannot add the grid distortion in
the same pass, and our XLA-compiled gather sampler does both in one resampling at twice its speed.
Random numbers come from tf.random.stateless_*: keras.random takes only an int or a SeedGenerator
(a variable), neither of which gives a per-element seed inside a tf.data map.
"""

import functools
import math
import statistics

import numpy as np
import tensorflow as tf
from keras import ops

from tfseg.config import AugmentConfig

GRID_CELLS = 5  # grid distortion: cells per axis whose borders move
QUANT = 65535.0  # scans in [0, 1] <-> uint16
BITS = (1, 2, 4)  # pack_masks: class k in bit k


def _uniform(seed, shape, low, high):
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def _sign(seed, n, enabled: bool):
    """-1 (flip) or +1 with equal chance per example; always +1 when the flip is switched off."""
    if not enabled:
        return tf.ones([n])
    return ops.where(_uniform(seed, [n], 0.0, 1.0) < 0.5, -1.0, 1.0)


def affine_transforms(config: AugmentConfig, n, height, width, seeds) -> tf.Tensor:
    """[n, 6] affine maps from output pixel (x, y) to input pixel (a0 x + a1 y + a2, b0 x + b1 y + b2):
    input = centre + R(angle) diag(flip_x, flip_y) (output - centre) / zoom - shift."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    angle = _uniform(seeds[0], [n], -1.0, 1.0) * (config.rotation_degrees * math.pi / 180)
    zoom = _uniform(seeds[1], [n], 1 - config.scale, 1 + config.scale)
    shift_x = _uniform(seeds[2], [n], -1.0, 1.0) * config.shift * w
    shift_y = _uniform(seeds[3], [n], -1.0, 1.0) * config.shift * h
    flip_x = _sign(seeds[4], n, config.flip_horizontal)
    flip_y = _sign(seeds[5], n, config.flip_vertical)
    cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom
    a0, a1, b0, b1 = cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return ops.stack([a0, a1, cx - a0 * cx - a1 * cy - shift_x, b0, b1, cy - b0 * cx - b1 * cy - shift_y], axis=1)


def grid_coordinates(amount: float, n, length, seed) -> tf.Tensor:
    """[n, length] distorted coordinate of every position along one axis: a random piecewise-linear map
    whose GRID_CELLS - 1 inner nodes move by up to `amount` of the length (ends fixed), as in
    albumentations' GridDistortion. amount 0 gives the plain positions 0 .. length - 1."""
    pos = tf.range(length, dtype=tf.float32)
    if amount <= 0:
        return tf.broadcast_to(pos, tf.stack([n, length]))
    step = tf.cast(length - 1, tf.float32) / GRID_CELLS
    # Nodes move less than half a cell, so the map stays monotonic: the image never folds over.
    amount = min(amount, 0.49 / GRID_CELLS)
    moves = _uniform(seed, [n, GRID_CELLS - 1], -amount, amount) * tf.cast(length, tf.float32)
    nodes = tf.range(GRID_CELLS + 1, dtype=tf.float32) * step + tf.pad(moves, [[0, 0], [1, 1]])
    cell = tf.minimum(ops.floor(pos / step), GRID_CELLS - 1)
    frac = pos / step - cell
    cell = tf.cast(cell, tf.int32)
    return tf.gather(nodes, cell, axis=1) * (1 - frac) + tf.gather(nodes, cell + 1, axis=1) * frac


def _take(images, ys, xs):
    """images [n, H, W, C] at integer pixels ys, xs [n, H', W']; 0 outside the image."""
    shape = tf.shape(images)
    inside = (ys >= 0) & (ys < shape[1]) & (xs >= 0) & (xs < shape[2])
    ys, xs = tf.clip_by_value(ys, 0, shape[1] - 1), tf.clip_by_value(xs, 0, shape[2] - 1)
    batch = tf.broadcast_to(tf.range(shape[0])[:, None, None], tf.shape(ys))
    values = tf.gather_nd(images, tf.stack([batch, ys, xs], axis=-1))  # keras.ops has no gather_nd
    return tf.where(inside[..., None], values, tf.zeros_like(values))


@tf.function(jit_compile=True)  # XLA fuses the coordinate maths and the gathers: 2x ImageProjectiveTransform
def warp(images, masks, transforms, rows, cols):
    """Resample images (bilinear) and masks (nearest) [n, H, W, *] at the same source coordinates:
    output pixel (y, x) reads input transforms[n] @ (cols[n, x], rows[n, y], 1); 0 outside."""
    a = transforms[:, :, None, None]
    y, x = rows[:, :, None], cols[:, None, :]
    xs = a[:, 0] * x + a[:, 1] * y + a[:, 2]
    ys = a[:, 3] * x + a[:, 4] * y + a[:, 5]
    masks = _take(masks, tf.cast(tf.round(ys), tf.int32), tf.cast(tf.round(xs), tf.int32))
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    top = _take(images, y0, x0) * (1 - wx) + _take(images, y0, x0 + 1) * wx
    bottom = _take(images, y0 + 1, x0) * (1 - wx) + _take(images, y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy, masks


def _holes(n, height, width, holes: int, size: float, seed):
    """Corners [n, holes, 1] and sides of `holes` random rectangles of side `size` of the image."""
    hole_h = tf.maximum(1, tf.cast(tf.round(size * tf.cast(height, tf.float32)), tf.int32))
    hole_w = tf.maximum(1, tf.cast(tf.round(size * tf.cast(width, tf.float32)), tf.int32))
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    top = tf.random.stateless_uniform([n, holes, 1], seed_y, 0, height - hole_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([n, holes, 1], seed_x, 0, width - hole_w + 1, dtype=tf.int32)
    return top, left, hole_h, hole_w


@tf.function(jit_compile=True)  # one pass; the warp reads float32 faster than integers
def _scaled(images, scale):
    return tf.cast(images, tf.float32) * scale


@tf.function(jit_compile=True)  # XLA: the [n, holes, H, W] hole test never materialises
def _cut_holes(images, top, left, hole_h, hole_w):
    shape = tf.shape(images)
    rows, cols = tf.range(shape[1])[None, None], tf.range(shape[2])[None, None]
    in_rows = (rows >= top) & (rows < top + hole_h)  # [n, holes, H]
    in_cols = (cols >= left) & (cols < left + hole_w)  # [n, holes, W]
    hit = tf.reduce_any(in_rows[..., :, None] & in_cols[..., None, :], axis=1)  # [n, H, W]
    return tf.where(hit[..., None], tf.zeros_like(images), images)


def has_geometry(config: AugmentConfig) -> bool:
    return bool(config.flip_horizontal or config.flip_vertical or config.rotation_degrees
                or config.scale or config.shift or config.grid_distortion > 0)


def augment_batch(images, masks, config: AugmentConfig, seed, scale: float = 1.0, group: int = 1):
    """images [B, H, W, C] (any number type), masks [B, H, W, K] of 0/1 (any dtype), seed int [2] ->
    (float32 images * scale, masks) with the same geometry applied to both (masks keep their shape and
    dtype and stay exactly 0/1), then coarse dropout on the scan. Each run of `group` consecutive
    examples (the slices of a 3D patch) shares one draw of geometry and holes."""
    if images.dtype != tf.float32 or scale != 1:
        images = _scaled(images, scale)
    if not config.enabled:
        return images, masks
    seeds = tf.random.experimental.stateless_split(seed, 9)
    shape = tf.shape(images)
    n, height, width = shape[0] // group, shape[1], shape[2]

    def shared(draws):
        return draws if group == 1 else tf.repeat(draws, group, axis=0)

    if has_geometry(config):
        transforms = affine_transforms(config, n, height, width, seeds[:6])
        rows = grid_coordinates(config.grid_distortion, n, height, seeds[6])
        cols = grid_coordinates(config.grid_distortion, n, width, seeds[7])
        images, masks = warp(images, masks, shared(transforms), shared(rows), shared(cols))
    if config.dropout_holes > 0:
        top, left, hole_h, hole_w = _holes(n, height, width, config.dropout_holes, config.dropout_size, seeds[8])
        images = _cut_holes(images, shared(top), shared(left), hole_h, hole_w)
    return images, masks


@tf.function(jit_compile=True)  # one pass instead of four
def pack_masks(masks) -> tf.Tensor:
    """Masks [..., 3] of 0/1 -> uint8 [..., 1] with class k in bit k: resizing, cropping, caching and the
    nearest-neighbour warp move one byte per pixel instead of three."""
    bits = tf.cast(masks > 0, tf.uint8) * tf.constant(BITS, tf.uint8)
    return tf.reduce_sum(bits, axis=-1, keepdims=True)


@tf.function(jit_compile=True)  # one pass instead of three
def unpack_masks(packed, dtype=tf.float32) -> tf.Tensor:
    """pack_masks' inverse: uint8 [..., 1] -> [..., 3] of 0/1 in `dtype`."""
    return tf.cast(tf.bitwise.bitwise_and(packed, tf.constant(BITS, tf.uint8)) > 0, dtype)


def finish_batch(images, packed_masks, seed, config: AugmentConfig):
    """A training batch as the pipeline holds it (scans uint16 [B, H, W, C], packed masks uint8
    [B, H, W, 1]) -> the model's (x float32 in [0, 1], y float32 [B, H, W, 3]), augmented with `seed`.
    The same function runs in the input pipeline (augment.device: host) or in the replica's train step
    (accelerator): same seed, same batch. A 3D batch (patches [B, D, H, W, 1]) gets one geometry per
    patch, the same for all its slices."""
    if len(images.shape) == 5:
        shape = tf.shape(images)
        flat = [tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)) for t in (images, packed_masks)]
        x, packed_masks = augment_batch(*flat, config, seed, 1 / QUANT, group=images.shape[1])
        return tf.reshape(x, shape), unpack_masks(tf.reshape(packed_masks, shape))
    x, packed_masks = augment_batch(images, packed_masks, config, seed, 1 / QUANT)
    return x, unpack_masks(packed_masks)


def quantize(volume) -> tf.Tensor:
    """Values in [0, 1] -> uint16 (to 1.5e-5): scans wait in caches and shuffle buffers at half the bytes."""
    return tf.cast(volume * QUANT + 0.5, tf.uint16)  # >= 0: truncation rounds


@functools.cache
def _normal_table() -> np.ndarray:
    """The standard normal's quantiles at the centres of 65,536 equal-probability bins."""
    return np.array([statistics.NormalDist().inv_cdf((i + 0.5) / 65536) for i in range(65536)], np.float32)


def gaussian_noise_index(shape, seed) -> tf.Tensor:
    """16 random bits per value (int32 indices into _normal_table): a table lookup of uniform bits gives
    normal noise (to 1/65536 in probability, tails cut at 4.2 sigma) at a quarter of the cost of
    tf.random.stateless_normal on CPU."""
    count = tf.reduce_prod(shape)
    words = tf.random.stateless_uniform([(count + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32)
    halves = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:count]
    return tf.reshape(tf.cast(halves, tf.int32), shape)


def augment_volume(volume, config: AugmentConfig, seed):
    """Scan intensities of a uint16-quantised volume [D, H, W] (any shape: one draw for all of it):
    gamma, contrast about the mean, brightness, Gaussian noise; clipped to [0, 1], uint16 again."""
    if not config.enabled:
        return volume
    seeds = tf.random.experimental.stateless_split(seed, 4)
    draw = lambda i, spread, centre: _uniform(seeds[i], [], centre - spread, centre + spread)
    noise = gaussian_noise_index(tf.shape(volume), seeds[3]) if config.noise_std > 0 else tf.zeros([], tf.int32)
    return _intensity(volume, draw(0, config.gamma, 1.0), draw(1, config.contrast, 1.0),
                      draw(2, config.brightness, 0.0), noise, _normal_table() * config.noise_std,
                      config.gamma > 0, config.noise_std > 0)


@tf.function(jit_compile=True)  # one fused pass over the volume: decode, intensity, noise lookup, encode
def _intensity(volume, gamma, contrast, brightness, noise_index, noise_table, use_gamma: bool, use_noise: bool):
    volume = tf.cast(volume, tf.float32) * (1 / QUANT)
    if use_gamma:  # x^g as exp(g log x): twice as fast as pow here, and 0 stays 0 (log 0 = -inf)
        volume = tf.exp(gamma * tf.math.log(volume))
    volume = volume * contrast + ((1 - contrast) * tf.reduce_mean(volume) + brightness)
    if use_noise:
        volume += tf.gather(noise_table, noise_index)
    return quantize(tf.clip_by_value(volume, 0.0, 1.0))
