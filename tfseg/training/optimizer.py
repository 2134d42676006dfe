"""The optimizer of a run: Adam(W) on a warm-up + cosine schedule, with loss scaling for float16.

The schedule's step counts live in variables, so a time budget (training.budget) can lay the whole
schedule over the steps it chooses once it has measured the first ones.
"""

import math

import keras
from keras import ops

from tfseg.config import TrainConfig

# Decay conv kernels and dense weights only: shrinking norm scales and offsets or biases only hurts.
NO_DECAY = ("bias", "gamma", "beta")


@keras.saving.register_keras_serializable(package="tfseg")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to peak * min_ratio at
    `total` steps (Keras' CosineDecay with a warm-up), held there after."""

    def __init__(self, peak: float, min_ratio: float, total: int, warmup: int):
        self.peak, self.min_ratio = float(peak), float(min_ratio)
        self.total = keras.Variable(0.0, trainable=False, dtype="float32", name="schedule_total")
        self.warmup = keras.Variable(0.0, trainable=False, dtype="float32", name="schedule_warmup")
        self.set_steps(total, warmup)

    def set_steps(self, total: int, warmup: int) -> None:
        total = max(1, int(total))
        self.total.assign(float(total))
        self.warmup.assign(float(min(total - 1, max(0, int(warmup)))))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warming = self.peak * step / ops.maximum(self.warmup, 1.0)
        progress = ops.clip((step - self.warmup) / ops.maximum(self.total - self.warmup, 1.0), 0.0, 1.0)
        cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
        decayed = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
        return ops.where(step < self.warmup, warming, decayed)

    def get_config(self):
        return {"peak": self.peak, "min_ratio": self.min_ratio, "total": int(self.total.numpy()),
                "warmup": int(self.warmup.numpy())}


def warmup_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    return int(round(train.warmup_epochs * steps_per_epoch))


def make_optimizer(train: TrainConfig, steps_per_epoch: int, precision: str) -> keras.optimizers.Optimizer:
    """Adam(W) on WarmupCosine over train.epochs * steps_per_epoch steps; an exponential moving average
    of the weights with train.ema > 0; loss scaling for float16 (bfloat16 has float32's exponent range
    and needs none).

    Keras' AdamW takes weight_decay * learning_rate of each kernel per step (decoupled decay as
    Loshchilov & Hutter write it), so weight_decay is of the order of 1e-2, not 1e-4.
    """
    schedule = WarmupCosine(train.learning_rate, train.min_lr_ratio, train.epochs * steps_per_epoch,
                            warmup_steps(train, steps_per_epoch))
    ema = {"use_ema": True, "ema_momentum": train.ema} if train.ema else {}
    if train.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=train.weight_decay, **ema)
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
    else:
        optimizer = keras.optimizers.Adam(schedule, **ema)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def schedule_of(optimizer) -> WarmupCosine:
    """The WarmupCosine schedule of an optimizer from make_optimizer (inside a LossScaleOptimizer too)."""
    inner = optimizer.inner_optimizer if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else optimizer
    schedule = inner._learning_rate  # where Keras 3 keeps a schedule: checked, not assumed
    if not isinstance(schedule, WarmupCosine):
        raise RuntimeError(f"the optimizer's learning rate is {schedule!r}, not tfseg's WarmupCosine: has Keras "
                           "moved it? (tfseg.training.optimizer.schedule_of)")
    return schedule


def loss_scale(optimizer) -> float:
    """The factor scale_loss multiplies the loss by: the dynamic scale of a LossScaleOptimizer, else 1.
    Read explicitly (not with a getattr default), so a Keras that renames it fails here, loudly."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    return 1.0
