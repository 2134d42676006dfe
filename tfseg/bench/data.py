"""Input pipeline speed, for sizing a machine: images/s and CPU ms per image at 256 x 256, 3-channel
2.5D input, full augmentation, on 1 and on 2 cores, for

- decode: reading the records and decoding the scan and mask PNGs, nothing else (the floor);
- host: the whole training pipeline, augmentation included (augment.device: host);
- cached: the same with data.cache: memory, after the first epoch filled the cache;
- device_aug: augment.device: accelerator, the host's part only (the step augments on the device);
- cached_device_aug: both;
- a notebook-style loader (single process, cv2, three PNG decodes per 2.5D sample, the sample's RLEs
  decoded per sample), written as fast as cv2 and numpy allow;

and the CPU ms per image of each pipeline stage on one thread (the `stage_*` figures).
"""

import dataclasses
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from tfseg import CLASSES, cli, layout
from tfseg.config import AugmentConfig, Config, DataConfig
from tfseg.kaggle import rle
from tfseg.records.reader import shard_files

SIZE = 256
OFFSETS = (-2, 0, 2)
# Every augmentation on, grid distortion and coarse dropout included: the slowest training setting.
FULL_AUGMENT = AugmentConfig(grid_distortion=0.03, dropout_holes=2)
MODES = ("decode", "host", "cached", "device_aug", "cached_device_aug")
WARMUP_VOLUMES = 6  # default --warmup-volumes
STAGE_VOLUMES = 4  # volumes the per-stage profile runs on


def add_arguments(parser) -> None:
    parser.add_argument("--records", metavar="DIR", default=layout.RECORDS_DIR,
                        help="tfseg records made from --data-dir (made if missing) (default: %(default)s)")
    parser.add_argument("--data-dir", metavar="DIR", default=layout.SYNTH_DATA_DIR,
                        help="the Kaggle-layout folder the records came from; the notebook loader reads it "
                             "(default: %(default)s, the synthetic dataset, made if missing)")
    parser.add_argument("--batches", type=cli.at_least(1), default=200, metavar="N",
                        help="timed batches per measurement, after warm-up; the pipeline needs many volumes' "
                             "worth for a steady-state figure (default: %(default)s)")
    parser.add_argument("--batch-size", type=cli.at_least(1), default=16,
                        help="images per batch (default: %(default)s)")
    parser.add_argument("--shuffle-buffer", type=cli.at_least(1), default=DataConfig.shuffle_buffer,
                        help="slices in the pipeline's shuffle buffer (default: %(default)s)")
    parser.add_argument("--warmup-volumes", type=float, default=WARMUP_VOLUMES, metavar="N",
                        help="volumes' worth of batches (144 slices each) taken after the shuffle buffer is full "
                             "and before the clock starts, so that autotune settles (default: %(default)s)")


def _inputs(args) -> tuple[Path, Path]:
    data_dir, records_dir = Path(args.data_dir), Path(args.records)
    if data_dir == Path(layout.SYNTH_DATA_DIR):
        from tfseg.kaggle import synth

        synth.ensure_dataset(data_dir)
    if not (records_dir / layout.MANIFEST).exists():
        from tfseg.records.writer import build_records

        build_records(data_dir, records_dir)
    return data_dir, records_dir


def _config(records_dir, batch_size: int, shuffle_buffer: int, mode: str = "host") -> Config:
    data = DataConfig(records=str(records_dir), image_size=(SIZE, SIZE), offsets=OFFSETS, batch_size=batch_size,
                      shuffle_buffer=shuffle_buffer, cache="memory" if mode.startswith("cached") else "none")
    device = "accelerator" if mode.endswith("device_aug") else "host"
    return Config(data=data, augment=dataclasses.replace(FULL_AUGMENT, device=device))


