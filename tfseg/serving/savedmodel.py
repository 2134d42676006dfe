"""Writing a trained run as a SavedModel version folder that TensorFlow Serving loads as it is:
saved_model.pb + variables/ with the signatures of tfseg.serving.signatures, and assets.extra/ with a
warm-up request and tfseg.json (what the model expects and how its masks are post-processed)."""

import os
from pathlib import Path

import keras
import tensorflow as tf

from tfseg import CLASSES, __version__, files, layout
from tfseg.config import Config, load_config, to_dict
from tfseg.errors import DataError
from tfseg.evaluation.postprocess import Postprocess
from tfseg.layout import MASKS_PNG, PREDICT_FLOAT, SIGNATURE
from tfseg.model.inference import check_tta, parse_tta, trained_flips
from tfseg.records.reader import fold_cases
from tfseg.serving.kit import write_kit
from tfseg.serving.signatures import serving_functions
from tfseg.serving.warmup import sample_context, warmup_record
from tfseg.training.run_folder import load_run_model


def _fold_cases(config: Config) -> dict[str, list[int]] | None:
    """fold -> case numbers of the records the model was trained on (predict --folds), if still there."""
    try:
        return {str(k): v for k, v in fold_cases(config.data.records).items()}
    except DataError:
        return None


# What every member of an ensemble must share: the serving graph prepares one input for all of them.
SHARED_SETTINGS = {"data.offsets": lambda c: list(c.data.offsets),
                   "data.image_size": lambda c: list(c.data.image_size),
                   "data.clip_percentiles": lambda c: list(c.data.clip_percentiles),
                   "data.resize": lambda c: c.data.resize,
                   "data.interpolation": lambda c: c.data.interpolation}


def export_info(config: Config, sources: list[Path | None], chunk: int, tta=(),
                configs: list[Config] | None = None) -> dict:
    d = config.data
    members = [{**({"path": str(s), "sha256": files.sha256(s)} if s else {}), "trained_flips": trained_flips(c)}
               for s, c in zip(sources, configs or [config] * len(sources), strict=True)]
    return {
        "tfseg_version": __version__,
        "classes": list(CLASSES),
        "offsets": list(d.offsets),
        **Postprocess.from_config(config.train).to_info(),
        "input_size": list(d.image_size),
        "clip_percentiles": list(d.clip_percentiles),
        "resize": d.resize,
        "chunk": chunk,
        "tta": list(tta),
        "source": members[0] if len(members) == 1 and sources[0] else None,
        "members": members,
        "signatures": {
            SIGNATURE: "slices string [N, K] 16-bit PNGs -> probabilities float32 [N, H, W, 3], "
                       "masks uint8 [N, H, W, 3] (and presence float32 [N, 3] with a presence head)",
            PREDICT_FLOAT: "scans float32 [N, h, w, K] normalised -> probabilities float32 [N, h, w, 3]",
            MASKS_PNG: "slices as serving_default -> masks_png string [N]: per slice an RGB PNG, 255 where "
                       "large bowel (R), small bowel (G), stomach (B)",
        },
        "config": to_dict(config),
        "fold_cases": _fold_cases(config),
    }


def check_members(configs: list[Config], names: list[str]) -> None:
    """DataError naming the member and the setting when an ensemble's members cannot share one input."""
    for key, value in SHARED_SETTINGS.items():
        first = value(configs[0])
        for config, name in zip(configs[1:], names[1:], strict=True):
            if value(config) != first:
                raise DataError(f"{name}: {key} is {value(config)} but {names[0]} has {first}; the members of "
                                "an ensemble must share their input (offsets, size, normalisation)")


def _check_target(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if not out.name.isdigit():
        raise DataError(f"{out}: TF Serving needs a numbered version folder, e.g. {out}/1")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it, or export a new version "
                        f"({out.parent / str(layout.next_version(out.parent))})")
    return out


