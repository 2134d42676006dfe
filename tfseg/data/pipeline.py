"""tf.data input pipelines from the TFRecords: endless augmented training batches (2.5D slices, or 3D patches
for model.kind 3d; shuffled, sharded per input pipeline), the ordered evaluation stream that reassembles into
volumes, whole volumes for 3D inference, and what the training loop validates on."""

import math
import random
import warnings
from pathlib import Path

import tensorflow as tf
from keras import ops

from tfseg.config import Config, DataConfig
from tfseg.data import augment
from tfseg.data.context import context_stack
from tfseg.data.preprocess import normalize, resize_images, resize_masks
from tfseg.layout import read_manifest
from tfseg.records import features, reader

AUTOTUNE = tf.data.AUTOTUNE
VOLUME_CYCLE = 4  # volumes whose slices alternate before the shuffle buffer (memory: ~4 volumes)
CACHED_VOLUME_SHUFFLE = 64  # data.cache: memory: volumes shuffled per epoch after the cache
STAGE_KEEP, STAGE_CROP, STAGE_AUGMENT, STAGE_INTENSITY = 1, 2, 3, 4  # independent random streams per pipeline stage


# ---- training stream ------------------------------------------------------------------------------

def _seed(base: int, stage: int, pipeline: int, index) -> tf.Tensor:
    """Stateless seed for element `index` of one stage: the same (seed, index) gives the same draw."""
    return tf.random.experimental.stateless_fold_in(
        tf.constant([base, stage + 16 * pipeline], tf.int64), tf.cast(index, tf.int64))


@tf.function(jit_compile=True)  # XLA interleaves the channels ~3x faster than tf.stack on CPU
def _context(volume, offsets):
    return context_stack(volume, offsets)


@tf.function(jit_compile=True)  # XLA's nearest resize is ~3x TensorFlow's on CPU; same result
def _resize_nearest(masks, size):
    return ops.image.resize(masks, size, interpolation="nearest")


def _fit_volume(image, mask, data: DataConfig):
    """A normalised volume [D, H, W, 1] and its masks to the model size: resized, or padded to at least
    it (pad_crop: the random crop per slice comes later)."""
    if data.resize == "pad_crop":
        height = tf.maximum(tf.shape(image)[1], data.image_size[0])
        width = tf.maximum(tf.shape(image)[2], data.image_size[1])
        return (tf.image.resize_with_crop_or_pad(image, height, width),
                tf.image.resize_with_crop_or_pad(mask, height, width))
    return resize_images(image, data.image_size, data), _resize_nearest(mask, tuple(data.image_size))


def _prepare_volume(serialized, data: DataConfig):
    """One record -> the work done once per volume (and kept by data.cache): the normalised, resized
    scans quantised to uint16 [D, h, w] and the packed masks uint8 [D, h, w, 1]."""
    ex = features.decode_volume(serialized)
    image, mask = _fit_volume(normalize(ex["image"], data.clip_percentiles)[..., None],
                              augment.pack_masks(ex["mask"]), data)
    return augment.quantize(image[..., 0]), mask


def _drop_empty(image, mask, keep_empty: float, seed):
    """Keep every slice with an organ and a random `keep_empty` share of the others."""
    if keep_empty >= 1:
        return image, mask
    organ = tf.reduce_any(mask > 0, axis=[1, 2, 3])
    keep = organ | (tf.random.stateless_uniform(tf.shape(organ), seed) < keep_empty)
    return tf.boolean_mask(image, keep), tf.boolean_mask(mask, keep)


def _epoch_volume(index, image, mask, config: Config, base: int, pipeline: int):
    """A prepared volume -> this epoch's kept slices: 2.5D uint16 scans [K, h, w, C] with this epoch's
    intensity draw, packed masks [K, h, w, 1]."""
    image = augment.augment_volume(image, config.augment, _seed(base, STAGE_INTENSITY, pipeline, index))
    image = _context(image, tuple(config.data.offsets))
    return _drop_empty(image, mask, config.data.keep_empty, _seed(base, STAGE_KEEP, pipeline, index))


