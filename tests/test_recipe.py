"""What won the competition, in tfseg: the presence head and empty-slice gating, flip TTA, fold ensembles
in one SavedModel, and cross-validation as a command."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from numpy.testing import assert_allclose

from tests.test_export import TINY, tiny_run
from tfseg import cli, cv, evaluate, export, layout
from tfseg.config import load_config, save_config
from tfseg.errors import ConfigError
from tfseg.evaluation.postprocess import Postprocess, slice_masks
from tfseg.evaluation.predictors import keras_predictor
from tfseg.evaluation.scoring import evaluate_run
from tfseg.model.inference import averaged, parse_tta
from tfseg.model.losses import presence_loss, presence_targets
from tfseg.model.unet import build_unet, split_outputs

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


# ---- presence head and gating ------------------------------------------------------------------

def test_presence_head_outputs_and_dtype():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_unet((32, 32, 3), depth=2, base_filters=4, presence_head=True)
    finally:
        keras.config.set_dtype_policy(previous)
    probs, presence = split_outputs(model(np.zeros((2, 32, 32, 3), np.float32)))
    assert probs.shape == (2, 32, 32, 3) and presence.shape == (2, 3)
    assert presence.dtype == "float32" and probs.dtype == "float32"
    assert split_outputs(build_unet((32, 32, 3), depth=2, base_filters=4)(np.zeros((1, 32, 32, 3))))[1] is None


def test_presence_targets_and_loss_against_numpy():
    masks = np.zeros((3, 8, 8, 3), np.float32)
    masks[0, 2, 2, 1] = 1
    masks[2, :, :, 0] = 1
    targets = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0]], np.float32)
    assert_allclose(keras.ops.convert_to_numpy(presence_targets(masks)), targets)
    presence = RNG.uniform(0.01, 0.99, (3, 3)).astype(np.float32)
    bce = -(targets * np.log(presence) + (1 - targets) * np.log(1 - presence)).mean(axis=1)
    assert_allclose(keras.ops.convert_to_numpy(presence_loss(masks, presence)), bce, rtol=1e-5)


def _probabilities():
    probs = RNG.uniform(0, 0.4, (4, 16, 16, 3)).astype(np.float32)
    probs[0, 3:9, 3:9, 0] = 0.9  # 36 pixels over 0.6 on slice 0, class 0
    probs[1, 3:5, 3:5, 1] = 0.7  # 4 pixels on slice 1, class 1
    probs[2, 0, 0, 2] = 0.95  # one pixel on slice 2, class 2
    return probs


PRESENCE = np.array([[0.9, 0.1, 0.1], [0.2, 0.8, 0.1], [0.1, 0.1, 0.3], [0.6, 0.6, 0.6]], np.float32)

# (post-processing, presence or None, the (slice, class) pairs left with any pixel)
GATES = [
    (Postprocess(), None, {(0, 0), (1, 1), (2, 2)}),
    (Postprocess(), PRESENCE, {(0, 0), (1, 1)}),  # slice 2's stomach pixel: presence 0.3 < 0.5
    (Postprocess(presence_threshold=0.25), PRESENCE, {(0, 0), (1, 1), (2, 2)}),
    (Postprocess(min_pixels=12, min_pixel_probability=0.6), None, {(0, 0)}),  # 1st place's rule
    (Postprocess(min_pixels=3, min_pixel_probability=0.6), None, {(0, 0), (1, 1)}),
    (Postprocess(min_pixels=3, min_pixel_probability=0.6), PRESENCE, {(0, 0), (1, 1)}),
    (Postprocess(threshold=0.8), None, {(0, 0), (2, 2)}),
]


@pytest.mark.parametrize(("post", "presence", "kept"), GATES)
def test_gating_numpy_and_serving_graph_agree(post, presence, kept):
    probs = _probabilities()
    masks = slice_masks(post, probs, presence)
    assert {(int(k), int(c)) for k, c in zip(*np.nonzero(masks.any(axis=(1, 2))), strict=True)} == kept
    graph = slice_masks(post, tf.constant(probs), None if presence is None else tf.constant(presence)).numpy()
    assert (graph == masks).all() and graph.dtype == np.uint8
    assert (post.masks(probs, presence) == masks).all()  # no component cleaning configured


def test_gating_settings_round_trip_through_tfseg_json():
    post = Postprocess(threshold=0.4, presence_threshold=0.3, min_pixels=12, min_pixel_probability=0.6,
                       min_component=5, min_component_fraction=0.1)
    assert Postprocess.from_info(json.loads(json.dumps(post.to_info()))) == post
    old = {k: v for k, v in post.to_info().items() if k != "min_pixels"}
    with pytest.raises(Exception, match="min_pixels"):
        Postprocess.from_info(old)


# ---- flip test-time augmentation ---------------------------------------------------------------

def _tiny_models(n=2, presence_head=False):
    models = []
    for seed in range(n):
        keras.utils.set_random_seed(seed)
        models.append(build_unet((32, 32, 3), depth=2, base_filters=4, presence_head=presence_head))
    return models


@pytest.mark.parametrize("tta", ["", "hflip", "vflip", "hflip,vflip"])
def test_tta_and_ensembles_average_the_flipped_back_predictions(tta):
    models = _tiny_models(2, presence_head=True)
    scans = RNG.random((2, 32, 32, 3)).astype(np.float32)
    probs, presence = averaged(models, tta)(scans)
    want_p, want_q = [], []
    for model in models:
        for mode in ("", *parse_tta(tta)):
            axis = {"": None, "hflip": 2, "vflip": 1}[mode]
            x = scans if axis is None else np.flip(scans, axis)
            p, q = (keras.ops.convert_to_numpy(t) for t in split_outputs(model(x, training=False)))
            want_p.append(p if axis is None else np.flip(p, axis))
            want_q.append(q)
    assert_allclose(keras.ops.convert_to_numpy(probs), np.mean(want_p, axis=0), atol=1e-6)
    assert_allclose(keras.ops.convert_to_numpy(presence), np.mean(want_q, axis=0), atol=1e-6)


def test_hflip_tta_makes_a_model_flip_equivariant():
    (model,) = _tiny_models(1)
    scans = RNG.random((1, 32, 32, 3)).astype(np.float32)
    predict = keras_predictor(model, "hflip")
    direct, _ = predict(scans)
    mirrored, _ = predict(np.flip(scans, 2).copy())
    assert_allclose(np.flip(mirrored, 2), direct, atol=1e-5)
    plain, _ = keras_predictor(model)(np.flip(scans, 2).copy())
    assert np.abs(np.flip(plain, 2) - direct).max() > 1e-4  # an untrained model is not symmetric by itself


@pytest.mark.parametrize("bad", ["hflop", "hflip,rot90"])
def test_unknown_tta_modes_are_refused(bad):
    with pytest.raises(ConfigError, match="tta: unknown mode"):
        parse_tta(bad)


# ---- ensembles in one SavedModel ---------------------------------------------------------------

def _second_run(records_dir, root: Path, overrides=()) -> Path:
    """Another tiny run like tests.test_export's, with other weights (seed 1) and optional overrides."""
    run = root / "run"
    config = load_config(None, [f"data.records={records_dir}", *TINY, *overrides])
    keras.utils.set_random_seed(1)
    k = len(config.data.offsets)
    model = build_unet((*config.data.image_size, k), depth=2, base_filters=8)
    save_config(config, run / "config.yaml")
    model.save(run / "model.keras")
    return run


