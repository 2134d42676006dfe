"""Input pipelines from the TFRecords: training batches (2.5D, augmented, shuffled, sharded per input
pipeline), the ordered evaluation stream that reassembles into volumes, and the preprocessing blocks
(normalize, context_stack, resize) that the SavedModel export reuses inside its serving graph.
"""

import random
import warnings
from pathlib import Path

import tensorflow as tf
from keras import ops

from tfseg import augment, features, records
from tfseg.config import Config, DataConfig

AUTOTUNE = tf.data.AUTOTUNE
# Percentiles are read off a strided subsample of at most this many values: ordering a whole
# 144 x 360 x 310 volume (16 M values) would dominate the pipeline, and 2^18 evenly spread values pin
# the 0.5 / 99.5 percentiles to well under 1 % of the intensity range.
PERCENTILE_SAMPLES = 1 << 18
VOLUME_CYCLE = 4  # volumes whose slices alternate before the shuffle buffer (memory: ~4 volumes)
QUANT = 65535.0  # scans in [0, 1] <-> uint16
STAGE_KEEP, STAGE_CROP, STAGE_AUGMENT, STAGE_INTENSITY = 1, 2, 3, 4  # independent random streams per pipeline stage


# ---- graph-friendly building blocks (training, evaluation and the serving graph) ------------------

