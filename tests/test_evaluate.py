"""Evaluate: volume reassembly (true masks score 1, nothing scores empty_score),
the report files and table, and the SavedModel path agreeing with the Keras one."""

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_array_equal

from tests.test_export import run_dir, saved_model  # noqa: F401  (session-wide tiny run and export)
from tfseg import CLASSES, cli, evaluate, files, layout
from tfseg.config import load_config
from tfseg.data import pipeline
from tfseg.evaluation import metric, scoring
from tfseg.evaluation.postprocess import Postprocess
from tfseg.records import reader


def test_true_masks_as_probabilities_score_one(records_dir):
    truth = next(reader.read_volumes(records_dir, [0]))["mask"]
    pred = Postprocess(threshold=0.5, min_component=0).masks(truth.astype(np.float32))
    assert_array_equal(pred, truth)
    assert metric.score_volume(pred, truth)["score"] == 1.0


def test_reassembled_true_masks_score_one(records_dir):
    """The whole path (batches straddling volumes, regrouping, restore_size, threshold, scoring against
    the original-size records) scores exactly 1 when the 'model' returns the true masks."""
    config = load_config(None, [f"data.records={records_dir}", "data.resize=pad_crop", "data.image_size=[272,272]",
                                "model.depth=4"])  # pad_crop to 272 and back is exact for 266 px scans
    stream = iter(pipeline.eval_dataset(config, [0], 10))  # 10: batches straddle the 24-slice volumes

    def oracle(scans):
        batch = next(stream)
        assert batch["image"].shape == scans.shape
        return batch["mask"].numpy().astype(np.float32)

    rows, summary = scoring.evaluate(config, [0], oracle, batch_size=10, limit=2, progress=False)
    assert summary["num_volumes"] == len(rows) == 2
    assert all(row["score"] == 1.0 for row in rows) and summary["score"] == 1.0
    assert summary["dice"] == 1.0 and summary["hausdorff"] == 0.0
    assert 0.0 <= summary["empty_score"] < 1.0


def test_empty_prediction_scores_empty_score(run_dir, records_dir):  # noqa: F811
    config = load_config(run_dir / "config.yaml")
    rows, summary = scoring.evaluate(config, [0], lambda scans: np.zeros((*scans.shape[:3], 3), np.float32),
                                      limit=2, progress=False)
    assert summary["score"] == pytest.approx(summary["empty_score"], abs=1e-12)
    for c in CLASSES:
        assert summary[f"score_{c}"] == pytest.approx(summary[f"empty_score_{c}"], abs=1e-12)
    # and empty_score is what the leaderboard metric gives all-empty volumes, computed independently
    volumes = [v for v, _ in zip(reader.read_volumes(records_dir, [0]), range(2), strict=False)]
    empty = [metric.leaderboard_volume(np.zeros_like(v["mask"]), v["mask"]) for v in volumes]
    assert [r["empty_score"] for r in rows] == pytest.approx([e["score"] for e in empty])
    assert summary["empty_score"] == pytest.approx(metric.leaderboard_summary(empty)["score"])


ARGS = ["--no-progress", "--min-component", "20", "--limit", "2"]


@pytest.fixture(scope="module")
def keras_report(run_dir, tmp_path_factory):  # noqa: F811
    """(report folder, printed text) of `python -m tfseg.evaluate --run RUN` on the tiny run."""
    out = tmp_path_factory.mktemp("eval_keras")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert evaluate.main(["--run", str(run_dir), "--out", str(out), *ARGS]) == 0
    return out, printed.getvalue()


def test_cli_writes_report_and_prints_table(keras_report, records_dir):
    out, printed = keras_report
    table = pd.read_csv(out / "per_volume.csv")
    summary = json.loads((out / "summary.json").read_text())
    first = [v["case_day"] for v, _ in zip(reader.read_volumes(records_dir, [0]), range(2), strict=False)]
    assert list(table["case_day"]) == first and summary["num_volumes"] == 2
    for key in ("score", "dice", "hausdorff", "empty_score", *(f"score_{c}" for c in CLASSES)):
        assert key in summary and key in table.columns
        assert 0.0 <= summary[key] <= 1.0
    # the leaderboard averages rows and case-days over the fold; the per-organ 3D metric volumes
    assert summary["score"] == pytest.approx(0.4 * summary["dice"] + 0.6 * (1 - summary["hausdorff"]))
    assert summary["hausdorff"] == pytest.approx(table["hausdorff"].mean())
    assert summary["organ3d_score"] == pytest.approx(table["organ3d_score"].mean())
    assert summary["threshold"] == 0.5 and summary["min_component"] == 20 and summary["folds"] == [0]
    assert summary["model"].endswith("model.keras")
    # the (untrained) model predicts organs, so it is not scored as the all-empty prediction
    assert summary["score"] != pytest.approx(summary["empty_score"])
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for word in (*CLASSES, "all", "dice", "hausdorff", "score", "empty", "leaderboard", "organ 3D"):
        assert word in printed
    assert f"{summary['score']:.4f}" in printed and f"{summary['empty_score']:.4f}" in printed


def test_saved_model_evaluates_like_keras(run_dir, saved_model, keras_report, tmp_path):  # noqa: F811
    assert evaluate.main(["--run", str(run_dir), "--model", str(saved_model), "--out", str(tmp_path), *ARGS]) == 0
    keras_rows = pd.read_csv(keras_report[0] / "per_volume.csv")
    saved_rows = pd.read_csv(tmp_path / "per_volume.csv")
    assert list(saved_rows["case_day"]) == list(keras_rows["case_day"])
    assert np.abs(saved_rows["score"] - keras_rows["score"]).max() < 1e-3
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == str(saved_model)


def test_report_says_held_out_and_the_limit(keras_report):
    """The tiny run validates on fold 0 (trains on fold 1): its fold-0 score is held out, and a --limit
    score says it covers the first volumes only, in summary.json and in the printout."""
    out, printed = keras_report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds_label"] == scoring.HELD_OUT and summary["limit"] == 2
    assert "fold(s) 0, held-out, only the first 2 volume(s) (--limit)" in printed


def test_training_folds_are_optimistic_and_a_limit_writes_its_own_folder(run_dir):  # noqa: F811
    run = layout.RunFolder(run_dir)
    full = run.eval_dir / "summary.json"
    before = full.read_bytes() if full.exists() else None
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert evaluate.main(["--run", str(run_dir), "--folds", "1", "--limit", "1", "--no-progress"]) == 0
    summary = json.loads((run.limited_eval_dir(1) / "summary.json").read_text())
    assert summary["folds_label"] == scoring.OPTIMISTIC == "training folds (optimistic)"
    assert "fold(s) 1, training folds (optimistic), only the first 1 volume(s)" in printed.getvalue()
    assert (full.read_bytes() if full.exists() else None) == before  # RUN/eval untouched


def test_a_limit_never_replaces_a_full_evaluation(run_dir, tmp_path, capsys):  # noqa: F811
    files.write_json(tmp_path / "summary.json", {"score": 0.9, "folds": [0]})  # a full evaluation's summary
    before = (tmp_path / "summary.json").read_bytes()
    argv = ["--run", str(run_dir), "--out", str(tmp_path), "--limit", "1", "--no-progress"]
    assert cli.run(evaluate.main, argv) == 2
    err = capsys.readouterr().err
    assert "holds a full evaluation" in err and "--out" in err
    assert (tmp_path / "summary.json").read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [tmp_path / "summary.json"]  # nothing else written
