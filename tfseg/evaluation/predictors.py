"""Probabilities for whole volumes from a Keras model or a SavedModel, in record order and at each
scan's original size: what evaluate scores."""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfseg.config import Config
from tfseg.data.pipeline import eval_dataset
from tfseg.data.preprocess import restore_size
from tfseg.errors import DataError
from tfseg.layout import PREDICT_FLOAT

Predictor = Callable[[tf.Tensor], np.ndarray]  # scans [B, h, w, K] -> probabilities [B, h, w, 3]


def keras_predictor(model) -> Predictor:
    call = tf.function(lambda scans: model(scans, training=False), reduce_retracing=True)
    return lambda scans: call(scans).numpy()


def load_signature(path: str | Path, name: str):
    """One signature of a SavedModel, as a function that keeps the loaded model (its variables) alive."""
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures[name]

    def call(_owner=loaded, **inputs):
        return signature(**inputs)

    return call


def saved_model_predictor(path: str | Path) -> Predictor:
    """The SavedModel's predict_float signature (same input as the Keras model)."""
    signature = load_signature(path, PREDICT_FLOAT)
    return lambda scans: signature(scans=tf.convert_to_tensor(scans, tf.float32))["probabilities"].numpy()


def predict_volumes(config: Config, folds, predict: Predictor, batch_size: int = 16
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(case_day, probabilities float32 [D, H, W, 3] at the original size) per volume, in record order."""
    parts: dict[str, list] = {}
    for batch in eval_dataset(config, folds, batch_size):
        probabilities = predict(batch["image"])
        case_days = batch["case_day"].numpy()
        for case_day in dict.fromkeys(case_days):  # volumes in this batch, in order
            take = case_days == case_day
            name = case_day.decode()
            parts.setdefault(name, []).append((batch["index"].numpy()[take], probabilities[take]))
            depth = int(batch["depth"].numpy()[take][0])
            if sum(len(index) for index, _ in parts[name]) == depth:
                index = np.concatenate([i for i, _ in parts[name]])
                volume = np.concatenate([p for _, p in parts.pop(name)])[np.argsort(index)]
                orig_hw = (int(batch["orig_height"].numpy()[take][0]), int(batch["orig_width"].numpy()[take][0]))
                yield name, np.asarray(restore_size(volume, orig_hw, config.data))
    if parts:
        raise DataError(f"{config.data.records}: incomplete volume(s) in the evaluation stream: {', '.join(parts)}")
