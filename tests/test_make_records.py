import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.kaggle_layout import scan_name, write_layout
from tfseg import CLASSES, cli, files, inspect_records, make_records
from tfseg.errors import DataError
from tfseg.kaggle import rle
from tfseg.layout import SHARD_PATTERN
from tfseg.records import inspect as records_inspect
from tfseg.records import reader, shards
from tfseg.records.writer import build_records

# 3 cases (2 folds), two sizes; case1 has two days.
LAYOUT = {"case1_day1": (5, 12, 16), "case1_day2": (4, 12, 16), "case2_day3": (6, 10, 14),
          "case3_day1": (5, 12, 16)}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "data"
    table = write_layout(root, LAYOUT)
    return root, table


def _scan(root: Path, case_day: str, num: int) -> Path:
    depth, h, w = LAYOUT[case_day]
    return root / "train" / case_day.split("_")[0] / case_day / "scans" / scan_name(num, w, h)


def _build(data, out, **kw):
    kw = {"folds": 2, "workers": 1, "progress": False, **kw}
    return build_records(data, out, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _only_final_files(out: Path, manifest: dict) -> bool:
    """The folder holds the manifest and its shards, nothing else (no temp, state or stale shard)."""
    return sorted(p.name for p in out.iterdir()) == sorted([*(s["path"] for s in manifest["shards"]),
                                                            "manifest.json"])


# sha256 of each shard of LAYOUT (folds=2, one volume per shard), as the record format stood when it
# was fixed: a change to the Example's bytes (field order, PNG settings, framing) fails here.
LAYOUT_SHARDS = {
    "fold0-00000-of-00002.tfrecord": "b4b0a42218ca9efa69c08ceea4ea6b5e63de623e33e4fbcb585b6e6a05bccbdd",
    "fold0-00001-of-00002.tfrecord": "21e7bc8de006d72855a4e5c2ccd94eada90178c97a934404e5a3076217c8c94f",
    "fold1-00000-of-00002.tfrecord": "480081a9a724268b78daab6caef0262fa5f1a6a61ebb0d81a970883bf5372e1c",
    "fold1-00001-of-00002.tfrecord": "4f0a8581627ccaad7e2b98dfa4d9dc9c33f3787cd6d5d3a324e01856c36490c1",
}


def test_records_bytes_are_the_fixed_format(layout, tmp_path):
    root, _ = layout
    manifest = _build(root, tmp_path / "rec", shard_mb=0.001)
    assert {s["path"]: s["sha256"] for s in manifest["shards"]} == LAYOUT_SHARDS


def test_round_trip_every_slice_and_mask(layout, tmp_path):
    root, table = layout
    out = tmp_path / "rec"
    manifest = _build(root, out, shard_mb=0.001)  # tiny shards: one volume each
    rles = table.set_index(["id", "class"])["segmentation"].fillna("")
    seen = set()
    for fold in range(2):
        for vol in reader.read_volumes(out, [fold]):
            assert vol["fold"] == fold
            depth, h, w = LAYOUT[vol["case_day"]]
            assert vol["image"].shape == (depth, h, w) and vol["image"].dtype == np.uint16
            assert vol["mask"].shape == (depth, h, w, 3) and vol["mask"].dtype == np.uint8
            assert vol["slices"].tolist() == list(range(1, depth + 1))
            assert vol["spacing"] == (1.5, 1.5)
            for k, num in enumerate(vol["slices"]):
                scan = cv2.imread(str(_scan(root, vol["case_day"], int(num))), cv2.IMREAD_UNCHANGED)
                np.testing.assert_array_equal(vol["image"][k], scan)
                sid = f"{vol['case_day']}_slice_{num:04d}"
                truth = np.stack([rle.decode(rles[sid, c], (h, w)) for c in CLASSES], axis=-1)
                np.testing.assert_array_equal(vol["mask"][k], truth)
            seen.add(vol["case_day"])
    assert seen == set(LAYOUT)
    # The manifest agrees with the data.
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["num_volumes"] == 4 and manifest["num_slices"] == 20 and manifest["num_cases"] == 3
    assert sum(f["slices"] for f in manifest["folds"]) == 20
    assert sum(f["cases"] for f in manifest["folds"]) == 3  # no case in two folds
    assert manifest["image_sizes"] == {"16x12": {"volumes": 3, "slices": 14},
                                       "14x10": {"volumes": 1, "slices": 6}}
    for c in CLASSES:
        segs = table.loc[table["class"] == c, "segmentation"].fillna("")
        assert manifest["classes"][c]["slices"] == int((segs != "").sum())
        assert manifest["classes"][c]["pixels"] == sum(int(n) for s in segs for n in s.split()[1::2])
    assert len(manifest["shards"]) == 4 and manifest["skipped"] == []
    for shard in manifest["shards"]:
        assert SHARD_PATTERN.fullmatch(shard["path"]).group(1) == str(shard["fold"])
        assert files.sha256(out / shard["path"]) == shard["sha256"]
        assert (out / shard["path"]).stat().st_size == shard["bytes"]
    assert _only_final_files(out, manifest)


def test_same_bytes_whatever_the_workers(layout, tmp_path):
    root, _ = layout
    _build(root, tmp_path / "w1", workers=1, shard_mb=0.002)
    _build(root, tmp_path / "w2", workers=2, shard_mb=0.002)
    one, two = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert len(one) > 3 and one == two


def test_test_layout_without_labels(layout, tmp_path):
    root, _ = layout
    (root / "train.csv").unlink()
    (root / "train").rename(root / "test")
    manifest = _build(root, tmp_path / "rec")
    assert manifest["num_slices"] == 20 and all(v["slices"] == 0 for v in manifest["classes"].values())
    assert all(not vol["mask"].any() for vol in reader.read_volumes(tmp_path / "rec"))


def test_rerun_is_a_no_op(layout, tmp_path, capsys):
    root, _ = layout
    first = _build(root, tmp_path / "rec")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rec").iterdir()}
    again = _build(root, tmp_path / "rec", progress=True, workers=2)
    assert again == first
    assert "up to date" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rec").iterdir()}


def test_a_scan_changed_in_place_is_noticed(layout, tmp_path):
    """Same name, same size, other pixels: the records folder is out of date (the fingerprint hashes
    the scans' contents, not their names and sizes)."""
    root, _ = layout
    path = _scan(root, "case1_day1", 2)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    stored = [cv2.IMWRITE_PNG_COMPRESSION, 0]  # uncompressed: the file size depends on the image size only
    assert cv2.imwrite(str(path), image, stored)
    out = tmp_path / "rec"
    _build(root, out)
    size = path.stat().st_size
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[::-1]), stored)
    assert path.stat().st_size == size
    with pytest.raises(DataError, match=r"the input data \(train.csv or scan files\) changed"):
        _build(root, out)


