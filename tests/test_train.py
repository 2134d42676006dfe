"""tfseg.train on tiny synthetic records: the smoke model learns, the run folder is complete, mixed
precision keeps float32 outputs, NaN stops the run, a changed config refuses to resume."""

import csv
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from tfseg import CLASSES, cli, train
from tfseg.config import load_config
from tfseg.layout import RunFolder
from tfseg.training import curves, trainer
from tfseg.training.optimizer import make_optimizer

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


def smoke_config(records_dir, *overrides):
    return load_config(SMOKE, [f"data.records={records_dir}", *overrides])


@pytest.fixture(scope="module")
def smoke_run(records_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    # Fixed batches: whether 90 steps at a high rate find the organs must not depend on the order drawn.
    return trainer.train(smoke_config(records_dir, "data.deterministic=true"), run_dir, progress=False), run_dir


def test_smoke_model_learns(smoke_run):
    result, _ = smoke_run
    dice = [row["val_dice"] for row in result.history]
    loss = [row["loss"] for row in result.history]
    assert loss[-1] < loss[0]
    # The first epoch ends near Dice 0 (nothing predicted yet); 90 steps later organs are found.
    assert max(dice) > 0.25 and max(dice) > dice[0] + 0.2, dice


def test_run_folder_is_complete(smoke_run, records_dir):
    result, run_dir = smoke_run
    epochs = result.config.train.epochs
    assert load_config(run_dir / "config.yaml") == result.config
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    columns = {"epoch", "steps", "loss", "val_loss", "val_dice", "lr", "seconds", *(f"val_dice_{c}" for c in CLASSES)}
    assert columns <= set(rows[0])
    assert [int(r["steps"]) for r in rows] == [result.config.train.steps_per_epoch] * epochs
    assert np.allclose([float(r["val_dice"]) for r in rows], [h["val_dice"] for h in result.history], atol=1e-5)
    assert not RunFolder(run_dir).best_weights.exists()  # nothing is selected on the validation folds
    picture = cv2.imread(str(RunFolder(run_dir).curves))
    assert picture is not None and picture.shape[0] > 200 and picture.shape[1] > 2 * picture.shape[0]
    assert len(list((RunFolder(run_dir).checkpoints).glob("ckpt-*.index"))) >= 1
    assert list((RunFolder(run_dir).logs / "train").glob("events.out.tfevents.*"))
    assert list((RunFolder(run_dir).logs / "validation").glob("events.out.tfevents.*"))
    loaded = keras.models.load_model(RunFolder(run_dir).final_model, compile=False)
    x = np.random.default_rng(0).random((2, *result.model.input_shape[1:]), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-5)


def test_a_changed_config_refuses_to_resume(smoke_run, records_dir, capsys):
    _, run_dir = smoke_run
    argv = ["--config", str(SMOKE), "--records", str(records_dir), "--run-dir", str(run_dir), "--no-progress"]
    before = (run_dir / "history.csv").read_text()
    assert cli.run(train.main, [*argv, "--set", "model.base_filters=4"]) == 2
    err = capsys.readouterr().err
    assert "model.base_filters: 8 -> 4" in err and "--fresh" in err
    assert (run_dir / "history.csv").read_text() == before


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_outputs(precision, records_dir, tmp_path):
    config = smoke_config(records_dir, f"train.precision={precision}", "train.epochs=1", "train.steps_per_epoch=1",
                          "train.image_log_every=0")
    result = trainer.train(config, tmp_path / "run", progress=False)
    assert result.model.output.dtype == "float32"
    assert result.model.get_layer("enc0_1_conv").compute_dtype == precision.removeprefix("mixed_")
    assert np.isfinite(result.history[0]["loss"])
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    optimizer = make_optimizer(config.train, 1, precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")


def test_nan_loss_stops_with_a_clear_message(records_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--config", str(SMOKE), "--records", str(records_dir), "--run-dir", str(run_dir), "--no-progress",
            "--set", "train.learning_rate=1e30", "--set", "train.clip_norm=0"]
    assert cli.run(train.main, argv) == 1
    err = capsys.readouterr().err
    assert "error: loss is nan" in err and "learning_rate" in err
    assert not (RunFolder(run_dir).final_model).exists()


def test_tpu_without_a_tpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    for extra in ([], ["--tpu", "no-such-tpu"]):
        argv = ["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), "--strategy", "tpu", *extra]
        assert cli.run(train.main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: train.") and "TPU" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_curves_need_at_least_one_epoch(tmp_path):
    with pytest.raises(ValueError, match="no epochs"):
        curves.plot_history([], tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()
