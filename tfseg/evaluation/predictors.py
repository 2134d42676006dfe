"""Probabilities for whole volumes from a Keras model or a SavedModel, in record order and at each
scan's original size: what evaluate scores. 2.5D models are called on batches of slices, 3D models on
whole volumes through sliding windows (tfseg.model.sliding_window)."""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfseg.config import Config
from tfseg.data.pipeline import eval_dataset, eval_volumes
from tfseg.data.preprocess import restore_size
from tfseg.errors import DataError
from tfseg.layout import PREDICT_FLOAT, VOLUME_PROBABILITIES
from tfseg.model.inference import averaged, averaged_volume
from tfseg.model.unet3d import slice_presence
from tfseg.records.features import parse_volume
from tfseg.records.reader import shard_files

# scans [B, h, w, K] -> probabilities [B, h, w, 3], or (probabilities, presence [B, 3] or None);
# for 3D models a volume [D, h, w, 1] -> the same for its D slices
Predictor = Callable[[tf.Tensor], np.ndarray | tuple[np.ndarray, np.ndarray | None]]


def keras_predictor(models, tta=()) -> Predictor:
    """The average of one or more Keras models over the scans and their `tta` flips (model.inference)."""
    call = tf.function(averaged(models if isinstance(models, list | tuple) else [models], tta), reduce_retracing=True)

    def predict(scans):
        probabilities, presence = call(scans)
        return probabilities.numpy(), None if presence is None else presence.numpy()

    return predict


def keras_volume_predictor(models, config: Config, tta=()) -> Predictor:
    """For 3D runs: a volume float32 [D, h, w, 1] -> (probabilities [D, h, w, 3], presence [D, 3]), the
    average of the Keras models (and their `tta` flips) over sliding windows of data.patch_size
    (model.inference.averaged_volume); presence is each slice's highest probability, as an export gates."""
    d, t = config.data, config.train
    volume_probabilities = averaged_volume(models if isinstance(models, list | tuple) else [models], d.patch_size,
                                           tta=tta, overlap=t.window_overlap, window_batch=t.window_batch)

    def with_presence(volume):
        probabilities = volume_probabilities(volume)
        return probabilities, slice_presence(probabilities)

    call = tf.function(with_presence, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])

    def predict(volume):
        probabilities, presence = call(volume)
        return probabilities.numpy(), presence.numpy()

    return predict


def load_signature(path: str | Path, name: str):
    """One signature of a SavedModel, as a function that keeps the loaded model (its variables) alive."""
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures[name]

    def call(_owner=loaded, **inputs):
        return signature(**inputs)

    return call


def saved_model_predictor(path: str | Path) -> Predictor:
    """The SavedModel's predict_float signature (same input as the Keras model; its TTA and members)."""
    signature = load_signature(path, PREDICT_FLOAT)

    def predict(scans):
        out = signature(scans=tf.convert_to_tensor(scans, tf.float32))
        return out["probabilities"].numpy(), out["presence"].numpy() if "presence" in out else None

    return predict


def saved_model_volumes(path: str | Path, records_dir: str | Path, folds
                        ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(case_day, probabilities float32 [D, H, W, 3] at the original size, presence [D, 3] or None) per
    volume of the records' folds, in record order, from the SavedModel's volume_probabilities signature
    fed the records' own PNGs: what a client sending whole volumes gets, members fused as exported."""
    signature = load_signature(path, VOLUME_PROBABILITIES)
    for serialized in tf.data.TFRecordDataset(shard_files(records_dir, folds)):
        volume = parse_volume(serialized)
        out = signature(slices=volume["image_png"])
        yield (volume["case_day"].numpy().decode(), out["probabilities"].numpy(),
               out["presence"].numpy() if "presence" in out else None)


def predict_volumes(config: Config, folds, predict: Predictor, batch_size: int = 16
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(case_day, probabilities float32 [D, H, W, 3] at the original size, presence [D, 3] or None) per
    volume, in record order."""
    if config.model.kind == "3d":
        yield from _predict_whole_volumes(config, folds, predict)
        return
    parts: dict[str, list] = {}
    for batch in eval_dataset(config, folds, batch_size):
        out = predict(batch["image"])
        probabilities, presence = out if isinstance(out, tuple) else (out, None)
        if presence is None:
            presence = np.full((len(probabilities), 0), np.nan, np.float32)  # keeps the slicing below uniform
        case_days = batch["case_day"].numpy()
        for case_day in dict.fromkeys(case_days):  # volumes in this batch, in order
            take = case_days == case_day
            name = case_day.decode()
            parts.setdefault(name, []).append((batch["index"].numpy()[take], probabilities[take], presence[take]))
            depth = int(batch["depth"].numpy()[take][0])
            if sum(len(index) for index, _, _ in parts[name]) == depth:
                pieces = parts.pop(name)
                order = np.argsort(np.concatenate([i for i, _, _ in pieces]))
                volume = np.concatenate([p for _, p, _ in pieces])[order]
                volume_presence = np.concatenate([q for _, _, q in pieces])[order]
                orig_hw = (int(batch["orig_height"].numpy()[take][0]), int(batch["orig_width"].numpy()[take][0]))
                yield (name, np.asarray(restore_size(volume, orig_hw, config.data)),
                       volume_presence if volume_presence.shape[-1] else None)
    if parts:
        raise DataError(f"{config.data.records}: incomplete volume(s) in the evaluation stream: {', '.join(parts)}")


def _predict_whole_volumes(config: Config, folds, predict: Predictor):
    """predict_volumes for 3D models: one call per whole volume; presence as `predict` gives it (a 3D model's
    is its highest probability on each slice, unet3d.slice_presence)."""
    patch_depth = config.data.patch_size[0]
    for volume in eval_volumes(config, folds):
        name, depth = volume["case_day"][0].numpy().decode(), int(volume["depth"][0])
        if depth < patch_depth:
            raise DataError(f"{config.data.records}: {name} has {depth} slices, fewer than the patch's "
                            f"{patch_depth} (data.patch_size): whole-volume inference needs at least one window")
        orig_hw = (int(volume["orig_height"][0]), int(volume["orig_width"][0]))
        out = predict(volume["image"])
        probabilities, presence = out if isinstance(out, tuple) else (out, None)
        yield name, np.asarray(restore_size(probabilities, orig_hw, config.data)), presence
