"""model.kind 3d: the 3D UNet (anisotropic pooling, save and reload, mixed precision), the patch sampler,
one geometry per patch, sliding-window inference, the checks of 3D configs, and a tiny 3D run trained
and evaluated through the commands, and through tfseg.cv."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfseg import cli, cv, evaluate, train
from tfseg.config import AugmentConfig, load_config
from tfseg.data import augment
from tfseg.data import pipeline as data
from tfseg.errors import ConfigError
from tfseg.layout import EVAL_SUMMARY, RunFolder
from tfseg.model.sliding_window import gaussian_weights, sliding_window_probabilities
from tfseg.model.unet import logits_model
from tfseg.model.unet3d import build_unet3d, pool_sizes, slice_presence
from tfseg.training import strategy

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# A tiny 3D recipe on the session's synthetic records (24-slice volumes): patches of 8 slices at 32 px.
# smoke.yaml's offsets and keep_empty are 2.5D settings: back to the defaults.
TINY_3D = ["model.kind=3d", "data.offsets=[-2,0,2]", "data.keep_empty=1", "data.image_size=[32,32]",
           "data.patch_size=[8,32,32]", "data.batch_size=2", "model.depth=2", "model.z_pools=1", "model.base_filters=4"]


def tiny_config(records_dir, *overrides):
    return load_config(SMOKE, [f"data.records={records_dir}", *TINY_3D, *overrides])


def tiny_model(**options):
    return build_unet3d(depth=2, z_pools=1, base_filters=4, **options)


# ---- model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("depth", "z_pools", "pools"), [
    (3, 0, [(1, 2, 2), (1, 2, 2), (1, 2, 2)]),
    (3, 1, [(1, 2, 2), (1, 2, 2), (2, 2, 2)]),
    (4, 2, [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]),
    (2, 2, [(2, 2, 2), (2, 2, 2)]),
])
def test_unet3d_pools_in_plane_first_and_z_in_the_deepest_stages(depth, z_pools, pools):
    assert pool_sizes(depth, z_pools) == pools
    model = build_unet3d((8, 32, 32, 1), depth=depth, z_pools=z_pools, base_filters=2)
    size = np.array([8, 32, 32])
    for level, pool in enumerate(pools):
        size //= pool
        assert model.get_layer(f"enc{level}_pool").output.shape[1:4] == tuple(size)
    assert model.output.shape == (None, 8, 32, 32, 3)


@pytest.mark.parametrize(("shape", "options", "named"), [
    ((5, 32, 32, 1), {}, "input D = 5"),
    ((8, 30, 32, 1), {}, "input H = 30"),
    ((8, 32, 32), {}, "(D, H, W, C)"),
    ((8, 32, 32, 1), {"block": "dense"}, "block"),
])
def test_unet3d_refuses_bad_options(shape, options, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        tiny_model(input_shape=shape, **options)


def test_unet3d_saves_reloads_and_gives_the_same_output(tmp_path):
    model = tiny_model(norm="group")
    x = np.random.default_rng(0).random((1, 8, 32, 32, 1), dtype=np.float32)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert loaded.input_shape == (None, None, None, None, 1)
    presence = slice_presence(model(x))
    assert presence.shape == (1, 8, 3)
    np.testing.assert_allclose(presence, np.max(model(x), axis=(2, 3)))


def test_unet3d_under_mixed_precision_has_float32_outputs_and_logits():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = tiny_model()
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("enc0_1_conv").compute_dtype == "bfloat16"
    x = np.random.default_rng(1).random((1, 8, 32, 32, 1), dtype=np.float32)
    assert model(x).dtype == "float32"
    np.testing.assert_allclose(tf.sigmoid(tf.cast(logits_model(model)(x), tf.float32)), model(x), atol=1e-2)


# ---- config checks --------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "key"), [
    (["data.patch_size=null"], "data.patch_size"),
    (["data.patch_size=[7,32,32]"], "data.patch_size"),  # D not a multiple of 2**z_pools
    (["data.patch_size=[8,30,32]"], "data.patch_size"),  # H not a multiple of 2**depth
    (["data.patch_size=[8,64,64]"], "data.patch_size"),  # larger than data.image_size in-plane
    (["model.z_pools=3"], "model.z_pools"),
    (["model.encoder=efficientnetv2b0"], "model.encoder"),
    (["model.presence_head=true"], "model.presence_head"),
    (["model.coord_channels=true"], "model.coord_channels"),
    (["data.offsets=[-1,0,1]"], "data.offsets"),
    (["data.keep_empty=0.5"], "data.keep_empty"),
    (["data.foreground_fraction=1.5"], "data.foreground_fraction"),
    (["train.window_overlap=1"], "train.window_overlap"),
    (["model.kind=2.5d"], "data.patch_size"),  # a patch size is for 3D only
    (["model.kind=4d"], "model.kind"),
])
def test_bad_3d_settings_name_the_key(records_dir, overrides, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key):
        tiny_config(records_dir, *overrides)
    argv = ["--config", str(SMOKE), "--run-dir", str(tmp_path / "run")]
    assert cli.run(train.main, [*argv, *(f"--set={o}" for o in [*TINY_3D, *overrides])]) == 2
    assert key in capsys.readouterr().err and not (tmp_path / "run").exists()


# ---- patches --------------------------------------------------------------------------------------

def patches(config, count: int):
    """The first `count` training patches (x, y) of the config's pipeline, host augmentation."""
    ds = data.train_dataset(config, [1]).unbatch().take(count)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.stack(xs), np.stack(ys)


