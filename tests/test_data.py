"""Input pipeline: 2.5D channels, resizing, sharding, determinism, keep_empty, evaluation reassembly."""

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfseg import layout
from tfseg.config import AugmentConfig, Config, DataConfig
from tfseg.data import augment, context, preprocess
from tfseg.data import pipeline as data
from tfseg.kaggle import scans
from tfseg.records import features, reader

DEPTH = 8
# fold -> shards -> volume ids; volume 7 is narrower (40 x 44) to exercise different original sizes
LAYOUT = {0: [[0, 1], [2, 3]], 1: [[4, 5, 6, 7]]}
SMALL = 7


def volume(v: int, height: int = 40, width: int = 48):
    """Slice i of volume v is the constant (i + 1) * 1000 + 10 v, so a normalised value times 7 is the
    slice index. Even slices carry organs: channel 0 encodes v (rows 0..v of columns 0..3), channel 1
    is random pixels, channel 2 a rectangle on every 4th slice; odd slices are organ-free."""
    if v == SMALL:
        width = 44
    image = np.stack([np.full((height, width), (i + 1) * 1000 + 10 * v, np.uint16) for i in range(DEPTH)])
    mask = np.zeros((DEPTH, height, width, 3), np.uint8)
    rng = np.random.default_rng(v)
    for i in range(0, DEPTH, 2):
        mask[i, : v + 1, :4, 0] = 1
        mask[i, ..., 1] = rng.random((height, width)) < 0.1
        if i % 4 == 0:
            mask[i, 10:20, 10:30, 2] = 1
    return image, mask


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """A records folder in make_records' layout: shards per fold listed in manifest.json."""
    root = tmp_path_factory.mktemp("records")
    shards = []
    for fold, fold_shards in LAYOUT.items():
        for k, ids in enumerate(fold_shards):
            name = layout.shard_name(fold, k, len(fold_shards))
            with tf.io.TFRecordWriter(str(root / name)) as writer:
                for v in ids:
                    image, mask = volume(v)
                    writer.write(features.encode_volume(
                        case_day=f"case{v}_day1", case=v, day=1, fold=fold, height=image.shape[1],
                        width=image.shape[2], spacing=(1.5, 1.5), slices=range(1, DEPTH + 1),
                        image_png=[scans.encode_png(s) for s in image],
                        mask_png=[scans.encode_png(m) for m in mask]))
            shards.append({"path": name, "slices": DEPTH * len(ids)})
    (root / "manifest.json").write_text(json.dumps({"settings": {"folds": len(LAYOUT)}, "shards": shards}))
    return root


def make_config(root, **data_keys) -> Config:
    keys = {"image_size": (40, 48), "batch_size": 4, "shuffle_buffer": 16, "deterministic": True, **data_keys}
    return Config(data=DataConfig(records=str(root), **keys), augment=AugmentConfig(enabled=False))


def batches(ds, n: int) -> list:
    return [tuple(t.numpy() for t in b) for b in ds.take(n)]


def volume_id(mask: np.ndarray) -> int:
    """The volume an organ slice came from (rows of channel 0's marker)."""
    return int(mask[:, :4, 0].any(axis=1).sum()) - 1


@pytest.mark.parametrize("offsets", [(-2, 0, 2), (0,), (-1, 0, 3), (1, 3)])
def test_context_stack_takes_clamped_neighbours(offsets):
    vol = np.arange(DEPTH, dtype=np.float32)[:, None, None] * np.ones((DEPTH, 3, 5), np.float32)
    stacked = context.context_stack(tf.constant(vol), offsets).numpy()
    assert stacked.shape == (DEPTH, 3, 5, len(offsets))
    for i in range(DEPTH):
        for c, o in enumerate(offsets):
            assert np.all(stacked[i, ..., c] == min(max(i + o, 0), DEPTH - 1))


def test_training_channels_are_the_neighbour_slices(tiny_records):
    offsets = (-3, 0, 1)  # asymmetric, clamped at both ends of the 8 slices; more in the test above
    config = make_config(tiny_records, offsets=offsets)
    centre = offsets.index(0)
    seen = set()
    for x, y in batches(data.train_dataset(config, folds=[0, 1]), 8):
        assert x.shape == (4, 40, 48, len(offsets)) and x.dtype == np.float32
        assert y.shape == (4, 40, 48, 3) and set(np.unique(y)) <= {0.0, 1.0}
        for image in x:
            # constant slices: the normalised value * 7 is the slice index (uint16 buffer: +-1e-5)
            i = int(round(image[0, 0, centre] * 7))
            assert np.allclose(image[..., centre] * 7, i, atol=1e-3)
            for c, o in enumerate(offsets):
                assert np.allclose(image[..., c] * 7, min(max(i + o, 0), DEPTH - 1), atol=1e-3)
            seen.add(i)
    assert seen == set(range(DEPTH))  # both ends (the clamped cases) were checked


