"""Score a trained run (or its SavedModel) on held-out volumes with the competition metric.

Every volume of the chosen folds is predicted, taken back to its scans' original size, post-processed
(tfseg.evaluation.postprocess) and scored per case-day (0.4 x 3D Dice + 0.6 x (1 - 3D Hausdorff));
the score of an all-empty prediction is reported beside it: what a model that finds nothing gets.
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from tfseg import CLASSES
from tfseg.config import Config, load_config
from tfseg.errors import ConfigError, DataError
from tfseg.evaluation import metric
from tfseg.evaluation.postprocess import Postprocess
from tfseg.evaluation.predictors import (
    Predictor,
    keras_predictor,
    keras_volume_predictor,
    predict_volumes,
    saved_model_predictor,
    saved_model_volumes,
)
from tfseg.evaluation.report import write_report
from tfseg.layout import EVAL_SUMMARY, VOLUME_SIGNATURE, RunFolder, existing_run, read_info, read_manifest
from tfseg.model.inference import check_tta, parse_tta
from tfseg.records.reader import check_shards, read_volumes
from tfseg.training.run_folder import load_run_model


def count_volumes(records_dir, folds) -> int | None:
    try:
        manifest = read_manifest(records_dir)
        return sum(f["volumes"] for f in manifest["folds"] if f["fold"] in set(folds))
    except (DataError, KeyError, TypeError):
        return None


def evaluate(config: Config, folds, predict: Predictor | None, *, volumes: Iterator | None = None,
             batch_size: int = 16, post: Postprocess | None = None, limit: int | None = None,
             empty_dice: str = "skip", hausdorff: str = "joined", progress: bool = True) -> tuple[list[dict], dict]:
    """Score every volume of `folds` (the first `limit` only, if given) predicted by `predict` over the
    evaluation pipeline, or given by `volumes` ((case_day, probabilities, presence) in record order),
    post-processed by `post` (default: config.train's settings): (per-volume rows, summary with
    num_volumes, the leaderboard score, the organ3d_* metric and empty_score; see metric.Scores)."""
    post = post or Postprocess.from_config(config.train)
    truths = read_volumes(config.data.records, folds)  # the same records, in the same order
    scores, rows = metric.Scores(empty_dice=empty_dice, hausdorff=hausdorff), []
    # With gating (a presence head, or the pixel rule) the same pass also scores the masks without it.
    ungated = metric.Scores(empty_dice=empty_dice, hausdorff=hausdorff)
    no_gating = dataclasses.replace(post, min_pixels=0)
    total = count_volumes(config.data.records, folds)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    bar = tqdm(total=total, unit="volume", desc="evaluate", disable=not progress)
    if volumes is None:
        volumes = predict_volumes(config, folds, predict, batch_size)
    for case_day, probabilities, presence in volumes:
        truth = next(truths)
        if truth["case_day"] != case_day:
            raise DataError(f"{config.data.records}: evaluation stream and records disagree "
                            f"({case_day} vs {truth['case_day']})")
        pred = post.masks(probabilities, presence)
        if presence is not None or post.min_pixels > 0:
            ungated.add(case_day, no_gating.masks(probabilities), truth["mask"])
        rows.append(scores.add(case_day, pred, truth["mask"])
                    | {"depth": pred.shape[0], "height": pred.shape[1], "width": pred.shape[2]})
        bar.update()
        bar.set_postfix(score=f"{scores.summary()['score']:.4f}")
        if limit is not None and len(rows) >= limit:
            break
    bar.close()
    if not rows:
        raise DataError(f"{config.data.records}: no volumes in fold(s) {list(folds)}")
    summary = scores.summary()
    summary = {"num_volumes": summary.pop("volumes"), **summary, **post.to_info(), "folds": [int(f) for f in folds]}
    if ungated.board:
        without = ungated.summary()
        summary |= {f"ungated_{k}": without[k] for k in ("score", "dice", "hausdorff")}
    return rows, summary


HELD_OUT, OPTIMISTIC = "held-out", "training folds (optimistic)"


def folds_label(config: Config, folds) -> str:
    """HELD_OUT when the run never trained on `folds` (its data.val_folds or holdout_folds), else OPTIMISTIC."""
    return HELD_OUT if set(folds) <= {*config.data.val_folds, *config.data.holdout_folds} else OPTIMISTIC


def report_dir(run: RunFolder, out: str | Path | None, limit: int | None) -> Path:
    """Where the report goes (RUN/eval, or RUN/eval-limitN for a --limit run); a --limit run refuses to
    replace a full evaluation."""
    out = Path(out) if out else run.eval_dir if limit is None else run.limited_eval_dir(limit)
    if limit is not None and (out / EVAL_SUMMARY).exists():
        if json.loads((out / EVAL_SUMMARY).read_text()).get("limit") is None:
            raise DataError(f"{out}: holds a full evaluation, which a --limit run does not replace; leave out "
                            f"--out (the report goes to {run.limited_eval_dir(limit)}) or choose another --out")
    return out


def evaluate_run(run_dir: str | Path, *, folds=None, model: str | Path | None = None, out: str | Path | None = None,
                 batch_size: int = 16, post_overrides: dict | None = None, tta=(), allow_untrained_tta: bool = False,
                 limit: int | None = None, empty_dice: str = "skip", hausdorff: str = "joined",
                 progress: bool = True) -> tuple[dict, Path]:
    """Evaluate a run folder's model (with flip `tta`), or an export `model` (its predict_float
    signature, with the TTA and members it was exported with), on `folds` (default: the run's validation
    folds), post-processed as the run's config says except for `post_overrides` (Postprocess fields); a
    flip in tta must be one the run was trained with, unless allow_untrained_tta (check_tta);
    write the report to `out` (default RUN/eval, RUN/eval-limitN with a limit); return (summary, report
    folder). The summary says whether the folds were held out in the run's training (folds_label)."""
    run = existing_run(run_dir)
    config = load_config(run.config)
    folds = folds if folds is not None else config.data.val_folds
    volumes = None
    out = report_dir(run, out, limit)
    check_shards(config.data.records, folds)
    if model:
        info = read_info(model)
        if list(info["classes"]) != list(CLASSES):
            raise ConfigError(f"{model}: classes {info['classes']} differ from tfseg's {list(CLASSES)}")
        if tta:
            raise ConfigError(f"{model}: a SavedModel keeps the TTA it was exported with ({info.get('tta') or 'none'});"
                              " drop --tta, or export again with it")
        if VOLUME_SIGNATURE in info.get("signatures", {}):
            # whole volumes through the volume signature: any fusion, scored as a client gets it
            predict, volumes = None, saved_model_volumes(model, config.data.records, folds)
        else:  # an export older than the volume signature: its predict_float, fed this run's input
            for key, value in (("offsets", list(config.data.offsets)), ("input_size", list(config.data.image_size))):
                if info[key] != value:
                    raise ConfigError(f"{model}: {key} {info[key]} differs from the run's {value}: "
                                      "is it an export of this run?")
            predict = saved_model_predictor(model)
        source, tta = Path(model), info.get("tta", [])
    else:
        check_tta(tta, [(str(run_dir), config)], allow_untrained=allow_untrained_tta)
        config, keras_model, source = load_run_model(run_dir)
        predict = (keras_volume_predictor(keras_model, config, tta) if config.model.kind == "3d"
                   else keras_predictor(keras_model, tta))
    post = Postprocess.from_config(config.train, **(post_overrides or {}))
    rows, summary = evaluate(config, folds, predict, volumes=volumes, batch_size=batch_size, post=post, limit=limit,
                             empty_dice=empty_dice, hausdorff=hausdorff, progress=progress)
    summary |= {"model": str(source), "tta": list(parse_tta(tta)), "folds_label": folds_label(config, folds),
                "limit": limit}
    write_report(out, rows, summary)
    return summary, out