def _rate(batches, count: int, warmup: int, size=lambda batch: len(batch[0])) -> tuple[float, float]:
    """(images/s, CPU ms of this process per image) over `count` elements of an iterable, after `warmup`
    elements; `size` counts the images of one element. CPU time stays comparable on a busy machine."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, cpu, images = time.perf_counter(), time.process_time(), 0
    for _ in range(count):
        images += int(size(next(it)))
    return images / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / images


def _pin(cores: int) -> None:
    """Limit this (fresh) process to `cores` cores before TensorFlow sizes its thread pools."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    cv2.setNumThreads(cores)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)


def _decode_rate(records_dir, cores: int) -> tuple[float, float]:
    """Slices/s of reading the records and decoding their scan and mask PNGs (the pipeline's floor)."""
    import tensorflow as tf

    from tfseg.records import features

    ds = tf.data.TFRecordDataset(shard_files(records_dir)).repeat()

    def decode(serialized):  # the values are used, so no decode can be pruned away
        volume = features.decode_volume(serialized)
        return tf.shape(volume["image"])[0], volume["image"][-1, -1, -1], volume["mask"][-1, -1, -1]

    ds = ds.map(decode, num_parallel_calls=cores).prefetch(cores)  # whole volumes: one per core at a time
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    volumes = sum(int(shard["volumes"]) for shard in layout.read_manifest(records_dir)["shards"])
    # every volume once after the warm-up, on 1 core as on 2: volume sizes differ
    return _rate(ds.with_options(options), volumes, warmup=2 * cores, size=lambda decoded: decoded[0])


def _pipeline_rate(records_dir, batches: int, batch_size: int, shuffle_buffer: int, warmup_volumes: float,
                   mode: str, cores: int) -> tuple[float, float]:
    """tfseg.data.train_dataset's (images/s, CPU ms per image) in one mode."""
    import tensorflow as tf

    from tfseg.data.pipeline import count_slices, train_dataset

    ds = train_dataset(_config(records_dir, batch_size, shuffle_buffer, mode), folds=None)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    ds = ds.with_options(options)
    # Warm-up fills the shuffle buffer, then drains the volumes decoded ahead meanwhile (timing them
    # would flatter the pipeline) and lets autotune settle: only then does the clock start. The cached
    # mode first reads one whole epoch, which fills the cache.
    warmup = math.ceil(shuffle_buffer / batch_size) + int(warmup_volumes * 144 / batch_size)
    if mode.startswith("cached"):
        warmup += math.ceil(count_slices(records_dir, None) / batch_size)
    return _rate(ds, batches, warmup=warmup)


def _timed(fn, inputs: list[tuple]) -> tuple[float, list[tuple]]:
    """(least CPU seconds of two passes of tf.function(fn) over inputs, the outputs as tuples)."""
    import tensorflow as tf

    fn = tf.function(fn)
    outputs = [fn(*x) for x in inputs]  # traced and compiled outside the clock
    passes = []
    for _ in range(2):  # outputs are dropped as they come, as in the pipeline: memory is reused
        cpu = time.process_time()
        for x in inputs:
            fn(*x)
        passes.append(time.process_time() - cpu)
    return min(passes), [o if isinstance(o, tuple | list) else (o,) for o in outputs]


