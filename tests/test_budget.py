"""Training to a time budget, training on every fold, and training settings that do what they say:
AdamW's decay shrinks kernels only, EMA leaves the averaged weights, the loss scale is read explicitly."""

import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tfseg import cli, train
from tfseg.config import load_config
from tfseg.errors import ConfigError
from tfseg.evaluation.report import trained_steps
from tfseg.layout import RunFolder
from tfseg.model.build import build_model
from tfseg.training import trainer
from tfseg.training.budget import FINAL_SECONDS, SAFETY, Replanner, plan_steps
from tfseg.training.optimizer import loss_scale, make_optimizer

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
BUDGET_TOLERANCE = 10.0  # seconds past the budget a run may end: one epoch's checkpoint, logs and save


def smoke_config(records_dir, *overrides):
    return load_config(SMOKE, [f"data.records={records_dir}", "train.image_log_every=0", *overrides])


# (budget s, elapsed s, step s, validation s, epochs, steps done) -> (epochs, steps per epoch)
PLANS = [
    ((600, 30, 0.5, 10, 5, 9), (5, (int((SAFETY * 570 - FINAL_SECONDS - 50) / 0.5) + 9) // 5)),
    ((600, 30, 0.5, 0, 5, 9), (5, (int((SAFETY * 570 - FINAL_SECONDS) / 0.5) + 9) // 5)),  # no validation
    ((60, 20, 1.0, 10, 6, 2), (1, int(SAFETY * 40 - FINAL_SECONDS - 10) + 2)),  # validation: <= 20% of the time
]


@pytest.mark.parametrize("args, expected", PLANS)
def test_plan_fills_the_budget(args, expected):
    plan = plan_steps(*args)
    assert (plan.epochs, plan.steps_per_epoch) == expected
    budget, elapsed, step, validation, _, done = args
    spent = elapsed + (plan.epochs * plan.steps_per_epoch - done) * step + plan.epochs * validation
    assert spent <= budget and spent + step + validation > SAFETY * budget - FINAL_SECONDS - budget * 0.05


@pytest.mark.parametrize("args", [(60, 59, 0.5, 10, 5, 1), (30, 28, 1, 0, 3, 1), (100, 10, 1, 95, 1, 1)])
def test_plan_too_short_names_the_minimum(args):
    with pytest.raises(ConfigError, match=r"too short.*give at least [0-9.]+ min"):
        plan_steps(*args)


@pytest.mark.parametrize(("step_seconds", "expected"), [
    (None, 4),  # no step of its own: the probe's 9.7 s, so (0.95 x 240 s - 3 s - 5 x 5.7 s) / 9.7 s / 5 epochs
    (2.0, 19),  # a step timed in the epoch: that figure
])
def test_replan_after_an_epoch_of_timing_steps_keeps_the_probes_step_time(records_dir, tmp_path, step_seconds,
                                                                          expected):
    """A slow step under a short budget can leave epoch 1 only the steps the budget timed; its replan then
    has no step to time and must keep the probe's figure (timing nothing once gave 0 s a step, and a
    5-minute run was planned 78602 steps an epoch)."""
    import tensorflow as tf

    config = smoke_config(records_dir, "train.budget_minutes=5", "train.epochs=6", "train.steps_per_epoch=3")
    optimizer = make_optimizer(config.train, 3, "float32")
    optimizer.build([keras.Variable(0.0)])
    logs = []
    replan = Replanner(tf.distribute.get_strategy(), config, time.perf_counter() - 60, optimizer, tmp_path,
                       False, logs.append, 9.7)
    assert replan(1, step_seconds, 5.7) == expected == config.train.steps_per_epoch
    assert f"a step took {step_seconds or 9.7:.3f} s" in logs[0]


@pytest.fixture(scope="module")
def budget_run(records_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("budget") / "run"
    config = smoke_config(records_dir, "train.budget_minutes=1", "train.steps_per_epoch=null", "train.epochs=3")
    began = time.perf_counter()
    result = trainer.train(config, run_dir, progress=False)
    return result, run_dir, time.perf_counter() - began, config


@pytest.mark.slow
def test_a_one_minute_budget_ends_in_a_minute(budget_run):
    result, run_dir, seconds, _ = budget_run
    assert seconds <= 60 + BUDGET_TOLERANCE
    assert seconds >= 0.8 * 60, "the plan should fill the budget, not stop early"
    t = result.config.train
    stored = load_config(RunFolder(run_dir).config).train
    assert stored.steps_per_epoch == t.steps_per_epoch and stored.epochs == t.epochs == len(result.history)
    assert t.steps_per_epoch > 10  # more than the timing steps
    steps = [int(row["steps"]) for row in result.history]  # each epoch's steps, as re-planned
    assert steps[-1] == t.steps_per_epoch
    assert trained_steps(RunFolder(run_dir), t).startswith(f"{t.epochs} epochs, {sum(steps)} steps in ")
    # The cosine schedule is laid over the whole run: it ends at its floor, not cut off part-way.
    assert result.history[-1]["lr"] == pytest.approx(t.learning_rate * t.min_lr_ratio, rel=0.02)


@pytest.mark.slow
def test_a_budgeted_run_resumes_with_its_steps(budget_run):
    result, run_dir, _, config = budget_run
    again = trainer.train(config, run_dir, progress=False)  # finished: resumes, takes no step, plans nothing
    assert again.config.train.steps_per_epoch == result.config.train.steps_per_epoch
    assert [r["loss"] for r in again.history] == pytest.approx([r["loss"] for r in result.history], rel=1e-5)


@pytest.mark.parametrize("option, message", [
    (["--budget-minutes", "0"], "argument --budget-minutes: must be above 0"),  # argparse, before TensorFlow
    (["--budget-minutes", "-2"], "argument --budget-minutes: must be above 0"),
    (["--set", "train.budget_minutes=0"], "train.budget_minutes: must be > 0"),  # the config's own check
    (["--budget-minutes", "0.02"], "too short"),
])
def test_bad_budgets_are_refused_and_write_nothing(option, message, records_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--config", str(SMOKE), "--records", str(records_dir), "--run-dir", str(run_dir), "--no-progress", *option]
    try:
        code = cli.run(train.main, argv)
    except SystemExit as exit:  # an argument error: argparse exits itself
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_training_on_every_fold_runs_without_validation(records_dir, tmp_path):
    config = smoke_config(records_dir, "data.val_folds=[]", "train.epochs=2", "train.steps_per_epoch=3")
    result = trainer.train(config, tmp_path / "run", progress=False)
    assert len(result.history) == 2 and not any(k.startswith("val_") for k in result.history[-1])
    run = RunFolder(tmp_path / "run")
    assert run.final_model.exists() and run.curves.exists() and not run.best_weights.exists()


def _small_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))


def test_weight_decay_shrinks_kernels_and_leaves_norms_and_biases(records_dir):
    config = smoke_config(records_dir, "train.weight_decay=0.05", "train.warmup_epochs=0",
                          "train.learning_rate=0.01")
    model = _small_model()
    for v in model.trainable_variables:  # biases and norm offsets start at 0: give them something to lose
        v.assign(v + 0.5)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    optimizer = make_optimizer(config.train, 10, "float32")
    optimizer.apply([keras.ops.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    shrink = 1 - 0.05 * 0.01  # AdamW: weight_decay * learning_rate per step; zero gradients move nothing else
    for v in model.trainable_variables:
        expected = before[v.path] * (shrink if v.name == "kernel" else 1.0)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)
    assert {v.name for v in model.trainable_variables} == {"kernel", "bias", "gamma", "beta"}


def test_ema_leaves_the_averaged_weights(records_dir, tmp_path):
    runs = {}
    for ema in (0.0, 0.999):
        config = smoke_config(records_dir, f"train.ema={ema}", "train.epochs=1", "train.steps_per_epoch=8")
        runs[ema] = trainer.train(config, tmp_path / f"run{ema}", progress=False).model
    keras.utils.set_random_seed(config.data.seed)  # as train() does before it builds the model
    start = build_model(config).trainable_weights
    moved = {ema: sum(float(np.abs(a.numpy() - b.numpy()).sum()) for a, b in zip(model.trainable_weights, start,
                                                                                  strict=True))
             for ema, model in runs.items()}
    # At momentum 0.999 the average stays near the weights of the first step (Keras starts it there);
    # the plain run goes on for seven more.
    assert moved[0.999] < 0.5 * moved[0.0], moved


def test_loss_scale_is_read_from_the_loss_scale_optimizer(records_dir):
    config = smoke_config(records_dir)
    scaled = make_optimizer(config.train, 10, "mixed_float16")
    scaled.build([keras.Variable(1.0)])
    assert float(loss_scale(scaled)) == pytest.approx(float(scaled.scale_loss(1.0)))
    assert float(loss_scale(scaled)) > 1
    assert loss_scale(make_optimizer(config.train, 10, "float32")) == 1.0
