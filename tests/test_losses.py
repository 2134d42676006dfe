"""Losses and overlap metrics against independent numpy formulas (MONAI-style tables)."""

import keras
import numpy as np
import pytest
from numpy.testing import assert_allclose

from tfseg import CLASSES
from tfseg.model.losses import BceDiceLoss, FocalDiceLoss, FocalLoss, TverskyLoss, get_loss, per_example_loss
from tfseg.model.metrics import DiceMetric, IoUMetric, get_metrics

RNG = np.random.default_rng(0)
SHAPE = (2, 8, 8, 3)
N_PIXELS = 8 * 8
MASK = (RNG.random(SHAPE) > 0.6).astype(np.float32)
MASK[:, 0, 0, :] = 1.0  # every (example, class) has a positive pixel
PROBS = RNG.random(SHAPE).astype(np.float32)
EMPTY = np.zeros(SHAPE, np.float32)


def np_bce(t, p):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_tversky(t, p, alpha, beta, smooth):
    """[B, C] soft Tversky index."""
    tp, fp, fn = ((a * b).sum(axis=(1, 2)) for a, b in ((t, p), (1 - t, p), (t, 1 - p)))
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def np_soft_dice(t, p, smooth=1.0):
    """[B, C] soft Dice."""
    return (2 * (t * p).sum(axis=(1, 2)) + smooth) / (t.sum(axis=(1, 2)) + p.sum(axis=(1, 2)) + smooth)


def np_bce_dice(t, p, bce_weight=1.0, dice_weight=1.0, smooth=1.0):
    """Dice term over the classes present in each example's truth (absent ones add 0)."""
    present = t.sum(axis=(1, 2)) > 0
    dice_term = np.where(present, 1 - np_soft_dice(t, p, smooth), 0.0).mean(axis=-1)
    return bce_weight * np_bce(t, p).mean(axis=(1, 2, 3)) + dice_weight * dice_term


def np_batch_dice_term(t, p, smooth=1.0):
    """[B] (all equal): the Dice term with the batch's pixels scored at once, classes absent from the batch 0."""
    dice = np_soft_dice(t.reshape(1, -1, *t.shape[2:]), p.reshape(1, -1, *p.shape[2:]), smooth)[0]
    return np.full(len(t), np.where(t.sum(axis=(0, 1, 2)) > 0, 1 - dice, 0.0).mean())


def np_focal(t, p, gamma=2.0, alpha=0.25):
    p_t = np.where(t == 1, p, 1 - p)
    alpha_t = np.where(t == 1, alpha, 1 - alpha)
    return (alpha_t * (1 - p_t) ** gamma * np_bce(t, p)).mean(axis=(1, 2, 3))


