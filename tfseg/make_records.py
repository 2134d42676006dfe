"""Turn a Kaggle-layout folder into sharded TFRecords (one Example per case-day volume) and a manifest.

Shards are grouped by fold (`fold{k}-{i:05d}-of-{n:05d}.tfrecord`), so choosing folds is choosing
files. Worker processes read and check the scans and masks of a volume and serialize it (without
TensorFlow: features.encode_volume); the parent writes the records in a fixed order, so the bytes do
not depend on the number of workers. Workers hand records over in temp files, not through the pool's
pipe: Python's multiprocessing reads a large message with one allocation per pipe-sized chunk, which
cost the parent more CPU than the workers' whole job on 15 MB volumes. Shards are hidden temp files
until every volume has been read, then renamed; manifest.json comes last and marks the folder complete.
A small state file lists finished temp shards (with sha256), so a killed run resumes where it stopped.
TensorFlow is imported only once there is work to do: --help, no-op reruns and refusals are instant,
and the workers (which never need it) start fast.
"""

import argparse
import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tfseg import CLASSES, __version__, cli, features, files, paths, rle, scans
from tfseg.errors import ConfigError, DataError
from tfseg.folds import FOLD_SEED, assign_folds
from tfseg.index import scan_dataset
from tfseg.records import SHARD_PATTERN, shard_name

MANIFEST = "manifest.json"
STATE = ".make_records-state.json"
TEMP_SHARD = re.compile(r"\.fold\d+-\d{5}\.tfrecord\.tmp")
TEMP_VOLUME = re.compile(r"\.volume-\d{5}\.tmp")  # a worker's serialized volume, waiting to be written
ATOMIC_TEMP = re.compile(rf"\.({re.escape(MANIFEST)}|{re.escape(STATE)})\..+\.tmp")  # files.atomic_path's
PR_SET_PDEATHSIG = 1  # from linux/prctl.h
RECORD_OVERHEAD = 16  # TFRecord framing per record: length, its CRC, the data's CRC