def percentiles(values, qs) -> tf.Tensor:
    """Percentiles (numpy's linear interpolation) over ALL values of `values`; deterministic."""
    flat = tf.reshape(values, [-1])
    stride = tf.maximum(1, -(-tf.size(flat) // PERCENTILE_SAMPLES))
    sample = tf.cast(tf.reshape(flat[::stride], [-1]), tf.float32)  # reshape keeps the rank known
    last = tf.size(sample) - 1
    out = []
    for q in qs:
        pos = q / 100 * tf.cast(last, tf.float32)
        below = tf.cast(tf.floor(pos), tf.int32)
        above = tf.minimum(below + 1, last)
        # top_k of the tail instead of a full sort: clip percentiles sit near the ends, so k is small
        if q <= 50:
            ascending = -tf.math.top_k(-sample, above + 1).values
            low, high = tf.gather(ascending, below), tf.gather(ascending, above)
        else:
            descending = tf.math.top_k(sample, last + 1 - below).values
            low, high = tf.gather(descending, last - below), tf.gather(descending, last - above)
        out.append(low + (high - low) * (pos - tf.floor(pos)))
    return tf.stack(out)


def normalize(images, clip_percentiles) -> tf.Tensor:
    """Clip to the given percentiles of the whole tensor (a volume, or a serving request) and scale
    to float32 [0, 1]. Intensities differ a lot between scans, so this is per volume, not global."""
    low, high = tf.unstack(percentiles(images, clip_percentiles), num=2)
    scale = 1.0 / tf.maximum(high - low, 1e-6)
    return tf.clip_by_value(tf.cast(images, tf.float32) * scale - low * scale, 0.0, 1.0)


def context_stack(volume, offsets) -> tf.Tensor:
    """2.5D input: volume [D, H, W] -> [D, H, W, C], channel c of slice i = slice i + offsets[c],
    clamped at the ends; offsets (0,) gives plain 2D."""
    depth = tf.shape(volume, out_type=tf.int32)[0]
    index = tf.range(depth)
    return tf.stack([tf.gather(volume, tf.clip_by_value(index + o, 0, depth - 1)) for o in offsets], axis=-1)


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


# ---- training stream ------------------------------------------------------------------------------

def _seed(base: int, stage: int, pipeline: int, index) -> tf.Tensor:
    """Stateless seed for element `index` of one stage: the same (seed, index) gives the same draw."""
    return tf.random.experimental.stateless_fold_in(
        tf.constant([base, stage + 16 * pipeline], tf.int64), tf.cast(index, tf.int64))


@tf.function(jit_compile=True)  # XLA interleaves the channels ~4x faster than tf.stack on CPU
def _quantized_context(volume, offsets):
    """[D, H, W] in [0, 1] -> 2.5D uint16 [D, H, W, C]: scans wait in the shuffle buffer at half the
    bytes of float32, exact to 1e-5, and the stack moves half the bytes."""
    return context_stack(tf.cast(volume * QUANT + 0.5, tf.uint16), offsets)  # >= 0: truncation rounds


@tf.function(jit_compile=True)  # XLA's nearest resize is ~3x TensorFlow's on CPU; same result
def _resize_nearest(masks, size):
    return ops.image.resize(masks, size, interpolation="nearest")


def _train_volume(index, serialized, config: Config, base: int, pipeline: int):
    """One record -> the volume's kept slices: uint16-quantised scans [K, h, w, C], masks [K, h, w, 3]."""
    data = config.data
    ex = features.decode_volume(serialized)
    image = normalize(ex["image"], data.clip_percentiles)[..., None]
    mask = ex["mask"]
    if data.resize == "pad_crop":  # pad now, random crop per slice later
        height = tf.maximum(tf.shape(image)[1], data.image_size[0])
        width = tf.maximum(tf.shape(image)[2], data.image_size[1])
        image = tf.image.resize_with_crop_or_pad(image, height, width)
        mask = tf.image.resize_with_crop_or_pad(mask, height, width)
    else:
        image = resize_images(image, data.image_size, data)
        mask = _resize_nearest(mask, tuple(data.image_size))
    image = augment.augment_volume(image[..., 0], config.augment, _seed(base, STAGE_INTENSITY, pipeline, index))
    image = _quantized_context(image, tuple(data.offsets))
    if data.keep_empty >= 1:
        return image, mask
    organ = tf.reduce_any(mask > 0, axis=[1, 2, 3])
    lucky = tf.random.stateless_uniform(tf.shape(organ), _seed(base, STAGE_KEEP, pipeline, index))
    keep = organ | (lucky < data.keep_empty)
    return tf.boolean_mask(image, keep), tf.boolean_mask(mask, keep)


def _random_crop(index, image, mask, size, base: int, pipeline: int):
    """Train-time pad_crop: one random window, the same for the scan channels and the mask."""
    both = tf.concat([image, tf.cast(mask, tf.uint16)], axis=-1)
    both = tf.image.stateless_random_crop(both, [size[0], size[1], tf.shape(both)[-1]],
                                          _seed(base, STAGE_CROP, pipeline, index))
    channels = tf.shape(image)[-1]
    return both[..., :channels], tf.cast(both[..., channels:], tf.uint8)


def _volume_records(files: list[str], data: DataConfig, input_context, base: int) -> tf.data.Dataset:
    """Serialized volumes, forever: files shuffled and (per input pipeline) sharded, read interleaved."""
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline = input_context.input_pipeline_id if input_context else 0
    if pipelines > 1 and len(files) < pipelines:
        # Too few files to give each pipeline its own: every pipeline reads every file in the same
        # fixed order and keeps its share of the volumes (correct, but reads all data everywhere).
        warnings.warn(f"{data.records}: {len(files)} record file(s) for {pipelines} input pipelines; "
                      "each pipeline reads all files and keeps every "
                      f"{pipelines}-th volume. Write more, smaller shards (make_records --shard-mb).",
                      stacklevel=3)
        return tf.data.TFRecordDataset(files).shard(pipelines, pipeline).repeat()
    ds = tf.data.Dataset.from_tensor_slices(files)
    if pipelines > 1:
        ds = ds.shard(pipelines, pipeline)
    ds = ds.shuffle(len(files), seed=base, reshuffle_each_iteration=True).repeat()
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
    """Endless (x, y) batches: x float32 [B, h, w, C] in [0, 1], y float32 [B, h, w, 3] of 0/1, with B
    the per-replica batch of `input_context` (or the global batch without one)."""
    data = config.data
    files = records.shard_files(data.records, folds)
    global_batch = global_batch_size or data.batch_size
    batch = input_context.get_per_replica_batch_size(global_batch) if input_context else global_batch
    pipeline = input_context.input_pipeline_id if input_context else 0
    # Deterministic runs take every seed from the config; otherwise a fresh one per dataset.
    base = data.seed if data.deterministic else random.SystemRandom().randrange(2**31)
    channels, height, width = len(data.offsets), *data.image_size

    ds = _volume_records(files, data, input_context, base).enumerate()
    ds = ds.map(lambda i, s: _train_volume(i, s, config, base, pipeline), num_parallel_calls=AUTOTUNE,
                deterministic=data.deterministic)
    # Cut volumes into slices, alternating between a few volumes, then shuffle slices across volumes.
    ds = ds.interleave(lambda image, mask: tf.data.Dataset.from_tensor_slices((image, mask)),
                       cycle_length=VOLUME_CYCLE, block_length=1)
    if data.resize == "pad_crop":
        ds = ds.enumerate().map(lambda i, xy: _random_crop(i, *xy, data.image_size, base, pipeline),
                                num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)
    ds = ds.shuffle(data.shuffle_buffer, seed=base + pipeline, reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=True)

    def finish(index, batch_xy):
        image, mask = batch_xy
        x = tf.ensure_shape(tf.cast(image, tf.float32) / QUANT, [batch, height, width, channels])
        y = tf.ensure_shape(mask, [batch, height, width, 3])  # uint8 through augmentation: fewer bytes
        x, y = augment.augment_batch(x, y, config.augment, _seed(base, STAGE_AUGMENT, pipeline, index))
        return x, tf.cast(y, tf.float32)

    ds = ds.enumerate().map(finish, num_parallel_calls=AUTOTUNE, deterministic=data.deterministic)
    return ds.prefetch(AUTOTUNE).with_options(_options(data.deterministic, input_context is not None))


def count_slices(records_dir, folds, keep_empty: float = 1.0) -> int:
    """Slices of the chosen folds per training epoch: all slices, organ-free ones weighted by keep_empty
    (expected count). From the manifest's per-shard counts when it has them and keep_empty is 1;
    otherwise from the records (slice lists, plus the mask PNGs when keep_empty < 1)."""
    files = records.shard_files(records_dir, folds)
    listed = [s for s in records.read_manifest(records_dir)["shards"]
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


# ---- evaluation stream ----------------------------------------------------------------------------

def _eval_volume(serialized, data: DataConfig) -> dict:
    """One record -> per-slice tensors (leading axis D) with everything needed to rebuild the volume."""
    ex = features.decode_volume(serialized)
    depth, height, width = tf.unstack(tf.shape(ex["image"]))
    image = resize_images(normalize(ex["image"], data.clip_percentiles)[..., None], data.image_size, data)

    def per_slice(value):
        return tf.fill([depth], tf.cast(value, tf.int32) if value.dtype.is_integer else value)

    return {
        "image": context_stack(image[..., 0], data.offsets),
        "mask": resize_masks(ex["mask"], data.image_size, data),
        "case_day": per_slice(ex["case_day"]),
        "slice": tf.cast(ex["slices"], tf.int32),
        "index": tf.range(depth),
        "depth": per_slice(depth),
        "orig_height": per_slice(height),
        "orig_width": per_slice(width),
    }


def eval_dataset(config: Config, folds, batch_size: int) -> tf.data.Dataset:
    """Batches of dicts, volumes in record order and slices in order: image float32 [B, h, w, C], mask
    uint8 [B, h, w, 3] (resized), case_day, slice (number), index (0-based), depth, orig_height,
    orig_width. Predictions regroup by (case_day, index) and go back to size with restore_size."""
    data = config.data
    ds = tf.data.TFRecordDataset(records.shard_files(data.records, folds))
    ds = ds.map(lambda s: _eval_volume(s, data), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.unbatch().batch(batch_size).prefetch(AUTOTUNE)
    # Evaluation must see every volume whole and in order: never let tf.distribute shard it.
    return ds.with_options(_options(True, sharded_here=True))