def test_patches_have_the_patch_shape_and_repeat_with_the_seed(records_dir):
    config = tiny_config(records_dir, "data.deterministic=true", "augment.enabled=true")
    x, y = patches(config, 8)
    assert x.shape == (8, 8, 32, 32, 1) and y.shape == (8, 8, 32, 32, 3)
    assert x.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0} and 0 <= x.min() <= x.max() <= 1
    again, _ = patches(config, 8)
    np.testing.assert_array_equal(again, x)
    other, _ = patches(tiny_config(records_dir, "data.deterministic=true", "augment.enabled=true", "data.seed=1"), 8)
    assert not np.array_equal(other, x)


def test_short_volumes_are_padded_to_the_patch(records_dir):
    x, y = patches(tiny_config(records_dir, "data.patch_size=[32,32,32]", "data.deterministic=true"), 2)
    assert x.shape == (2, 32, 32, 32, 1)
    # 24 slices in a 32-slice patch: 4 zero slices on each side, whatever the corner (there is no room)
    assert not x[:, :4].any() and not x[:, -4:].any() and x[:, 4:-4].any(axis=(2, 3, 4)).all()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_foreground_fraction_centres_patches_on_organs(records_dir, fraction):
    """Short patches (2 slices of 24) mostly miss the organs by chance; centred on one they always hold one."""
    config = tiny_config(records_dir, "data.patch_size=[2,8,8]", "model.depth=3", "model.z_pools=1",
                         f"data.foreground_fraction={fraction}", "data.deterministic=true", "augment.enabled=false")
    _, y = patches(config, 48)
    with_organ = y.any(axis=(1, 2, 3, 4)).mean()
    if fraction == 1:
        assert with_organ == 1.0
    else:
        assert with_organ < 0.8, with_organ


def test_one_geometry_for_every_slice_of_a_patch_and_the_mask_follows():
    """finish_batch on patches whose slices are all the same picture: each output patch still has equal
    slices (one transform per patch), two patches got different transforms, and the scan follows the mask."""
    mask = np.zeros((24, 24), np.uint8)
    mask[6:14, 4:18] = 1  # class 0 (bit 1)
    scan = mask.astype(np.uint16) * 40000 + 10000
    images = np.broadcast_to(scan[None, None, ..., None], (2, 4, 24, 24, 1)).copy()
    masks = np.broadcast_to(mask[None, None, ..., None], (2, 4, 24, 24, 1)).copy()
    config = AugmentConfig(rotation_degrees=30, scale=0.2, shift=0.1, grid_distortion=0.02)
    x, y = augment.finish_batch(tf.constant(images), tf.constant(masks), tf.constant([3, 4], tf.int64), config)
    x, y = x.numpy(), y.numpy()
    assert x.shape == (2, 4, 24, 24, 1) and y.shape == (2, 4, 24, 24, 3)
    for patch in range(2):
        for s in range(1, 4):
            np.testing.assert_array_equal(x[patch, s], x[patch, 0])
            np.testing.assert_array_equal(y[patch, s], y[patch, 0])
    assert not np.array_equal(y[0], y[1])
    organ = y[..., 0] > 0
    assert (x[..., 0][organ] > 0.5).mean() > 0.9 and (x[..., 0][~organ] < 0.5).mean() > 0.9


