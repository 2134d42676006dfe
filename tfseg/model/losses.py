"""Segmentation losses for [B, H, W, C] multi-label masks and probabilities.

Losses return one value per example from `call` (Dice and Tversky are soft scores per example and
class, averaged over classes), so Keras' own reduction gives the batch mean in `model.fit`, and a
custom tf.distribute loop takes `per_example_loss(loss, y_true, y_pred)` and averages it over the
global batch itself (`tf.nn.compute_average_loss`). Per-example rather than per-batch Dice is what
makes that split exact. Everything is computed in float32, whatever the model's compute dtype.
With from_logits (what training uses) the losses take the model's logits: BCE is computed from them
exactly, not from probabilities clipped away from 0 and 1 (under bf16 / fp16 the sigmoid saturates
long before a logit does).
"""

import keras
from keras import ops

from tfseg.errors import ConfigError

EPSILON = 1e-7  # without logits: clip probabilities away from 0 and 1 before taking logs


def as_float32(y_true, y_pred):
    y_true = ops.cast(ops.convert_to_tensor(y_true), "float32")
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    shapes = tuple(y_true.shape), tuple(y_pred.shape)
    if len(shapes[0]) != len(shapes[1]) or len(shapes[1]) < 3 or any(
            None not in dims and dims[0] != dims[1] for dims in zip(*shapes, strict=True)):
        raise ValueError(f"y_true and y_pred must both be [batch, ..., classes] with the same shape, "
                         f"got {shapes[0]} and {shapes[1]}")
    return y_true, y_pred


def _mean_per_example(values):
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return ops.mean(values, axis=list(range(1, len(values.shape)))) if len(values.shape) > 1 else values


def check_option(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def binary_crossentropy(y_true, y_pred, logits=None):
    """Per-pixel BCE: from the logits when given (exact: max(x, 0) - x t + log(1 + exp(-|x|))), else of
    the probabilities clipped to [EPSILON, 1 - EPSILON]."""
    if logits is not None:
        return ops.relu(logits) - logits * y_true + ops.log1p(ops.exp(-ops.abs(logits)))
    p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    return -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))


def probabilities(y_pred, from_logits: bool):
    """(float32 probabilities, float32 logits or None) of a model output."""
    y_pred = ops.cast(y_pred, "float32")
    return (ops.sigmoid(y_pred), y_pred) if from_logits else (y_pred, None)


