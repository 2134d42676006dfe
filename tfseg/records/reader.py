"""Reading tfseg TFRecords: shard selection by fold, the check of those shards against the manifest,
and a plain numpy volume reader for tools."""

from collections.abc import Iterator
from pathlib import Path

from tfseg import files
from tfseg.errors import DataError
from tfseg.layout import read_manifest, shard_fold


def shard_files(records_dir: str | Path, folds=None) -> list[str]:
    """Complete shard paths of the chosen folds (all if None), sorted, as listed in the manifest."""
    manifest = read_manifest(records_dir)
    wanted = None if folds is None else {int(f) for f in folds}
    known = set(range(int(manifest["settings"]["folds"])))
    if wanted is not None and not wanted <= known:
        raise DataError(f"{records_dir}: fold(s) {sorted(wanted - known)} do not exist "
                        f"(folds are 0..{len(known) - 1})")
    paths = [str(Path(records_dir) / shard["path"]) for shard in manifest["shards"]
             if wanted is None or shard_fold(shard["path"]) in wanted]
    return sorted(paths)


def damaged_shards(records_dir: str | Path, folds=None) -> list[str]:
    """'shard: what is wrong' for every shard of the chosen folds (all if None) that is missing or differs
    from the manifest in size or sha256 (the size alone for a manifest without checksums)."""
    manifest = read_manifest(records_dir)
    wanted = set(range(int(manifest["settings"]["folds"]))) if folds is None else {int(f) for f in folds}
    damaged = []
    for shard in manifest["shards"]:
        path = Path(records_dir) / shard["path"]
        if shard_fold(shard["path"]) not in wanted:
            continue
        if not path.is_file():
            damaged.append(f"{path}: missing")
        elif path.stat().st_size != shard["bytes"]:
            damaged.append(f"{path}: {path.stat().st_size:,} bytes, the manifest says {shard['bytes']:,}")
        elif "sha256" in shard and files.sha256(path) != shard["sha256"]:
            damaged.append(f"{path}: contents changed (sha256 differs from the manifest's)")
    return damaged


def remake_command(records_dir: str | Path) -> str:
    """The make_records command that rebuilds a records folder with the settings in its manifest."""
    manifest = read_manifest(records_dir)
    settings = manifest["settings"]
    extra = "".join([f" --shard-mb {settings['shard_mb']}" if settings.get("shard_mb", 150) != 150 else "",
                     " --on-error skip" if settings.get("on_error") == "skip" else "",
                     " --keep-mislabelled" if manifest.get("kept_mislabelled") else ""])
    return (f"python -m tfseg.make_records --data-dir {settings['data_dir']} --out {records_dir} "
            f"--num-folds {settings['folds']}{extra}")


def check_shards(records_dir: str | Path, folds=None) -> None:
    """DataError naming every damaged shard of the chosen folds (damaged_shards) and how to remake them.
    Reads each shard once (sha256): about 1.4 s per GB on a 2-core machine, before any run starts."""
    damaged = damaged_shards(records_dir, folds)
    if damaged:
        raise DataError(f"{'; '.join(damaged)}: the records in {records_dir} are damaged; remake them with "
                        f"`{remake_command(records_dir)}` (it rewrites the damaged shards), or check them with "
                        f"`python -m tfseg.inspect_records {records_dir} --verify`")


def fold_cases(records_dir: str | Path) -> dict[int, list[int]]:
    """fold -> case numbers in it, from the manifest."""
    return {int(f["fold"]): [int(c) for c in f["case_ids"]] for f in read_manifest(records_dir)["folds"]}


def read_volumes(records_dir: str | Path, folds=None) -> Iterator[dict]:
    """Yield every volume of the chosen folds as numpy: case_day, image uint16 [D, H, W],
    mask uint8 [D, H, W, 3], slices, fold, spacing (plus case, day)."""
    # TensorFlow loads here, not at import: tools that only list shards (make_records) start at once.
    import tensorflow as tf

    from tfseg.records import features

    for serialized in tf.data.TFRecordDataset(shard_files(records_dir, folds)):
        yield features.numpy_volume(features.decode_volume(serialized))
