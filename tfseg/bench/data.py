"""Input pipeline speed: images/s of tfseg.data (with and without augmentation) against the loader of
public Kaggle notebooks, at 256 x 256 with 3-channel 2.5D input, and its scaling from one to two cores.
CPU milliseconds per image are reported too: they stay comparable when other work shares the cores.

The notebook loader is the usual Python generator: per sample it looks the neighbour slices up in a
pandas table, reads their PNGs with cv2, decodes the sample's RLEs from train.csv (pandas lookups per
sample), resizes, flips and cv2.warpAffine's, and stacks batches in numpy.
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
import pandas as pd

from tfseg import CLASSES, layout
from tfseg.config import AugmentConfig, Config, DataConfig
from tfseg.kaggle import rle
from tfseg.records.reader import shard_files

SIZE = 256
OFFSETS = (-2, 0, 2)
# Every augmentation on, grid distortion and coarse dropout included: the slowest training setting.
FULL_AUGMENT = AugmentConfig(grid_distortion=0.03, dropout_holes=2)
WARMUP_VOLUMES = 6  # volumes' worth of batches after the shuffle buffer is full, before timing


def add_arguments(parser) -> None:
    parser.add_argument("--records", metavar="DIR", default=layout.RECORDS_DIR,
                        help="tfseg records made from --data-dir (made if missing) (default: %(default)s)")
    parser.add_argument("--data-dir", metavar="DIR", default=layout.SYNTH_DATA_DIR,
                        help="the Kaggle-layout folder the records came from; the notebook loader reads it "
                             "(default: %(default)s, the synthetic dataset, made if missing)")
    parser.add_argument("--batches", type=int, default=100, metavar="N",
                        help="timed batches per measurement, after warm-up; the pipeline needs many volumes' "
                             "worth for a steady-state figure (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--shuffle-buffer", type=int, default=DataConfig.shuffle_buffer,
                        help="slices in the pipeline's shuffle buffer (default: %(default)s)")


def _inputs(args) -> tuple[Path, Path]:
    data_dir, records_dir = Path(args.data_dir), Path(args.records)
    if data_dir == Path(layout.SYNTH_DATA_DIR):
        from tfseg.kaggle import synth

        synth.ensure_dataset(data_dir)
    if not (records_dir / layout.MANIFEST).exists():
        from tfseg.records.writer import build_records

        build_records(data_dir, records_dir)
    return data_dir, records_dir


def _config(records_dir, batch_size: int, shuffle_buffer: int, augment: bool) -> Config:
    data = DataConfig(records=str(records_dir), image_size=(SIZE, SIZE), offsets=OFFSETS, batch_size=batch_size,
                      shuffle_buffer=shuffle_buffer)
    return Config(data=data, augment=dataclasses.replace(FULL_AUGMENT, enabled=augment))


def _rate(batches, count: int, warmup: int) -> tuple[float, float]:
    """(images/s, CPU ms of this process per image) over `count` batches of an iterable of (x, y)
    batches, after `warmup` batches. CPU time per image stays comparable on a busy machine."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, cpu, images = time.perf_counter(), time.process_time(), 0
    for _ in range(count):
        images += len(next(it)[0])
    return images / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / images