def test_other_settings_refused_unless_overwrite(layout, tmp_path):
    root, table = layout
    out = tmp_path / "rec"
    before = _files(out) if _build(root, out, shard_mb=0.001) else None
    with pytest.raises(DataError, match=r"other settings: folds 2 -> 3; shard_mb 0\.001 -> 150.*--overwrite"):
        _build(root, out, folds=3)
    assert _files(out) == before
    table.loc[0, "segmentation"] = "1 2"  # same files, new labels
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"the input data \(train.csv or scan files\) changed"):
        _build(root, out, shard_mb=0.001)
    manifest = _build(root, out, folds=3, overwrite=True)
    assert manifest["settings"]["folds"] == 3 and len(manifest["folds"]) == 3
    assert _only_final_files(out, manifest)
    assert {v["fold"] for v in reader.read_volumes(out)} == {0, 1, 2}


def _write(path: Path, image: np.ndarray) -> None:
    assert cv2.imwrite(str(path), image)


def _edit_csv(root: Path, edit) -> None:
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(edit(lines)) + "\n")


def _set_rle(root, slice_id, cls, value):
    _edit_csv(root, lambda ls: [f"{slice_id},{cls},{value}" if ln.startswith(f"{slice_id},{cls},") else ln
                                for ln in ls])


