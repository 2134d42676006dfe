"""Writing a trained run as a SavedModel version folder that TensorFlow Serving loads as it is:
saved_model.pb + variables/ with the signatures of tfseg.serving.signatures, and assets.extra/ with a
warm-up request and tfseg.json (what the model expects and how its masks are post-processed)."""

import os
from pathlib import Path

import keras
import tensorflow as tf

from tfseg import CLASSES, __version__, files, layout
from tfseg.config import Config, to_dict
from tfseg.errors import DataError
from tfseg.evaluation.postprocess import Postprocess
from tfseg.layout import PREDICT_FLOAT, SIGNATURE
from tfseg.records.reader import fold_cases
from tfseg.serving.signatures import serving_functions
from tfseg.serving.warmup import sample_context, warmup_record
from tfseg.training.run_folder import load_run_model


def _fold_cases(config: Config) -> dict[str, list[int]] | None:
    """fold -> case numbers of the records the model was trained on (predict --folds), if still there."""
    try:
        return {str(k): v for k, v in fold_cases(config.data.records).items()}
    except DataError:
        return None


def export_info(config: Config, source: Path | None, chunk: int) -> dict:
    d = config.data
    return {
        "tfseg_version": __version__,
        "classes": list(CLASSES),
        "offsets": list(d.offsets),
        **Postprocess.from_config(config.train).to_info(),
        "input_size": list(d.image_size),
        "clip_percentiles": list(d.clip_percentiles),
        "resize": d.resize,
        "chunk": chunk,
        "source": {"path": str(source), "sha256": files.sha256(source)} if source else None,
        "signatures": {
            SIGNATURE: "slices string [N, K] 16-bit PNGs -> probabilities float32 [N, H, W, 3], "
                               "masks uint8 [N, H, W, 3]",
            PREDICT_FLOAT: "scans float32 [N, h, w, K] normalised -> probabilities float32 [N, h, w, 3]",
        },
        "config": to_dict(config),
        "fold_cases": _fold_cases(config),
    }


def _check_target(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if not out.name.isdigit():
        raise DataError(f"{out}: TF Serving needs a numbered version folder, e.g. {out}/1")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it, or export a new version "
                        f"({out.parent / str(layout.next_version(out.parent))})")
    return out


def write_saved_model(model: keras.Model, config: Config, out: str | os.PathLike, *,
                      overwrite: bool = False, chunk: int = 16, source: Path | None = None,
                      verbose: bool = True) -> Path:
    """Write `model` (float32) as the SavedModel version folder `out`, atomically; returns `out`."""
    out = _check_target(out, overwrite)
    if chunk < 1:
        raise DataError(f"--chunk must be >= 1, got {chunk}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (fn, signature) in serving_functions(model, config, chunk).items():
        archive.add_endpoint(name, fn, input_signature=signature)
    warmup = sample_context(config)
    with files.atomic_dir(out, overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
        layout.warmup_path(tmp).parent.mkdir()
        with tf.io.TFRecordWriter(str(layout.warmup_path(tmp))) as writer:
            writer.write(warmup_record(warmup))
        files.write_json(layout.info_path(tmp), export_info(config, source, chunk))
        # Answer the warm-up request from the written files before publishing them.
        answer = tf.saved_model.load(str(tmp)).signatures[SIGNATURE](slices=tf.constant([warmup]))
        if verbose:
            print(f"warm-up request answered: masks {answer['masks'].shape}, "
                  f"{int(tf.reduce_sum(tf.cast(answer['masks'], tf.int32)))} organ pixels")
    return out


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
           chunk: int = 16, verbose: bool = True) -> Path:
    """Write the run's model as the SavedModel `out` (a numbered version folder); returns `out`."""
    _check_target(out, overwrite)  # fail before loading anything
    config, model, source = load_run_model(run_dir)
    write_saved_model(model, config, out, overwrite=overwrite, chunk=chunk, source=source, verbose=verbose)
    if verbose:
        print(f"exported {source} -> {out} (signatures {SIGNATURE}, {PREDICT_FLOAT})")
    return Path(out)
