"""Score a trained run on its validation volumes with the competition metric, comparable to Kaggle's.

`python -m tfseg.evaluate --run runs/NAME` predicts every volume of the validation folds, takes the
probabilities back to each scan's original size, thresholds them (train.threshold), drops small
components (train.min_component pixels per slice, then 3D pieces under train.min_component_fraction of
each organ's largest), scores every case-day (0.4 x 3D Dice + 0.6 x (1 - 3D Hausdorff)) and writes
eval/per_volume.csv, eval/summary.json and eval/scores.png. The score of an all-empty prediction is
reported beside it: it is what a model that finds nothing would get.
"""

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from tfseg import CLASSES, cli, components, data, export, files, metric, records
from tfseg.config import Config, load_config
from tfseg.errors import ConfigError, DataError

Predictor = Callable[[tf.Tensor], np.ndarray]  # scans [B, h, w, K] -> probabilities [B, h, w, 3]


# ---- masks from probabilities ----------------------------------------------------------------------

def postprocess(probabilities, threshold: float, min_component: int = 0, min_fraction: float = 0.0) -> np.ndarray:
    """One volume's probabilities [D, H, W, 3] at the original size -> uint8 0/1 masks (what evaluate and
    predict score), without components below min_component pixels per slice or min_fraction in 3D."""
    return components.clean(np.asarray(export.to_masks(probabilities, threshold)), min_component, min_fraction)


# ---- predicting whole volumes ----------------------------------------------------------------------

def keras_predictor(model) -> Predictor:
    call = tf.function(lambda scans: model(scans, training=False), reduce_retracing=True)
    return lambda scans: call(scans).numpy()


def saved_model_predictor(path: str | Path) -> Predictor:
    """The SavedModel's predict_float signature (same input as the Keras model)."""
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["predict_float"]

    def predict(scans, _owner=loaded):  # _owner keeps the variables alive as long as `predict`
        return signature(scans=tf.convert_to_tensor(scans, tf.float32))["probabilities"].numpy()

    return predict


