"""Read a Kaggle-layout folder into one table with a row per slice.

Train layout: `train.csv` (id,class,segmentation; three rows per slice) and
`train/caseC/caseC_dayD/scans/slice_SSSS_W_H_pw_ph.png`. Test layout: `test/...` scans only.
Ids become file paths, so every id is checked against `case{C}_day{D}_slice_{SSSS}` first.
"""

import os
import re
import warnings
from pathlib import Path

import pandas as pd

from tfseg import CLASSES
from tfseg.errors import DataError

ID_PATTERN = re.compile(r"case(\d+)_day(\d+)_slice_(\d{4})")
SCAN_PATTERN = re.compile(r"slice_(\d{4})_(\d+)_(\d+)_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)\.png")
CASE_DIR = re.compile(r"case(\d+)")
DAY_DIR = re.compile(r"case(\d+)_day(\d+)")
MISLABELLED_REASON = "known mislabelled in the competition data"
COLUMNS = ["id", "case", "day", "slice", "case_day", "path", "width", "height", "spacing_w", "spacing_h",
           *CLASSES]


class _Problems:
    """Collects row-level problems: raise at once (fail) or remember them (skip)."""

    def __init__(self, on_error: str):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self.skipped: list[dict] = []

    def add(self, item_id: str, reason: str) -> None:
        if self.on_error == "fail":
            raise DataError(reason)
        self.skipped.append({"id": item_id, "reason": reason})


def _list_scans(root: Path, problems: _Problems) -> pd.DataFrame:
    """Every parsable scan below root/caseC/caseC_dayD/scans/, one row per (case, day, slice)."""
    rows = []
    for case_entry in sorted(os.scandir(root), key=lambda e: e.name) if root.is_dir() else []:
        if not case_entry.is_dir():
            continue
        if not CASE_DIR.fullmatch(case_entry.name):
            problems.add(case_entry.name, f"{case_entry.path}: folder name is not case{{C}}")
            continue
        for day_entry in sorted(os.scandir(case_entry.path), key=lambda e: e.name):
            if not day_entry.is_dir():
                continue
            match = DAY_DIR.fullmatch(day_entry.name)
            if not match or match.group(1) != case_entry.name[4:]:
                problems.add(day_entry.name, f"{day_entry.path}: folder name is not {case_entry.name}_day{{D}}")
                continue
            scans_dir = Path(day_entry.path) / "scans"
            for name in sorted(os.listdir(scans_dir)) if scans_dir.is_dir() else []:
                if not name.endswith(".png"):
                    continue
                parsed = SCAN_PATTERN.fullmatch(name)
                if not parsed:
                    problems.add(name, f"{scans_dir / name}: scan name does not parse as "
                                       "slice_{SSSS}_{W}_{H}_{pw}_{ph}.png")
                    continue
                num, width, height, spacing_w, spacing_h = parsed.groups()
                rows.append((f"{day_entry.name}_slice_{num}", int(match.group(1)), int(match.group(2)),
                             int(num), day_entry.name, str(scans_dir / name), int(width), int(height),
                             float(spacing_w), float(spacing_h)))
    scans = pd.DataFrame(rows, columns=COLUMNS[:10])
    dup = scans["id"].duplicated(keep=False)
    for slice_id in scans.loc[dup, "id"].unique():
        paths = ", ".join(scans.loc[scans["id"] == slice_id, "path"])
        problems.add(slice_id, f"{slice_id}: more than one scan file for one slice: {paths}")
    return scans[~dup].reset_index(drop=True)