def tversky_index(y_true, y_pred, alpha: float, beta: float, smooth: float):
    """Soft Tversky index per example and class, [B, C].

    alpha = beta = 0.5 is soft Dice (2 tp + 2 smooth) / (2 tp + fp + fn + 2 smooth).
    """
    axes = list(range(1, len(y_pred.shape) - 1))
    tp = ops.sum(y_true * y_pred, axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


class _SegmentationLoss(keras.losses.Loss):
    """Shared plumbing: float32 inputs, options kept as float attributes and in get_config."""

    def __init__(self, default_name: str, options: dict[str, float], from_logits: bool = False, **kwargs):
        super().__init__(name=kwargs.pop("name", default_name), **kwargs)
        self.from_logits = bool(from_logits)
        self._options = {key: float(value) for key, value in options.items()}
        for key, value in self._options.items():
            setattr(self, key, value)
        if "smooth" in options:
            check_option(self.smooth > 0, f"{default_name}: smooth must be > 0, got {self.smooth}")

    def call(self, y_true, y_pred):
        y_true, y_pred = as_float32(y_true, y_pred)
        return self.per_example(y_true, *probabilities(y_pred, self.from_logits))

    def get_config(self):
        return {**super().get_config(), **self._options, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="tfseg")
class BceDiceLoss(_SegmentationLoss):
    """bce_weight * mean pixel BCE + dice_weight * Dice term, per example.

    Soft Dice is (2 sum(p t) + smooth) / (sum p + sum t + smooth) per example and class. The Dice term
    is the mean over classes of (1 - soft Dice) for the classes present in the example's true mask and
    0 for absent ones, as segmentation_models_pytorch's multilabel DiceLoss does: on an absent class
    soft Dice only reaches 1 when every probability is far below smooth / pixels, a push toward empty
    predictions that made small-organ training collapse; BCE alone keeps absent classes empty.

    batch_dice (nnU-Net's option of that name) scores the batch's pixels at once instead: false
    positives on a slice without the organ then cost Dice too (per example they only cost BCE, which
    on a 128 x 128 slice is a tiny penalty). Under a strategy the training steps all-reduce the batch's
    sums (batch_sums, per_example_with_sums), so the loss is the global batch's for any replica count.
    """

    NAME = "bce_dice"

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 batch_dice: bool = False, **kwargs):
        check_option(bce_weight >= 0 and dice_weight >= 0 and bce_weight + dice_weight > 0,
               f"{self.NAME}: weights must be >= 0 and not both 0, got {bce_weight}, {dice_weight}")
        options = {"bce_weight": bce_weight, "dice_weight": dice_weight, "smooth": smooth}
        options |= {key: kwargs.pop(key) for key in ("gamma", "alpha") if key in kwargs}
        super().__init__(self.NAME, options, **kwargs)
        self.batch_dice = bool(batch_dice)

    def pixel_loss(self, y_true, y_pred, logits):
        """The per-pixel term beside Dice: BCE (FocalDiceLoss: focal)."""
        return binary_crossentropy(y_true, y_pred, logits)

    def per_example(self, y_true, y_pred, logits=None):
        bce = _mean_per_example(self.pixel_loss(y_true, y_pred, logits))
        if self.batch_dice:  # the whole batch as one image: every example gets the batch's Dice term
            y_true, y_pred = y_true[None], y_pred[None]
        dice = tversky_index(y_true, y_pred, 0.5, 0.5, self.smooth / 2)
        present = ops.cast(ops.sum(y_true, axis=list(range(1, len(y_true.shape) - 1))) > 0, "float32")
        return self.bce_weight * bce + self.dice_weight * ops.mean(present * (1.0 - dice), axis=-1)

    def batch_sums(self, y_true, y_pred):
        """[3, K]: sum over the batch of p * t, of p and of t per class, batch Dice's statistics (a
        strategy all-reduces them so that every replica scores the global batch)."""
        y_true, y_pred = as_float32(y_true, y_pred)
        y_pred, _ = probabilities(y_pred, self.from_logits)
        axes = list(range(len(y_pred.shape) - 1))
        return ops.stack([ops.sum(y_true * y_pred, axis=axes), ops.sum(y_pred, axis=axes), ops.sum(y_true, axis=axes)])

    def per_example_with_sums(self, y_true, y_pred, sums):
        """per_example with the batch Dice term computed from `sums` (batch_sums of the global batch)."""
        y_true, y_pred = as_float32(y_true, y_pred)
        y_pred, logits = probabilities(y_pred, self.from_logits)
        bce = _mean_per_example(self.pixel_loss(y_true, y_pred, logits))
        tp, predicted, true = ops.unstack(sums, num=3)
        half = self.smooth / 2
        dice = (tp + half) / (0.5 * (predicted + true) + half)  # the Tversky index with alpha = beta = 1/2
        present = ops.cast(true > 0, "float32")
        return self.bce_weight * bce + self.dice_weight * ops.mean(present * (1.0 - dice))

    def get_config(self):
        return {**super().get_config(), "batch_dice": self.batch_dice}


@keras.saving.register_keras_serializable(package="tfseg")
class TverskyLoss(_SegmentationLoss):
    """1 - soft Tversky index per example (mean over classes); beta > alpha penalises misses more."""

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0, **kwargs):
        check_option(alpha >= 0 and beta >= 0 and alpha + beta > 0,
               f"tversky: alpha and beta must be >= 0 and not both 0, got {alpha}, {beta}")
        super().__init__("tversky", {"alpha": alpha, "beta": beta, "smooth": smooth}, **kwargs)

    def per_example(self, y_true, y_pred, logits=None):
        return 1.0 - ops.mean(tversky_index(y_true, y_pred, self.alpha, self.beta, self.smooth), axis=-1)


