"""evaluate's report: a table, per-volume CSV, summary JSON and a bar chart; and the closing summary
of a pipeline run, read back from what the stages wrote."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tfseg import CLASSES, files
from tfseg.config import load_config
from tfseg.errors import DataError
from tfseg.layout import EVAL_PER_VOLUME, EVAL_SCORES_PLOT, EVAL_SUMMARY, RunFolder


def format_table(summary: dict) -> str:
    """The leaderboard score with its parts per class, then the per-organ 3D metric beside it."""
    volumes = summary.get("num_volumes", summary.get("volumes"))
    lines = [f"{'leaderboard':<14}{'dice':>8}{'hausdorff':>11}{'score':>8}{'empty':>8}"
             f"   {'organ 3D':>9}{'dice':>8}{'hausdorff':>11}"]
    for name, suffix in [*((c, f"_{c}") for c in CLASSES), ("all", "")]:
        lines.append(f"{name:<14}{summary['dice' + suffix]:>8.4f}{summary['hausdorff' + suffix]:>11.4f}"
                     f"{summary['score' + suffix]:>8.4f}{summary['empty_score' + suffix]:>8.4f}"
                     f"   {summary['organ3d_score' + suffix]:>9.4f}{summary['organ3d_dice' + suffix]:>8.4f}"
                     f"{summary['organ3d_hausdorff' + suffix]:>11.4f}")
    if "ungated_score" in summary:
        lines.append(f"{'no gating':<14}{summary['ungated_dice']:>8.4f}{summary['ungated_hausdorff']:>11.4f}"
                     f"{summary['ungated_score']:>8.4f}   (the same masks without empty-slice gating)")
    lines.append(f"{volumes} volume(s). score = 0.4 x dice + 0.6 x (1 - hausdorff), the leaderboard's: 2D Dice per "
                 f"slice and class (rows empty in both: {summary.get('dice_empty_rows', 'skip')}), 3D Hausdorff per "
                 f"case-day ({summary.get('hausdorff_classes', 'joined')} classes) in the unit cube; per class, the "
                 "class's own Hausdorff. 'empty' scores an all-empty prediction. organ 3D: tfseg's per-organ 3D "
                 "Dice and Hausdorff / voxel diagonal.")
    return "\n".join(lines)


def describe_folds(summary: dict) -> str:
    """Which folds a summary scores and what that score is: held-out or optimistic, all volumes or a limit."""
    text = f"fold(s) {', '.join(map(str, summary['folds']))}, {summary.get('folds_label', 'held-out')}"
    if summary.get("limit") is not None:
        text += f", only the first {summary['limit']} volume(s) (--limit)"
    return text


EMPTY_COLOR = "#d65f5f"  # the all-empty prediction's marker in the per-volume score chart


def plot_scores(rows: list[dict], path: Path) -> None:
    """Bar chart of per-volume scores (worst first), with the all-empty score of each volume."""
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["score"])
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.25 * len(rows) + 2), 4))
    ax = fig.subplots()
    ax.bar(x, [r["score"] for r in rows], color="#4878d0", label="score")
    # A filled diamond with a dark edge, not clipped: an all-empty prediction scores 0 on most volumes,
    # and a flat marker there would hide in the x axis.
    ax.scatter(x, [r["empty_score"] for r in rows], color=EMPTY_COLOR, marker="D", s=36, edgecolors="#333333",
               linewidths=0.6, zorder=4, clip_on=False, label="all-empty prediction")
    ax.axhline(np.mean([r["score"] for r in rows]), color="#333333", linestyle="--", linewidth=1, label="mean")
    ax.set_xticks(x, [r["case_day"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(-0.04, 1.12)  # room for the markers at 0 below, the legend above the bars
    ax.set_ylabel("leaderboard score of the volume")
    ax.set_title("per-volume score")
    ax.legend(loc="upper left", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_report(out_dir: str | Path, rows: list[dict], summary: dict) -> None:
    out_dir = Path(out_dir)
    with files.atomic_path(out_dir / EVAL_PER_VOLUME) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6f")
    files.write_json(out_dir / EVAL_SUMMARY, summary)
    plot_scores(rows, out_dir / EVAL_SCORES_PLOT)


def report_files(out_dir: str | Path) -> list[Path]:
    return [Path(out_dir) / name for name in (EVAL_PER_VOLUME, EVAL_SUMMARY, EVAL_SCORES_PLOT)]


def trained_steps(run: RunFolder, train) -> str:
    """What the run trained, from history.csv: a time budget re-plans each epoch's steps."""
    from tfseg.training.run_folder import read_history  # keras: this module stays TensorFlow-free

    rows = read_history(run.path, train.epochs)
    if rows and all("steps" in row for row in rows):
        minutes = sum(row["seconds"] for row in rows) / 60
        return f"{len(rows)} epochs, {int(sum(row['steps'] for row in rows))} steps in {minutes:.1f} min"
    return f"{train.epochs} epochs of {train.steps_per_epoch} steps"


def pipeline_summary(run_dir: str | Path, model=None, submission=None, overlays=None) -> str:
    """The closing summary of a pipeline run: the score (held-out or not), where every output is, how to look."""
    run = RunFolder(run_dir)
    summary_path = run.eval_dir / EVAL_SUMMARY
    if not summary_path.exists():
        raise DataError(f"{summary_path}: missing; run python -m tfseg.evaluate --run {run.path} first")
    summary = json.loads(summary_path.read_text())
    lines = ["", "=== tfseg summary ===",
             f"{summary.get('folds_label', 'held-out')} score  {summary['score']:.4f}  (leaderboard metric: dice "
             f"{summary['dice']:.4f}, hausdorff {summary['hausdorff']:.4f}) on {summary['num_volumes']} volume(s) of "
             f"{describe_folds(summary)}",
             f"per-organ 3D    {summary['organ3d_score']:.4f}  (dice {summary['organ3d_dice']:.4f}, hausdorff "
             f"{summary['organ3d_hausdorff']:.4f})",
             f"all-empty prediction would score {summary['empty_score']:.4f}"]
    if "ungated_score" in summary:
        lines.insert(3, f"without empty-slice gating {summary['ungated_score']:.4f}")
    if run.config.exists():
        t = load_config(run.config).train
        trained = (f"a {t.budget_minutes:g}-minute time budget (train.budget_minutes)" if t.budget_minutes
                   else "a fixed number of steps")
        lines.insert(3, f"after training for {trained}: {trained_steps(run, t)}")
    outputs = [("run folder (config, history.csv, checkpoints)", run.path),
               ("training curves (loss, per-class Dice)", run.curves),
               ("evaluation report", run.eval_dir),
               ("SavedModel for TF Serving", model),
               ("submission", submission),
               ("overlay PNGs", overlays)]
    for label, path in outputs:
        if path is not None:
            lines.append(f"{label:<48} {path}{'' if Path(path).exists() else '  (missing)'}")
    lines.append(f"look at training curves:  tensorboard --logdir {run.path.parent} --host 127.0.0.1")
    return "\n".join(lines)
