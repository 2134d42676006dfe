"""Training to a time budget (train.budget_minutes): time the first steps and a few validation batches,
then choose the steps per epoch so that training, validation included, ends within the budget, and
lay the learning-rate schedule over all of them. The choice is written to the run's config.yaml, so
a resumed run keeps it."""

import math
import statistics
import time
from dataclasses import dataclass

from tfseg.errors import ConfigError

PROBE_STEPS = 16  # timed steps after the first (which compiles): past what the prefetch buffer held
PROBE_SHARE = 0.05  # at most this share of the budget goes to timing steps
VALIDATION_PROBE_BATCHES = 3  # validation batches timed (the first compiles)
VALIDATION_SHARE = 0.2  # validations beyond this share of the time are dropped (fewer epochs), not steps
SAFETY = 0.95  # share of the time left that the plan fills: checkpoints, logs and a noisy machine take the rest
FINAL_SECONDS = 3.0  # saving the model and the curves at the end


@dataclass
class Plan:
    epochs: int
    steps_per_epoch: int
    step_seconds: float
    validation_seconds: float

    def describe(self, budget_minutes: float, elapsed: float) -> str:
        return (f"time budget {budget_minutes:g} min: a step takes {self.step_seconds:.3f} s and a validation "
                f"{self.validation_seconds:.1f} s, so {self.epochs} epochs of {self.steps_per_epoch} steps "
                f"({self.epochs * self.steps_per_epoch} steps; {elapsed:.0f} s spent on start-up and timing)")


def plan_steps(budget_seconds: float, elapsed: float, step_seconds: float, validation_seconds: float,
               epochs: int, steps_done: int) -> Plan:
    """Epochs (each ending in a validation: up to `epochs`, fewer when they would take more than
    VALIDATION_SHARE of the time left) and the steps that fill the rest of the budget, given what has
    been spent and the steps already done (they belong to epoch 1). ConfigError when not even one
    epoch of one step and its validation fits."""
    left = SAFETY * (budget_seconds - elapsed) - FINAL_SECONDS
    fit = math.floor(VALIDATION_SHARE * left / validation_seconds) if validation_seconds else epochs
    most = max(1, min(epochs, fit))
    for count in range(most, 0, -1):
        for_steps = left - count * validation_seconds
        per_epoch = (steps_done + math.floor(for_steps / step_seconds)) // count
        if for_steps >= 0 and per_epoch >= max(1, steps_done):
            return Plan(count, per_epoch, step_seconds, validation_seconds)
    needed = (elapsed + validation_seconds + step_seconds + FINAL_SECONDS) / SAFETY
    raise ConfigError(f"train.budget_minutes: {budget_seconds / 60:g} min is too short: start-up and timing took "
                      f"{elapsed:.0f} s, a step takes {step_seconds:.2f} s and a validation "
                      f"{validation_seconds:.1f} s; give at least {math.ceil(needed / 6) / 10:g} min")


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def probe(steps, iterator, val_data, validation_batches: int,
          budget_seconds: float) -> tuple[list[float], float, float]:
    """Run the first training steps and a few validation batches, timing them: (losses of the steps
    done, seconds per step, seconds per whole validation). The first step of each compiles."""
    losses = [float(steps.train_step(iterator))]
    times: list[float] = []
    while len(times) < PROBE_STEPS and sum(times) < PROBE_SHARE * budget_seconds:
        began = time.perf_counter()
        losses.append(float(steps.train_step(iterator)))
        times.append(time.perf_counter() - began)
    validation = 0.0
    if val_data is not None and validation_batches:
        batch_times = []
        for _, (x, y) in zip(range(VALIDATION_PROBE_BATCHES), val_data, strict=False):
            batch_times.append(_timed(lambda x=x, y=y: steps.eval_step(x, y).numpy()))
        timed = batch_times[1:] or batch_times
        validation = statistics.median(timed) * validation_batches
    return losses, statistics.median(times), validation


def plan_run(strategy, steps, iterator, val_data, config, started: float) -> tuple[list[float], Plan]:
    """Probe the run's first steps and validation, then plan_steps. Workers agree on the slowest one's
    figures, so that every worker takes the same number of steps (their collectives must match)."""
    import tensorflow as tf  # the planning above stays importable without TensorFlow

    from tfseg.data.pipeline import count_slices

    d, t = config.data, config.train
    budget_seconds = 60 * t.budget_minutes
    val_batches = math.ceil(count_slices(d.records, d.val_folds) / d.batch_size) if val_data is not None else 0
    losses, step_seconds, validation_seconds = probe(steps, iterator, val_data, val_batches, budget_seconds)
    figures = tf.constant([time.perf_counter() - started, step_seconds, validation_seconds], tf.float32)
    every = strategy.gather(strategy.run(lambda: tf.identity(figures)[None]), axis=0)
    elapsed, step_seconds, validation_seconds = (float(v) for v in tf.reduce_max(every, axis=0).numpy())
    return losses, plan_steps(budget_seconds, elapsed, step_seconds, validation_seconds, t.epochs, len(losses))


def adopt_plan(config, run_dir) -> None:
    """A resumed budgeted run keeps the epochs and steps its config.yaml recorded (set in config)."""
    from tfseg.config import load_config
    from tfseg.layout import RunFolder

    path = RunFolder(run_dir).config
    if not path.exists() or config.train.steps_per_epoch is not None:
        return
    stored = load_config(path).train
    if stored.budget_minutes == config.train.budget_minutes and stored.steps_per_epoch is not None:
        config.train.epochs, config.train.steps_per_epoch = stored.epochs, stored.steps_per_epoch
