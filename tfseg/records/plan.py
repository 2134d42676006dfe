"""What make_records will write: the input's fingerprint, per-volume checks, folds, one task per volume."""

import hashlib
import os
from pathlib import Path

from tfseg import CLASSES, files
from tfseg.errors import DataError
from tfseg.kaggle.constants import KNOWN_MISLABELLED
from tfseg.kaggle.folds import assign_folds
from tfseg.kaggle.index import scan_dataset


def input_fingerprint(data_dir: Path) -> str:
    """sha256 over train.csv and the name and contents of every scan file: a scan rewritten in place
    with the same size changes it too. Reading the scans costs seconds for the full data set."""
    digest = hashlib.sha256()
    csv_path = data_dir / "train.csv"
    if csv_path.exists():
        digest.update(files.sha256(csv_path).encode())
    split = data_dir / ("train" if csv_path.exists() else "test")
    for root, dirs, names in os.walk(split, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(root, name)
            digest.update(f"{path.relative_to(data_dir)}\0{files.sha256(path)}\n".encode())
    return digest.hexdigest()


def mislabelled_present(data_dir: Path) -> list[str]:
    """The known-mislabelled case-days that data_dir holds (labelled layouts only: a folder without
    train.csv has no labels to be wrong). A folder check, so settings are known before any indexing."""
    if not (data_dir / "train.csv").exists():
        return []
    return [d for d in KNOWN_MISLABELLED if (data_dir / "train" / d.split("_")[0] / d).is_dir()]


def check_volume(case_day: str, group) -> str | None:
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


def plan(data_dir: Path, n_folds: int, on_error: str,
         exclude: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """Index the data and check each volume; returns (one task per volume in write order, skipped).
    Case-days in exclude are left out before the checks and the fold assignment."""
    table, skipped = scan_dataset(data_dir, on_error=on_error)
    table = table[~table["case_day"].isin(exclude)]
    skipped = [s for s in skipped if s["id"].split("_slice_")[0] not in exclude]
    keep = []
    for case_day, group in table.groupby("case_day", sort=False):
        reason = check_volume(case_day, group)
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