def _random_crop(index, image, mask, size, base: int, pipeline: int):
    """Train-time pad_crop: one random window, the same for the scan channels and the mask."""
    room = tf.shape(image)[:2] - tf.constant(size)
    corner = tf.random.stateless_uniform([2], _seed(base, STAGE_CROP, pipeline, index), maxval=tf.int32.max,
                                         dtype=tf.int32) % (room + 1)
    return (tf.slice(image, tf.concat([corner, [0]], 0), [size[0], size[1], -1]),
            tf.slice(mask, tf.concat([corner, [0]], 0), [size[0], size[1], -1]))


def _pad_to(volume, size) -> tf.Tensor:
    """volume [D, H, W, ...] zero-padded (evenly on both sides) to at least `size` (D, H, W)."""
    need = tf.maximum(tf.constant(size, tf.int32) - tf.shape(volume)[:3], 0)
    pads = tf.stack([need // 2, need - need // 2], axis=1)
    return tf.pad(volume, tf.concat([pads, tf.zeros([volume.shape.rank - 3, 2], tf.int32)], 0))


def _patch_corner(mask, present, room, patch, foreground_fraction: float, seed) -> tf.Tensor:
    """int32 [3] corner of one patch: with probability foreground_fraction (and an organ in the volume)
    centred on a random voxel of a random present class (nnU-Net's foreground oversampling), else
    anywhere. mask packed uint8 [D, H, W, 1], present bool [K], room = volume size - patch."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    anywhere = tf.random.stateless_uniform([3], seeds[0], maxval=tf.int32.max, dtype=tf.int32) % (room + 1)

    def on_organ():
        choice = tf.random.stateless_categorical(tf.where(present, 0.0, -1e9)[None], 1, seeds[1])[0, 0]
        bit = tf.gather(tf.constant(augment.BITS, tf.uint8), choice)
        voxels = tf.cast(tf.where(tf.bitwise.bitwise_and(mask[..., 0], bit) > 0), tf.int32)
        pick = tf.random.stateless_uniform([], seeds[2], maxval=tf.shape(voxels)[0], dtype=tf.int32)
        return tf.clip_by_value(voxels[pick] - tf.constant(patch) // 2, 0, room)

    wanted = tf.random.stateless_uniform([], seeds[3]) < foreground_fraction
    return tf.cond(wanted & tf.reduce_any(present), on_organ, lambda: anywhere)


def _volume_patches(index, image, mask, config: Config, base: int, pipeline: int):
    """A prepared volume (uint16 [D, h, w], packed masks uint8 [D, h, w, 1]) -> data.patches_per_volume
    training patches with this epoch's intensity draw: uint16 [P, d, h, w, 1], packed masks [P, d, h, w, 1].
    Volumes smaller than the patch are zero-padded."""
    data, patch = config.data, list(config.data.patch_size)
    image = augment.augment_volume(image, config.augment, _seed(base, STAGE_INTENSITY, pipeline, index))
    image, mask = _pad_to(image[..., None], patch), _pad_to(mask, patch)
    room = tf.shape(image)[:3] - tf.constant(patch)
    present = tf.reduce_any(augment.unpack_masks(mask, tf.bool), axis=[0, 1, 2])
    seeds = tf.random.experimental.stateless_split(_seed(base, STAGE_CROP, pipeline, index), data.patches_per_volume)

    def cut(seed):
        corner = tf.concat([_patch_corner(mask, present, room, patch, data.foreground_fraction, seed), [0]], 0)
        return tf.slice(image, corner, [*patch, 1]), tf.slice(mask, corner, [*patch, 1])

    return tf.map_fn(cut, seeds, fn_output_signature=(tf.TensorSpec([*patch, 1], tf.uint16),
                                                      tf.TensorSpec([*patch, 1], tf.uint8)))


def _volume_records(files: list[str], data: DataConfig, input_context, base: int) -> tf.data.Dataset:
    """Serialized volumes, one pass: files (per input pipeline) sharded and shuffled, read interleaved."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline = input_context.input_pipeline_id if input_context else 0
    if pipelines > 1 and len(files) < pipelines:
        # Too few files to give each pipeline its own: every pipeline reads every file in the same
        # fixed order and keeps its share of the volumes (correct, but reads all data everywhere).
        warnings.warn(f"{data.records}: {len(files)} record file(s) for {pipelines} input pipelines; "
                      "each pipeline reads all files and keeps every "
                      f"{pipelines}-th volume. Write more, smaller shards (make_records --shard-mb).",
                      stacklevel=3)
        return tf.data.TFRecordDataset(files).shard(pipelines, pipeline)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if pipelines > 1:
        ds = ds.shard(pipelines, pipeline)
    # A cached stream is read once, in one shuffled order; otherwise every epoch reshuffles the files.
    ds = ds.shuffle(len(files), seed=base, reshuffle_each_iteration=data.cache == "none")
    return ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8), block_length=1,
                         num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)


