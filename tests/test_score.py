"""python -m tfseg.score: any submission against labels, equal to the leaderboard computed here from the
decoded masks; bad submissions refused with the row named."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from tests.kaggle_layout import write_layout
from tests.test_leaderboard import reference_score
from tfseg import CLASSES, cli, score
from tfseg.evaluation.submission import score_submission
from tfseg.kaggle import rle

# 2 cases, 3 case-days, non-square scans
VOLUMES = {"case1_day1": (6, 12, 16), "case1_day2": (5, 12, 16), "case2_day3": (7, 10, 14)}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    table = write_layout(root, VOLUMES, seed=3)
    return root, table


def submission_of(table: pd.DataFrame, rng) -> pd.DataFrame:
    """The labels, changed: some masks dropped, some grown by a pixel, a few stray pixels added."""
    rows = []
    for _, row in table.iterrows():
        case_day = row["id"].rsplit("_slice_", 1)[0]
        _, h, w = VOLUMES[case_day]
        mask = rle.decode(row["segmentation"], (h, w))
        draw = rng.random()
        if draw < 0.15:
            mask[:] = 0
        elif draw < 0.35:
            mask[rng.integers(h), rng.integers(w)] = 1
        rows.append({"id": row["id"], "class": row["class"], "predicted": rle.encode(mask)})
    return pd.DataFrame(rows)


def volumes(table: pd.DataFrame, column: str) -> dict:
    """case_day -> masks [D, H, W, 3] decoded from a table's RLE column."""
    out = {}
    for case_day, (depth, h, w) in VOLUMES.items():
        masks = np.zeros((depth, h, w, 3), np.uint8)
        for s in range(depth):
            for c, name in enumerate(CLASSES):
                text = table.loc[(table["id"] == f"{case_day}_slice_{s + 1:04d}") & (table["class"] == name), column]
                masks[s, ..., c] = rle.decode(text.iloc[0], (h, w))
        out[case_day] = masks
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("empty_dice", "hausdorff"), [("skip", "joined"), ("one", "per_class")])
def test_equals_the_leaderboard_of_the_decoded_masks(labelled, tmp_path, seed, empty_dice, hausdorff):
    root, table = labelled
    sub = submission_of(table, np.random.default_rng(seed)).sample(frac=1.0, random_state=seed)  # any row order
    path = tmp_path / "submission.csv"
    sub.to_csv(path, index=False)
    summary, rows = score_submission(path, root / "train.csv", root, empty_dice=empty_dice, hausdorff=hausdorff)
    pred, true = volumes(sub, "predicted"), volumes(table, "segmentation")
    want = reference_score([(pred[k], true[k]) for k in sorted(VOLUMES)], empty_dice, hausdorff)
    for key, value in want.items():
        assert summary[key] == pytest.approx(value, abs=1e-12), key
    assert [r["case_day"] for r in rows] == sorted(VOLUMES)


def test_perfect_submission_scores_one_and_the_command_writes_json(labelled, tmp_path, capsys):
    root, table = labelled
    path = tmp_path / "submission.csv"
    table.rename(columns={"segmentation": "predicted"}).to_csv(path, index=False)
    out = tmp_path / "score.json"
    assert score.main(["--submission", str(path), "--labels", str(root / "train.csv"), "--data-dir", str(root),
                       "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["score"] == 1.0 and summary["volumes"] == len(VOLUMES)
    assert "score 1.0000" in capsys.readouterr().out


def test_only_submitted_volumes(labelled, tmp_path):
    root, table = labelled
    path = tmp_path / "submission.csv"
    part = table[table["id"].str.startswith("case1_day2")].rename(columns={"segmentation": "predicted"})
    part.to_csv(path, index=False)
    with pytest.raises(Exception, match="no row for id 'case1_day1_slice_0001'"):
        score_submission(path, root / "train.csv", root)
    summary, rows = score_submission(path, root / "train.csv", root, only_submitted_volumes=True)
    assert summary["score"] == 1.0 and [r["case_day"] for r in rows] == ["case1_day2"]


def _edit(table: pd.DataFrame, change) -> pd.DataFrame:
    sub = table.rename(columns={"segmentation": "predicted"}).copy()
    return change(sub) if change else sub


def _set(row: int, column: str, value):
    def change(sub):
        sub.loc[row, column] = value
        return sub
    return change


# (what is wrong, how, what the error names); row 4 of the table is line 6 of the file
BAD = [
    ("wrong columns", lambda s: s.rename(columns={"predicted": "segmentation"}), "missing column\\(s\\) predicted"),
    ("unsorted runs", _set(4, "predicted", "30 2 10 2"), "line 6: .*unsorted"),
    ("overlapping runs", _set(4, "predicted", "10 5 12 2"), "line 6: .*overlapping"),
    ("run past the image", _set(4, "predicted", "190 5"), "line 6: .*past the 12 x 16"),
    ("not a number", _set(4, "predicted", "10 x"), "line 6: .*not an integer"),
    ("unknown class", _set(4, "class", "liver"), "line 6: unknown class 'liver'"),
    ("malformed id", _set(4, "id", "case1_slice_0001"), "line 6: id 'case1_slice_0001' is not of the form"),
    ("unknown id", _set(4, "id", "case9_day1_slice_0001"), "line 6: id 'case9_day1_slice_0001' .* not in"),
    ("missing row", lambda s: s.drop(index=4), "no row for id"),
    ("duplicate row", lambda s: pd.concat([s, s.iloc[[4]]]), "a second row for id"),
]


@pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_submissions_are_refused_naming_the_row(labelled, tmp_path, capsys, what, change, message):
    root, table = labelled
    path = tmp_path / "submission.csv"
    _edit(table, change).to_csv(path, index=False)
    out = tmp_path / "score.json"
    assert cli.run(score.main, ["--submission", str(path), "--labels", str(root / "train.csv"),
                                "--data-dir", str(root), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists()  # nothing written
