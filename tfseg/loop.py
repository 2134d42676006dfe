"""The custom training loop every strategy runs: distributed steps, validation, logs, checkpoints, resume.

Keras' model.fit breaks under MultiWorkerMirroredStrategy with 2+ workers (keras-team/keras#20585),
so training is one tf.distribute loop for all strategies: a tf.function step run with strategy.run,
per-example losses averaged over the GLOBAL batch (tf.nn.compute_average_loss), gradients summed over
replicas once, clipped by their global norm, then applied. Only the chief writes the run folder.
"""

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from tfseg import CLASSES, curves, files, losses, overlay
from tfseg.config import Config, TrainConfig
from tfseg.errors import ConfigError

SUM = tf.distribute.ReduceOp.SUM
CHECKPOINTS = "checkpoints"
HISTORY = "history.csv"
BEST_WEIGHTS = "best.weights.h5"
FINAL_MODEL = "model.keras"
LOGS = "logs"  # TensorBoard: logs/train and logs/validation
IMAGES = 4  # validation slices shown in TensorBoard


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss became NaN); the last good checkpoint is kept."""


def make_optimizer(train: TrainConfig, steps_per_epoch: int, precision: str) -> keras.optimizers.Optimizer:
    """Adam(W) on a linear warm-up then cosine decay to learning_rate * min_lr_ratio; loss scaling for
    float16 (bfloat16 has float32's exponent range and needs none)."""
    total = max(1, train.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(train.warmup_epochs * steps_per_epoch)))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else train.learning_rate, decay_steps=max(1, total - warmup),
        alpha=train.min_lr_ratio, warmup_target=train.learning_rate if warmup else None, warmup_steps=warmup)
    if train.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=train.weight_decay)
        # Decay conv kernels only: shrinking norm scales/offsets and biases only hurts.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    else:
        optimizer = keras.optimizers.Adam(schedule)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class Steps:
    """The compiled train and validation steps of one model under one strategy."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, optimizer, loss,
                 global_batch: int, config: Config):
        self.strategy, self.model, self.optimizer, self.loss = strategy, model, optimizer, loss
        self.global_batch, self.train_config = global_batch, config.train
        # XLA compiles the forward and backward pass of one replica; the cross-replica sum and the
        # update stay outside it, so jit_compile works under every strategy.
        self._gradients = tf.function(self._gradients_fn, jit_compile=True) if config.train.jit_compile \
            else self._gradients_fn
        self.train_step = tf.function(self._train_step)
        self.eval_step = tf.function(self._eval_step)

    def _gradients_fn(self, x, y):
        with tf.GradientTape() as tape:
            pred = self.model(x, training=True)
            per_example = losses.per_example_loss(self.loss, y, pred)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(loss)  # the loss scale under mixed_float16, else loss
        return loss, tape.gradient(scaled, self.model.trainable_variables)

    def _replica_train(self, x, y):
        loss, grads = self._gradients(x, y)
        context = tf.distribute.get_replica_context()
        # Sum once here so that clipping (and the loss-scale finite check) sees the full-batch
        # gradient on every replica; Keras' optimizer sums again, hence the division.
        grads = context.all_reduce(SUM, grads)
        if self.train_config.clip_norm > 0:
            scale = getattr(self.optimizer, "dynamic_scale", 1.0)  # clip the unscaled norm
            grads, _ = tf.clip_by_global_norm(grads, self.train_config.clip_norm * scale)
        replicas = context.num_replicas_in_sync
        self.optimizer.apply([g / replicas for g in grads], self.model.trainable_variables)
        return loss

    def _train_step(self, iterator):
        x, y = next(iterator)
        return self.strategy.reduce(SUM, self.strategy.run(self._replica_train, args=(x, y)), axis=None)

    def _replica_eval(self, x, y):
        """[loss sum, examples, intersection (K), predicted (K), true (K)]: one vector, one all-reduce."""
        pred = self.model(x, training=False)
        y = tf.cast(y, tf.float32)
        per_example = losses.per_example_loss(self.loss, y, pred)
        true = tf.cast(y > 0.5, tf.float32)
        hard = tf.cast(pred > self.train_config.threshold, tf.float32)
        sums = [tf.reduce_sum(v, axis=[0, 1, 2]) for v in (true * hard, hard, true)]
        return tf.concat([[tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32)], *sums], 0)

    def _eval_step(self, x, y):
        return self.strategy.reduce(SUM, self.strategy.run(self._replica_eval, args=(x, y)), axis=None)

    def evaluate(self, dataset) -> dict:
        """Validation loss and Dice / IoU of all pixels of the (distributed) validation set at once."""
        totals = sum(self.eval_step(x, y).numpy().astype(np.float64) for x, y in dataset)
        loss, count, (inter, pred, true) = totals[0], totals[1], totals[2:].reshape(3, -1)
        dice = np.asarray(losses.DiceMetric.score(inter, pred, true))
        iou = np.asarray(losses.IoUMetric.score(inter, pred, true))
        return {"val_loss": loss / max(count, 1.0), "val_dice": float(dice.mean()), "val_iou": float(iou.mean()),
                **{f"val_dice_{c}": float(d) for c, d in zip(CLASSES, dice, strict=True)}}


# ---- the run folder ---------------------------------------------------------------------------------

def read_history(run_dir: Path, last_epoch: int) -> list[dict]:
    """history.csv rows of epochs 1..last_epoch (a killed run may have logged one more)."""
    path = run_dir / HISTORY
    if not path.exists():
        return []
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(path.read_text()))]
    return [row for row in rows if 1 <= row["epoch"] <= last_epoch]


def write_history(run_dir: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["epoch"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: int(v) if k == "epoch" else f"{v:.6g}" for k, v in row.items()})
    files.write_text(run_dir / HISTORY, out.getvalue())


def save_keras(path: Path, save) -> None:
    """Atomically write a Keras file (weights or model): Keras needs the real suffix on the temp name."""
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    save(str(tmp))
    os.replace(tmp, path)


def parse_profile(spec: str | None) -> tuple[int, int] | None:
    """'10,20' -> global steps 10..20 (1-based, inclusive); '5' -> just step 5."""
    if not spec:
        return None
    first, _, last = str(spec).partition(",")
    try:
        steps = int(first), int(last or first)
    except ValueError:
        steps = (0, 0)
    if not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"train.profile_batches: expected START,STOP steps with 1 <= START <= STOP, got {spec!r}")
    return steps


def validation_images(dataset, count: int = IMAGES) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`count` validation slices with organs, spread over the first ones found: scans and masks."""
    scans, masks = [], []
    for x, y in dataset:
        keep = np.asarray(tf.reduce_any(y > 0, axis=[1, 2, 3]))
        scans += list(x.numpy()[keep])
        masks += list(y.numpy()[keep])
        if len(scans) >= 16 * count:
            break
    if not scans:
        return None, None
    pick = np.linspace(0, len(scans) - 1, min(count, len(scans))).round().astype(int)
    return np.stack([scans[i] for i in pick]), np.stack([masks[i] for i in pick])