@keras.saving.register_keras_serializable(package="tfseg")
class FocalLoss(_SegmentationLoss):
    """Binary focal loss -a_t (1 - p_t)**gamma log(p_t), mean over pixels and classes per example.

    a_t is alpha on positive pixels and 1 - alpha on negative ones; gamma = 0, alpha = 0.5 gives
    half the BCE.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, **kwargs):
        check_option(gamma >= 0, f"focal: gamma must be >= 0, got {gamma}")
        check_option(0 <= alpha <= 1, f"focal: alpha must be in [0, 1], got {alpha}")
        super().__init__("focal", {"gamma": gamma, "alpha": alpha}, **kwargs)

    def per_example(self, y_true, y_pred, logits=None):
        return _mean_per_example(focal_term(y_true, y_pred, logits, self.gamma, self.alpha))


def focal_term(y_true, y_pred, logits, gamma: float, alpha: float):
    """Per-pixel binary focal loss -a_t (1 - p_t)**gamma log(p_t)."""
    p_t = y_true * y_pred + (1.0 - y_true) * (1.0 - y_pred)
    alpha_t = y_true * alpha + (1.0 - y_true) * (1.0 - alpha)
    return alpha_t * ops.power(1.0 - p_t, gamma) * binary_crossentropy(y_true, y_pred, logits)


@keras.saving.register_keras_serializable(package="tfseg")
class FocalDiceLoss(BceDiceLoss):
    """bce_weight * mean pixel focal loss (FocalLoss's) + dice_weight * the Dice term of BceDiceLoss (with
    its batch_dice option): focal in place of BCE spends the pixel term on the pixels still wrong."""

    NAME = "focal_dice"

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, **kwargs):
        check_option(gamma >= 0, f"focal_dice: gamma must be >= 0, got {gamma}")
        check_option(0 <= alpha <= 1, f"focal_dice: alpha must be in [0, 1], got {alpha}")
        super().__init__(gamma=gamma, alpha=alpha, **kwargs)

    def pixel_loss(self, y_true, y_pred, logits):
        return focal_term(y_true, y_pred, logits, self.gamma, self.alpha)


LOSSES = {"bce_dice": BceDiceLoss, "tversky": TverskyLoss, "focal": FocalLoss, "focal_dice": FocalDiceLoss}


def get_loss(name: str, **kwargs) -> keras.losses.Loss:
    """The loss called `name` (one of LOSSES) built with its options, e.g. get_loss("focal", gamma=2)."""
    if name not in LOSSES:
        raise ConfigError(f"loss: unknown name {name!r}; allowed: {', '.join(LOSSES)}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"loss {name!r}: bad options {kwargs}: {err}") from err


def presence_targets(y_true):
    """Masks [B, H, W, K] -> float32 [B, K]: 1 where the slice shows any pixel of the class."""
    y_true = ops.cast(ops.convert_to_tensor(y_true), "float32")
    return ops.cast(ops.max(y_true, axis=(1, 2)) > 0.5, "float32")


def presence_loss(y_true, presence, from_logits: bool = False):
    """BCE of a presence head's [B, K] probabilities (or logits) against the masks' presence, one value
    per example."""
    return ops.mean(binary_crossentropy(presence_targets(y_true), *probabilities(presence, from_logits)), axis=-1)


def per_example_loss(loss: keras.losses.Loss, y_true, y_pred):
    """Unreduced loss, one float32 value per example, [B], for a custom tf.distribute step.

    Works for any Keras Loss: values that `call` leaves per pixel are averaged. Scale with
    `tf.nn.compute_average_loss(values, global_batch_size=...)` inside `strategy.run`.
    """
    return _mean_per_example(ops.cast(loss.call(*as_float32(y_true, y_pred)), "float32"))
