"""K-fold cross-validation: one training run per validation fold, each scored on its held-out fold, and
the out-of-fold leaderboard score over every volume, which is what the competitors compared.

A fold whose run folder holds a finished model and its evaluation is skipped on a rerun; an interrupted
one resumes from its last checkpoint (tfseg.training); `fresh` starts every fold over.
"""

import json
import math
from pathlib import Path

import pandas as pd

from tfseg import CLASSES, files, layout
from tfseg.config import load_config
from tfseg.errors import ConfigError
from tfseg.evaluation.metric import combine_rows
from tfseg.evaluation.scoring import evaluate_run
from tfseg.records.reader import check_shards
from tfseg.training.run_folder import read_history
from tfseg.training.trainer import train

SHOWN = ("score", "dice", "hausdorff", *(f"score_{c}" for c in CLASSES), "organ3d_score")


def _finished(run: layout.RunFolder, epochs: int) -> bool:
    return (run.final_model.exists() and len(read_history(run.path, epochs)) == epochs
            and (run.eval_dir / layout.EVAL_PER_VOLUME).exists())


def cross_validate(config_path, folds, out, *, records=None, overrides=(), fresh: bool = False,
                   progress: bool = True) -> dict:
    """Train and evaluate one run per fold in `folds` under out/fold{k}; write out/cv.json and cv.txt;
    return the cv summary (per fold, out of fold, mean of folds)."""
    out, folds = Path(out), [int(f) for f in folds]
    if not folds or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds: need distinct folds, got {folds}")
    extra = [f"data.records={json.dumps(str(records))}"] if records else []
    per_fold, rows = {}, []
    configs = {fold: load_config(config_path, [*overrides, *extra, f"data.val_folds=[{fold}]"]) for fold in folds}
    check_shards(configs[folds[0]].data.records)  # before any fold: a damaged shard stops the whole run at once
    for fold, config in configs.items():
        run = layout.RunFolder(layout.fold_run(out, fold))
        if fresh or not _finished(run, config.train.epochs):
            print(f"fold {fold}: training {run.path}", flush=True)
            train(config, run.path, fresh=fresh, progress=progress)
            evaluate_run(run.path, progress=progress)
        else:
            print(f"fold {fold}: finished run {run.path} reused", flush=True)
        per_fold[fold] = json.loads((run.eval_dir / layout.EVAL_SUMMARY).read_text())
        rows += pd.read_csv(run.eval_dir / layout.EVAL_PER_VOLUME).to_dict("records")
    summary = {
        "folds": {str(k): v for k, v in per_fold.items()},
        "out_of_fold": {"volumes": len(rows), **combine_rows(rows)},
        "mean_of_folds": {key: sum(s[key] for s in per_fold.values()) / len(per_fold) for key in SHOWN},
        "config": str(config_path),
    }
    files.write_json(out / layout.CV_SUMMARY, summary)
    files.write_text(out / layout.CV_TABLE, format_cv(summary) + "\n")
    return summary


def format_cv(summary: dict) -> str:
    """One line per fold, the mean of the folds and the out-of-fold score over every volume."""
    width = max(len(k) for k in SHOWN) + 2
    lines = [f"{'':<14}{'volumes':>8}" + "".join(f"{k:>{width}}" for k in SHOWN)]

    def line(label, values, volumes):
        cells = "".join(f"{values[k]:>{width}.4f}" if not math.isnan(values[k]) else f"{'nan':>{width}}"
                        for k in SHOWN)
        lines.append(f"{label:<14}{volumes:>8}{cells}")

    for fold, values in summary["folds"].items():
        line(f"fold {fold}", values, values["num_volumes"])
    line("mean of folds", summary["mean_of_folds"], "")
    line("out of fold", summary["out_of_fold"], summary["out_of_fold"]["volumes"])
    return "\n".join(lines)
