"""Overlap metrics (hard Dice and IoU) of thresholded [B, H, W, C] masks, summed over every batch seen."""

import keras
from keras import ops

from tfseg import CLASSES
from tfseg.model.losses import as_float32, check_option


class _OverlapMetric(keras.metrics.Metric):
    """Sums per-class intersections and cardinalities of thresholded masks over every batch seen.

    The result is the score of all those pixels at once (not a mean of per-batch scores): the
    score of one class, or the mean over classes when class_index is None. A class with no positive
    pixel in either mask scores 1. Sums are float32: relative error ~1e-7 per batch added.
    """

    def __init__(self, class_index: int | None = None, threshold: float = 0.5, num_classes: int = len(CLASSES),
                 name: str | None = None, dtype=None):
        check_option(isinstance(num_classes, int) and num_classes >= 1,
               f"{type(self).__name__}: num_classes must be a positive integer, got {num_classes!r}")
        check_option(class_index is None or (isinstance(class_index, int) and 0 <= class_index < num_classes),
               f"{type(self).__name__}: class_index must be None or in 0..{num_classes - 1}, got {class_index!r}")
        check_option(0 <= threshold < 1, f"{type(self).__name__}: threshold must be in [0, 1), got {threshold!r}")
        super().__init__(name=name or self.default_name, dtype=dtype)
        self.class_index, self.threshold, self.num_classes = class_index, float(threshold), num_classes
        self.intersection, self.pred_sum, self.true_sum = (
            self.add_variable((num_classes,), "zeros", dtype="float32", name=n)
            for n in ("intersection", "pred_sum", "true_sum"))

    def update_state(self, y_true, y_pred, sample_weight=None):
        """sample_weight, if given, is one weight per example, [B]."""
        y_true, y_pred = as_float32(y_true, y_pred)
        if y_pred.shape[-1] not in (None, self.num_classes):
            raise ValueError(f"{self.name}: expected {self.num_classes} classes, got shape {tuple(y_pred.shape)}")
        true = ops.cast(y_true > 0.5, "float32")
        pred = ops.cast(y_pred > self.threshold, "float32")
        weight = 1.0
        if sample_weight is not None:
            weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1,) + (1,) * (len(pred.shape) - 1))
        axes = list(range(len(pred.shape) - 1))
        self.intersection.assign_add(ops.sum(true * pred * weight, axis=axes))
        self.pred_sum.assign_add(ops.sum(pred * weight, axis=axes))
        self.true_sum.assign_add(ops.sum(true * weight, axis=axes))

    def result(self):
        scores = self.score(self.intersection, self.pred_sum, self.true_sum)
        return ops.mean(scores) if self.class_index is None else scores[self.class_index]

    def get_config(self):
        return {"class_index": self.class_index, "threshold": self.threshold,
                "num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="tfseg")
class DiceMetric(_OverlapMetric):
    """Hard Dice 2|P & T| / (|P| + |T|) over all pixels seen; 1 when both masks are empty."""

    default_name = "dice"

    @staticmethod
    def score(inter, pred, true):
        total = pred + true
        return ops.where(total > 0, ops.divide_no_nan(2.0 * inter, total), 1.0)


@keras.saving.register_keras_serializable(package="tfseg")
class IoUMetric(_OverlapMetric):
    """Hard IoU |P & T| / |P | T| over all pixels seen; 1 when both masks are empty."""

    default_name = "iou"

    @staticmethod
    def score(inter, pred, true):
        union = pred + true - inter
        return ops.where(union > 0, ops.divide_no_nan(inter, union), 1.0)


def get_metrics(class_names: tuple[str, ...] = CLASSES, threshold: float = 0.5) -> list[keras.metrics.Metric]:
    """dice_<class> for each class, then mean-over-classes `dice` and `iou`."""
    n = len(class_names)
    per_class = [DiceMetric(i, threshold, n, name=f"dice_{c}") for i, c in enumerate(class_names)]
    return [*per_class, DiceMetric(None, threshold, n, name="dice"), IoUMetric(None, threshold, n, name="iou")]