def stage_costs(records_dir, batch_size: int) -> dict:
    """CPU ms per image of each pipeline stage on one thread, each stage timed alone (as a tf.function) on
    the previous stage's outputs for STAGE_VOLUMES volumes. Run it in a process pinned to one core."""
    import tensorflow as tf

    from tfseg.data import augment, pipeline
    from tfseg.data.preprocess import normalize
    from tfseg.records import features

    config = _config(records_dir, batch_size, 1)
    data, aug = config.data, config.augment
    cpu = time.process_time()
    records = [(r,) for r in tf.data.TFRecordDataset(shard_files(records_dir)).take(STAGE_VOLUMES)]
    read = time.process_time() - cpu
    images = sum(int(tf.size(features.parse_volume(r)["slices"])) for r, in records)
    seconds = {"read": read}

    def stage(name, fn, inputs):
        seconds[name], outputs = _timed(fn, inputs)
        return outputs

    stage("parse", lambda s: features.parse_volume(s)["slices"], records)
    volumes = stage("decode", lambda s: (lambda v: (v["image"], v["mask"]))(features.decode_volume(s)), records)
    seconds["decode"] -= seconds["parse"]  # decode_volume parses first
    volumes = stage("normalize", lambda i, m: (normalize(i, data.clip_percentiles)[..., None], m), volumes)
    volumes = stage("pack_masks", lambda i, m: (i, augment.pack_masks(m)), volumes)
    volumes = stage("resize", lambda i, m: pipeline._fit_volume(i, m, data), volumes)
    volumes = stage("quantize", lambda i, m: (augment.quantize(i[..., 0]), m), volumes)
    seed = tf.constant([1, 2], tf.int64)
    volumes = stage("intensity_augment", lambda i, m: (augment.augment_volume(i, aug, seed), m), volumes)
    volumes = stage("context", lambda i, m: (pipeline._context(i, OFFSETS), m), volumes)
    costs = {name: value * 1000 / images for name, value in seconds.items()}

    slices = [(i[k], m[k]) for i, m in volumes for k in range(len(i))]
    pad = lambda t: tf.pad(t, [[16, 16], [16, 16], [0, 0]])  # pad_crop only: a 288 px slice cut to 256
    padded = [(pad(i), pad(m)) for i, m in slices[:64]]
    costs["crop"] = _timed(lambda i, m: pipeline._random_crop(0, i, m, (SIZE, SIZE), 0, 0), padded)[0] * 1000 / 64
    ds = tf.data.Dataset.from_tensor_slices(tuple(tf.stack(t) for t in zip(*slices, strict=True)))
    ds = ds.shuffle(data.shuffle_buffer, seed=0).batch(batch_size, drop_remainder=True)
    cpu = time.process_time()
    batches = [(i, m, seed) for i, m in ds]
    costs["batch"] = (time.process_time() - cpu) * 1000 / images
    count = len(batches) * batch_size
    finish = lambda config: _timed(lambda i, m, s: augment.finish_batch(i, m, s, config), batches)[0] * 1000 / count
    plain = finish(dataclasses.replace(aug, enabled=False))
    geometric = finish(dataclasses.replace(aug, dropout_holes=0))
    costs |= {"to_float": plain, "geometric_augment": geometric - plain, "dropout": finish(aug) - geometric}
    return costs


def measure(records_dir, batches: int, batch_size: int, shuffle_buffer: int, warmup_volumes: float,
            cores: int) -> dict:
    """Every mode on `cores` cores, plus the stage profile on one: call it in a fresh process."""
    _pin(cores)
    out = {}
    if cores == 1:
        out |= {f"stage_{name}_cpu_ms": value for name, value in stage_costs(records_dir, batch_size).items()}
    for mode in MODES:
        if mode == "decode":
            rate, cpu = _decode_rate(records_dir, cores)
        else:
            rate, cpu = _pipeline_rate(records_dir, batches, batch_size, shuffle_buffer, warmup_volumes, mode, cores)
        out[f"{mode}_img_per_s_{cores}core"], out[f"{mode}_cpu_ms_per_img_{cores}core"] = rate, cpu
    return out