def input_fingerprint(data_dir: Path) -> str:
    """sha256 of train.csv plus the name and size of every scan file: cheap, and changes with the data."""
    digest = hashlib.sha256()
    csv_path = data_dir / "train.csv"
    if csv_path.exists():
        digest.update(files.sha256(csv_path).encode())
    split = data_dir / ("train" if csv_path.exists() else "test")
    for root, dirs, names in os.walk(split, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(root, name)
            digest.update(f"{path.relative_to(data_dir)}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()


# ---- planning: index, per-volume checks, folds ---------------------------------------------------

def _check_volume(case_day: str, group) -> str | None:
    """Why a volume cannot be one [D, H, W] stack (a gap in its slice numbers, mixed sizes), or None."""
    folder = Path(group["path"].iloc[0]).parent
    nums = group["slice"].tolist()
    missing = sorted(set(range(nums[0], nums[-1] + 1)) - set(nums))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        return (f"{case_day}: slice numbers have a gap (missing slice {shown} of {nums[0]}..{nums[-1]}) "
                f"in {folder}")
    geometry = group[["width", "height", "spacing_w", "spacing_h"]].drop_duplicates()
    if len(geometry) > 1:
        kinds = ", ".join(f"{w}x{h} at {pw}x{ph} mm" for w, h, pw, ph in geometry.itertuples(index=False))
        return f"{case_day}: slices differ in size or spacing ({kinds}) in {folder}; a volume needs one"
    return None


def plan(data_dir: Path, n_folds: int, on_error: str) -> tuple[list[dict], list[dict]]:
    """Index the data and check each volume; returns (one task per volume in write order, skipped)."""
    table, skipped = scan_dataset(data_dir, on_error=on_error)
    keep = []
    for case_day, group in table.groupby("case_day", sort=False):
        reason = _check_volume(case_day, group)
        if reason and on_error == "fail":
            raise DataError(reason)
        if reason:
            skipped.append({"id": case_day, "reason": f"{reason}; volume left out"})
        else:
            keep.append(group)
    if not keep:
        raise DataError(f"{data_dir}: no volume left to write (every one was skipped)")
    fold_of = assign_folds(table[table["case_day"].isin([g["case_day"].iloc[0] for g in keep])], n_folds)
    tasks = []
    for group in keep:
        first = group.iloc[0]
        meta = {"case_day": first["case_day"], "case": int(first["case"]), "day": int(first["day"]),
                "fold": fold_of[first["case_day"]], "height": int(first["height"]),
                "width": int(first["width"]),
                "spacing": (float(first["spacing_w"]), float(first["spacing_h"]))}
        slices = list(zip(group["slice"].tolist(), group["id"], group["path"],
                          group[list(CLASSES)].itertuples(index=False, name=None), strict=True))
        tasks.append({"meta": meta, "slices": slices, "csv": str(data_dir / "train.csv"),
                      "on_error": on_error})
    tasks.sort(key=lambda t: (t["meta"]["fold"], t["meta"]["case"], t["meta"]["day"]))
    return tasks, skipped


# ---- workers: read and check one volume ------------------------------------------------------------

def _mask_png(layers: list[np.ndarray]) -> bytes:
    """PNG of the 0/1 class layers as channels in CLASSES order (scans.encode_png's layout), 4x faster:
    row filters only cost time on flat masks, and run-length zlib packs them smaller."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buf = cv2.imencode(".png", np.stack(layers[::-1], axis=-1), params)  # cv2 writes BGR
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


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
        masks.append(_mask_png(layers))
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


def _volumes(todo: list[dict], first: int, out: Path, workers: int, stack: contextlib.ExitStack):
    """read_volume over todo (task numbers from `first`), results in order: in this process, or in a
    pool of workers."""
    if workers == 1:
        return map(read_volume, todo)
    # forkserver: workers start from a clean process that imported what they use (not this module: it
    # may be __main__, which each worker loads anew), never from a parent whose TensorFlow (or other)
    # threads may hold locks. Leaving the block terminates the pool: an error stops it at once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tfseg.features", "tfseg.index", "tfseg.folds", "tfseg.scans", "tfseg.rle",
                                    "tqdm"])
    pool = stack.enter_context(context.Pool(workers, initializer=_worker_init))
    temps = [str(out / f".volume-{i:05d}.tmp") for i in range(first, first + len(todo))]
    return map(_take, pool.imap(_read_volume_to_file, zip(todo, temps, strict=True)))


# ---- the parent: shards, state, manifest ---------------------------------------------------------

class _Shards:
    """Writes records in order into hidden temp shards of about `limit` bytes, one fold at a time,
    and lists every finished shard in the state file (so a killed run can resume after it)."""

    def __init__(self, out: Path, limit: float, state: dict, open_writer):
        self.out, self.limit, self.state, self.open_writer = out, limit, state, open_writer
        self.writer = self.current = None

    def add(self, task_index: int, record: bytes | None, info: dict) -> None:
        cur = self.current
        if record is not None and cur and (
                cur["fold"] != info["fold"] or cur["bytes"] + len(record) + RECORD_OVERHEAD > self.limit):
            self.close(task_index)
        self.state["infos"].append(info)
        if record is None:
            return
        if self.current is None:
            fold = info["fold"]
            index = sum(s["fold"] == fold for s in self.state["shards"])
            self.current = {"fold": fold, "index": index, "temp": f".fold{fold}-{index:05d}.tfrecord.tmp",
                            "bytes": 0, "volumes": 0, "slices": 0}
            self.writer = self.open_writer(str(self.out / self.current["temp"]))
        self.writer.write(record)
        self.current["bytes"] += len(record) + RECORD_OVERHEAD
        self.current["volumes"] += 1
        self.current["slices"] += info["slices"]

    def close(self, next_task: int) -> None:
        if self.current is None:
            return
        self.writer.close()
        shard, self.current, self.writer = self.current, None, None
        path = self.out / shard["temp"]
        shard.update(bytes=path.stat().st_size, sha256=files.sha256(path), next_task=next_task)
        self.state["shards"].append(shard)
        files.write_json(self.out / STATE, self.state)

    def abandon(self) -> None:
        """After an error: drop the unfinished shard (finished ones stay listed for a rerun)."""
        if self.writer is not None:
            self.writer.close()
            (self.out / self.current["temp"]).unlink(missing_ok=True)
        self.writer = self.current = None


def _final_name(shard: dict, shards: list[dict]) -> str:
    return shard_name(shard["fold"], shard["index"], sum(s["fold"] == shard["fold"] for s in shards))


def _intact(path: Path, shard: dict) -> bool:
    return path.is_file() and path.stat().st_size == shard["bytes"] and files.sha256(path) == shard["sha256"]


def _resume(out: Path, key: dict, n_tasks: int) -> dict:
    """The state of an earlier run with the same key, cut to its shards that are still intact."""
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        state = None
    if not state or state.get("key") != key:
        return {"key": key, "shards": [], "infos": []}
    done = state["shards"]
    finished = bool(done) and done[-1]["next_task"] == n_tasks
    good = []
    for shard in done:  # a kill during the final renames leaves some shards under their final names
        temp_ok = _intact(out / shard["temp"], shard)
        if not (temp_ok or (finished and _intact(out / _final_name(shard, done), shard))):
            break
        good.append(dict(shard, renamed=not temp_ok))
    state["shards"] = good
    state["infos"] = state["infos"][:good[-1]["next_task"] if good else 0]
    return state


def _clean(out: Path, keep: set[str]) -> None:
    """Remove temp files of earlier runs except the finished shards being reused."""
    for path in out.iterdir():
        if ((TEMP_SHARD.fullmatch(path.name) and path.name not in keep) or ATOMIC_TEMP.fullmatch(path.name)
                or TEMP_VOLUME.fullmatch(path.name)):
            path.unlink(missing_ok=True)


def _differences(old: dict, settings: dict) -> list[str]:
    before = old.get("settings", {})
    diffs = [f"{k} {before.get(k)!r} -> {settings.get(k)!r}" if k != "input_fingerprint"
             else "the input data (train.csv or scan files) changed"
             for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if old.get("tfseg_version") != __version__:
        diffs.append(f"tfseg version {old.get('tfseg_version')!r} -> {__version__!r}")
    return diffs


def _manifest(settings: dict, shards: list[dict], infos: list[dict], skipped: list[dict]) -> dict:
    stored = [i for i in infos if i["stored"]]
    folds = []
    for k in range(settings["folds"]):
        vols = [i for i in stored if i["fold"] == k]
        cases = sorted({i["case"] for i in vols})
        folds.append({"fold": k, "cases": len(cases), "volumes": len(vols),
                      "slices": sum(i["slices"] for i in vols), "case_ids": cases})
    sizes: dict[str, dict] = {}
    for i in stored:
        entry = sizes.setdefault(i["size"], {"volumes": 0, "slices": 0})
        entry["volumes"] += 1
        entry["slices"] += i["slices"]
    return {
        "tfseg_version": __version__,
        "settings": settings,
        "num_volumes": len(stored),
        "num_slices": sum(i["slices"] for i in stored),
        "num_cases": len({i["case"] for i in stored}),
        "folds": folds,
        "classes": {c: {"slices": sum(i["organ_slices"][j] for i in stored),
                        "pixels": sum(i["organ_pixels"][j] for i in stored)} for j, c in enumerate(CLASSES)},
        "image_sizes": sizes,  # "WxH" -> volumes, slices
        "shards": [{"path": _final_name(s, shards), "fold": s["fold"], "volumes": s["volumes"],
                    "slices": s["slices"], "bytes": s["bytes"], "sha256": s["sha256"]} for s in shards],
        "skipped": skipped + [s for i in infos for s in i["skipped"]],
    }


def _finish(out: Path, manifest: dict, state: dict) -> None:
    """Swap in the new shards: the old manifest goes first, so the folder never looks complete half-way."""
    (out / MANIFEST).unlink(missing_ok=True)
    final = {s["path"] for s in manifest["shards"]}
    for path in out.iterdir():
        if SHARD_PATTERN.fullmatch(path.name) and path.name not in final:
            path.unlink()
    for shard, entry in zip(state["shards"], manifest["shards"], strict=True):
        if not shard.get("renamed"):
            os.replace(out / shard["temp"], out / entry["path"])
    files.write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)


def _up_to_date(out: Path, manifest: dict) -> bool:
    return all((out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"]
               for s in manifest["shards"])


def build_records(data_dir, out_dir, *, folds: int = 5, workers: int | None = None, shard_mb: float = 150,
                  on_error: str = "fail", overwrite: bool = False, progress: bool = True) -> dict:
    """Write the records of a Kaggle-layout folder to out_dir; returns the manifest.

    A complete out_dir made from the same data with the same settings is left as it is; one made
    otherwise raises DataError naming the differences, unless overwrite. on_error "fail" stops at
    the first bad input and writes no shard; "skip" leaves bad slices (or volumes) out and lists them.
    workers > 1 start processes with multiprocessing's forkserver: a script calling this needs the
    `if __name__ == "__main__":` guard.
    """
    if folds < 1 or shard_mb <= 0 or (workers is not None and workers < 1):
        raise ConfigError(f"need folds >= 1, shard_mb > 0 and workers >= 1 "
                          f"(got {folds}, {shard_mb}, {workers})")
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    say = print if progress else (lambda *a, **k: None)
    data_dir, out = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    settings = {"data_dir": str(data_dir.resolve()), "folds": int(folds), "on_error": on_error,
                "shard_mb": int(shard_mb) if float(shard_mb).is_integer() else float(shard_mb),
                "fold_seed": FOLD_SEED, "input_fingerprint": input_fingerprint(data_dir)}
    if (out / MANIFEST).exists():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
        diffs = _differences(old, settings)
        if not diffs and _up_to_date(out, old):
            say(f"{out} is up to date (same data and settings); nothing to do")
            return old
        if diffs and not overwrite:
            raise DataError(f"{out} holds records made with other settings: {'; '.join(diffs)}. "
                            "Use --overwrite to replace them (or choose another --out)")
        say(f"{out}: replacing the records there ({'; '.join(diffs) or 'shard files missing or changed'})")

    import tensorflow as tf  # only now that there is work to do: --help and no-op reruns stay quick

    start_time = time.perf_counter()
    tasks, skipped = plan(data_dir, folds, on_error)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = {"settings": settings, "tfseg_version": __version__,
           "volumes": [t["meta"]["case_day"] for t in tasks]}
    state = _resume(out, key, len(tasks))
    _clean(out, {s["temp"] for s in state["shards"] if not s["renamed"]})
    start = len(state["infos"])
    if start:
        say(f"resuming: {len(state['shards'])} finished shard(s) of an interrupted run reused")
    todo = tasks[start:]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
    writer = _Shards(out, shard_mb * 1e6, state, tf.io.TFRecordWriter)
    slices = [len(t["slices"]) for t in tasks]
    try:
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(tqdm(total=sum(slices), initial=sum(slices[:start]), unit="slice",
                                           desc="records", disable=not progress, dynamic_ncols=True))
            for i, (record, info) in enumerate(_volumes(todo, start, out, workers, stack), start):
                writer.add(i, record, info)
                bar.update(slices[i])
            writer.close(len(tasks))
        manifest = _manifest(settings, state["shards"], state["infos"], skipped)
        empty = [f["fold"] for f in manifest["folds"] if not f["volumes"]]
        if empty:
            raise DataError(f"{data_dir}: fold(s) {empty} have no volume left after skipping bad input")
    except DataError:
        writer.abandon()  # bad input: a rerun must start afresh, so nothing of this run is kept
        _clean(out, set())
        (out / STATE).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    except BaseException:
        writer.abandon()
        raise
    _finish(out, manifest, state)
    seconds = time.perf_counter() - start_time
    megabytes = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    say(f"wrote {out}: {len(manifest['shards'])} shard(s), {megabytes:.1f} MB in {seconds:.1f} s "
        f"({sum(slices[start:]) / seconds:.0f} slices/s, {workers} worker(s))")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfseg.make_records",
        description="Turn a Kaggle-layout folder (train.csv + train/caseC/caseC_dayD/scans/*.png) into "
                    "sharded TFRecords for training: one example per case-day volume, shards grouped by "
                    "cross-validation fold (whole cases per fold), manifest.json written last. Safe to "
                    "interrupt: rerun the same command to finish; on complete output it does nothing.")
    parser.add_argument("--data-dir", help="Kaggle-layout data folder (default: the built-in synthetic "
                                           f"dataset in {paths.SYNTH_DATA_DIR}, made first if missing)")
    parser.add_argument("--out", default=paths.RECORDS_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    parser.add_argument("--workers", type=int,
                        help=f"worker processes (default: all cores, {len(os.sched_getaffinity(0))} here)")
    parser.add_argument("--shard-mb", type=float, default=150,
                        help="about this many MB per shard; a volume is never split (default: %(default)s)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="bad input: fail (stop, write nothing) or skip (leave it out, list it in the "
                             "manifest) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace records in --out made from other data or with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        from tfseg import synth

        data_dir = synth.ensure_dataset()
    else:
        data_dir = Path(args.data_dir)
    manifest = build_records(data_dir, args.out, folds=args.folds, workers=args.workers,
                             shard_mb=args.shard_mb, on_error=args.on_error, overwrite=args.overwrite,
                             progress=not args.no_progress)
    from tfseg.inspect_records import summary

    print(summary(manifest))
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        print(f"warning: {len(manifest['skipped'])} item(s) skipped as bad input (listed under 'skipped' in "
              f"{Path(args.out) / MANIFEST}); first: {first['id']}: {first['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
