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
from tfseg.layout import MASKS_PNG, PREDICT_FLOAT, SIGNATURE, VOLUME_PROBABILITIES, VOLUME_SIGNATURE
from tfseg.model.inference import Member, check_kind, check_tta, member_weights, model_kind, parse_tta, trained_flips
from tfseg.records.reader import fold_cases
from tfseg.serving.kit import write_kit
from tfseg.serving.signatures import BIT_DEPTH, MAX_IMAGE_SIZE, per_slice, serving_functions
from tfseg.serving.warmup import sample_requests, warmup_record
from tfseg.training.run_folder import load_run_model


def _fold_cases(config: Config) -> dict[str, list[int]] | None:
    """fold -> case numbers of the records the model was trained on (predict --folds), if still there."""
    try:
        return {str(k): v for k, v in fold_cases(config.data.records).items()}
    except DataError:
        return None


# What the 2.5D members of an ensemble must share: the per-slice signatures prepare one input for all of
# them. A fusion with a 3D member serves whole volumes only, where each member prepares its own.
SHARED_SETTINGS = {"data.offsets": lambda c: list(c.data.offsets),
                   "data.image_size": lambda c: list(c.data.image_size),
                   "data.clip_percentiles": lambda c: list(c.data.clip_percentiles),
                   "data.resize": lambda c: c.data.resize,
                   "data.interpolation": lambda c: c.data.interpolation}


def output_classes(model: keras.Model) -> int:
    """How many classes a model's probabilities have (the last axis of its probabilities output)."""
    output = model.output["probabilities"] if isinstance(model.output, dict) else model.output
    return int(output.shape[-1])


def export_info(members: list[Member], post: Postprocess, chunk: int, tta=(), sources=None,
                max_image_size: int = MAX_IMAGE_SIZE, signatures=None) -> dict:
    """tfseg.json: what the export holds and how it reads its input; `signatures` (default: all) the
    names it serves."""
    config = members[0].config
    d = config.data
    sources = sources or [None] * len(members)
    total = sum(m.weight for m in members)
    listed = [{**({"path": str(s), "sha256": files.sha256(s)} if s else {}), "trained_flips": trained_flips(m.config),
               "weight": m.weight / total, "kind": model_kind(m.config), "input_size": list(m.config.data.image_size),
               "offsets": list(m.config.data.offsets)} for m, s in zip(members, sources, strict=True)]
    return {
        "tfseg_version": __version__,
        "classes": list(CLASSES),
        "offsets": list(d.offsets),
        **post.to_info(),
        "input_size": list(d.image_size),
        "clip_percentiles": list(d.clip_percentiles),
        "resize": d.resize,
        "chunk": chunk,
        "tta": list(tta),
        "bit_depth": BIT_DEPTH,
        "max_image_size": max_image_size,
        "source": listed[0] if len(listed) == 1 and sources[0] else None,
        "members": listed,
        "signatures": {name: text for name, text in {
            SIGNATURE: "slices string [N, K] 16-bit PNGs -> probabilities float32 [N, H, W, 3], "
                       "masks uint8 [N, H, W, 3] (and presence float32 [N, 3] with a presence head); "
                       "normalised over the request's distinct slices",
            PREDICT_FLOAT: "scans float32 [N, h, w, K] normalised -> probabilities float32 [N, h, w, 3]",
            MASKS_PNG: "slices as serving_default -> masks_png string [N]: per slice an RGB PNG, 255 where "
                       "large bowel (R), small bowel (G), stomach (B)",
            VOLUME_SIGNATURE: "slices string [D]: every 16-bit PNG of one volume once, in slice order -> "
                              "masks_png string [D] as masks_png; normalised over the volume, context built "
                              "in the graph",
            VOLUME_PROBABILITIES: "slices as serving_volume -> probabilities float32 [D, H, W, 3], masks uint8 "
                                  "[D, H, W, 3] (and presence float32 [D, 3] with presence heads or 3D members)",
        }.items() if signatures is None or name in signatures},
        "config": to_dict(config),
        "fold_cases": _fold_cases(config),
    }