def test_validation_grid_covers_every_voxel_without_padding(records_dir):
    config = tiny_config(records_dir, "data.patch_size=[16,16,32]")
    volume = next(iter(data.eval_volumes(config, [0])))["image"].numpy()
    count = len(list(data.eval_volumes(config, [0])))
    x = np.concatenate([p[0].numpy() for p in data.validation_pairs(config, [0], 4)])
    assert volume.shape == (24, 32, 32, 1) and x.shape[1:] == (16, 16, 32, 1)
    # 24 slices -> 2 patches along z, from slice 0 and slice 8 (overlapping, not zero-padded as the model
    # never sees in training), 2 along the rows, 1 along the columns
    assert len(x) == 4 * count == data.count_validation_examples(config, [0])
    for patch, (z, row) in enumerate([(0, 0), (0, 16), (8, 0), (8, 16)]):
        np.testing.assert_array_equal(x[patch], volume[z:z + 16, row:row + 16])


def test_only_an_axis_shorter_than_the_patch_is_padded():
    volume = np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6, 1) + 1
    x, y = data._grid_patches(volume, np.zeros((5, 4, 6, 3), np.float32), [8, 4, 4])
    assert x.shape == (2, 8, 4, 4, 1) and y.shape == (2, 8, 4, 4, 3)
    np.testing.assert_array_equal(x[0, :5], volume[:, :, :4])
    np.testing.assert_array_equal(x[1, :5], volume[:, :, 2:])
    assert not np.any(x[:, 5:])


# ---- sliding windows ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def window_model():
    return tiny_model(norm="group")


def test_one_window_is_a_whole_volume_pass(window_model):
    volume = np.random.default_rng(2).random((8, 32, 32, 1), dtype=np.float32)
    got = sliding_window_probabilities(lambda w: window_model(w), volume, (8, 32, 32))
    np.testing.assert_allclose(got, window_model(volume[None])[0], atol=1e-6)


@pytest.mark.parametrize("window_batch", [1, 3, 64])
def test_result_does_not_depend_on_the_window_batch(window_model, window_batch):
    volume = np.random.default_rng(3).random((13, 40, 36, 1), dtype=np.float32)
    predict = tf.function(lambda w: window_model(w), reduce_retracing=True)
    reference = sliding_window_probabilities(predict, volume, (8, 16, 16), window_batch=2)
    got = sliding_window_probabilities(predict, volume, (8, 16, 16), window_batch=window_batch)
    # float32 kernels may sum another batch in another order (1.07e-6 seen in the full suite)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert got.shape == (13, 40, 36, 3) and 0 <= float(tf.reduce_min(got)) <= float(tf.reduce_max(got)) <= 1


def test_windows_are_gaussian_weighted_averages():
    """With a constant prediction per window (its index), each voxel gets the Gaussian-weighted mean."""
    calls = []

    def predict(windows):
        calls.append(int(windows.shape[0]))
        return tf.zeros([*windows.shape[:-1], 3]) + 1.0 * (len(calls) - 1)

    got = sliding_window_probabilities(predict, np.zeros((12, 8, 8, 1), np.float32), (8, 8, 8), window_batch=1)
    assert calls == [1, 1]  # starts 0 and 4: overlapping by half a patch
    g = gaussian_weights((8, 8, 8))[:, 4, 4, 0]
    expected = (g[6] * 0 + g[2] * 1) / (g[6] + g[2])  # slice 6 is slice 6 of window 0 and slice 2 of window 1
    np.testing.assert_allclose(got[6, 4, 4], [expected] * 3, rtol=1e-5)
    np.testing.assert_array_equal(got[:4], 0)  # only window 0 covers them
    np.testing.assert_array_equal(got[8:], 1)
    # as few windows as keep the overlap, spread evenly from the start to the end
    for size, starts in ((8, [0]), (12, [0, 4]), (13, [0, 2, 5]), (20, [0, 4, 8, 12])):
        np.testing.assert_array_equal(data.window_starts(size, 8, 0.5), starts)
    np.testing.assert_array_equal(data.window_starts(20, 8, 0.0), [0, 6, 12])
    assert gaussian_weights((8, 16, 16)).shape == (8, 16, 16, 1)