class NotebookLoader:
    """A public-notebook loader (2.5D, flip + shift/scale/rotate), as fast as cv2 and numpy make it: every
    lookup is a dict built once; per sample it still reads three PNGs and decodes the slice's RLEs, as
    those loaders do, and cv2 does the resizing and warping."""

    def __init__(self, data_dir, batch_size: int, seed: int = 0):
        data_dir = Path(data_dir)
        import pandas as pd  # here: `python -m tfseg.bench --help` imports every benchmark module

        labels = pd.read_csv(data_dir / "train.csv", keep_default_na=False)
        self.rles = {(i, c): s for i, c, s in zip(labels["id"], labels["class"], labels["segmentation"], strict=True)}
        self.paths, self.depth, self.samples = {}, {}, []
        for path in sorted(data_dir.glob("train/*/*/scans/*.png")):
            case_day, fields = path.parts[-3], path.name.split("_")  # slice_SSSS_W_H_pw_ph.png
            number, width, height = int(fields[1]), int(fields[2]), int(fields[3])
            self.paths[case_day, number] = str(path)
            self.depth[case_day] = max(self.depth.get(case_day, 0), number)
            self.samples.append((case_day, number, height, width))
        self.batch_size, self.rng = batch_size, np.random.default_rng(seed)

    def image(self, case_day: str, number: int) -> np.ndarray:
        channels = []
        for offset in OFFSETS:
            s = min(max(number + offset, 1), self.depth[case_day])
            channels.append(cv2.imread(self.paths[case_day, s], cv2.IMREAD_UNCHANGED))
        img = cv2.merge(channels).astype(np.float32)
        low, high = float(img.min()), float(img.max())
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        return (img - low) * (1 / (high - low + 1e-6))

    def mask(self, case_day: str, number: int, shape) -> np.ndarray:
        slice_id = f"{case_day}_slice_{number:04d}"
        masks = cv2.merge([rle.decode(self.rles[slice_id, c], shape) for c in CLASSES])
        return cv2.resize(masks, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)

    def augment(self, img: np.ndarray, msk: np.ndarray):
        angle, scale = self.rng.uniform(-15, 15), self.rng.uniform(0.9, 1.1)
        matrix = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
        matrix[:, 2] += self.rng.uniform(-0.0625, 0.0625, 2) * SIZE
        if self.rng.random() < 0.5:  # the flip folded into the one warp
            matrix[0] = -matrix[0]
            matrix[0, 2] += SIZE - 1
        img = cv2.warpAffine(img, matrix, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        msk = cv2.warpAffine(msk, matrix, (SIZE, SIZE), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
        return img, msk

    def __iter__(self):
        while True:
            order = self.rng.permutation(len(self.samples))
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                images = np.empty((self.batch_size, SIZE, SIZE, len(OFFSETS)), np.float32)
                masks = np.empty((self.batch_size, SIZE, SIZE, len(CLASSES)), np.uint8)
                for k, i in enumerate(order[start:start + self.batch_size]):
                    case_day, number, height, width = self.samples[i]
                    images[k], masks[k] = self.augment(self.image(case_day, number),
                                                       self.mask(case_day, number, (height, width)))
                yield images, masks


def run(args) -> dict:
    data_dir, records_dir = _inputs(args)
    shard_files(records_dir)  # fails early and clearly on an incomplete folder
    # The notebook loader first, before any tf.data threads exist in this process. It buffers nothing,
    # so a third of the batches give its steady rate.
    notebook, notebook_cpu = _rate(NotebookLoader(data_dir, args.batch_size), max(1, args.batches // 3), warmup=2)
    figures = {"notebook_img_per_s": notebook, "notebook_cpu_ms_per_img": notebook_cpu}
    # A fresh process per core count, pinned before TensorFlow starts its thread pools.
    for cores in (1, 2):
        if cores > len(os.sched_getaffinity(0)):
            figures |= {f"{mode}_{what}_{cores}core": math.nan
                        for mode in MODES for what in ("img_per_s", "cpu_ms_per_img")}
            continue
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            figures |= pool.submit(measure, records_dir, args.batches, args.batch_size, args.shuffle_buffer,
                                   args.warmup_volumes, cores).result()
    for mode in MODES:
        figures[f"{mode}_core_scaling"] = figures[f"{mode}_img_per_s_2core"] / figures[f"{mode}_img_per_s_1core"]
    figures |= {f"{mode}_vs_notebook": figures[f"{mode}_img_per_s_2core"] / notebook for mode in MODES[1:]}
    for mode in MODES[1:]:  # same core count on both sides
        for cores in (1, 2):
            figures[f"{mode}_vs_decode_{cores}core"] = (figures[f"{mode}_img_per_s_{cores}core"]
                                                        / figures[f"decode_img_per_s_{cores}core"])
    return figures