@pytest.fixture(scope="module")
def ensemble(records_dir, tmp_path_factory):
    """Run a (augment.flip_horizontal false, the default) and run b (trained with it), exported with hflip
    TTA: only with --allow-untrained-tta, because of run a. Returns (runs, out, stderr of the export)."""
    root = tmp_path_factory.mktemp("ensemble")
    runs = [tiny_run(records_dir, root / "a"), _second_run(records_dir, root / "b", ["augment.flip_horizontal=true"])]
    out = root / "models" / "1"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert export.main([*sum((["--run", str(r)] for r in runs), []), "--tta", "hflip", "--allow-untrained-tta",
                            "--out", str(out)]) == 0
    return runs, out, err.getvalue()


def test_ensemble_saved_model_averages_its_members(ensemble):
    runs, out, _ = ensemble
    info = layout.read_info(out)
    assert len(info["members"]) == 2 and info["tta"] == ["hflip"] and info["source"] is None
    members = [keras.models.load_model(layout.RunFolder(r).final_model, compile=False) for r in runs]
    scans = RNG.random((3, 64, 64, 3)).astype(np.float32)
    want, _ = keras_predictor(members, "hflip")(scans)
    loaded = tf.saved_model.load(str(out))
    got = loaded.signatures["predict_float"](scans=tf.constant(scans))["probabilities"].numpy()
    assert_allclose(got, want, atol=1e-5)