def test_a_volume_of_unknown_depth_runs_inside_a_tf_function(window_model):
    volume = np.random.default_rng(4).random((12, 32, 32, 1), dtype=np.float32)
    graph = tf.function(lambda v: sliding_window_probabilities(window_model, v, (8, 16, 16)),
                        input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    np.testing.assert_allclose(graph(volume), sliding_window_probabilities(window_model, volume, (8, 16, 16)),
                               atol=1e-6)


def test_a_patch_larger_than_the_volume_is_an_error(window_model):
    graph = tf.function(lambda v: sliding_window_probabilities(window_model, v, (8, 16, 16)),
                        input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the patch"):
        graph(np.zeros((4, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match=r"\[D, H, W, C\]"):
        sliding_window_probabilities(window_model, np.zeros((8, 32, 32), np.float32), (8, 16, 16))


# ---- training, evaluation, cross-validation -------------------------------------------------------

@pytest.fixture(scope="module")
def run_3d(records_dir, tmp_path_factory):
    """A tiny 3D run trained to a time budget (2 epochs in a minute: 40 s left no room for a slow start on a
    machine running other tests) and evaluated through the commands."""
    run = tmp_path_factory.mktemp("run3d") / "run"
    overrides = [*TINY_3D, "train.epochs=2", "augment.enabled=true", "augment.rotation_degrees=10",
                 "train.window_batch=2"]
    argv = ["--config", str(SMOKE), "--records", str(records_dir), "--run-dir", str(run), "--no-progress",
            "--budget-minutes", "1"]
    assert cli.run(train.main, [*argv, *(f"--set={o}" for o in overrides)]) == 0
    assert cli.run(evaluate.main, ["--run", str(run), "--limit", "2", "--no-progress"]) == 0
    return run


def test_a_3d_run_trains_and_evaluate_scores_whole_volumes(run_3d):
    history = (run_3d / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "val_dice" in history[0]
    assert load_config(run_3d / "config.yaml").train.steps_per_epoch >= 1  # the budget's plan
    summary = json.loads((RunFolder(run_3d).limited_eval_dir(2) / EVAL_SUMMARY).read_text())  # --limit 2
    assert summary["num_volumes"] >= 1 and 0 <= summary["score"] <= 1 and summary["folds"] == [0]
    model = keras.models.load_model(RunFolder(run_3d).final_model, compile=False)
    assert model.input_shape == (None, None, None, None, 1)


def test_evaluate_refuses_volumes_shorter_than_the_patch(run_3d, records_dir, tmp_path, capsys):
    """The run's patch is 8 slices; a copy of its config with 32-slice patches meets 24-slice volumes."""
    config = (run_3d / "config.yaml").read_text().replace("- 8\n  - 32\n  - 32", "- 32\n  - 32\n  - 32")
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.yaml").write_text(config)
    (other / "model.keras").symlink_to(RunFolder(run_3d).final_model)
    assert cli.run(evaluate.main, ["--run", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.patch_size" in err and "24 slices" in err
    assert not (other / "eval").exists()


def test_a_3d_run_serves_whole_volumes_alone_and_fused_with_a_2_5d_run(run_3d, records_dir, synth_dir, tmp_path):
    """Export a 3D run alone (whole-volume signatures only), a 2.5D run with a presence head alone, and
    their 3:1 fusion; in a fresh process without tfseg the fusion's probabilities and presence are the
    weighted means of the members' (a 3D member's presence: its highest probability on each slice), and
    the fusion's masks are gated by that presence."""
    import pickle
    import subprocess
    import sys

    from tests.test_export import tiny_run, volume_pngs
    from tests.test_volume import ANSWER
    from tfseg import export, layout

    run_2d = tiny_run(records_dir, tmp_path, presence_head=True)
    models = {name: tmp_path / name / "1" for name in ("3d", "2d", "fused")}
    for name, runs in (("3d", [run_3d]), ("2d", [run_2d]), ("fused", [run_2d, run_3d])):
        weights = ["--weight", "3", "--weight", "1"] if name == "fused" else []
        argv = [arg for run in runs for arg in ("--run", str(run))]
        assert cli.run(export.main, [*argv, *weights, "--out", str(models[name])]) == 0
    for name in ("3d", "fused"):
        assert sorted(layout.read_info(models[name])["signatures"]) == ["serving_volume", "volume_probabilities"]
    _, pngs = volume_pngs(synth_dir)
    requests = [(name, str(path), "volume_probabilities", pngs) for name, path in models.items()]
    requests.append(("short", str(models["3d"]), "serving_volume", pngs[:4]))  # fewer slices than a patch
    (tmp_path / "requests.pkl").write_bytes(pickle.dumps(requests))
    done = subprocess.run([sys.executable, "-c", ANSWER, "requests.pkl", "answers.pkl"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tfseg imported: False" in done.stdout
    answers = pickle.loads((tmp_path / "answers.pkl").read_bytes())
    probabilities = {name: answers[name]["probabilities"] for name in models}
    assert probabilities["3d"].shape == probabilities["2d"].shape == (len(pngs), *probabilities["2d"].shape[1:])
    assert not np.allclose(probabilities["3d"], probabilities["2d"], atol=1e-3)
    np.testing.assert_allclose(probabilities["fused"], 0.75 * probabilities["2d"] + 0.25 * probabilities["3d"],
                               atol=1e-5)
    presence = {name: answers[name]["presence"] for name in models}
    assert presence["3d"].shape == (len(pngs), 3) and not np.allclose(presence["3d"], presence["2d"], atol=1e-3)
    np.testing.assert_allclose(presence["fused"], 0.75 * presence["2d"] + 0.25 * presence["3d"], atol=1e-5)
    above = probabilities["fused"].max(axis=(1, 2)) > 0.05  # [D, 3]: where the threshold alone would draw
    assert np.any(above & (presence["fused"] < 0.5))  # slices the gating must empty (tiny_run's settings)
    np.testing.assert_array_equal(answers["fused"]["masks"].max(axis=(1, 2)) > 0, above & (presence["fused"] >= 0.5))
    assert "error" in answers["short"]


def test_evaluate_gates_a_3d_run_as_its_export_does(run_3d, tmp_path):
    """evaluate --run and evaluate --model of the run's export get the same probabilities and the same
    presence (each slice's highest probability at model size), so any presence_threshold gates alike."""
    import itertools

    from tfseg import export
    from tfseg.evaluation.predictors import keras_volume_predictor, predict_volumes, saved_model_volumes

    exported = tmp_path / "3d" / "1"
    assert cli.run(export.main, ["--run", str(run_3d), "--out", str(exported)]) == 0
    config = load_config(run_3d / "config.yaml")
    model = keras.models.load_model(RunFolder(run_3d).final_model, compile=False)
    from_run = itertools.islice(predict_volumes(config, [0], keras_volume_predictor(model, config)), 2)
    from_export = itertools.islice(saved_model_volumes(exported, config.data.records, [0]), 2)
    for (name, probabilities, presence), (other_name, other_probabilities, other_presence) in zip(
            from_run, from_export, strict=True):
        assert name == other_name and presence.shape == (len(probabilities), 3)
        np.testing.assert_allclose(probabilities, other_probabilities, atol=1e-4)
        np.testing.assert_allclose(presence, other_presence, atol=1e-4)
        assert np.all(presence >= probabilities.max(axis=(1, 2)) - 1e-5)  # a resize cannot exceed the max


@pytest.mark.slow  # ~2 min: cv evaluates every volume of the fold at the scans' own size
def test_cv_runs_a_3d_config(records_dir, tmp_path):
    overrides = [*TINY_3D, "train.epochs=1", "train.steps_per_epoch=2", "train.image_log_every=0"]
    argv = ["--config", str(SMOKE), "--records", str(records_dir), "--folds", "1", "--out", str(tmp_path / "cv"),
            "--no-progress", *(f"--set={o}" for o in overrides)]
    assert cli.run(cv.main, argv) == 0
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert list(summary["folds"]) == ["1"] and 0 <= summary["out_of_fold"]["score"] <= 1


def test_3d_models_train_in_float32_on_the_cpu():
    """TensorFlow's CPU bf16 Conv3D kernel gradients are non-finite for 2-voxel-deep inputs (a 3D UNet's
    deepest stages): auto picks float32 there, mixed_bfloat16 is refused naming the key."""
    assert strategy.resolve_precision("auto", "cpu", "3d") == "float32"
    assert strategy.resolve_precision("mixed_float16", "gpu", "3d") == "mixed_float16"
    with pytest.raises(ConfigError, match="train.precision"):
        strategy.resolve_precision("mixed_bfloat16", "cpu", "3d")