def pipeline_rate(records_dir, batches: int, batch_size: int, shuffle_buffer: int, augment: bool = True,
                  cores: int | None = None) -> tuple[float, float]:
    """tfseg.data.train_dataset's (images/s, CPU ms per image); with `cores`, pinned to that many cores
    (call it in a fresh process: TensorFlow sizes its thread pools from the CPU affinity when it starts)."""
    if cores is not None:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    import tensorflow as tf

    from tfseg.data.pipeline import train_dataset

    if cores is not None:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(cores)
    ds = train_dataset(_config(records_dir, batch_size, shuffle_buffer, augment), folds=None)
    if cores is not None:
        options = tf.data.Options()
        options.threading.private_threadpool_size = cores
        ds = ds.with_options(options)
    # Warm-up fills the shuffle buffer, then drains the volumes decoded ahead meanwhile (timing them
    # would flatter the pipeline) and lets autotune settle: only then does the clock start.
    return _rate(ds, batches, warmup=math.ceil(shuffle_buffer / batch_size) + WARMUP_VOLUMES * 144 // batch_size)


class NotebookLoader:
    """The public-notebook loader (2.5D, flips + shift/scale/rotate), written the way notebooks do."""

    def __init__(self, data_dir, batch_size: int, seed: int = 0):
        data_dir = Path(data_dir)
        self.labels = pd.read_csv(data_dir / "train.csv", keep_default_na=False)
        scans = pd.DataFrame({"path": sorted(str(p) for p in data_dir.glob("train/*/*/scans/*.png"))})
        scans["case_day"] = scans["path"].map(lambda p: Path(p).parts[-3])
        parts = scans["path"].map(lambda p: Path(p).name.split("_"))  # slice_SSSS_W_H_pw_ph.png
        scans["slice"] = parts.map(lambda f: int(f[1]))
        scans["height"], scans["width"] = parts.map(lambda f: int(f[3])), parts.map(lambda f: int(f[2]))
        scans["id"] = scans["case_day"] + "_slice_" + scans["slice"].map("{:04d}".format)
        scans["depth"] = scans.groupby("case_day")["slice"].transform("max")
        self.scans, self.batch_size = scans, batch_size
        self.rng = np.random.default_rng(seed)

    def load_image(self, row) -> np.ndarray:
        channels = []
        for offset in OFFSETS:
            s = min(max(row["slice"] + offset, 1), row["depth"])
            match = self.scans[(self.scans["case_day"] == row["case_day"]) & (self.scans["slice"] == s)]
            img = cv2.imread(match["path"].iloc[0], cv2.IMREAD_UNCHANGED).astype(np.float32)
            img = (img - img.min()) / (img.max() - img.min() + 1e-6)
            channels.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
        return np.stack(channels, axis=-1)

    def load_mask(self, slice_id: str, shape) -> np.ndarray:
        rows = self.labels[self.labels["id"] == slice_id]
        masks = [rle.decode(rows.loc[rows["class"] == c, "segmentation"].iloc[0], shape) for c in CLASSES]
        return cv2.resize(np.stack(masks, axis=-1), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)

    def augment(self, img: np.ndarray, msk: np.ndarray):
        if self.rng.random() < 0.5:
            img, msk = np.flip(img, axis=1), np.flip(msk, axis=1)
        angle, scale = self.rng.uniform(-15, 15), self.rng.uniform(0.9, 1.1)
        matrix = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
        matrix[:, 2] += self.rng.uniform(-0.0625, 0.0625, 2) * SIZE
        img = cv2.warpAffine(np.ascontiguousarray(img), matrix, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT)
        msk = cv2.warpAffine(np.ascontiguousarray(msk), matrix, (SIZE, SIZE), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT)
        return img, msk

    def __iter__(self):
        while True:
            order = self.rng.permutation(len(self.scans))
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                images, masks = [], []
                for i in order[start:start + self.batch_size]:
                    row = self.scans.iloc[i]
                    img = self.load_image(row)
                    msk = self.load_mask(row["id"], (row["height"], row["width"]))
                    img, msk = self.augment(img, msk)
                    images.append(img)
                    masks.append(msk)
                yield np.stack(images).astype(np.float32), np.stack(masks).astype(np.float32)


def run(args) -> dict:
    data_dir, records_dir = _inputs(args)
    shard_files(records_dir)  # fails early and clearly on an incomplete folder
    common = (records_dir, args.batches, args.batch_size, args.shuffle_buffer)
    # The notebook loader first, before any tf.data threads exist in this process. It buffers nothing,
    # so a third of the batches give its steady rate.
    notebook, notebook_cpu = _rate(NotebookLoader(data_dir, args.batch_size), max(1, args.batches // 3), warmup=2)
    pipeline, pipeline_cpu = pipeline_rate(*common, augment=True)
    figures = {"pipeline_img_per_s": pipeline, "no_aug_img_per_s": pipeline_rate(*common, augment=False)[0],
               "notebook_loader_img_per_s": notebook, "speedup_vs_notebook": pipeline / notebook,
               "pipeline_cpu_ms_per_img": pipeline_cpu, "notebook_cpu_ms_per_img": notebook_cpu}
    # Core scaling: a fresh process per setting, pinned before TensorFlow starts its thread pools.
    for cores in (1, 2):
        key = f"pipeline_{cores}core_img_per_s"
        if cores > len(os.sched_getaffinity(0)):
            figures[key] = math.nan
            continue
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            figures[key] = pool.submit(pipeline_rate, *common, cores=cores).result()[0]
    figures["core_scaling"] = figures["pipeline_2core_img_per_s"] / figures["pipeline_1core_img_per_s"]
    return figures
