"""Predict: the submission format (3 rows per slice, the index's ids, RLEs at the scan size), the test
layout, filters, overlays, clear errors, and the same masks as evaluate for the same model and volume."""

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.test_export import run_dir, saved_model, volume_pngs  # noqa: F401  (session-wide tiny run and export)
from tfseg import CLASSES, predict
from tfseg.draw import pick_slices
from tfseg.errors import DataError
from tfseg.evaluation import predictors
from tfseg.evaluation.postprocess import Postprocess
from tfseg.evaluation.submission import score_submission
from tfseg.kaggle import index, rle
from tfseg.records import reader
from tfseg.serving import predict as predict_lib
from tfseg.training.run_folder import load_run_model


@pytest.fixture(scope="module")
def served(saved_model):  # noqa: F811
    return predict_lib.load_model(saved_model)


def test_submission_format_and_overlays(saved_model, synth_dir, tmp_path, capsys):  # noqa: F811
    table = index.read_index(synth_dir)
    chosen = list(table["case_day"].unique()[:2])
    out = tmp_path / "submission.csv"
    assert predict.main(["--model", str(saved_model), "--data-dir", str(synth_dir), "--case-days", ",".join(chosen),
                         "--out", str(out), "--overlays", str(tmp_path / "overlays"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = table[table["case_day"].isin(chosen)]
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub.columns) == ["id", "class", "predicted"]
    assert len(sub) == len(CLASSES) * len(rows)
    assert list(sub["id"]) == [slice_id for slice_id in rows["id"] for _ in CLASSES]
    assert list(sub["class"]) == list(CLASSES) * len(rows)
    organ_pixels = 0
    for (_, meta), encodings in zip(rows.iterrows(), sub["predicted"].to_numpy().reshape(-1, len(CLASSES)),
                                    strict=True):
        for encoded in encodings:
            mask = rle.decode(encoded, (meta["height"], meta["width"]))  # raises if a run passes H x W
            assert rle.encode(mask) == encoded
            organ_pixels += int(mask.sum())
    assert organ_pixels > 0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == sorted(f"{c}.png" for c in chosen)
    assert f"{len(rows)} slices of 2 volume(s)" in printed and "score" in printed  # train split: labels known
    # tfseg.score on the written submission gives the score predict printed for the same masks
    scored, _ = score_submission(out, synth_dir / "train.csv", synth_dir, only_submitted_volumes=True)
    assert f"score {scored['score']:.4f} (leaderboard metric" in printed
    _, scores = predict_lib.predict(saved_model, synth_dir, case_days=chosen, progress=False)
    assert scores.summary() == scored


def test_test_layout_without_labels(saved_model, synth_dir, tmp_path, capsys):  # noqa: F811
    table = index.read_index(synth_dir)
    first = table[table["case_day"] == table["case_day"].iloc[0]].head(5)
    for path in first["path"]:  # test/caseC/caseC_dayD/scans/..., no train.csv
        target = tmp_path / "data" / "test" / "/".join(path.split("/")[-4:])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    out = tmp_path / "submission.csv"
    assert predict.main(["--model", str(saved_model), "--data-dir", str(tmp_path / "data"), "--out", str(out),
                         "--no-progress"]) == 0
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub["id"]) == [slice_id for slice_id in first["id"] for _ in CLASSES]
    assert "score" not in capsys.readouterr().out


def test_masks_match_evaluate(run_dir, served, synth_dir):  # noqa: F811
    """Same model, same volume: predict (SavedModel PNG signature, file bytes) == evaluate (Keras, records)."""
    config, model, _ = load_run_model(run_dir)
    case_day, probabilities, presence = next(predictors.predict_volumes(config, [0], predictors.keras_predictor(model)))
    assert presence is None  # no presence head
    expected = Postprocess(threshold=config.train.threshold, min_component=20,
                           min_component_fraction=0.3).masks(probabilities)
    serve, info = served
    _, pngs = volume_pngs(synth_dir, case_day)
    got = predict_lib.predict_volume(serve, pngs, info["offsets"],
                                     post=Postprocess(min_component=20, min_component_fraction=0.3))
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert expected.sum() > 0
    # float32 sums in different batch shapes may flip a pixel sitting exactly at the threshold, no more
    assert (got != expected).mean() < 1e-4


def test_smaller_requests_give_masks_of_the_same_volume(served, synth_dir):
    serve, info = served
    _, pngs = volume_pngs(synth_dir)
    whole = predict_lib.predict_volume(serve, pngs, info["offsets"])
    parts = predict_lib.predict_volume(serve, pngs, info["offsets"], batch_size=5)
    assert parts.shape == whole.shape
    assert (parts == whole).mean() > 0.9  # normalised over 5 slices instead of the volume: close, not equal


def test_bad_scans_name_the_volume(served):
    serve, info = served
    eight_bit = cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes()
    with pytest.raises(DataError, match=r"case1_day2: the model rejected the scans: .*not a 16-bit PNG"):
        predict_lib.predict_volume(serve, [eight_bit] * 4, info["offsets"], name="case1_day2")


def test_select_by_fold_and_case_day(records_dir, synth_dir):
    table = index.read_index(synth_dir)
    fold0 = {v["case_day"] for v in reader.read_volumes(records_dir, [0])}
    assert set(predict_lib.select(table, folds=[0], fold_cases=reader.fold_cases(records_dir))["case_day"]) == fold0
    one = table["case_day"].iloc[-1]
    assert set(predict_lib.select(table, case_days=[one])["case_day"]) == {one}
    with pytest.raises(DataError, match="case999_day1"):
        predict_lib.select(table, case_days=["case999_day1"])


def test_overlays_show_every_predicted_organ():
    masks = np.zeros((8, 4, 4, 3), np.uint8)  # uint8 like predict's masks: a negated uint sum would wrap
    for i, pixels in {1: 5, 4: 9, 6: 1, 7: 3}.items():
        masks[i, ..., 0].reshape(-1)[:pixels] = 1
    masks[0, 0, 0, 2] = 1  # a one-pixel stomach, on a slice with nothing else
    masks[4, 0, :2, 1] = 1
    assert pick_slices(masks, 2) == [0, 4]  # each class's largest: 4 (both bowels), 0 (stomach)
    assert pick_slices(masks, 3) == [0, 1, 4]  # then each class's second: large bowel's 1
    assert pick_slices(masks, 4) == [0, 1, 4, 7]
    assert pick_slices(masks, 20) == list(range(8))
    assert pick_slices(np.zeros_like(masks), 2) == [0, 1]
