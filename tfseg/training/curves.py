"""Training curves as a picture: loss and validation Dice per epoch from a run's history.csv.

TensorBoard shows the same scalars live; this PNG is for a glance without starting a server (the
train command writes it to runs/NAME/curves.png at the end, and the README shows one).
"""

from pathlib import Path

from tfseg import CLASSES, files
from tfseg.draw import CLASS_COLORS


def plot_history(rows: list[dict], path: str | Path) -> None:
    """Two panels: train and validation loss; validation mean and per-class Dice."""
    from matplotlib.figure import Figure  # plotting only here: training itself needs no matplotlib

    if not rows:
        raise ValueError(f"{path}: no epochs to plot")
    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(9, 3.4))
    loss_ax, dice_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["loss"] for r in rows], "o-", color="#4878d0", label="train")
    validated = "val_dice" in rows[0]  # a run on every fold has no validation
    if validated:
        loss_ax.plot(epochs, [r["val_loss"] for r in rows], "o-", color="#d65f5f", label="validation")
        dice_ax.plot(epochs, [r["val_dice"] for r in rows], "o-", color="#333333", linewidth=2, label="mean")
    else:
        dice_ax.text(0.5, 0.5, "no validation folds", ha="center", va="center", transform=dice_ax.transAxes)
    loss_ax.set_title("loss")
    for name, color in zip(CLASSES, CLASS_COLORS, strict=True):
        key = f"val_dice_{name}"
        if key in rows[0]:
            dice_ax.plot(epochs, [r[key] for r in rows], ".--", color=[c / 255 for c in color], label=name)
    dice_ax.set_ylim(0, 1)
    dice_ax.set_title("validation Dice")
    for ax in (loss_ax, dice_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    with files.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