def test_ensemble_is_served_in_a_fresh_process_without_tfseg(ensemble, synth_dir, tmp_path):
    """TF Serving's view: load the SavedModel in a process that never imports tfseg, answer a PNG request."""
    _, out, _ = ensemble
    scans = sorted((synth_dir / "train").glob("case*/case*_day*/scans"))[0]
    pngs = sorted(scans.glob("*.png"))[:3]
    code = ("import sys, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]); "
            "rows = [[open(p, 'rb').read() for p in sys.argv[2:5]]]; "
            "o = m.signatures['serving_default'](slices=tf.constant(rows)); "
            "assert 'tfseg' not in sys.modules; print(o['masks'].shape, o['probabilities'].dtype.name)")
    done = subprocess.run([sys.executable, "-c", code, str(out), *map(str, pngs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(1, " in done.stdout and "float32" in done.stdout


def test_untrained_flip_tta_is_allowed_loudly_and_recorded(ensemble):
    runs, out, err = ensemble
    assert err.count("WARNING: --allow-untrained-tta") == 1
    assert f"{runs[0]}" in err and "augment.flip_horizontal is false" in err and str(runs[1]) not in err
    members = layout.read_info(out)["members"]
    assert [m["trained_flips"] for m in members] == [[], ["hflip"]]
    assert [m["path"] for m in members] == [str(layout.RunFolder(r).final_model) for r in runs]


@pytest.mark.parametrize(("overrides", "tta", "refused", "setting"), [
    ([], "hflip", "a", "augment.flip_horizontal"),
    (["augment.flip_horizontal=true"], "hflip,vflip", "b", "augment.flip_vertical"),
    (["augment.flip_horizontal=true", "augment.enabled=false"], "hflip", "b", "augment.enabled"),
])
def test_flip_tta_refused_for_a_run_not_trained_with_it(records_dir, tmp_path, capsys, overrides, tta, refused,
                                                        setting):
    runs = {"a": _second_run(records_dir, tmp_path / "a", overrides),
            "b": _second_run(records_dir, tmp_path / "b", ["augment.flip_horizontal=true", *overrides])}
    out = tmp_path / "models" / "1"
    args = ["--run", str(runs["a"]), "--run", str(runs["b"]), "--tta", tta, "--out", str(out)]
    if refused == "b":
        args = args[2:]  # run b alone
    assert cli.run(export.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tta: ") and f"{runs[refused]} was not trained with" in err
    assert f"({setting} is false)" in err and "--allow-untrained-tta" in err
    assert not out.parent.exists()
    # evaluate applies the same rule to a run's Keras model, before predicting anything
    assert cli.run(evaluate.main, ["--run", str(runs[refused]), "--tta", tta, "--no-progress"]) == 2
    assert f"({setting} is false)" in capsys.readouterr().err
    assert not layout.RunFolder(runs[refused]).eval_dir.exists()


def test_flip_tta_of_a_run_trained_with_flips_is_not_refused(records_dir, tmp_path, capsys):
    run = _second_run(records_dir, tmp_path / "b", ["augment.flip_horizontal=true", "augment.flip_vertical=true"])
    summary, _ = evaluate_run(run, tta="hflip,vflip", limit=1, progress=False)
    assert summary["tta"] == ["hflip", "vflip"] and "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize(("override", "setting"), [("data.offsets=[-1,0,1]", "data.offsets"),
                                                   ("data.image_size=[32,32]", "data.image_size")])
def test_ensemble_members_must_share_their_input(records_dir, tmp_path, capsys, override, setting):
    runs = [tiny_run(records_dir, tmp_path / "a"), _second_run(records_dir, tmp_path / "b", [override])]
    out = tmp_path / "models" / "1"
    assert cli.run(export.main, ["--run", str(runs[0]), "--run", str(runs[1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(runs[1]) in err and setting in err
    assert not out.exists() and not any(p.name.startswith(".1.") for p in out.parent.glob("*"))


def test_missing_runs_are_refused(records_dir, tmp_path, capsys):
    good = tiny_run(records_dir, tmp_path / "a")
    out = tmp_path / "models" / "1"
    assert cli.run(export.main, ["--run", str(good), "--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "cv").mkdir()
    assert cli.run(export.main, ["--cv", str(tmp_path / "cv"), "--out", str(out)]) == 2
    assert "no fold run folders" in capsys.readouterr().err
    assert not out.exists()


# ---- cross-validation --------------------------------------------------------------------------

CV_SET = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=3", "--set", "train.image_log_every=0"]


@pytest.mark.slow
def test_cross_validation_trains_scores_and_resumes(records_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--records", str(records_dir), "--folds", "0,1",
            "--out", str(out), "--no-progress", *CV_SET]
    assert cv.main(args) == 0
    summary = json.loads((out / "cv.json").read_text())
    per_fold = [pd.read_csv(out / f"fold{k}" / "eval" / "per_volume.csv") for k in (0, 1)]
    assert summary["out_of_fold"]["volumes"] == sum(len(t) for t in per_fold)
    assert set(summary["folds"]) == {"0", "1"} and summary["folds"]["1"]["folds"] == [1]
    mean = np.mean([summary["folds"][k]["score"] for k in ("0", "1")])
    assert summary["mean_of_folds"]["score"] == pytest.approx(mean)
    assert 0 <= summary["out_of_fold"]["score"] <= 1
    table = (out / "cv.txt").read_text()
    assert "out of fold" in table and "fold 1" in table
    capsys.readouterr()
    # a rerun skips finished folds; a fold whose run was interrupted (no final model) is finished
    layout.RunFolder(out / "fold1").final_model.unlink()
    shutil.rmtree(layout.RunFolder(out / "fold1").eval_dir)
    assert cv.main(args) == 0
    printed = capsys.readouterr().out
    assert "fold 0: finished run" in printed and "fold 1: training" in printed
    assert json.loads((out / "cv.json").read_text())["out_of_fold"] == pytest.approx(summary["out_of_fold"],
                                                                                     nan_ok=True)
    # and the folds export as one ensemble
    model = tmp_path / "models" / "1"
    assert export.main(["--cv", str(out), "--out", str(model)]) == 0
    assert len(layout.read_info(model)["members"]) == 2


@pytest.mark.slow
def test_presence_head_trains_and_logs_presence_metrics(records_dir, tmp_path):
    from tfseg.training.trainer import train

    config = load_config(ROOT / "configs" / "smoke.yaml", [f"data.records={records_dir}", "model.presence_head=true",
                                                          "train.epochs=1", "train.steps_per_epoch=4"])
    result = train(config, tmp_path / "run", progress=False)
    row = result.history[0]
    for c in ("large_bowel", "small_bowel", "stomach"):
        assert 0 <= row[f"val_presence_f1_{c}"] <= 1 and 0 <= row[f"val_presence_accuracy_{c}"] <= 1
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert "val_presence_f1" in history.columns
    from tfseg.evaluation.scoring import evaluate_run

    summary, _ = evaluate_run(tmp_path / "run", progress=False)  # gated, and the same pass without gating
    assert 0 <= summary["score"] <= 1 and 0 <= summary["ungated_score"] <= 1
    out = tmp_path / "models" / "1"
    assert export.main(["--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    signature = tf.saved_model.load(str(out)).signatures["predict_float"]
    assert signature(scans=tf.zeros([2, 64, 64, 3]))["presence"].shape == (2, 3)
    info = layout.read_info(out)
    assert info["presence_threshold"] == config.train.presence_threshold and info["min_pixels"] == 0