def write_saved_model(models, config: Config, out: str | os.PathLike, *, overwrite: bool = False, chunk: int = 16,
                      sources: list[Path | None] | None = None, tta=(), configs: list[Config] | None = None,
                      allow_untrained_tta: bool = False, verbose: bool = True) -> Path:
    """Write `models` (one float32 Keras model, or an ensemble's members) as the SavedModel version
    folder `out`, atomically; returns `out`. config gives the input and the post-processing; configs,
    each member's (default: config for all), the flips each was trained with (check_tta)."""
    models = list(models) if isinstance(models, list | tuple) else [models]
    sources = sources or [None] * len(models)
    configs = configs or [config] * len(models)
    tta = check_tta(tta, [(str(s or f"member {i}"), c) for i, (s, c) in enumerate(zip(sources, configs, strict=True))],
                    allow_untrained=allow_untrained_tta)
    out = _check_target(out, overwrite)
    if chunk < 1:
        raise DataError(f"--chunk must be >= 1, got {chunk}")
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    for name, (fn, signature) in serving_functions(models, config, chunk, tta).items():
        archive.add_endpoint(name, fn, input_signature=signature)
    warmup = sample_context(config)
    with files.atomic_dir(out, overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
        layout.warmup_path(tmp).parent.mkdir()
        with tf.io.TFRecordWriter(str(layout.warmup_path(tmp))) as writer:
            writer.write(warmup_record(warmup))
        files.write_json(layout.info_path(tmp), export_info(config, sources, chunk, tta, configs))
        write_kit(layout.info_path(tmp).parent, out.parent.name or "tfseg", int(out.name))
        # Answer the warm-up request from the written files before publishing them.
        answer = tf.saved_model.load(str(tmp)).signatures[SIGNATURE](slices=tf.constant([warmup]))
        if verbose:
            print(f"warm-up request answered: masks {answer['masks'].shape}, "
                  f"{int(tf.reduce_sum(tf.cast(answer['masks'], tf.int32)))} organ pixels")
    return out


def export(runs, out: str | os.PathLike, *, overwrite: bool = False, chunk: int = 16, tta=(),
           allow_untrained_tta: bool = False, verbose: bool = True) -> Path:
    """Write a run's model, or the average of several runs' models (an ensemble, e.g. the folds of a
    cross-validation), as the SavedModel `out` (a numbered version folder); returns `out`. The first
    run's config gives the post-processing; all must share their input (check_members); a flip in tta
    must be one every run was trained with, unless allow_untrained_tta (check_tta)."""
    runs = [runs] if isinstance(runs, str | os.PathLike) else list(runs)
    if not runs:
        raise DataError("export needs at least one run folder")
    _check_target(out, overwrite)  # fail before loading anything
    parse_tta(tta)
    for run in runs:
        if not layout.RunFolder(run).final_model.exists():
            raise DataError(f"{run}: no {layout.RunFolder(run).final_model.name}; not a finished tfseg run folder")
    # Before loading any model; write_saved_model checks again (and warns when allowed).
    check_tta(tta, [(str(run), load_config(layout.RunFolder(run).config)) for run in runs],
              allow_untrained=allow_untrained_tta, warn=False)
    loaded = [load_run_model(run) for run in runs]
    check_members([config for config, _, _ in loaded], [str(run) for run in runs])
    write_saved_model([model for _, model, _ in loaded], loaded[0][0], out, overwrite=overwrite, chunk=chunk,
                      sources=[source for _, _, source in loaded], tta=tta,
                      configs=[config for config, _, _ in loaded], allow_untrained_tta=allow_untrained_tta,
                      verbose=verbose)
    if verbose:
        what = loaded[0][2] if len(runs) == 1 else f"an ensemble of {len(runs)} runs"
        print(f"exported {what} -> {out} (signatures {SIGNATURE}, {MASKS_PNG}, {PREDICT_FLOAT}"
              f"{'; tta ' + ','.join(parse_tta(tta)) if tta else ''})")
    return Path(out)