@pytest.mark.parametrize("size", [1, 7, 5000, 2 * 2**18 + 3, 3 * 2**18 - 1])
def test_uint16_histogram_percentiles_equal_the_top_k_ones(size):
    """Scans (uint16) take the histogram path, other dtypes top_k: the same order statistics."""
    values = np.random.default_rng(size).integers(0, 65536, size, dtype=np.uint16)
    values[: size // 3] = 17  # ties
    qs = (0.0, 0.5, 2.0, 50.0, 99.5, 100.0)
    np.testing.assert_array_equal(preprocess.percentiles(tf.constant(values), qs).numpy(),
                                  preprocess.percentiles(tf.constant(values.astype(np.float32)), qs).numpy())


def test_normalize_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5000, (6, 30, 20), dtype=np.uint16)  # small: every value is used
    low, high = np.percentile(values, [2, 98])
    expected = np.clip((values - low) / (high - low), 0, 1)
    out = preprocess.normalize(tf.constant(values), (2, 98)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    big = rng.integers(0, 60000, (2 * preprocess.PERCENTILE_SAMPLES + 3,), dtype=np.uint16).astype(np.float32)
    lo, hi = preprocess.percentiles(big, (1, 99)).numpy()  # strided subsample: close, not exact
    np.testing.assert_allclose([lo, hi], np.percentile(big, [1, 99]), rtol=0.02)
    np.testing.assert_array_equal(preprocess.normalize(big, (1, 99)).numpy(),
                                  preprocess.normalize(big, (1, 99)).numpy())


@pytest.mark.parametrize("mode", ["resize", "pad_crop"])
@pytest.mark.parametrize("size", [(33, 57), (64, 64), (20, 24)])
def test_resized_masks_stay_binary(mode, size):
    masks = (np.random.default_rng(1).random((2, 40, 48, 3)) < 0.3).astype(np.uint8)
    config = DataConfig(resize=mode, interpolation="area")
    out = preprocess.resize_masks(tf.constant(masks), size, config).numpy()
    assert out.shape == (2, *size, 3) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1}
    images = preprocess.resize_images(tf.constant(masks, tf.float32), size, config).numpy()
    assert images.shape == (2, *size, 3) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("mode", ["resize", "pad_crop"])
def test_training_stream_resizes_and_keeps_masks_binary(tiny_records, mode):
    config = make_config(tiny_records, image_size=(48, 56), resize=mode)
    for x, y in batches(data.train_dataset(config, folds=[0, 1]), 4):
        assert x.shape == (4, 48, 56, 3) and y.shape == (4, 48, 56, 3)
        assert set(np.unique(y)) <= {0.0, 1.0} and y.max() == 1.0
        assert 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_training_and_evaluation_preprocess_alike(tiny_records, cache):
    config = make_config(tiny_records, image_size=(48, 56), cache=cache)  # a real resize; augmentation off
    evaluated = [(image, mask) for b in data.eval_dataset(config, [0, 1], batch_size=16)
                 for image, mask in zip(b["image"].numpy(), b["mask"].numpy(), strict=True)]
    for x, y in batches(data.train_dataset(config, [0, 1]), 4):
        for image, mask in zip(x, y, strict=True):
            assert any(np.array_equal(mask, m) and np.allclose(image, i, atol=1e-4) for i, m in evaluated)


FULL_AUGMENT = AugmentConfig(flip_vertical=True, grid_distortion=0.05, dropout_holes=2)


def test_accelerator_mode_yields_what_the_step_augments_into_the_host_batches(tiny_records):
    """augment.device: accelerator hands the step (uint16 scans, packed masks, seed); finish_batch there
    gives exactly the batches the host mode yields for the same seed."""
    config = make_config(tiny_records, seed=3, keep_empty=0.5)
    config.augment = FULL_AUGMENT
    host = batches(data.train_dataset(config, folds=[0, 1]), 5)
    config.augment = dataclasses.replace(FULL_AUGMENT, device="accelerator")
    raw = batches(data.train_dataset(config, folds=[0, 1]), 5)
    assert raw[0][0].dtype == np.uint16 and raw[0][1].shape == (4, 40, 48, 1) and raw[0][2].shape == (2,)
    for (x, y), (image, packed, seed) in zip(host, raw, strict=True):
        fx, fy = augment.finish_batch(image, packed, seed, config.augment)
        np.testing.assert_allclose(fx.numpy(), x, atol=1e-6)
        np.testing.assert_array_equal(fy.numpy(), y)
    assert not np.array_equal(host[0][0], raw[0][0] / augment.QUANT)  # the host batches were augmented


@pytest.mark.parametrize("cache, survives", [("memory", True), ("none", False)])
def test_memory_cache_reads_the_records_once(tiny_records, tmp_path, cache, survives):
    """With data.cache: memory the stream goes on after the record files are gone (read once, then served
    from RAM); without it the next epoch needs them again."""
    root = tmp_path / "records"
    shutil.copytree(tiny_records, root)
    config = make_config(root, cache=cache)
    stream = iter(data.train_dataset(config, folds=[0, 1]))
    per_epoch = 8 * DEPTH // 4
    for _ in range(per_epoch + 4):  # past the first epoch
        next(stream)
    for shard in root.glob("*.tfrecord"):
        shard.unlink()
    try:
        seen = [next(stream) for _ in range(3 * per_epoch)]
    except tf.errors.NotFoundError:
        seen = None
    assert (seen is not None) == survives
    if survives:  # still every volume
        ids = {volume_id(m) for _, y in seen for m in y.numpy() if m[..., 0].any()}
        assert ids == set(range(8))


