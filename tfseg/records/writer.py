"""Turn a Kaggle-layout folder into sharded TFRecords (one Example per case-day volume) and a manifest.

Shards are grouped by fold (`fold{k}-{i:05d}-of-{n:05d}.tfrecord`), so choosing folds is choosing
files. Worker processes read, check and serialize volumes (records.volumes); this process writes the
records in a fixed order, so the bytes do not depend on the number of workers. Shards are hidden temp
files until every volume has been read, then renamed; manifest.json comes last and marks the folder
complete, and a state file lets a killed run resume (records.shards). TensorFlow is imported only once
there is work to do: no-op reruns and refusals are instant.
"""

import contextlib
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from tfseg import __version__
from tfseg.errors import ConfigError, DataError, check_ranges
from tfseg.kaggle.folds import FOLD_SEED
from tfseg.layout import MANIFEST
from tfseg.records import manifest as manifest_lib
from tfseg.records import plan, reader, shards, volumes


def build_records(data_dir, out_dir, *, folds: int = 5, workers: int | None = None, shard_mb: float = 150,
                  on_error: str = "fail", overwrite: bool = False, keep_mislabelled: bool = False,
                  progress: bool = True) -> dict:
    """Write the records of a Kaggle-layout folder to out_dir; returns the manifest.

    A complete out_dir made from the same data with the same settings is left as it is; one made
    otherwise raises DataError naming the differences, unless overwrite. on_error "fail" stops at
    the first bad input and writes no shard; "skip" leaves bad slices (or volumes) out and lists them.
    The known-mislabelled case-days (kaggle.constants.KNOWN_MISLABELLED) are left out and listed under
    "excluded" unless keep_mislabelled; settings name them only when the data holds them, so records of
    data without them keep the settings they had before this rule existed.
    workers > 1 start processes with multiprocessing's forkserver: a script calling this needs the
    `if __name__ == "__main__":` guard.
    """
    check_ranges("records", [("folds", folds, folds >= 1, ">= 1"), ("shard_mb", shard_mb, shard_mb > 0, "> 0"),
                             ("workers", workers, workers is None or workers >= 1, ">= 1")])
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
                "fold_seed": FOLD_SEED, "input_fingerprint": plan.input_fingerprint(data_dir)}
    mislabelled = plan.mislabelled_present(data_dir)
    exclude = () if keep_mislabelled else tuple(mislabelled)
    if exclude:
        settings["excluded_mislabelled"] = list(exclude)
    if (out / MANIFEST).exists():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
        diffs = manifest_lib.differences(old, settings)
        if not diffs and not reader.damaged_shards(out):  # sizes and sha256: a damaged shard is remade
            say(f"{out} is up to date (same data and settings); nothing to do")
            return old
        if diffs and not overwrite:
            raise DataError(f"{out} holds records made with other settings: {'; '.join(diffs)}. "
                            "Use --overwrite to replace them (or choose another --out)")
        say(f"{out}: replacing the records there ({'; '.join(diffs) or 'shard files missing or damaged'})")

    import tensorflow as tf  # only now that there is work to do: --help and no-op reruns stay quick

    start_time = time.perf_counter()
    tasks, skipped = plan.plan(data_dir, folds, on_error, exclude)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = {"settings": settings, "tfseg_version": __version__,
           "volumes": [t["meta"]["case_day"] for t in tasks]}
    state = shards.resume(out, key, len(tasks))
    shards.clean(out, {s["temp"] for s in state["shards"] if not s["renamed"]})
    start = len(state["infos"])
    if start:
        say(f"resuming: {len(state['shards'])} finished shard(s) of an interrupted run reused")
    todo = tasks[start:]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
    writer = shards.ShardWriter(out, shard_mb * 1e6, state, tf.io.TFRecordWriter)
    slices = [len(t["slices"]) for t in tasks]
    try:
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(tqdm(total=sum(slices), initial=sum(slices[:start]), unit="slice",
                                           desc="records", disable=not progress, dynamic_ncols=True))
            for i, (record, info) in enumerate(volumes.read_volumes(todo, start, out, workers, stack), start):
                writer.add(i, record, info)
                bar.update(slices[i])
            writer.close(len(tasks))
        manifest = manifest_lib.build_manifest(settings, state["shards"], state["infos"], skipped,
                                               kept_mislabelled=mislabelled if keep_mislabelled else [])
        empty = [f["fold"] for f in manifest["folds"] if not f["volumes"]]
        if empty:
            raise DataError(f"{data_dir}: fold(s) {empty} have no volume left after skipping bad input")
    except DataError:
        writer.abandon()  # bad input: a rerun must start afresh, so nothing of this run is kept
        shards.clean(out, set())
        (out / shards.STATE).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    except BaseException:
        writer.abandon()
        raise
    manifest_lib.finish(out, manifest, state)
    seconds = time.perf_counter() - start_time
    megabytes = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    say(f"wrote {out}: {len(manifest['shards'])} shard(s), {megabytes:.1f} MB in {seconds:.1f} s "
        f"({sum(slices[start:]) / seconds:.0f} slices/s, {workers} worker(s))")
    return manifest

