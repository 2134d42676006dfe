"""Training as a library call: pick the strategy and precision, build the data, model and optimizer
under the strategy's scope, and run the loop. `python -m tfseg.train` is its command line."""

import copy
import dataclasses
import time
from pathlib import Path

import keras
import tensorflow as tf

from tfseg.config import Config
from tfseg.data.pipeline import count_examples, train_dataset, validation_pairs
from tfseg.errors import ConfigError, TrainingStopped
from tfseg.layout import read_manifest
from tfseg.model.build import build_loss, build_model, resolve_norm
from tfseg.records.reader import check_shards, damaged_shards, remake_command
from tfseg.training import budget
from tfseg.training import strategy as strategy_lib
from tfseg.training.loop import Log, fit
from tfseg.training.optimizer import make_optimizer, schedule_of, warmup_steps
from tfseg.training.run_folder import check_run_dir, start_run_dir
from tfseg.training.steps import Steps
from tfseg.training.tensorboard import parse_profile, validation_images


@dataclasses.dataclass
class Result:
    model: keras.Model
    history: list[dict]
    config: Config  # with the strategy and precision actually used
    chief: bool
    minutes: float  # from the call to the model saved


def train_folds(config: Config) -> list[int]:
    """The records' folds that train: all but data.val_folds and data.holdout_folds."""
    folds = int(read_manifest(config.data.records)["settings"]["folds"])
    val, holdout = set(config.data.val_folds), set(config.data.holdout_folds)
    for key, chosen in (("val_folds", val), ("holdout_folds", holdout)):
        if not chosen <= set(range(folds)):
            raise ConfigError(f"data.{key}: {sorted(chosen - set(range(folds)))} not in the records' folds "
                              f"0..{folds - 1} ({config.data.records})")
    if val & holdout:
        raise ConfigError(f"data.holdout_folds: {sorted(val & holdout)} also validate (data.val_folds)")
    rest = [f for f in range(folds) if f not in val | holdout]
    if not rest:
        raise ConfigError(f"data.val_folds and data.holdout_folds leave no fold of {config.data.records} to train on")
    return rest


def shard_lost(config: Config, run_dir: Path, err: Exception) -> TrainingStopped | None:
    """A records shard that became unreadable in the middle of a run (None if the DataLossError is not
    about records): which one, and what to do."""
    records, damaged = config.data.records, "; ".join(damaged_shards(config.data.records))
    if not damaged and "record at" not in str(err):  # not a TFRecord's "truncated/corrupted record at N"
        return None
    damaged = damaged or f"{records}: {str(err).split('}} ')[-1].split(' [Op:')[0]}"
    return TrainingStopped(f"{damaged}: a records shard became unreadable during training; training stopped, the "
                           f"finished epochs are kept in {run_dir}. Remake the records (`{remake_command(records)}`), "
                           "then run the same command again: it resumes after the last finished epoch")