LOSS_CASES = [  # (loss class, kwargs, y_true, y_pred, expected per-example values)
    (BceDiceLoss, {"bce_weight": 0.0}, MASK, MASK, np.zeros(2)),  # perfect -> Dice loss 0
    # all wrong: no overlap and |T| + |P| = pixels -> loss 1 - smooth / (pixels + smooth), near 1
    (BceDiceLoss, {"bce_weight": 0.0}, MASK, 1 - MASK, np.full(2, 1 - 1 / (N_PIXELS + 1))),
    (BceDiceLoss, {"bce_weight": 0.0}, EMPTY, EMPTY, np.zeros(2)),  # both empty -> Dice 1
    # absent classes add no Dice loss, whatever is predicted (BCE keeps them empty) ...
    (BceDiceLoss, {"bce_weight": 0.0}, EMPTY, PROBS, np.zeros(2)),
    # ... present ones do: class 0 only, in example 0 only
    (BceDiceLoss, {"bce_weight": 0.0}, np.where(np.arange(3) == 0, MASK, 0) * [[[[1]]], [[[0]]]], PROBS,
     np.array([(1 - np_soft_dice(MASK, PROBS)[0, 0]) / 3, 0.0])),
    (BceDiceLoss, {}, np.where(np.arange(3) == 1, MASK, 0), PROBS,
     np_bce_dice(np.where(np.arange(3) == 1, MASK, 0), PROBS)),
    # batch_dice: false positives in an example without the class now cost Dice as well
    (BceDiceLoss, {"bce_weight": 0.0, "batch_dice": True}, np.where(np.arange(3) == 0, MASK, 0) * [[[[1]]], [[[0]]]],
     PROBS, np_batch_dice_term(np.where(np.arange(3) == 0, MASK, 0) * [[[[1]]], [[[0]]]], PROBS)),
    (BceDiceLoss, {"batch_dice": True}, MASK, PROBS, np_bce(MASK, PROBS).mean(axis=(1, 2, 3)) +
     np_batch_dice_term(MASK, PROBS)),
    (BceDiceLoss, {"bce_weight": 0.0, "batch_dice": True}, EMPTY, PROBS, np.zeros(2)),
    (BceDiceLoss, {"dice_weight": 0.0}, MASK, MASK, np.full(2, -np.log(1 - 1e-7))),  # clipped BCE ~0
    (BceDiceLoss, {}, MASK, PROBS, np_bce_dice(MASK, PROBS)),
    (BceDiceLoss, {"bce_weight": 0.3, "dice_weight": 0.7, "smooth": 0.5}, MASK, PROBS,
     np_bce_dice(MASK, PROBS, 0.3, 0.7, 0.5)),
    # alpha = beta = 0.5 is the Dice loss with twice the smoothing
    (TverskyLoss, {"alpha": 0.5, "beta": 0.5, "smooth": 0.5}, MASK, PROBS, np_bce_dice(MASK, PROBS, 0.0)),
    # Tversky alone scores absent classes too (nothing else would keep them empty)
    (TverskyLoss, {}, EMPTY, PROBS, 1 - np_tversky(EMPTY, PROBS, 0.3, 0.7, 1.0).mean(axis=-1)),
    (TverskyLoss, {}, MASK, PROBS, 1 - np_tversky(MASK, PROBS, 0.3, 0.7, 1.0).mean(axis=-1)),
    (TverskyLoss, {"alpha": 0.9, "beta": 0.1, "smooth": 2.0}, MASK, PROBS,
     1 - np_tversky(MASK, PROBS, 0.9, 0.1, 2.0).mean(axis=-1)),
    (FocalLoss, {}, MASK, PROBS, np_focal(MASK, PROBS)),
    (FocalLoss, {"gamma": 0.0, "alpha": 0.5}, MASK, PROBS, 0.5 * np_bce(MASK, PROBS).mean(axis=(1, 2, 3))),
    (FocalLoss, {"gamma": 1.0, "alpha": 0.9}, MASK, PROBS, np_focal(MASK, PROBS, 1.0, 0.9)),
    (FocalDiceLoss, {}, MASK, PROBS, np_focal(MASK, PROBS) + np_bce_dice(MASK, PROBS, bce_weight=0.0)),
    (FocalDiceLoss, {"gamma": 0.0, "alpha": 0.5, "dice_weight": 0.0}, MASK, PROBS,
     0.5 * np_bce(MASK, PROBS).mean(axis=(1, 2, 3))),
]


@pytest.mark.parametrize(("cls", "kwargs", "y_true", "y_pred", "expected"), LOSS_CASES)
def test_loss_values(cls, kwargs, y_true, y_pred, expected):
    loss = cls(**kwargs)
    per_example = per_example_loss(loss, y_true, y_pred)
    assert tuple(per_example.shape) == (2,)
    assert_allclose(keras.ops.convert_to_numpy(per_example), expected, rtol=1e-5, atol=1e-6)
    # Keras' own reduction (model.fit, or calling the loss) is the batch mean.
    assert_allclose(float(loss(y_true, y_pred)), expected.mean(), rtol=1e-5, atol=1e-6)
    unreduced = cls(**kwargs, reduction=None)(y_true, y_pred)
    assert_allclose(keras.ops.convert_to_numpy(unreduced), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["bce_dice", "tversky", "focal"])
def test_losses_compute_in_float32(name, dtype):
    loss = get_loss(name)
    low = keras.ops.cast(PROBS, dtype)
    values = per_example_loss(loss, keras.ops.cast(MASK, "uint8"), low)
    assert keras.backend.standardize_dtype(values.dtype) == "float32"
    # Same as float32 on the rounded inputs: only the inputs lose precision, not the sums.
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(low, "float32"))
    expected = keras.ops.convert_to_numpy(per_example_loss(loss, MASK, rounded))
    assert_allclose(keras.ops.convert_to_numpy(values), expected, rtol=1e-6)


def test_per_example_loss_accepts_builtin_keras_losses():
    values = per_example_loss(keras.losses.BinaryCrossentropy(), MASK, PROBS)
    assert_allclose(keras.ops.convert_to_numpy(values), np_bce(MASK, PROBS).mean(axis=(1, 2, 3)), rtol=1e-4)


def test_custom_distributed_step_matches_numpy():
    import tensorflow as tf  # tf.distribute is the point here

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        loss, metric = get_loss("bce_dice"), DiceMetric()

    @tf.function
    def step(y_true, y_pred):
        def replica_fn(t, p):
            metric.update_state(t, p)
            return tf.nn.compute_average_loss(per_example_loss(loss, t, p), global_batch_size=SHAPE[0])

        return strategy.reduce("SUM", strategy.run(replica_fn, args=(y_true, y_pred)), axis=None)

    assert_allclose(float(step(MASK, PROBS)), np_bce_dice(MASK, PROBS).mean(), rtol=1e-5)
    assert_allclose(float(metric.result()), np_dice(MASK, PROBS).mean(), rtol=1e-6)