@dataclass
class Log:
    """Where messages go: the summary lines (chief only) and tqdm bars."""

    chief: bool
    bars: bool = True

    def __call__(self, message: str) -> None:
        if self.chief:
            tqdm.write(message)


def fit(*, strategy: tf.distribute.Strategy, model: keras.Model, optimizer, loss, config: Config,
        train_data, val_data, image_data, steps_per_epoch: int, run_dir: Path, write_dir: Path,
        chief: bool, resume: bool, log: Log) -> list[dict]:
    """Train config.train.epochs epochs (continuing from the run folder's last checkpoint if resume);
    return the history rows. Every worker must call this; only the chief writes run_dir."""
    t = config.train
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, str(write_dir / CHECKPOINTS), max_to_keep=2)
    latest = tf.train.latest_checkpoint(str(run_dir / CHECKPOINTS)) if resume else None
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        log(f"resumed from {latest}: {int(epoch_var.numpy())} of {t.epochs} epochs done")
    start = int(epoch_var.numpy())
    history = read_history(run_dir, start) if latest else []
    best = max((row["val_dice"] for row in history), default=-math.inf)
    if chief:
        write_history(run_dir, history)

    steps = Steps(strategy, model, optimizer, loss, config.data.batch_size, config)
    iterator = iter(train_data)
    writers = {name: tf.summary.create_file_writer(str(run_dir / LOGS / name)) for name in ("train", "validation")} \
        if chief else {}
    profile, profiling = parse_profile(t.profile_batches) if chief else None, False
    step = start * steps_per_epoch
    for epoch in range(start + 1, t.epochs + 1):
        began = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{t.epochs}", unit="step", leave=False,
                   disable=not (chief and log.bars), dynamic_ncols=True)
        total = 0.0
        for i in range(steps_per_epoch):
            step += 1
            if profile and step == profile[0]:
                tf.profiler.experimental.start(str(run_dir / LOGS / "train"))  # TensorBoard's Profile tab
                profiling = True
            value = float(steps.train_step(iterator))
            if profiling and step == profile[1]:
                tf.profiler.experimental.stop()
                profiling = False
            if not math.isfinite(value):
                bar.close()
                raise TrainingStopped(
                    f"loss is {value} at epoch {epoch}, step {i + 1}: training stopped (kept the checkpoint of "
                    f"epoch {epoch - 1}); lower train.learning_rate or train.clip_norm, or check the data")
            total += value
            bar.update()
            bar.set_postfix(loss=f"{total / (i + 1):.4f}", refresh=False)
        bar.close()
        row = {"epoch": epoch, "loss": total / steps_per_epoch, **steps.evaluate(val_data),
               "lr": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
               "seconds": time.perf_counter() - began}
        history.append(row)
        improved = row["val_dice"] > best
        best = max(best, row["val_dice"])
        if chief:
            _log_epoch(writers, row, epoch, model, image_data, config, t.epochs)
            # history first, then the checkpoint: a kill in between redoes this epoch, never skips it
            write_history(run_dir, history)
            if improved:
                save_keras(run_dir / BEST_WEIGHTS, model.save_weights)
        epoch_var.assign(epoch)
        manager.save(checkpoint_number=epoch)
        dice = ", ".join(f"{c} {row[f'val_dice_{c}']:.3f}" for c in CLASSES)
        log(f"epoch {epoch}/{t.epochs}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}, "
            f"val_dice {row['val_dice']:.4f} ({dice}), lr {row['lr']:.2e}, {row['seconds']:.1f} s"
            + (" [best]" if improved else ""))
    if profiling:  # the run ended inside the profiled range
        tf.profiler.experimental.stop()
    if chief:
        save_keras(run_dir / FINAL_MODEL, model.save)
        if history:
            curves.plot_history(history, run_dir / curves.FILE_NAME)
        for writer in writers.values():
            writer.close()
    return history


def _log_epoch(writers, row: dict, epoch: int, model, image_data, config: Config, epochs: int) -> None:
    with writers["train"].as_default(step=epoch):
        tf.summary.scalar("loss", row["loss"])
        tf.summary.scalar("learning_rate", row["lr"])
    with writers["validation"].as_default(step=epoch):
        for key, value in row.items():
            if key.startswith("val_"):
                tf.summary.scalar(key.removeprefix("val_"), value)
        every = config.train.image_log_every
        if every and image_data[0] is not None and (epoch % every == 0 or epoch == epochs):
            scans, masks = image_data
            pred = keras.ops.convert_to_numpy(model(scans, training=False)) > config.train.threshold
            offsets = config.data.offsets
            centre = offsets.index(0) if 0 in offsets else len(offsets) // 2
            images = [overlay.draw_contours(s[..., centre], m, p) for s, m, p in zip(scans, masks, pred, strict=True)]
            tf.summary.image("predictions", np.stack(images), max_outputs=len(images),
                             description="scan with true (solid) and predicted (dashed) contours")
        writers["validation"].flush()
    writers["train"].flush()
