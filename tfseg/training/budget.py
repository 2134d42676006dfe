"""Training to a time budget (train.budget_minutes): time the first steps and a few validation batches,
then choose the steps per epoch so that training, validation included, ends within the budget, and
lay the learning-rate schedule over all of them. After each epoch the epochs left are planned again
from what that epoch took (a machine that gets busier or quieter moves the end less). The choice is
written to the run's config.yaml, so a resumed run keeps it."""

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


def _time_left(budget_seconds: float, elapsed: float) -> float:
    """Seconds the plan may fill: SAFETY of what is left, less the final save."""
    return SAFETY * (budget_seconds - elapsed) - FINAL_SECONDS


def plan_steps(budget_seconds: float, elapsed: float, step_seconds: float, validation_seconds: float,
               epochs: int, steps_done: int) -> Plan:
    """Epochs (each ending in a validation: up to `epochs`, fewer when they would take more than
    VALIDATION_SHARE of the time left) and the steps that fill the rest of the budget, given what has
    been spent and the steps already done (they belong to epoch 1). ConfigError when not even one
    epoch of one step and its validation fits."""
    left = _time_left(budget_seconds, elapsed)
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
    from tfseg.data.pipeline import count_validation_examples

    d, t = config.data, config.train
    budget_seconds = 60 * t.budget_minutes
    val_batches = math.ceil(count_validation_examples(config, d.val_folds) / d.batch_size) if val_data is not None \
        else 0
    losses, step_seconds, validation_seconds = probe(steps, iterator, val_data, val_batches, budget_seconds)
    elapsed, step_seconds, validation_seconds = agree(
        strategy, [time.perf_counter() - started, step_seconds, validation_seconds])
    return losses, plan_steps(budget_seconds, elapsed, step_seconds, validation_seconds, t.epochs, len(losses))


def agree(strategy, figures: list[float]) -> list[float]:
    """The largest of each figure over all workers: every worker then plans the same steps (their
    collectives must match) and the slowest one keeps the budget."""
    import tensorflow as tf

    values = tf.constant(figures, tf.float32)
    every = strategy.gather(strategy.run(lambda: tf.identity(values)[None]), axis=0)
    return [float(v) for v in tf.reduce_max(every, axis=0).numpy()]


@dataclass
class Replanner:
    """Called after each epoch but the last: the steps each epoch left takes, from the time that epoch's
    steps and validation took; the schedule is laid again over the run's new end (config.train and
    the run's config.yaml are updated, so a resume keeps the last plan). An epoch whose steps were all
    taken while timing (step_seconds None) keeps the last figure, first the probe's (step_seconds)."""

    strategy: object
    config: object  # the run's resolved Config
    started: float
    optimizer: object
    run_dir: object
    chief: bool
    log: object
    step_seconds: float  # the last timed step

    def __call__(self, epoch: int, step_seconds: float | None, validation_seconds: float) -> int:
        from tfseg.config import save_config
        from tfseg.layout import RunFolder
        from tfseg.training.optimizer import schedule_of

        t = self.config.train
        epochs_left = t.epochs - epoch
        elapsed, step_seconds, validation_seconds = agree(
            self.strategy, [time.perf_counter() - self.started, step_seconds or self.step_seconds, validation_seconds])
        self.step_seconds = step_seconds
        left = _time_left(60 * t.budget_minutes, elapsed) - epochs_left * validation_seconds
        per_epoch = max(1, math.floor(left / step_seconds / epochs_left))
        schedule = schedule_of(self.optimizer)
        schedule.set_steps(int(self.optimizer.iterations.numpy()) + epochs_left * per_epoch,
                           int(schedule.warmup.numpy()))
        if per_epoch != t.steps_per_epoch:
            self.log(f"time budget: {elapsed / 60:.1f} of {t.budget_minutes:g} min spent, a step took "
                     f"{step_seconds:.3f} s: the {epochs_left} epoch(s) left take {per_epoch} steps each")
            t.steps_per_epoch = per_epoch
            if self.chief:
                save_config(self.config, RunFolder(self.run_dir).config)
        return per_epoch


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