def _read_labels(csv_path: Path, problems: _Problems) -> tuple[pd.DataFrame, set[str]]:
    """train.csv -> (one row per good slice id with the three RLE columns, every id in the CSV)."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{csv_path}: not a readable CSV ({err})") from None
    missing = [c for c in ("id", "class", "segmentation") if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (expected id,class,segmentation)")
    table["line"] = table.index + 2  # line numbers as a person sees them (header is line 1)
    bad = set()

    def reject(mask: pd.Series, reason) -> None:
        for _, row in table[mask & ~table.index.isin(bad)].iterrows():
            bad.add(row.name)
            problems.add(row["id"], f"{csv_path} line {row['line']}: {reason(row)}")

    reject(~table["id"].str.fullmatch(ID_PATTERN.pattern),
           lambda r: f"id {r['id']!r} is not of the form case{{C}}_day{{D}}_slice_{{SSSS}}")
    reject(~table["class"].isin(CLASSES),
           lambda r: f"unknown class {r['class']!r} (expected one of {', '.join(CLASSES)})")
    reject(table.duplicated(["id", "class"], keep="first"),
           lambda r: f"duplicate row for id {r['id']!r} and class {r['class']!r}")
    # A slice needs all three classes: ids that lost a row to an error above are dropped whole.
    good = table[~table["id"].isin(table.loc[list(bad), "id"])]
    counts = good.groupby("id")["class"].transform("size")
    for slice_id in good.loc[counts != len(CLASSES), "id"].unique():
        lines = ", ".join(map(str, good.loc[good["id"] == slice_id, "line"]))
        n = int((good["id"] == slice_id).sum())
        problems.add(slice_id, f"{csv_path} lines {lines}: id {slice_id!r} has {n} rows; "
                               f"expected {len(CLASSES)} (one per class)")
    good = good[counts == len(CLASSES)]
    labels = good.pivot(index="id", columns="class", values="segmentation").reindex(columns=list(CLASSES))
    return labels.rename_axis(columns=None).reset_index(), set(table["id"])


def scan_dataset(data_dir: str | os.PathLike, split: str | None = None, *,
                 on_error: str = "fail") -> tuple[pd.DataFrame, list[dict]]:
    """Index a Kaggle-layout folder; returns (table, skipped) where skipped lists {id, reason}.

    split: "train" (train.csv + train/ scans) or "test" (test/ scans, no labels); default: train
    if train.csv exists, else test. on_error: "fail" raises DataError at the first bad row,
    "skip" leaves bad rows out and lists them.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    csv_path = data_dir / "train.csv"
    split = split or ("train" if csv_path.exists() else "test")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    problems = _Problems(on_error)
    scan_root = data_dir / split
    if not scan_root.is_dir():
        raise DataError(f"{scan_root}: no scan folder (expected {split}/caseC/caseC_dayD/scans/*.png)")
    scans = _list_scans(scan_root, problems)
    if split == "test":
        table = scans.assign(**{c: "" for c in CLASSES})
    else:
        if not csv_path.exists():
            raise DataError(f"{csv_path}: missing (the train layout needs train.csv)")
        labels, csv_ids = _read_labels(csv_path, problems)
        table = labels.merge(scans, on="id", how="left", validate="one_to_one")
        no_scan = table["path"].isna()
        for slice_id in table.loc[no_scan, "id"]:
            case_day = slice_id.rsplit("_slice_", 1)[0]
            folder = scan_root / case_day.split("_")[0] / case_day / "scans"
            problems.add(slice_id, f"{csv_path}: slice {slice_id!r} has no scan file "
                                   f"{folder}/slice_{slice_id[-4:]}_*.png")
        table = table[~no_scan]
        unlabelled = ~scans["id"].isin(csv_ids)
        if unlabelled.any():
            warnings.warn(f"{int(unlabelled.sum())} scan(s) under {scan_root} have no rows in {csv_path} "
                          f"and are left out (first: {scans.loc[unlabelled, 'path'].iloc[0]})", stacklevel=2)
    if table.empty and not problems.skipped:
        raise DataError(f"{data_dir}: no slices found under {scan_root}")
    table = table[COLUMNS].sort_values(["case", "day", "slice"], kind="stable").reset_index(drop=True)
    for col in ("case", "day", "slice", "width", "height"):
        table[col] = table[col].astype("int64")
    return table, problems.skipped


def read_index(data_dir: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The per-slice table of a Kaggle-layout folder; any bad input raises DataError."""
    return scan_dataset(data_dir, split, on_error="fail")[0]


def read_labels(csv_path: str | os.PathLike) -> pd.DataFrame:
    """A train.csv-style file (id,class,segmentation) as one row per slice id with an RLE column per
    class; any bad row raises DataError naming its line."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: labels file does not exist")
    return _read_labels(csv_path, _Problems("fail"))[0]


def scan_sizes(data_dir: str | os.PathLike) -> pd.DataFrame:
    """id, case_day, slice, height, width of every scan under data_dir/train (or data_dir/test), from
    the scan file names alone."""
    data_dir = Path(data_dir)
    root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir / "test"
    if not root.is_dir():
        raise DataError(f"{data_dir}: no train/ or test/ scan folder (expected train/caseC/caseC_dayD/scans/*.png)")
    return _list_scans(root, _Problems("fail"))[["id", "case_day", "slice", "height", "width"]]