def check_members(members: list[Member]) -> None:
    """DataError naming the member and the setting when an ensemble's members cannot be fused: another
    model.kind than this export serves, other classes, or (for the per-slice signatures of 2.5D members)
    another input (SHARED_SETTINGS)."""
    first = members[0]
    for member in members:
        check_kind(member.config, member.name)
        classes = output_classes(member.model)
        if classes != len(CLASSES):
            raise DataError(f"{member.name}: its model outputs {classes} classes, but tfseg's classes are "
                            f"{len(CLASSES)} ({', '.join(CLASSES)}); it cannot be fused with "
                            f"{'the other members' if len(members) > 1 else 'tfseg'}")
    if not per_slice(members):  # whole volumes only: each member normalises and resizes for itself
        return
    for key, value in SHARED_SETTINGS.items():
        for member in members[1:]:
            if value(member.config) != value(first.config):
                raise DataError(f"{member.name}: {key} is {value(member.config)} but {first.name} has "
                                f"{value(first.config)}; the members of an ensemble must share their input "
                                "(offsets, size, normalisation): the per-slice signatures give them one input")


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
                      weights=None, allow_untrained_tta: bool = False, max_image_size: int = MAX_IMAGE_SIZE,
                      verbose: bool = True) -> Path:
    """Write `models` (one float32 Keras model, or an ensemble's members) as the SavedModel version
    folder `out`, atomically; returns `out`. config gives the post-processing; configs, each member's
    input and the flips it was trained with (check_tta; default: config for all); weights, each member's
    share of the fused probabilities (default: equal)."""
    models = list(models) if isinstance(models, list | tuple) else [models]
    sources = sources or [None] * len(models)
    configs = configs or [config] * len(models)
    weights = member_weights(weights, len(models))
    members = [Member(model, c, w, str(s or f"member {i}"))
               for i, (model, c, w, s) in enumerate(zip(models, configs, weights, sources, strict=True))]
    tta = check_tta(tta, [(m.name, m.config) for m in members], allow_untrained=allow_untrained_tta)
    out = _check_target(out, overwrite)
    if chunk < 1:
        raise DataError(f"--chunk must be >= 1, got {chunk}")
    if max_image_size < 1:
        raise DataError(f"--max-image-size must be >= 1, got {max_image_size}")
    check_members(members)
    post = Postprocess.from_config(config.train)
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    functions = serving_functions(members, post, chunk, tta, max_image_size)
    for name, (fn, signature) in functions.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    depth = max([m.config.data.patch_size[0] for m in members if m.config.data.patch_size] or [0])
    context, volume = sample_requests(config, min_slices=depth)  # a 3D member needs a patch's depth
    with files.atomic_dir(out, overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
        layout.warmup_path(tmp).parent.mkdir()
        with tf.io.TFRecordWriter(str(layout.warmup_path(tmp))) as writer:
            if SIGNATURE in functions:
                writer.write(warmup_record([context], SIGNATURE))
            writer.write(warmup_record(volume, VOLUME_SIGNATURE))
        files.write_json(layout.info_path(tmp), export_info(members, post, chunk, tta, sources, max_image_size,
                                                            list(functions)))
        write_kit(layout.info_path(tmp).parent, out.parent.name or "tfseg", int(out.name))
        # Answer the warm-up requests from the written files before publishing them.
        loaded = tf.saved_model.load(str(tmp))
        pngs = loaded.signatures[VOLUME_SIGNATURE](slices=tf.constant(volume))["masks_png"]
        if verbose:
            print(f"warm-up requests answered: {len(pngs)} mask PNGs for a {len(volume)}-slice volume")
        if SIGNATURE in functions:
            answer = loaded.signatures[SIGNATURE](slices=tf.constant([context]))
            if verbose:
                print(f"  and a context row: masks {answer['masks'].shape}, "
                      f"{int(tf.reduce_sum(tf.cast(answer['masks'], tf.int32)))} organ pixels")
    return out


def export(runs, out: str | os.PathLike, *, overwrite: bool = False, chunk: int = 16, tta=(), weights=None,
           allow_untrained_tta: bool = False, max_image_size: int = MAX_IMAGE_SIZE, verbose: bool = True) -> Path:
    """Write a run's model, or the fusion of several runs' models (e.g. the folds of a cross-validation;
    probabilities averaged with `weights`, default equal), as the SavedModel `out` (a numbered version
    folder); returns `out`. The first run's config gives the post-processing; all must be fusable
    (check_members); a flip in tta must be one every run was trained with, unless allow_untrained_tta."""
    runs = [runs] if isinstance(runs, str | os.PathLike) else list(runs)
    if not runs:
        raise DataError("export needs at least one run folder")
    _check_target(out, overwrite)  # fail before loading anything
    parse_tta(tta)
    member_weights(weights, len(runs))
    for run in runs:
        if not layout.RunFolder(run).final_model.exists():
            raise DataError(f"{run}: no {layout.RunFolder(run).final_model.name}; not a finished tfseg run folder")
    configs = [load_config(layout.RunFolder(run).config) for run in runs]
    for run, config in zip(runs, configs, strict=True):
        check_kind(config, str(run))
    # Before loading any model; write_saved_model checks again (and warns when allowed).
    check_tta(tta, [(str(run), config) for run, config in zip(runs, configs, strict=True)],
              allow_untrained=allow_untrained_tta, warn=False)
    loaded = [load_run_model(run) for run in runs]
    check_members([Member(model, config, 1.0, str(run)) for run, (config, model, _) in zip(runs, loaded, strict=True)])
    write_saved_model([model for _, model, _ in loaded], loaded[0][0], out, overwrite=overwrite, chunk=chunk,
                      sources=[source for _, _, source in loaded], tta=tta, weights=weights,
                      configs=[config for config, _, _ in loaded], allow_untrained_tta=allow_untrained_tta,
                      max_image_size=max_image_size, verbose=verbose)
    if verbose:
        what = loaded[0][2] if len(runs) == 1 else f"a fusion of {len(runs)} runs"
        signatures = ", ".join(layout.read_info(out)["signatures"])
        print(f"exported {what} -> {out} (signatures {signatures}{'; tta ' + ','.join(parse_tta(tta)) if tta else ''})")
    return Path(out)
