"""Reading tfseg TFRecords: shard selection by fold, and a plain numpy volume reader for tools."""

from collections.abc import Iterator
from pathlib import Path

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
