"""Augmentation: scan and mask get the same geometry, masks stay 0/1, seeds make it repeatable."""

import dataclasses
import statistics

import numpy as np
import pytest
import tensorflow as tf

from tfseg.config import AugmentConfig
from tfseg.data import augment

GEOMETRY_ONLY = AugmentConfig(flip_horizontal=True, flip_vertical=True, rotation_degrees=30, scale=0.2,
                              shift=0.1, grid_distortion=0.03)


def shapes_batch(n: int = 8, size: int = 96, seed: int = 0):
    """Scans with sharp rectangles and discs (0.8 on 0.2), one set per channel; mask = scan > 0.5."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size, 3), 0.2, np.float32)
    for b in range(n):
        for c in range(3):
            for _ in range(3):
                y, x, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(4, 14)
                inside = (yy - y) ** 2 + (xx - x) ** 2 < r * r if rng.random() < 0.5 else \
                    (abs(yy - y) < r) & (abs(xx - x) < 2 * r // 3)
                images[b, inside, c] = 0.8
    return tf.constant(images), tf.constant((images > 0.5).astype(np.float32))


def run(images, masks, config, seed=(1, 2)):
    out = augment.augment_batch(images, masks, config, tf.constant(seed, tf.int64))
    return out[0].numpy(), out[1].numpy()


def test_geometry_keeps_scan_and_mask_aligned():
    images, masks = shapes_batch()
    x, y = run(images, masks, GEOMETRY_ONLY)
    assert not np.array_equal(y, masks.numpy())  # something moved
    aligned = np.mean((x > 0.5) != (y > 0.5))
    assert aligned < 0.01, f"{aligned:.2%} of pixels disagree"
    # the check has teeth: the same masks under another draw of the transform disagree a lot
    _, other = run(images, masks, GEOMETRY_ONLY, seed=(7, 7))
    unaligned = np.mean((x > 0.5) != (other > 0.5))
    assert unaligned > 0.05 and unaligned > 10 * aligned, (aligned, unaligned)


def test_masks_stay_binary_and_keep_their_dtype():
    images, masks = shapes_batch(seed=1)
    config = dataclasses.replace(AugmentConfig(), grid_distortion=0.05, dropout_holes=3)
    x, y = run(images, tf.cast(masks, tf.uint8), config)
    assert x.shape == images.shape and y.shape == masks.shape
    assert x.dtype == np.float32 and y.dtype == np.uint8
    assert set(np.unique(y)) == {0, 1}
    assert x.min() >= 0 and x.max() <= 1


def test_same_seed_same_batch_other_seed_differs():
    images, masks = shapes_batch(seed=2)
    config = dataclasses.replace(AugmentConfig(), grid_distortion=0.05, dropout_holes=2)
    a, b, c = run(images, masks, config), run(images, masks, config), run(images, masks, config, seed=(1, 3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_dropout_touches_the_scan_only():
    images, masks = shapes_batch(seed=3)
    plain = run(images, masks, GEOMETRY_ONLY)
    x, y = run(images, masks, dataclasses.replace(GEOMETRY_ONLY, dropout_holes=2, dropout_size=0.2))
    np.testing.assert_array_equal(y, plain[1])  # masks untouched
    changed = (x != plain[0]).any(axis=-1)
    assert (x[changed] == 0).all()  # only zeros were written
    zeros = (x == 0).all(axis=-1)
    assert all(z.sum() >= (0.2 * 96) ** 2 for z in zeros)  # at least one whole hole per example


def test_flips_are_exact_and_shared():
    images, masks = shapes_batch(seed=4)
    config = AugmentConfig(flip_horizontal=True, rotation_degrees=0, scale=0, shift=0)
    x, y = run(images, masks, config)
    flipped = []
    for k in range(len(x)):
        mirror = np.array_equal(x[k], images[k, :, ::-1].numpy())
        assert mirror or np.array_equal(x[k], images[k].numpy())
        np.testing.assert_array_equal(y[k], (masks[k, :, ::-1] if mirror else masks[k]).numpy())
        flipped.append(mirror)
    assert 0 < sum(flipped) < len(x)


@pytest.mark.parametrize("config", [AugmentConfig(enabled=False),
                                    AugmentConfig(flip_horizontal=False, rotation_degrees=0, scale=0, shift=0)])
def test_switched_off_is_identity(config):
    images, masks = shapes_batch(n=2, seed=5)
    x, y = run(images, masks, config)
    np.testing.assert_array_equal(x, images.numpy())
    np.testing.assert_array_equal(y, masks.numpy())


def volume_intensity(config, seed=(3, 4)):
    """A ramp volume in [0, 1] and its augmented copy, through the uint16 form the pipeline keeps."""
    volume = augment.quantize(np.linspace(0, 1, 4 * 20 * 30, dtype=np.float32).reshape(4, 20, 30))
    out = augment.augment_volume(volume, config, tf.constant(seed, tf.int64))
    assert out.dtype == tf.uint16
    return volume.numpy() / augment.QUANT, out.numpy() / augment.QUANT


def test_volume_intensity_is_seeded_and_stays_in_range():
    config = AugmentConfig(gamma=0.3, contrast=0.3, brightness=0.1, noise_std=0.02)
    volume, a = volume_intensity(config)
    _, b = volume_intensity(config)
    _, c = volume_intensity(config, seed=(3, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(volume_intensity(AugmentConfig(enabled=False))[1], volume)


@pytest.mark.parametrize("key, value", [("gamma", 0.3), ("contrast", 0.3), ("brightness", 0.1)])
def test_each_volume_intensity_change_is_one_monotonic_map(key, value):
    off = dict(gamma=0, contrast=0, brightness=0, noise_std=0)
    volume, out = volume_intensity(AugmentConfig(**{**off, key: value}))
    assert not np.allclose(out, volume)
    assert (np.diff(out.ravel()) >= -1e-6).all()  # one draw per volume: order of intensities kept


def test_noise_has_the_configured_spread():
    off = dict(gamma=0, contrast=0, brightness=0)
    volume, out = volume_intensity(AugmentConfig(**off, noise_std=0.02))
    inner = (volume > 0.1) & (volume < 0.9)  # away from the clip at 0 and 1
    assert abs(np.std(out[inner] - volume[inner]) - 0.02) < 0.002


def test_table_noise_is_standard_normal():
    index = augment.gaussian_noise_index(tf.constant([400, 501]), tf.constant([5, 6], tf.int64))
    noise = np.asarray(augment._normal_table())[index.numpy()].ravel()
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    qs = [0.001, 0.025, 0.16, 0.5, 0.84, 0.975, 0.999]
    normal = [statistics.NormalDist().inv_cdf(q) for q in qs]
    np.testing.assert_allclose(np.quantile(noise, qs), normal, atol=0.03)
    assert len(np.unique(index.numpy())) > 60000  # all 16 bits are random, not a few repeated values


def test_packed_masks_round_trip():
    masks = (np.random.default_rng(0).random((2, 5, 7, 3)) < 0.5).astype(np.uint8)
    packed = augment.pack_masks(masks)
    assert packed.shape == (2, 5, 7, 1) and packed.dtype == tf.uint8
    np.testing.assert_array_equal(augment.unpack_masks(packed, tf.uint8).numpy(), masks)