def test_input_pipelines_read_disjoint_files_and_together_all(tiny_records):
    config = make_config(tiny_records, keep_empty=0.01)  # (almost) only organ slices, whose masks name v
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 3 files for 2 pipelines: no warning
            ds = data.train_dataset(config, folds=None, input_context=context, global_batch_size=8)
        got = batches(ds, 12)
        assert all(x.shape[0] == 4 for x, _ in got)  # per-replica batch: 8 / 2
        seen.append({volume_id(m) for _, y in got for m in y if m.any()})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(8))
    files = [set(ids) for shards in LAYOUT.values() for ids in shards]
    assert all(f <= ids or not f & ids for f in files for ids in seen)  # whole files go to one pipeline


def test_fewer_files_than_pipelines_warns_and_still_splits(tiny_records):
    config = make_config(tiny_records, keep_empty=0.01)
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        with pytest.warns(UserWarning, match="1 record file.*2 input pipelines"):
            ds = data.train_dataset(config, folds=[1], input_context=context)
        seen.append({volume_id(m) for _, y in batches(ds, 6) for m in y if m.any()})
    assert seen[0] | seen[1] == {4, 5, 6, 7} and not seen[0] & seen[1]  # split by volume


def test_deterministic_mode_repeats_batches_and_seed_changes_them(tiny_records):
    def first(seed):
        config = make_config(tiny_records, seed=seed, keep_empty=0.5)
        config.augment = AugmentConfig(grid_distortion=0.05, dropout_holes=2)
        return batches(data.train_dataset(config, folds=[0, 1]), 3)

    a, b, c = first(0), first(0), first(1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=True))


def test_keep_empty_drops_organ_free_slices(tiny_records):
    keep_all, keep_few = (make_config(tiny_records, keep_empty=k, batch_size=8) for k in (1.0, 1e-6))
    empty = lambda config: [not m.any() for _, y in batches(data.train_dataset(config, [0, 1]), 8) for m in y]
    assert not any(empty(keep_few))
    assert 0.3 < np.mean(empty(keep_all)) < 0.7  # half the slices are organ-free
    assert data.count_slices(tiny_records, None) == 8 * DEPTH  # from the manifest
    assert data.count_slices(tiny_records, [0]) == 4 * DEPTH
    assert data.count_slices(tiny_records, [0], keep_empty=0.5) == 4 * DEPTH * 3 // 4  # from the masks
    assert data.count_slices(tiny_records, [0], keep_empty=0.999) == 4 * DEPTH


def reassemble(config: Config, folds):
    """Predict with the true masks (as probabilities), restore the size, stack per case_day."""
    slices = {}
    for b in data.eval_dataset(config, folds, batch_size=5):
        probs = tf.cast(b["mask"], tf.float32)
        for k in range(probs.shape[0]):
            orig = (int(b["orig_height"][k]), int(b["orig_width"][k]))
            restored = preprocess.restore_size(probs[k : k + 1], orig, config.data).numpy()[0]
            key = b["case_day"][k].numpy().decode()
            slices.setdefault(key, []).append((int(b["index"][k]), int(b["slice"][k]), int(b["depth"][k]),
                                               restored, b["image"][k].numpy()))
    return slices


@pytest.mark.parametrize("mode, size", [("resize", (80, 96)), ("pad_crop", (64, 64))])
def test_eval_stream_reassembles_volumes_exactly(tiny_records, mode, size):
    offsets = (-3, 1)
    config = make_config(tiny_records, resize=mode, image_size=size, offsets=offsets)
    folds = [0] if mode == "resize" else None  # resize x2 is exact only for the 40 x 48 volumes
    got = reassemble(config, folds)
    truth = list(reader.read_volumes(tiny_records, folds))
    assert list(got) == [v["case_day"] for v in truth]  # volumes in record order
    for vol in truth:
        items = got[vol["case_day"]]
        assert [i for i, *_ in items] == list(range(DEPTH))  # slices in order
        assert [s for _, s, *_ in items] == list(vol["slices"]) and {d for _, _, d, *_ in items} == {DEPTH}
        masks = np.stack([r for *_, r, _ in items])
        np.testing.assert_array_equal((masks > 0.5).astype(np.uint8), vol["mask"])
        for i, *_, image in items:
            assert image.shape == (*size, len(offsets))
            centre = image[size[0] // 2, size[1] // 2]
            expected = [min(max(i + o, 0), DEPTH - 1) / 7 for o in offsets]
            np.testing.assert_allclose(centre, expected, atol=1e-5)

