import hashlib
import re
import subprocess
import sys
from collections import Counter

import cv2
import numpy as np
import pytest
from scipy import ndimage

from tfseg import CLASSES
from tfseg import draw as overlay
from tfseg import synth as synth_command
from tfseg.errors import ConfigError
from tfseg.kaggle import rle, synth

SCAN = re.compile(r"slice_(\d{4})_(\d+)_(\d+)_(\d+\.\d\d)_(\d+\.\d\d)\.png")


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _table(root):
    lines = (root / "train.csv").read_text().splitlines()
    assert lines[0] == "id,class,segmentation"
    return [line.split(",") for line in lines[1:]]


def _volumes(root):
    """{case_day: (scans uint16 [D, H, W], masks [D, H, W, 3])} read back through the Kaggle layout."""
    rows = _table(root)
    volumes = {}
    for i in range(0, len(rows), 3):
        sid = rows[i][0]
        case_day, num = sid.rsplit("_slice_", 1)
        [path] = (root / "train" / case_day.split("_")[0] / case_day / "scans").glob(f"slice_{num}_*.png")
        scan = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        mask = np.stack([rle.decode(r[2], scan.shape) for r in rows[i:i + 3]], axis=-1)
        volumes.setdefault(case_day, []).append((scan, mask))
    return {k: (np.stack([s for s, _ in v]), np.stack([m for _, m in v])) for k, v in volumes.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("tiny"), cases=3, seed=1, days=2, num_slices=24,
                              workers=1, progress=False)


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("hard"), cases=2, seed=1, days=2, num_slices=40,
                              workers=1, progress=False, difficulty="hard")


@pytest.fixture(scope="module")
def hard_volumes(hard):
    return _volumes(hard)


@pytest.fixture(scope="module")
def full_volumes(tmp_path_factory):
    """Two case-days at their real depth (144 or 80 slices)."""
    root = synth.make_dataset(tmp_path_factory.mktemp("deep"), cases=2, seed=0, days=1, workers=1,
                              progress=False)
    return _volumes(root)