def _options(deterministic: bool, sharded_here: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.autotune.enabled = True
    # Parallelism across elements (parallel map/interleave), one thread per op: on few cores this
    # beats splitting every op across threads that the other elements need.
    options.threading.max_intra_op_parallelism = 1
    options.deterministic = deterministic
    # We shard files per input pipeline ourselves when tf.distribute hands us an InputContext, so
    # tf.distribute must not shard again (OFF). Without a context (a dataset distributed as a whole
    # with experimental_distribute_dataset), FILE lets each worker read its own subset of the files.
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = policy.OFF if sharded_here else policy.FILE
    return options


def train_dataset(config: Config, folds, *, input_context: tf.distribute.InputContext | None = None,
                  global_batch_size: int | None = None) -> tf.data.Dataset:
    """Endless training batches with B the per-replica batch of `input_context` (or the global batch).

    augment.device host: (x, y), x float32 [B, h, w, C] in [0, 1], y float32 [B, h, w, 3] of 0/1.
    augment.device accelerator: (scans uint16 [B, h, w, C], packed masks uint8 [B, h, w, 1], seed int64
    [2]), which augment.finish_batch turns into the same (x, y) inside the train step.
    model.kind 3d: the same with patches, [B, d, h, w, 1] for [B, h, w, C] (d, h, w = data.patch_size).
    """
    data = config.data
    files = reader.shard_files(data.records, folds)
    global_batch = global_batch_size or data.batch_size
    batch = input_context.get_per_replica_batch_size(global_batch) if input_context else global_batch
    pipeline = input_context.input_pipeline_id if input_context else 0
    # Deterministic runs take every seed from the config; otherwise a fresh one per dataset.
    base = data.seed if data.deterministic else random.SystemRandom().randrange(2**31)
    is_3d = config.model.kind == "3d"
    example = [*data.patch_size, 1] if is_3d else [*data.image_size, len(data.offsets)]

    ds = _volume_records(files, data, input_context, base)
    ds = ds.map(lambda s: _prepare_volume(s, data), num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)
    if data.cache == "memory":
        ds = ds.cache().shuffle(CACHED_VOLUME_SHUFFLE, seed=base + pipeline, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()
    cut = _volume_patches if is_3d else _epoch_volume
    ds = ds.map(lambda i, volume: cut(i, *volume, config, base, pipeline), num_parallel_calls=AUTOTUNE,
                deterministic=data.deterministic)
    # Cut volumes into slices (or patches), alternating between a few volumes, then shuffle across volumes.
    ds = ds.interleave(lambda image, mask: tf.data.Dataset.from_tensor_slices((image, mask)),
                       cycle_length=VOLUME_CYCLE, block_length=1)
    if data.resize == "pad_crop" and not is_3d:
        ds = ds.enumerate().map(lambda i, xy: _random_crop(i, *xy, data.image_size, base, pipeline),
                                num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)
    ds = ds.shuffle(data.shuffle_buffer, seed=base + pipeline, reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)

    def batch_seed(index, batch_xy):
        image, mask = batch_xy
        image = tf.ensure_shape(image, [batch, *example])
        return image, tf.ensure_shape(mask, [batch, *example[:-1], 1]), _seed(base, STAGE_AUGMENT, pipeline, index)

    ds = ds.enumerate().map(batch_seed)
    if config.augment.device == "host":
        ds = ds.map(lambda image, mask, seed: augment.finish_batch(image, mask, seed, config.augment),
                    num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)
    return ds.prefetch(AUTOTUNE).with_options(_options(data.deterministic, input_context is not None))


def count_slices(records_dir, folds, keep_empty: float = 1.0) -> int:
    """Slices of the chosen folds per training epoch: all slices, organ-free ones weighted by keep_empty
    (expected count). From the manifest's per-shard counts when it has them and keep_empty is 1;
    otherwise from the records (slice lists, plus the mask PNGs when keep_empty < 1)."""
    files = reader.shard_files(records_dir, folds)
    listed = [s for s in read_manifest(records_dir)["shards"]
              if str(Path(records_dir) / s["path"]) in set(files)]
    if keep_empty >= 1 and all("slices" in s for s in listed):
        return sum(int(s["slices"]) for s in listed)

    def counts(serialized):
        ex = features.parse_volume(serialized)
        if keep_empty >= 1:
            return tf.size(ex["slices"]), 0
        empty = tf.map_fn(lambda b: tf.reduce_all(tf.io.decode_png(b, channels=3) == 0), ex["mask_png"],
                          fn_output_signature=tf.bool)
        return tf.size(ex["slices"]), tf.reduce_sum(tf.cast(empty, tf.int32))

    ds = tf.data.TFRecordDataset(files).map(counts, num_parallel_calls=AUTOTUNE)
    total, empty = ds.reduce((0, 0), lambda acc, c: (acc[0] + c[0], acc[1] + c[1]))
    return int(round(int(total) - int(empty) * (1 - keep_empty)))


def count_examples(config: Config, folds) -> int:
    """Training examples per epoch: slices (count_slices), or for 3D data.patches_per_volume per volume."""
    if config.model.kind != "3d":
        return count_slices(config.data.records, folds, config.data.keep_empty)
    files = set(reader.shard_files(config.data.records, folds))
    volumes = sum(int(s["volumes"]) for s in read_manifest(config.data.records)["shards"]
                  if str(Path(config.data.records) / s["path"]) in files)
    return volumes * config.data.patches_per_volume


def count_validation_examples(config: Config, folds) -> int:
    """What validation_pairs yields for `folds`: slices, or for 3D the grid patches of every volume."""
    if config.model.kind != "3d":
        return count_slices(config.data.records, folds)
    ds = tf.data.TFRecordDataset(reader.shard_files(config.data.records, folds))
    depths = ds.map(lambda s: tf.size(features.parse_volume(s)["slices"]), num_parallel_calls=AUTOTUNE)
    patch, size = config.data.patch_size, config.data.image_size
    in_plane = -(-size[0] // patch[1]) * -(-size[1] // patch[2])
    return sum(-(-int(depth) // patch[0]) for depth in depths) * in_plane


# ---- evaluation stream ----------------------------------------------------------------------------

def _eval_volume(serialized, config: Config) -> dict:
    """One record -> per-slice tensors (leading axis D) with everything needed to rebuild the volume; the
    image is the 2.5D stack [D, h, w, C], or for 3D the volume [D, h, w, 1]."""
    data = config.data
    ex = features.decode_volume(serialized)
    depth, height, width = tf.unstack(tf.shape(ex["image"]))
    image = resize_images(normalize(ex["image"], data.clip_percentiles)[..., None], data.image_size, data)

    def per_slice(value):
        return tf.fill([depth], tf.cast(value, tf.int32) if value.dtype.is_integer else value)

    return {
        "image": image if config.model.kind == "3d" else context_stack(image[..., 0], data.offsets),
        "mask": resize_masks(ex["mask"], data.image_size, data),
        "case_day": per_slice(ex["case_day"]),
        "slice": tf.cast(ex["slices"], tf.int32),
        "index": tf.range(depth),
        "depth": per_slice(depth),
        "orig_height": per_slice(height),
        "orig_width": per_slice(width),
    }


def eval_volumes(config: Config, folds) -> tf.data.Dataset:
    """One dict per volume, in record order, each value with a leading axis D (see eval_dataset); for 3D
    its image float32 [D, h, w, 1] is what whole-volume inference takes."""
    ds = tf.data.TFRecordDataset(reader.shard_files(config.data.records, folds))
    ds = ds.map(lambda s: _eval_volume(s, config), num_parallel_calls=AUTOTUNE, deterministic=True)
    # Evaluation must see every volume whole and in order: never let tf.distribute shard it.
    return ds.prefetch(2).with_options(_options(True, sharded_here=True))


def eval_dataset(config: Config, folds, batch_size: int) -> tf.data.Dataset:
    """Batches of dicts, volumes in record order and slices in order: image float32 [B, h, w, C], mask
    uint8 [B, h, w, 3] (resized), case_day, slice (number), index (0-based), depth, orig_height,
    orig_width. Predictions regroup by (case_day, index) and go back to size with restore_size."""
    return eval_volumes(config, folds).unbatch().batch(batch_size).prefetch(AUTOTUNE)


def window_starts(size, patch: int, overlap: float) -> tf.Tensor:
    """int32 [n] starts of windows of `patch` covering 0..size - 1 (size a scalar tensor >= patch): as few as
    keep consecutive windows overlapping by at least `overlap` of the patch, spread evenly from 0 to
    size - patch (nnU-Net's compute_steps_for_sliding_window)."""
    step = max(1, math.floor(patch * (1 - overlap)))
    room = tf.cast(size, tf.int32) - patch
    count = (room + step - 1) // step + 1
    spread = tf.cast(room, tf.float64) / tf.cast(tf.maximum(count - 1, 1), tf.float64)
    return tf.cast(tf.round(tf.cast(tf.range(count), tf.float64) * spread), tf.int32)


def window_corners(shape, patch, overlap: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The windows of `patch` (d, h, w) covering a volume of `shape` [D, H, W] (each >= the patch): their first
    voxels int32 [M, 3] (window_starts along each axis, z slowest) and the offsets of a window's voxels
    [d, h, w, 3]; gather_nd at corner + offsets reads one window."""
    starts = [window_starts(shape[axis], patch[axis], overlap) for axis in range(3)]
    corners = tf.reshape(tf.stack(tf.meshgrid(*starts, indexing="ij"), axis=-1), [-1, 3])
    offsets = tf.stack(tf.meshgrid(*[tf.range(p) for p in patch], indexing="ij"), axis=-1)
    return corners, offsets


def _grid_patches(image, mask, patch) -> tuple[tf.Tensor, tf.Tensor]:
    """A volume [D, h, w, C] and its masks cut into a grid of patches [N, d, h', w', C]: ceil(size / patch)
    per axis, spread from edge to edge as the sliding windows are (overlapping where the patch does not
    divide the size) rather than running into padding the model never sees in training; only an axis
    shorter than the patch is zero-padded."""

    patch = list(patch)

    def cut(volume):
        size = tf.maximum(tf.shape(volume)[:3], patch)
        volume = tf.pad(volume, tf.concat([tf.stack([tf.zeros([3], tf.int32), size - tf.shape(volume)[:3]], 1),
                                           [[0, 0]]], 0))
        corners, offsets = window_corners(size, patch, overlap=0.0)
        return tf.gather_nd(volume, corners[:, None, None, None, :] + offsets)

    return cut(image), cut(mask)


def validation_pairs(config: Config, folds, batch_size: int) -> tf.data.Dataset:
    """(scans, masks) batches that training validates on: every slice (eval_dataset), or for 3D the
    patches of a grid over every volume (_grid_patches; evaluate scores whole volumes)."""
    if config.model.kind != "3d":
        return eval_dataset(config, folds, batch_size).map(lambda d: (d["image"], d["mask"]))
    ds = eval_volumes(config, folds).map(lambda d: _grid_patches(d["image"], d["mask"], config.data.patch_size))
    return ds.unbatch().batch(batch_size).prefetch(AUTOTUNE)
