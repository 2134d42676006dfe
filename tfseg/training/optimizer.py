"""The optimizer of a run: Adam(W) on a warm-up + cosine schedule, with loss scaling for float16."""

import keras

from tfseg.config import TrainConfig


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