def predict_volumes(config: Config, folds, predict: Predictor, batch_size: int = 16
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(case_day, probabilities float32 [D, H, W, 3] at the original size) per volume, in record order."""
    parts: dict[str, list] = {}
    for batch in data.eval_dataset(config, folds, batch_size):
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
                yield name, np.asarray(data.restore_size(volume, orig_hw, config.data))
    if parts:
        raise DataError(f"{config.data.records}: incomplete volume(s) in the evaluation stream: {', '.join(parts)}")


def count_volumes(records_dir, folds) -> int | None:
    try:
        manifest = records.read_manifest(records_dir)
        return sum(f["volumes"] for f in manifest["folds"] if f["fold"] in set(folds))
    except (DataError, KeyError, TypeError):
        return None


def evaluate(config: Config, folds, predict: Predictor, *, batch_size: int = 16, threshold: float | None = None,
             min_component: int | None = None, min_fraction: float | None = None, limit: int | None = None,
             progress: bool = True) -> tuple[list[dict], dict]:
    """Score every volume of `folds` (the first `limit` only, if given): (per-volume rows, summary with
    num_volumes and empty_score)."""
    threshold = config.train.threshold if threshold is None else threshold
    min_component = config.train.min_component if min_component is None else min_component
    min_fraction = config.train.min_component_fraction if min_fraction is None else min_fraction
    truths = records.read_volumes(config.data.records, folds)  # the same records, in the same order
    rows, empty_rows = [], []
    total = count_volumes(config.data.records, folds)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    bar = tqdm(total=total, unit="volume", desc="evaluate", disable=not progress)
    for case_day, probabilities in predict_volumes(config, folds, predict, batch_size):
        truth = next(truths)
        if truth["case_day"] != case_day:
            raise DataError(f"{config.data.records}: evaluation stream and records disagree "
                            f"({case_day} vs {truth['case_day']})")
        pred = postprocess(probabilities, threshold, min_component, min_fraction)
        empty = metric.score_volume(np.zeros_like(truth["mask"]), truth["mask"])
        rows.append({"case_day": case_day, "depth": pred.shape[0], "height": pred.shape[1], "width": pred.shape[2]}
                    | metric.score_volume(pred, truth["mask"]) | {"empty_score": empty["score"]})
        empty_rows.append(empty)
        bar.update()
        bar.set_postfix(score=f"{np.mean([r['score'] for r in rows]):.4f}")
        if limit is not None and len(rows) >= limit:
            break
    bar.close()
    if not rows:
        raise DataError(f"{config.data.records}: no volumes in fold(s) {list(folds)}")
    summary = metric.summarize(rows)
    empty = metric.summarize(empty_rows)
    summary = {"num_volumes": summary.pop("volumes"), **summary, "empty_score": empty["score"],
               **{f"empty_score_{c}": empty[f"score_{c}"] for c in CLASSES},
               "threshold": threshold, "min_component": min_component,
               "min_component_fraction": min_fraction, "folds": [int(f) for f in folds]}
    return rows, summary


# ---- reports ---------------------------------------------------------------------------------------

def format_table(summary: dict) -> str:
    lines = [f"{'class':<14}{'dice':>8}{'hausdorff':>11}{'score':>8}{'empty':>8}"]
    for name, suffix in [*((c, f"_{c}") for c in CLASSES), ("all", "")]:
        lines.append(f"{name:<14}{summary['dice' + suffix]:>8.4f}{summary['hausdorff' + suffix]:>11.4f}"
                     f"{summary['score' + suffix]:>8.4f}{summary['empty_score' + suffix]:>8.4f}")
    lines.append(f"{summary['num_volumes']} volume(s); score = 0.4 x dice + 0.6 x (1 - hausdorff); "
                 "'empty' scores an all-empty prediction")
    return "\n".join(lines)


def plot_scores(rows: list[dict], path: Path) -> None:
    """Bar chart of per-volume scores (worst first), with the all-empty score of each volume."""
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["score"])
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.25 * len(rows) + 2), 4))
    ax = fig.subplots()
    ax.bar(x, [r["score"] for r in rows], color="#4878d0", label="score")
    ax.scatter(x, [r["empty_score"] for r in rows], color="#d65f5f", marker="_", s=120, zorder=3,
               label="all-empty prediction")
    ax.axhline(np.mean([r["score"] for r in rows]), color="#333333", linestyle="--", linewidth=1, label="mean")
    ax.set_xticks(x, [r["case_day"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.12)  # room for the legend above the bars
    ax.set_ylabel("0.4 dice + 0.6 (1 - hausdorff)")
    ax.set_title("per-volume score")
    ax.legend(loc="upper left", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_report(out_dir: str | Path, rows: list[dict], summary: dict) -> None:
    out_dir = Path(out_dir)
    with files.atomic_path(out_dir / "per_volume.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6f")
    files.write_json(out_dir / "summary.json", summary)
    plot_scores(rows, out_dir / "scores.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfseg.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by tfseg.train")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to score (default: the run's data.val_folds)")
    parser.add_argument("--model", help="evaluate this SavedModel (its predict_float signature) instead of the "
                                         "run's Keras model, e.g. saved_models/NAME/1")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per model call (default: 16)")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the run's train.threshold)")
    parser.add_argument("--min-component", type=int,
                        help="drop predicted components smaller than this many pixels per slice "
                             "(default: the run's train.min_component)")
    parser.add_argument("--min-component-fraction", type=float,
                        help="drop predicted 3D components smaller than this fraction of the organ's largest "
                             "(default: the run's train.min_component_fraction)")
    parser.add_argument("--limit", type=int, help="score only the first LIMIT volumes (a quick look)")
    parser.add_argument("--out", help="report folder (default: RUN/eval)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = load_config(Path(args.run) / "config.yaml")
    folds = args.folds if args.folds is not None else config.data.val_folds
    if args.model:
        info = export.read_info(args.model)
        for key, value in (("offsets", list(config.data.offsets)), ("input_size", list(config.data.image_size))):
            if info[key] != value:
                raise ConfigError(f"{args.model}: {key} {info[key]} differs from the run's {value}: "
                                  "is it an export of this run?")
        predict, source = saved_model_predictor(args.model), Path(args.model)
    else:
        config, model, source = export.load_run_model(args.run)
        predict = keras_predictor(model)
    rows, summary = evaluate(config, folds, predict, batch_size=args.batch_size, threshold=args.threshold,
                             min_component=args.min_component, min_fraction=args.min_component_fraction,
                             limit=args.limit, progress=not args.no_progress)
    summary["model"] = str(source)
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    write_report(out, rows, summary)
    print(f"\n{source}, fold(s) {', '.join(map(str, folds))}:")
    print(format_table(summary))
    print(f"wrote {out / 'per_volume.csv'}, {out / 'summary.json'}, {out / 'scores.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