def test_layout_is_kaggle(tiny):
    rows = _table(tiny)
    assert len(rows) == 3 * 3 * 2 * 24  # three rows per slice, 3 cases x 2 days x 24 slices
    ids = [r[0] for r in rows]
    assert all(re.fullmatch(r"case\d+_day\d+_slice_\d{4}", i) for i in ids)
    assert [r[1] for r in rows] == list(CLASSES) * (len(rows) // 3)
    assert ids[::3] == ids[1::3] == ids[2::3]
    assert len(set(ids)) == len(ids) // 3
    days = Counter(i.split("_")[0] for i in set(i.rsplit("_slice_", 1)[0] for i in ids))
    assert list(days.values()) == [2, 2, 2]
    scans = sorted(tiny.glob("train/case*/case*_day*/scans/*.png"))
    assert len(scans) == len(ids) // 3  # no stray files (temp files included)
    for sid in ids[::3]:
        case_day, num = sid.rsplit("_slice_", 1)
        [path] = (tiny / "train" / case_day.split("_")[0] / case_day / "scans").glob(f"slice_{num}_*.png")
        _, width, height, pw, ph = SCAN.fullmatch(path.name).groups()
        scan = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert scan.dtype == np.uint16 and scan.shape == (int(height), int(width))
        assert pw == ph and (int(width), int(height), float(pw)) in {s[:3] for s in synth.SIZES}


def test_masks_decode_inside_images_and_every_class_appears(tiny):
    volumes = _volumes(tiny)
    totals = sum(mask.sum(axis=(0, 1, 2)) for _, mask in volumes.values())
    assert (totals > 0).all()
    for scans, mask in volumes.values():
        present = mask.any(axis=(1, 2, 3))
        assert present.any() and not present.all()  # organs come and go along the slice axis
        assert scans.max() > 0


def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    # The bytes of the standard data were also checked by hand against the code before difficulties.
    again = synth.make_dataset(tmp_path / "again", cases=3, seed=1, days=2, num_slices=24, workers=2,
                               progress=False, difficulty="standard")
    assert _hashes(again) == _hashes(tiny)
    other = synth.make_dataset(tmp_path / "other", cases=3, seed=2, days=2, num_slices=24, workers=1,
                               progress=False)
    assert _hashes(other) != _hashes(tiny)
    assert (other / "train.csv").read_bytes() != (tiny / "train.csv").read_bytes()


def test_complete_dataset_is_not_rewritten(tiny):
    before = (tiny / "train.csv").stat().st_mtime_ns
    assert synth.make_dataset(tiny, cases=3, seed=1, days=2, num_slices=24, progress=False) == tiny
    assert (tiny / "train.csv").stat().st_mtime_ns == before


@pytest.mark.parametrize(("options", "named"), [({"cases": 5}, "cases 3 -> 5"), ({"seed": 9}, "seed 1 -> 9"),
                                                ({"num_slices": 12}, "slices 144 -> 72"),
                                                ({"difficulty": "hard"}, "difficulty 'standard' -> 'hard'")])
def test_a_dataset_made_with_other_options_is_refused(tiny, options, named):
    """Not silently kept: the error names what differs and --overwrite."""
    before = _hashes(tiny)
    wanted = {"cases": 3, "seed": 1, "days": 2, "num_slices": 24} | options
    with pytest.raises(ConfigError) as err:
        synth.make_dataset(tiny, progress=False, **wanted)
    assert named in str(err.value) and "--overwrite" in str(err.value)
    assert _hashes(tiny) == before


def test_half_the_slices_are_empty(tiny, full_volumes):
    assert {m.shape[0] for _, m in full_volumes.values()} <= {144, 80}
    for _, mask in full_volumes.values():
        assert 0.3 <= 1 - mask.any(axis=(1, 2, 3)).mean() <= 0.7
    empty = np.concatenate([1 - m.any(axis=(1, 2, 3)) for _, m in _volumes(tiny).values()])
    assert 0.3 <= empty.mean() <= 0.7


def test_days_of_a_case_share_anatomy(tiny):
    """Two days of one case overlap far more than two different cases do."""
    by_case = {}
    for case_day, (_, mask) in _volumes(tiny).items():
        by_case.setdefault(case_day.split("_")[0], []).append(mask > 0)

    def dice(x, y):
        return 2 * (x & y).sum() / (x.sum() + y.sum()) if x.shape == y.shape else 0.0

    same = [dice(*days) for days in by_case.values()]
    firsts = [days[0] for days in by_case.values()]
    other = [dice(x, y) for i, x in enumerate(firsts) for y in firsts[i + 1:]]
    assert min(same) > 0.4 and min(same) > max(other) + 0.1


def test_intensity_scale_differs_between_cases(tiny):
    maxima = {}
    for case_day, (scans, _) in _volumes(tiny).items():
        case = case_day.split("_")[0]
        maxima[case] = max(maxima.get(case, 0), int(scans.max()))
    low, high = min(maxima.values()), max(maxima.values())
    assert low < 2000 and high > 6000 and high > 4 * low


def test_full_plan_matches_the_real_table():
    volumes = synth.plan_volumes(seed=3, full=True)
    assert len({v.case for v in volumes}) == 85 and len(volumes) == 274
    assert sum(v.slices for v in volumes) == 38_496
    sizes = Counter((v.width, v.height, v.spacing, v.slices) for v in volumes)
    assert sizes == {(266, 266, 1.5, 144): 180, (360, 310, 1.5, 144): 78, (276, 276, 1.63, 80): 15,
                     (234, 234, 1.5, 144): 1}
    days = Counter(v.case for v in volumes)
    assert min(days.values()) >= 1 and max(days.values()) <= synth.MAX_DAYS
    assert len({(v.case, v.width, v.height) for v in volumes}) == 85  # one scanner set-up per case
    assert synth.plan_volumes(seed=3, full=True) == volumes


def test_draw_contours_outlines_masks():
    scan = np.zeros((40, 50), np.uint16)
    mask = np.zeros((40, 50, 3), np.uint8)
    mask[10:30, 10:25, 0] = 1
    pred = np.zeros((40, 50, 3), np.float32)
    pred[5:35, 30:45, 2] = 0.9
    image = overlay.draw_contours(scan, mask, pred)
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    true_color, pred_color = overlay.CLASS_COLORS[0], overlay.lighter(overlay.CLASS_COLORS[2])
    assert (image[10, 10:25] == true_color).all()  # a solid outline
    assert (image[15:25, 15:20] == 0).all()  # the inside stays the scan
    on_pred_edge = (image[5, 30:45] == pred_color).all(axis=-1)
    assert 0 < on_pred_edge.sum() < on_pred_edge.size  # a dashed outline
    with pytest.raises(ValueError, match="does not match"):
        overlay.draw_contours(scan, mask[:20])


def test_preview_command_writes_png(tiny, tmp_path):
    out = tmp_path / "preview.png"
    tiny_options = ["--cases", "3", "--seed", "1", "--days", "2", "--slices", "24"]
    assert synth_command.main(["--out", str(tiny), *tiny_options, "--preview", str(out)]) == 0
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 300
    tiles = image[: int(image.shape[0] * 0.85)].astype(int)  # above the legend
    for bgr in (c[::-1] for c in overlay.CLASS_COLORS):  # every class outline is drawn somewhere
        assert (np.abs(tiles - bgr).sum(axis=-1) < 30).any()


def _labels(days: dict[str, int]):
    """case_day -> slice id -> RLEs, every organ on every slice."""
    return {cd: {f"{cd}_slice_{i:04d}": ["1 5"] * len(CLASSES) for i in range(n)} for cd, n in days.items()}


@pytest.mark.parametrize("days, count, first_cases", [
    ({"case1_day0": 10, "case1_day1": 10, "case2_day0": 10}, 6, ["case1_day0", "case2_day0", "case1_day1"]),
    ({"case1_day0": 10}, 6, ["case1_day0"]),  # one volume: six different slices of it
    ({"case1_day0": 2}, 6, ["case1_day0"]),  # fewer slices than tiles: each slice once
])
def test_preview_tiles_are_distinct_slices_of_distinct_cases_first(days, count, first_cases):
    picks = synth.preview_picks(_labels(days), count)
    assert len(picks) == min(count, sum(days.values())) and len(set(picks)) == len(picks)
    assert [case_day for case_day, _ in picks[:len(first_cases)]] == first_cases


@pytest.mark.slow
def test_command_line_makes_dataset_and_preview(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "tfseg.synth", "--out", str(out), "--cases", "1", "--days", "1",
           "--slices", "12", "--no-progress", "--preview", str(tmp_path / "p.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "train.csv").is_file() and (tmp_path / "p.png").is_file()
    assert "wrote" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "tfseg.synth", "--full", "--days", "2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--full" in bad.stderr


def test_hard_is_deterministic_and_differs_from_standard(hard, tmp_path):
    again = synth.make_dataset(tmp_path / "again", cases=2, seed=1, days=2, num_slices=40, workers=2,
                               progress=False, difficulty="hard")
    assert _hashes(again) == _hashes(hard)
    standard = synth.make_dataset(tmp_path / "standard", cases=2, seed=1, days=2, num_slices=40, workers=1,
                                  progress=False)
    hashes, hard_hashes = _hashes(standard), _hashes(hard)
    assert hashes.keys() == hard_hashes.keys()  # the same plan: case-days, sizes, slices
    assert not set(hashes.items()) & set(hard_hashes.items())  # every file differs
    assert synth.dataset_options(hard)["difficulty"] == "hard"
    assert synth.dataset_options(standard)["difficulty"] == "standard"
    with pytest.raises(ConfigError, match="difficulty"):
        synth.plan_volumes(difficulty="harder")


def _iqr(values):
    return np.percentile(values, [25, 75])


def _lumen(mask):
    """A mask without its outer 2 pixels (the bowel wall) in each slice."""
    return ndimage.binary_erosion(mask.astype(bool), np.ones((1, 5, 5)))


def test_hard_bowel_intensities_overlap(hard_volumes, tiny):
    """Small- and large-bowel lumen (per volume normalised) share their interquartile range in hard data;
    the standard data tells them apart by brightness."""
    def overlap(scans, mask):
        x = scans / np.percentile(scans, 99)
        (sb_lo, sb_hi), (lb_lo, lb_hi) = _iqr(x[_lumen(mask[..., 1])]), _iqr(x[_lumen(mask[..., 0])])
        return max(sb_lo, lb_lo) < min(sb_hi, lb_hi)

    assert all(overlap(*volume) for volume in hard_volumes.values())
    assert not any(overlap(*volume) for volume in _volumes(tiny).values())


def test_hard_bowel_comes_in_several_pieces(hard_volumes):
    for _, mask in hard_volumes.values():
        assert ndimage.label(mask[..., 1])[1] >= 2  # small bowel
        assert ndimage.label(mask[..., 0])[1] >= 2  # large bowel (collapsed stretches)
        assert ndimage.label(mask[..., 2])[1] >= 1


def test_hard_has_unlabelled_look_alikes():
    """Unlabelled tubes and blobs inside the body with the intensities of the bowel lumen."""
    vol = synth.plan_volumes(cases=1, seed=1, days=1, num_slices=40, difficulty="hard")[0]
    phantom = synth.Phantom(vol, seed=1)
    scans, mask = phantom.render()
    look = _lumen(phantom.lookalikes)
    assert look.sum() > 2000 and not (look & mask.any(axis=-1)).any()
    labels, count = ndimage.label(look)
    assert count >= 5
    extent = [z.stop - z.start for z, _, _ in ndimage.find_objects(labels)]
    assert min(extent) <= 3 < max(extent)  # blobs on 1-3 slices, tubes through many
    x = scans / np.percentile(scans, 99)
    lo, hi = _iqr(x[_lumen(mask[..., :2].any(axis=-1))])
    assert 0.3 < ((x[look] > lo) & (x[look] < hi)).mean()


def test_hard_organs_taper_at_their_z_ends(hard_volumes):
    for _, mask in hard_volumes.values():
        for c in range(3):
            area = mask[..., c].sum(axis=(1, 2))
            present = np.flatnonzero(area)
            assert area[present[0]] < 0.5 * area.max() and area[present[-1]] < 0.5 * area.max()


def test_command_refuses_a_dataset_of_another_difficulty(tmp_path, capsys):
    out = tmp_path / "data"
    small = ["--out", str(out), "--cases", "1", "--days", "1", "--slices", "6", "--workers", "1", "--no-progress"]
    assert synth_command.main(small) == 0
    before = _hashes(out)
    assert synth_command.main([*small, "--difficulty", "hard"]) == 2
    assert "error:" in capsys.readouterr().err
    assert _hashes(out) == before
    (out / "train" / "case_stale").mkdir()
    assert synth_command.main([*small, "--difficulty", "hard", "--overwrite"]) == 0
    assert synth.dataset_options(out)["difficulty"] == "hard"
    assert not (out / "train" / "case_stale").exists()
    assert _hashes(out).keys() == before.keys() and _hashes(out) != before
    assert synth_command.main([*small, "--difficulty", "hard"]) == 0
    assert "not regenerated" in capsys.readouterr().out
