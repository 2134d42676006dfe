"""make_records' workers: read and check one volume's scans and masks and serialize it as a record.

Workers hand records over in temp files, not through the pool's pipe: Python's multiprocessing reads
a large message with one allocation per pipe-sized chunk, which costs the parent more CPU than the
workers' whole job. Workers never import TensorFlow (features.encode_volume needs none), so they
start fast.
"""

import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import sys
from pathlib import Path

import cv2
import numpy as np

from tfseg import CLASSES
from tfseg.errors import DataError
from tfseg.kaggle import rle, scans
from tfseg.records import features

TEMP_VOLUME = re.compile(r"\.volume-\d{5}\.tmp")  # a worker's serialized volume, waiting to be written
PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def temp_volume_name(task: int) -> str:
    return f".volume-{task:05d}.tmp"


def _read_slice(task: dict, slice_id: str, path: str, rles) -> tuple[bytes, list[np.ndarray]]:
    """The scan's own PNG bytes (checked: decodable, 16-bit, one channel, size as named) and its
    mask as one 0/1 layer per class."""
    h, w = task["meta"]["height"], task["meta"]["width"]
    try:
        scans.read_scan(path, (h, w))
        png = Path(path).read_bytes()  # already a lossless 16-bit PNG: storing it as is is exact and fast
    except OSError as err:
        raise DataError(f"{path}: cannot read scan ({err.strerror or err})") from None
    layers = []
    for cls, text in zip(CLASSES, rles, strict=True):
        try:
            layers.append(rle.decode(text, (h, w)))
        except ValueError as err:
            raise DataError(f"{task['csv']}: id {slice_id!r} class {cls}: segmentation does not fit the "
                            f"{w} x {h} scan: {err}") from None
    return png, layers


def read_volume(task: dict) -> tuple[bytes | None, dict]:
    """Worker: one volume -> (its serialized Example, or None if it is left out; an info dict for the
    manifest: counts, organ content, skipped input)."""
    meta = task["meta"]
    info = {"case_day": meta["case_day"], "case": meta["case"], "fold": meta["fold"], "stored": False,
            "slices": 0, "size": f"{meta['width']}x{meta['height']}", "skipped": []}
    nums, images, masks = [], [], []
    organ_slices = np.zeros(len(CLASSES), np.int64)
    organ_pixels = np.zeros(len(CLASSES), np.int64)
    for num, slice_id, path, rles in task["slices"]:
        try:
            png, layers = _read_slice(task, slice_id, path, rles)
        except DataError as err:
            if task["on_error"] == "fail":
                raise
            info["skipped"].append({"id": slice_id, "reason": str(err)})
            continue
        pixels = np.array([np.count_nonzero(layer) for layer in layers])
        organ_pixels += pixels
        organ_slices += pixels > 0
        nums.append(num)
        images.append(png)
        masks.append(scans.encode_png(np.stack(layers, axis=-1), scans.FLAT))
    info.update(organ_slices=organ_slices.tolist(), organ_pixels=organ_pixels.tolist())
    # A slice left out inside the stack would silently misplace 2.5D neighbours: drop the volume too.
    if not nums or nums != list(range(nums[0], nums[0] + len(nums))):
        bad = ", ".join(s["id"] for s in info["skipped"])
        info["skipped"].append({"id": meta["case_day"], "reason": f"{meta['case_day']}: volume left out: "
                                f"bad slice(s) {bad} would leave {'a gap' if nums else 'no slice'}"})
        return None, info
    info.update(stored=True, slices=len(nums))
    return features.encode_volume(**meta, slices=nums, image_png=images, mask_png=masks), info


def _read_volume_to_file(task_and_path: tuple[dict, str]) -> tuple[str | None, dict]:
    """Pool worker: read_volume, with the record written to the given temp file (see the module doc)."""
    task, path = task_and_path
    record, info = read_volume(task)
    if record is None:
        return None, info
    Path(path).write_bytes(record)
    return path, info


def _take(result: tuple[str | None, dict]) -> tuple[bytes | None, dict]:
    path, info = result
    if path is None:
        return None, info
    record = Path(path).read_bytes()
    os.unlink(path)
    return record, info


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Die with the forkserver, which exits as soon as make_records does (even on kill -9): an orphan
    # would finish its volume and drop a temp file into the folder that a rerun is already using.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    cv2.setNumThreads(1)


def read_volumes(todo: list[dict], first: int, out: Path, workers: int, stack: contextlib.ExitStack):
    """read_volume over todo (task numbers from `first`), results in order: in this process, or in a
    pool of workers."""
    if workers == 1:
        return map(read_volume, todo)
    # forkserver: workers start from a clean process that imported what they use, never from a parent
    # whose TensorFlow (or other) threads may hold locks. Leaving the block terminates the pool: an
    # error stops it at once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    pool = stack.enter_context(context.Pool(workers, initializer=_worker_init))
    temps = [str(out / temp_volume_name(i)) for i in range(first, first + len(todo))]
    return map(_take, pool.imap(_read_volume_to_file, zip(todo, temps, strict=True)))