@pytest.mark.parametrize(("name", "kwargs", "cls"), [
    ("bce_dice", {"smooth": 2.0}, BceDiceLoss), ("bce_dice", {"batch_dice": True}, BceDiceLoss),
    ("tversky", {"alpha": 0.2}, TverskyLoss),
    ("focal", {"gamma": 1.5}, FocalLoss), ("focal_dice", {"gamma": 1.0, "batch_dice": True}, FocalDiceLoss)])
def test_get_loss_and_serialization(name, kwargs, cls):
    loss = get_loss(name, **kwargs)
    assert type(loss) is cls and all(getattr(loss, k) == v for k, v in kwargs.items())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is cls and restored.get_config() == loss.get_config()
    assert_allclose(float(restored(MASK, PROBS)), float(loss(MASK, PROBS)))


@pytest.mark.parametrize(("make", "match"), [
    (lambda: get_loss("dice"), "bce_dice, tversky, focal, focal_dice"),
    (lambda: FocalDiceLoss(gamma=-1.0), "gamma"),
    (lambda: get_loss("focal", beta=0.5), "focal"),
    (lambda: BceDiceLoss(bce_weight=-1.0), "weights"),
    (lambda: BceDiceLoss(bce_weight=0.0, dice_weight=0.0), "weights"),
    (lambda: BceDiceLoss(smooth=0.0), "smooth"),
    (lambda: TverskyLoss(alpha=-0.1), "alpha"),
    (lambda: FocalLoss(gamma=-1.0), "gamma"),
    (lambda: FocalLoss(alpha=1.5), "alpha"),
    (lambda: BceDiceLoss()(MASK, PROBS[..., :2]), "same shape"),
    (lambda: BceDiceLoss()(MASK[:, :, 0, 0], PROBS[:, :, 0, 0]), "same shape"),  # no class axis
    (lambda: DiceMetric(class_index=3), "class_index"),
    (lambda: DiceMetric(threshold=1.0), "threshold"),
    (lambda: IoUMetric(num_classes=0), "num_classes"),
    (lambda: DiceMetric(num_classes=2).update_state(MASK, PROBS), "classes"),
])
def test_bad_options_and_shapes_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def np_dice(t, p, threshold=0.5):
    """Per-class hard Dice over all pixels of all examples; 1 when both are empty."""
    t, p = t > 0.5, p > threshold
    inter, total = (t & p).sum(axis=(0, 1, 2)), t.sum(axis=(0, 1, 2)) + p.sum(axis=(0, 1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def np_iou(t, p, threshold=0.5):
    t, p = t > 0.5, p > threshold
    inter, union = (t & p).sum(axis=(0, 1, 2)), (t | p).sum(axis=(0, 1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


HALF_EMPTY = MASK.copy()
HALF_EMPTY[..., 2] = 0.0  # class 2 absent from truth and (with EMPTY-like pred) prediction
HALF_PRED = PROBS.copy()
HALF_PRED[..., 2] = 0.1
METRIC_CASES = [  # (metric, y_true, y_pred, expected)
    (DiceMetric(), MASK, MASK, 1.0),
    (DiceMetric(), MASK, 1 - MASK, 0.0),
    (DiceMetric(), EMPTY, EMPTY, 1.0),  # empty truth and prediction: Dice 1
    (DiceMetric(), EMPTY, PROBS, 0.0),
    (DiceMetric(), MASK, PROBS, np_dice(MASK, PROBS).mean()),
    (DiceMetric(class_index=1), MASK, PROBS, np_dice(MASK, PROBS)[1]),
    (DiceMetric(class_index=2), HALF_EMPTY, HALF_PRED, 1.0),
    (DiceMetric(), HALF_EMPTY, HALF_PRED, np_dice(HALF_EMPTY, HALF_PRED).mean()),
    (DiceMetric(threshold=0.8), MASK, PROBS, np_dice(MASK, PROBS, 0.8).mean()),
    (DiceMetric(threshold=0.5), MASK, np.full(SHAPE, 0.5, np.float32), 0.0),  # at threshold -> negative
    (IoUMetric(), MASK, PROBS, np_iou(MASK, PROBS).mean()),
    (IoUMetric(class_index=0), MASK, PROBS, np_iou(MASK, PROBS)[0]),
    (IoUMetric(), EMPTY, EMPTY, 1.0),
]


@pytest.mark.parametrize(("metric", "y_true", "y_pred", "expected"), METRIC_CASES)
def test_metric_values(metric, y_true, y_pred, expected):
    metric.reset_state()
    metric.update_state(y_true, y_pred)
    assert_allclose(float(metric.result()), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cls", "reference"), [(DiceMetric, np_dice), (IoUMetric, np_iou)])
def test_metric_accumulates_global_counts_not_batch_means(cls, reference):
    # Batches with very different foreground sizes: global Dice != mean of per-batch Dice.
    big, small = MASK.copy(), np.zeros(SHAPE, np.float32)
    small[:, 1, 1, :] = 1.0
    preds = [PROBS, np.roll(PROBS, 1, axis=1)]
    metric = cls()
    for t, p in zip((big, small), preds, strict=True):
        metric.update_state(t, p)
    expected = reference(np.concatenate([big, small]), np.concatenate(preds)).mean()
    batch_mean = np.mean([reference(t, p).mean() for t, p in zip((big, small), preds, strict=True)])
    assert abs(expected - batch_mean) > 1e-3
    assert_allclose(float(metric.result()), expected, rtol=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 1.0  # nothing seen: scored like empty masks


def test_metric_sample_weight_drops_examples():
    metric = DiceMetric()
    metric.update_state(MASK, PROBS, sample_weight=np.array([1.0, 0.0], np.float32))
    assert_allclose(float(metric.result()), np_dice(MASK[:1], PROBS[:1]).mean(), rtol=1e-6)


def test_get_metrics_names_and_serialization():
    metrics = get_metrics(threshold=0.4)
    assert [m.name for m in metrics] == [f"dice_{c}" for c in CLASSES] + ["dice", "iou"]
    for metric in metrics:
        metric.update_state(MASK, PROBS)
    expected = [*np_dice(MASK, PROBS, 0.4), np_dice(MASK, PROBS, 0.4).mean(), np_iou(MASK, PROBS, 0.4).mean()]
    assert_allclose([float(m.result()) for m in metrics], expected, rtol=1e-6)
    for metric in metrics:
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
        assert type(restored) is type(metric) and restored.get_config() == metric.get_config()


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_compiled_model_saves_and_loads_loss_and_metrics(tmp_path):
    inputs = keras.Input(SHAPE[1:])
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="sigmoid")(inputs))
    model.compile(optimizer="adam", loss=get_loss("tversky", alpha=0.4, beta=0.6), metrics=get_metrics())
    before = model.evaluate(PROBS, MASK, verbose=0, return_dict=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.loss, TverskyLoss) and loaded.loss.alpha == 0.4
    after = loaded.evaluate(PROBS, MASK, verbose=0, return_dict=True)
    assert after.keys() == before.keys()
    assert_allclose([after[k] for k in before], list(before.values()), rtol=1e-6)


def test_batch_dice_from_sums_equals_the_batch_dice():
    """What a replica computes from all-reduced sums equals the single-device batch Dice loss."""
    loss = BceDiceLoss(batch_dice=True)
    want = keras.ops.convert_to_numpy(loss.per_example(MASK, PROBS))
    got = loss.per_example_with_sums(MASK, PROBS, loss.batch_sums(MASK, PROBS))
    assert_allclose(keras.ops.convert_to_numpy(got), want, rtol=1e-6)


LOGITS = np.log(PROBS / (1 - PROBS)).astype(np.float32)


@pytest.mark.parametrize("name, options", [("bce_dice", {}), ("bce_dice", {"batch_dice": True}), ("tversky", {}),
                                           ("focal", {"gamma": 2.0, "alpha": 0.25}), ("focal_dice", {})])
def test_from_logits_equals_the_loss_of_the_probabilities(name, options):
    from_logits = get_loss(name, **options, from_logits=True)
    plain = get_loss(name, **options)
    assert_allclose(keras.ops.convert_to_numpy(per_example_loss(from_logits, MASK, LOGITS)),
                    keras.ops.convert_to_numpy(per_example_loss(plain, MASK, PROBS)), rtol=2e-5)


def test_bce_from_logits_is_exact_where_probabilities_saturate():
    # sigmoid(+-40) is exactly 1 or 0 in float32: clipped probabilities cap the loss at -log(1e-7) = 16.1
    # and pass no gradient; logits give the exact loss, 40 per wrong pixel, and a gradient.
    t = np.zeros((1, 4, 4, 3), np.float32)
    logits = np.full_like(t, 40.0)
    loss = get_loss("bce_dice", dice_weight=0.0, from_logits=True)
    assert_allclose(keras.ops.convert_to_numpy(per_example_loss(loss, t, logits)), [40.0], rtol=1e-6)
    clipped = get_loss("bce_dice", dice_weight=0.0)
    saturated = keras.ops.sigmoid(keras.ops.convert_to_tensor(logits))
    assert float(per_example_loss(clipped, t, saturated)[0]) < 16.2
    assert get_loss("bce_dice", from_logits=True).get_config()["from_logits"] is True
