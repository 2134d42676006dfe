import os

import pytest

from tests.kaggle_layout import scan_name, write_layout
from tfseg import CLASSES
from tfseg.errors import DataError
from tfseg.kaggle.index import read_index, scan_dataset

VOLUMES = {"case7_day1": (5, 12, 16), "case7_day3": (4, 12, 16), "case12_day2": (6, 10, 14)}


@pytest.fixture
def layout(tmp_path):
    table = write_layout(tmp_path, VOLUMES)
    return tmp_path, table


def test_train_layout_reads_back(layout):
    root, table = layout
    index = read_index(root)
    assert len(index) == sum(d for d, _, _ in VOLUMES.values()) == len(table) // 3
    assert index.groupby("case_day").size().to_dict() == {k: v[0] for k, v in VOLUMES.items()}
    row = index[index["id"] == "case12_day2_slice_0003"].iloc[0]
    assert (row["case"], row["day"], row["slice"], row["height"], row["width"]) == (12, 2, 3, 10, 14)
    assert row["spacing_w"] == row["spacing_h"] == 1.5
    assert os.path.isfile(row["path"])
    for cls in CLASSES:  # RLEs land in their class column, empty ones as ""
        expected = table[(table["id"] == row["id"]) & (table["class"] == cls)]["segmentation"].iloc[0]
        assert (row[cls] if isinstance(row[cls], str) else "") == (expected if isinstance(expected, str) else "")
    assert list(index["case"]) == sorted(index["case"])  # sorted by case, day, slice


def test_test_layout_has_no_labels(layout):
    root, _ = layout
    (root / "train.csv").unlink()
    (root / "train").rename(root / "test")
    index = read_index(root)
    assert len(index) == 15
    assert (index[list(CLASSES)] == "").all().all()


def _break_csv(root, edit):
    path = root / "train.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda ls: [ls[0].replace("segmentation", "seg")] + ls[1:], "missing column.*segmentation"),
    (lambda ls: ls[:1] + [ls[1].replace("large_bowel", "liver")] + ls[2:], r"line 2: unknown class 'liver'"),
    (lambda ls: ls[:1] + [ls[1].replace("case7_day1_slice_0001", "../../etc/passwd")] + ls[2:],
     r"line 2: id '\.\./\.\./etc/passwd' is not of the form"),
    (lambda ls: ls[:1] + [ls[1].replace("slice_0001", "slice_1")] + ls[2:], "line 2: id 'case7_day1_slice_1'"),
    (lambda ls: ls + [ls[1]], "duplicate row for id 'case7_day1_slice_0001'"),
    (lambda ls: ls[:1] + ls[2:], "id 'case7_day1_slice_0001' has 2 rows; expected 3"),
    (lambda ls: ls + [f"case7_day1_slice_0099,{c}," for c in CLASSES],
     "slice 'case7_day1_slice_0099' has no scan file"),
])
def test_bad_csv_raises_naming_row(layout, edit, message):
    root, _ = layout
    _break_csv(root, edit)
    with pytest.raises(DataError, match=message):
        read_index(root)


def test_skip_mode_lists_bad_rows(layout):
    root, _ = layout
    _break_csv(root, lambda ls: ls[:1] + [ls[1].replace("large_bowel", "liver")] + ls[2:])
    index, skipped = scan_dataset(root, on_error="skip")
    assert len(index) == 14
    assert [s["id"] for s in skipped] == ["case7_day1_slice_0001"]
    assert "unknown class" in skipped[0]["reason"]


def test_unparsable_scan_name_raises(layout):
    root, _ = layout
    scans = root / "train" / "case7" / "case7_day1" / "scans"
    (scans / scan_name(2, 16, 12)).rename(scans / "slice_0002_16x12.png")
    with pytest.raises(DataError, match=r"slice_0002_16x12\.png: scan name does not parse"):
        read_index(root)


def test_missing_folder_and_csv(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_index(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="train.csv: missing"):
        read_index(tmp_path, split="train")