def train(config: Config, run_dir: str | Path, *, fresh: bool = False, progress: bool = True) -> Result:
    """Train under the strategy and precision of config.train; see the module docstring."""
    started = time.perf_counter()
    run_dir, t = Path(run_dir), config.train
    parse_profile(t.profile_batches)  # a bad value fails now, not mid-run
    strategy = strategy_lib.make_strategy(t.strategy, t.tpu, t.cpu_replicas)
    kind = strategy_lib.device_kind(strategy)
    resolved = copy.deepcopy(config)
    resolved.train.strategy = strategy_lib.resolve_name(t.strategy, t.tpu, t.cpu_replicas)
    resolved.train.precision = precision = strategy_lib.resolve_precision(t.precision, kind, config.model.kind)
    resolved.train.jit_compile = strategy_lib.resolve_jit_compile(t.jit_compile, kind, precision)
    resolved.model.norm = resolve_norm(config.model.norm, config.data.batch_size, strategy.num_replicas_in_sync)
    chief = strategy_lib.is_chief(strategy)
    log = Log(chief, progress)
    folds = train_folds(config)
    check_shards(config.data.records, [*folds, *config.data.val_folds])  # a damaged shard stops us before any file
    batch = config.data.batch_size
    if batch % strategy.num_replicas_in_sync:
        raise ConfigError(f"data.batch_size: {batch} is not divisible by the {strategy.num_replicas_in_sync} replicas")
    if t.budget_minutes and not fresh:
        budget.adopt_plan(resolved, run_dir)
    resume = check_run_dir(run_dir, resolved, fresh=fresh)
    to_plan = bool(t.budget_minutes) and resolved.train.steps_per_epoch is None
    steps_per_epoch = resolved.train.steps_per_epoch or max(1, count_examples(config, folds) // batch)
    validate = bool(config.data.val_folds)
    log(f"strategy {resolved.train.strategy} ({strategy.num_replicas_in_sync} replicas on {kind}), precision "
        f"{precision}{', XLA' if resolved.train.jit_compile else ''}; train folds {folds}, validation folds "
        f"{list(config.data.val_folds) if validate else 'none (nothing validates, nothing is selected)'}; "
        + ("steps per epoch from the time budget" if to_plan else f"{steps_per_epoch} steps of {batch} per epoch")
        + f"; run folder {run_dir}")

    def val_pairs(context: tf.distribute.InputContext | None = None):
        per_replica = context.get_per_replica_batch_size(batch) if context else batch
        ds = validation_pairs(config, config.data.val_folds, per_replica)
        return ds.shard(context.num_input_pipelines, context.input_pipeline_id) if context else ds

    write_dir = strategy_lib.write_dir(run_dir, strategy)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # global by Keras' design; restored below
    try:
        keras.utils.set_random_seed(config.data.seed)
        with strategy.scope():
            model = build_model(resolved)
            optimizer = make_optimizer(t, steps_per_epoch, precision)
            optimizer.build(model.trainable_variables)
            loss = build_loss(config)
        train_data = strategy.distribute_datasets_from_function(
            lambda context: train_dataset(config, folds, input_context=context, global_batch_size=batch))
        val_data = strategy.distribute_datasets_from_function(val_pairs) if validate else None
        steps = Steps(strategy, model, optimizer, loss, batch, resolved)
        iterator = iter(train_data)
        done_losses = []
        if to_plan:
            done_losses, plan = budget.plan_run(strategy, steps, iterator, val_data, config, started)
            resolved.train.epochs, resolved.train.steps_per_epoch = plan.epochs, plan.steps_per_epoch
            steps_per_epoch = plan.steps_per_epoch
            schedule_of(optimizer).set_steps(plan.epochs * steps_per_epoch, warmup_steps(t, steps_per_epoch))
            log(plan.describe(t.budget_minutes, time.perf_counter() - started))
        if chief:  # only now: bad input (a weights file that does not fit, too short a budget) writes nothing
            start_run_dir(run_dir, resolved, fresh=fresh)
        images = validation_images(val_pairs()) if chief and t.image_log_every and validate else (None, None)
        history = fit(strategy=strategy, model=model, optimizer=optimizer, steps=steps, iterator=iterator,
                      config=resolved, val_data=val_data, image_data=images, steps_per_epoch=steps_per_epoch,
                      run_dir=run_dir, write_dir=write_dir, chief=chief, resume=resume, log=log,
                      done_losses=done_losses,
                      replan=budget.Replanner(strategy, resolved, started, optimizer, run_dir, chief, log,
                                             plan.step_seconds)
                      if to_plan else None)
    except tf.errors.DataLossError as err:  # a shard damaged after check_shards, in the middle of the run
        stopped = shard_lost(config, run_dir, err)
        if stopped is None:
            raise
        raise stopped from None
    finally:
        keras.config.set_dtype_policy(previous_policy)
        strategy_lib.remove_write_dir(write_dir, run_dir)
    return Result(model, history, resolved, chief, (time.perf_counter() - started) / 60)
