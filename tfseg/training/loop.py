"""The training loop every strategy runs: epochs of distributed steps, validation, logs, checkpoints,
resume. Only the chief writes the run folder; the other workers checkpoint into their own write_dir."""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf
from tqdm import tqdm

from tfseg import CLASSES
from tfseg.config import Config
from tfseg.errors import TrainingStopped
from tfseg.layout import RunFolder
from tfseg.training import strategy as strategy_lib
from tfseg.training.curves import plot_history
from tfseg.training.optimizer import schedule_of
from tfseg.training.run_folder import read_history, save_keras, write_history
from tfseg.training.steps import Steps
from tfseg.training.tensorboard import Profiler, log_epoch


@dataclass
class Log:
    """Where messages go: the summary lines (chief only) and tqdm bars."""

    chief: bool
    bars: bool = True

    def __call__(self, message: str) -> None:
        if self.chief:
            tqdm.write(message)



def describe(row: dict) -> str:
    """One epoch's line: loss, validation loss and Dice per class (when the run validates), lr, time."""
    text = f"loss {row['loss']:.4f}"
    if "val_dice" in row:
        dice = ", ".join(f"{c} {row[f'val_dice_{c}']:.3f}" for c in CLASSES)
        text += f", val_loss {row['val_loss']:.4f}, val_dice {row['val_dice']:.4f} ({dice})"
    return text + f", lr {row['lr']:.2e}, {row['seconds']:.1f} s"


def fit(*, strategy: tf.distribute.Strategy, model: keras.Model, optimizer, steps: Steps, iterator,
        config: Config, val_data, image_data, steps_per_epoch: int, run_dir: Path, write_dir: Path,
        chief: bool, resume: bool, log: Log, done_losses: list[float] = (), replan=None) -> list[dict]:
    """Train config.train.epochs epochs (continuing from the run folder's last checkpoint if resume);
    return the history rows. done_losses: losses of epoch 1's steps already taken (a time budget's
    timing steps). replan(epoch, seconds a step (None when the epoch's steps were all timing steps),
    seconds of validation) -> the steps of the epochs left (a time budget's Replanner). val_data None: no
    validation (training on every fold). Every worker must call this; only the chief writes run_dir. The
    run's model ends with the last weights (their moving average with train.ema): nothing is selected on
    the validation folds, which evaluate scores."""
    t, run = config.train, RunFolder(run_dir)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    schedule = schedule_of(optimizer)  # its step counts: a time budget may have moved them
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var,
                                     schedule_total=schedule.total.value, schedule_warmup=schedule.warmup.value)
    manager = tf.train.CheckpointManager(checkpoint, str(RunFolder(write_dir).checkpoints), max_to_keep=2)
    latest = tf.train.latest_checkpoint(str(run.checkpoints)) if resume else None
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        log(f"resumed from {latest}: {int(epoch_var.numpy())} of {t.epochs} epochs done")
    start = int(epoch_var.numpy())
    history = read_history(run_dir, start) if latest else []
    if chief:
        write_history(run_dir, history)
    done_losses = list(done_losses) if start == 0 else []

    writers = {name: tf.summary.create_file_writer(str(run.logs / name)) for name in ("train", "validation")} \
        if chief else {}
    profiler = Profiler(t.profile_batches if chief else None, run.logs / "train")
    step = start * steps_per_epoch
    # Under multiworker a lost worker fails the others' collectives within a bounded time (strategy.py):
    # say which one, instead of a TensorFlow traceback.
    try:
        for epoch in range(start + 1, t.epochs + 1):
            began = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{t.epochs}", unit="step", leave=False,
                       disable=not (chief and log.bars), dynamic_ncols=True)
            total = sum(done_losses) if epoch == 1 else 0.0
            bar.update(len(done_losses) if epoch == 1 else 0)
            for i in range(len(done_losses) if epoch == 1 else 0, steps_per_epoch):
                step += 1
                profiler.before(step)
                value = float(steps.train_step(iterator))
                profiler.after(step)
                if not math.isfinite(value):
                    bar.close()
                    raise TrainingStopped(
                        f"loss is {value} at epoch {epoch}, step {i + 1}: training stopped (kept the checkpoint of "
                        f"epoch {epoch - 1}); lower train.learning_rate or train.clip_norm, or check the data")
                total += value
                bar.update()
                bar.set_postfix(loss=f"{total / (i + 1):.4f}", refresh=False)
            bar.close()
            taken, trained = steps_per_epoch - (len(done_losses) if epoch == 1 else 0), time.perf_counter() - began
            row = {"epoch": epoch, "steps": steps_per_epoch, "loss": total / steps_per_epoch,
                   **(steps.evaluate(val_data) if val_data is not None else {}),
                   "lr": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
                   "seconds": time.perf_counter() - began}
            history.append(row)
            if chief:
                log_epoch(writers, row, epoch, model, image_data, config, t.epochs)
                # history first, then the checkpoint: a kill in between redoes this epoch, never skips it
                write_history(run_dir, history)
            epoch_var.assign(epoch)
            manager.save(checkpoint_number=epoch)
            log(f"epoch {epoch}/{t.epochs}: {describe(row)}")
            if replan and epoch < t.epochs:
                steps_per_epoch = replan(epoch, trained / taken if taken else None, row["seconds"] - trained)
    except strategy_lib.LOST_WORKER_ERRORS as err:
        lost = strategy_lib.lost_worker(strategy, err)
        if lost is None:
            raise
        raise TrainingStopped(f"{lost}; training stopped. Start every worker again with the same command: "
                              f"they resume from the last checkpoint in {run.checkpoints}") from None
    profiler.stop()  # the run may have ended inside the profiled range
    optimizer.finalize_variable_values(model.trainable_variables)  # train.ema: the averaged weights
    if chief:
        save_keras(run.final_model, model.save)
        if history:
            plot_history(history, run.curves)
        for writer in writers.values():
            writer.close()
    return history