def _drop_slice(root, case_day, num):
    _scan(root, case_day, num).unlink()
    _edit_csv(root, lambda ls: [ln for ln in ls if not ln.startswith(f"{case_day}_slice_{num:04d},")])


def _mixed_size(root):
    old = _scan(root, "case3_day1", 5)
    old.unlink()
    _write(old.with_name(scan_name(5, 20, 12)), np.ones((12, 20), np.uint16))


def _truncate(root):
    path = _scan(root, "case1_day1", 3)
    path.write_bytes(path.read_bytes()[:200])


PNG = r"_1\.50_1\.50\.png"
# name: (break the layout, what the fail-mode message must say, ids the skip mode must list)
BAD_INPUTS = {
    "corrupt png": (
        lambda r: _scan(r, "case2_day3", 6).write_bytes(b"\x89PNG not really"),
        rf"case2_day3/scans/slice_0006_14_10{PNG}: unreadable or corrupt PNG",
        ["case2_day3_slice_0006"]),  # the last slice: the volume keeps the other 5
    "truncated png": (
        _truncate, rf"slice_0003_16_12{PNG}: unreadable or corrupt PNG",
        ["case1_day1_slice_0003", "case1_day1"]),  # a hole: the volume goes too
    "8-bit scan": (
        lambda r: _write(_scan(r, "case3_day1", 1), np.full((12, 16), 7, np.uint8)),
        rf"slice_0001_16_12{PNG}: scan is uint8 \(8-bit\); expected 16-bit",
        ["case3_day1_slice_0001"]),
    "rgb scan": (
        lambda r: _write(_scan(r, "case1_day2", 2), np.ones((12, 16, 3), np.uint16)),
        rf"slice_0002_16_12{PNG}: scan has 3 channels",
        ["case1_day2_slice_0002", "case1_day2"]),
    "size not as named": (
        lambda r: _write(_scan(r, "case1_day1", 5), np.ones((12, 15), np.uint16)),
        rf"slice_0005_16_12{PNG}: scan is 15 x 12 \(W x H\) but its file name says 16 x 12",
        ["case1_day1_slice_0005"]),
    "rle past the scan": (
        lambda r: _set_rle(r, "case2_day3_slice_0002", "stomach", "130 20"),
        r"train\.csv: id 'case2_day3_slice_0002' class stomach: segmentation does not fit the "
        r"14 x 10 scan: .*past the 10 x 14 = 140 pixels",
        ["case2_day3_slice_0002", "case2_day3"]),
    "malformed rle": (
        lambda r: _set_rle(r, "case1_day2_slice_0004", "small_bowel", "5 x"),
        r"id 'case1_day2_slice_0004' class small_bowel: .*token 'x' is not an integer",
        ["case1_day2_slice_0004"]),
    "rle number past int64": (
        lambda r: _set_rle(r, "case1_day2_slice_0003", "stomach", "99999999999999999999 2"),
        r"id 'case1_day2_slice_0003' class stomach: .*token '99999999999999999999' is out of range",
        ["case1_day2_slice_0003", "case1_day2"]),
    "rle with non-ascii digits": (
        lambda r: _set_rle(r, "case1_day2_slice_0004", "stomach", "\u0663 2"),
        r"id 'case1_day2_slice_0004' class stomach: .*is not an integer",
        ["case1_day2_slice_0004"]),
    "gap in slices": (
        lambda r: _drop_slice(r, "case3_day1", 3),
        r"case3_day1: slice numbers have a gap \(missing slice 3 of 1\.\.5\)",
        ["case3_day1"]),
    "bad csv row": (
        lambda r: _edit_csv(r, lambda ls: [ls[0], ls[1].replace("large_bowel", "liver"), *ls[2:]]),
        r"train\.csv line 2: unknown class 'liver'",
        ["case1_day1_slice_0001"]),
    "mixed sizes in a volume": (
        _mixed_size,
        r"case3_day1: slices differ in size or spacing \(16x12 at 1\.5x1\.5 mm, 20x12 at 1\.5x1\.5 mm\)",
        ["case3_day1"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_naming_it_and_writes_nothing(layout, tmp_path, capsys, name):
    root, _ = layout
    BAD_INPUTS[name][0](root)
    out = tmp_path / "rec"
    args = ["--data-dir", str(root), "--out", str(out), "--num-folds", "2", "--workers", "2", "--no-progress"]
    assert cli.run(make_records.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(BAD_INPUTS[name][1], err), err
    assert not out.exists()  # no shard, no manifest, no temp file, no folder


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_skipped_and_listed(layout, tmp_path, name):
    root, _ = layout
    BAD_INPUTS[name][0](root)
    manifest = _build(root, tmp_path / "rec", on_error="skip", workers=2)
    assert [s["id"] for s in manifest["skipped"]] == BAD_INPUTS[name][2]
    assert all(s["reason"] for s in manifest["skipped"])
    left_out = {s["id"] for s in manifest["skipped"]}
    stored = {v["case_day"]: v["slices"].tolist() for v in reader.read_volumes(tmp_path / "rec")}
    assert set(stored) == set(LAYOUT) - left_out
    for case_day, nums in stored.items():
        assert not any(f"{case_day}_slice_{n:04d}" in left_out for n in nums)
        assert nums == list(range(nums[0], nums[0] + len(nums)))  # stored volumes never have a hole
    assert manifest["num_slices"] == sum(map(len, stored.values()))


def test_failed_overwrite_leaves_the_old_records(layout, tmp_path):
    root, _ = layout
    out = tmp_path / "rec"
    _build(root, out)
    before = _files(out)
    BAD_INPUTS["corrupt png"][0](root)
    with pytest.raises(DataError, match="unreadable or corrupt PNG"):
        _build(root, out, folds=3, overwrite=True, workers=2)
    assert _files(out) == before


def test_too_few_cases_for_the_folds(layout, tmp_path, capsys):
    root, _ = layout
    args = ["--data-dir", str(root), "--out", str(tmp_path / "rec"), "--no-progress"]
    assert cli.run(make_records.main, args) == 2
    assert "only 3 case(s) for 5 folds" in capsys.readouterr().err


def test_interrupted_finish_resumes(layout, tmp_path, monkeypatch):
    """Stopped between two shard renames (the last step), the rerun completes with the same bytes."""
    root, _ = layout
    _build(root, tmp_path / "ref", shard_mb=0.001)
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(".tfrecord") and renamed:
            raise KeyboardInterrupt
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _build(root, tmp_path / "rec", shard_mb=0.001)
    monkeypatch.undo()
    assert not (tmp_path / "rec" / "manifest.json").exists()
    _build(root, tmp_path / "rec", shard_mb=0.001)
    assert _files(tmp_path / "rec") == _files(tmp_path / "ref")


@pytest.mark.slow
def test_killed_run_leaves_nothing_complete_and_rerun_finishes(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "rec"
    write_layout(data, {f"case{c}_day1": (60, 128, 128) for c in range(1, 11)})
    args = ["--data-dir", str(data), "--out", str(out), "--num-folds", "2", "--shard-mb", "0.01",
            "--workers", "2"]  # workers hand volumes over in temp files: the rerun must clear those too
    proc = subprocess.Popen([sys.executable, "-m", "tfseg.make_records", *args, "--no-progress"], cwd=REPO,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / shards.STATE).exists():  # one shard finished, the next one being written
        assert proc.poll() is None, "make_records finished (or failed) before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    names = [p.name for p in out.iterdir()]
    assert "manifest.json" not in names and not any(SHARD_PATTERN.fullmatch(n) for n in names)
    assert any(shards.TEMP_SHARD.fullmatch(n) for n in names)

    manifest = build_records(data, out, folds=2, shard_mb=0.01, workers=2)  # the same command again
    assert "resuming: " in capsys.readouterr().out
    reference = build_records(data, tmp_path / "ref", folds=2, shard_mb=0.01, workers=1, progress=False)
    assert manifest == reference
    assert _files(out) == _files(tmp_path / "ref")  # no leftover temp or state file either


def test_help_and_inspect(tmp_path, capsys, records_dir):
    for module in (make_records, inspect_records):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
    assert "--shard-mb" in capsys.readouterr().out
    assert inspect_records.main([str(records_dir), "--overlays", str(tmp_path / "png"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "slices with organ" in printed and "every shard matches" in printed
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["fold0.png", "fold1.png"]
    assert cv2.imread(str(tmp_path / "png" / "fold0.png")).shape[2] == 3


# case7_day0 is one of the competition's known-mislabelled case-days; case3 and case9 give two folds.
MISLABELLED_LAYOUT = {"case7_day0": (3, 12, 16), "case3_day1": (4, 12, 16), "case9_day2": (3, 12, 16)}


def test_known_mislabelled_excluded_unless_kept(tmp_path, capsys):
    data = tmp_path / "data"
    write_layout(data, MISLABELLED_LAYOUT)
    out = tmp_path / "rec"
    assert make_records.main(["--data-dir", str(data), "--out", str(out), "--num-folds", "2", "--workers", "1",
                              "--no-progress"]) == 0
    printed = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["excluded"] == [{"id": "case7_day0", "reason": "known mislabelled in the competition data"}]
    assert manifest["settings"]["excluded_mislabelled"] == ["case7_day0"]
    assert {v["case_day"] for v in reader.read_volumes(out)} == {"case3_day1", "case9_day2"}
    assert manifest["num_volumes"] == 2 and manifest["num_slices"] == 7
    assert "excluded as known mislabelled: 1\n  case7_day0: known mislabelled" in printed.out
    assert "left out 1 case-day(s) known to be mislabelled" in printed.err and "case7_day0" in printed.err
    assert inspect_records.main([str(out)]) == 0
    assert "case7_day0: known mislabelled in the competition data" in capsys.readouterr().out

    # Keeping them is another setting: refused over the first records unless --overwrite, then kept.
    with pytest.raises(DataError, match=r"known-mislabelled case-days left out: case7_day0 -> none.*--overwrite"):
        _build(data, out, keep_mislabelled=True)
    kept = _build(data, out, keep_mislabelled=True, overwrite=True)
    assert kept["excluded"] == [] and kept["kept_mislabelled"] == ["case7_day0"]
    assert "excluded_mislabelled" not in kept["settings"]
    assert {v["case_day"] for v in reader.read_volumes(out)} == set(MISLABELLED_LAYOUT)
    assert kept["num_slices"] == 10
    assert "kept although known mislabelled (--keep-mislabelled): case7_day0" in records_inspect.summary(kept)


def test_records_made_before_the_mislabelled_rule(tmp_path, layout):
    """A manifest written before make_records knew of mislabelled case-days (no 'excluded', no setting):
    without them in the data it stays up to date; with them, the refusal says what changed."""
    root, _ = layout
    out = tmp_path / "rec"
    manifest = _build(root, out)
    assert "excluded_mislabelled" not in manifest["settings"] and manifest["excluded"] == []
    old = {k: v for k, v in manifest.items() if k not in ("excluded", "kept_mislabelled")}
    files.write_json(out / "manifest.json", old)
    assert _build(root, out) == old  # up to date: nothing rewritten
    assert "known-mislabelled case-days: not recorded" in records_inspect.summary(old)

    data = tmp_path / "data7"
    write_layout(data, MISLABELLED_LAYOUT)
    out7 = tmp_path / "rec7"
    legacy = _build(data, out7, keep_mislabelled=True)  # what make_records wrote before the rule
    legacy = {k: v for k, v in legacy.items() if k not in ("excluded", "kept_mislabelled")}
    files.write_json(out7 / "manifest.json", legacy)
    with pytest.raises(DataError, match=r"left out: none -> case7_day0 \(make_records leaves them out unless "
                                        r"--keep-mislabelled; records made before that rule kept them\)"):
        _build(data, out7)
    assert _build(data, out7, keep_mislabelled=True) == legacy
