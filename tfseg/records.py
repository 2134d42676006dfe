"""Reading tfseg TFRecords: shard selection by fold, and a plain numpy volume reader for tools."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

from tfseg.errors import DataError

SHARD_PATTERN = re.compile(r"fold(\d+)-(\d{5})-of-(\d{5})\.tfrecord")


def shard_name(fold: int, index: int, count: int) -> str:
    return f"fold{fold}-{index:05d}-of-{count:05d}.tfrecord"


def read_manifest(records_dir: str | Path) -> dict:
    """The manifest written last by make_records: its presence means the records are complete."""
    path = Path(records_dir) / "manifest.json"
    if not path.exists():
        raise DataError(f"{records_dir}: no manifest.json; not a complete tfseg records folder "
                        "(run python -m tfseg.make_records)")
    return json.loads(path.read_text())


def shard_files(records_dir: str | Path, folds=None) -> list[str]:
    """Complete shard paths of the chosen folds (all if None), sorted, as listed in the manifest."""
    manifest = read_manifest(records_dir)
    wanted = None if folds is None else {int(f) for f in folds}
    known = set(range(int(manifest["settings"]["folds"])))
    if wanted is not None and not wanted <= known:
        raise DataError(f"{records_dir}: fold(s) {sorted(wanted - known)} do not exist "
                        f"(folds are 0..{len(known) - 1})")
    paths = []
    for shard in manifest["shards"]:
        fold = int(SHARD_PATTERN.fullmatch(Path(shard["path"]).name).group(1))
        if wanted is None or fold in wanted:
            paths.append(str(Path(records_dir) / shard["path"]))
    return sorted(paths)


def read_volumes(records_dir: str | Path, folds=None) -> Iterator[dict]:
    """Yield every volume of the chosen folds as numpy: case_day, image uint16 [D, H, W],
    mask uint8 [D, H, W, 3], slices, fold, spacing (plus case, day)."""
    # TensorFlow loads here, not at import: tools that only list shards (make_records) start at once.
    import tensorflow as tf

    from tfseg import features

    for serialized in tf.data.TFRecordDataset(shard_files(records_dir, folds)):
        yield features.numpy_volume(features.decode_volume(serialized))
