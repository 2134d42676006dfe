"""Mask contours drawn over scans, image grids with a class legend, and which slices to show
(synthetic previews, records inspection, TensorBoard, predict's overlays)."""

import itertools
import os
from pathlib import Path

import cv2
import numpy as np

from tfseg import CLASSES
from tfseg.files import atomic_path

# RGB per class, in tfseg.CLASSES order: large bowel gold, small bowel green, stomach red.
CLASS_COLORS = ((255, 200, 0), (40, 220, 60), (255, 50, 50))
DASH = 4  # contour pixels per dash (and per gap) of predicted outlines


def lighter(color, amount: float = 0.55) -> tuple[int, int, int]:
    """Blend an RGB colour towards white (predicted outlines use lighter colours than true ones)."""
    return tuple(int(round(c + (255 - c) * amount)) for c in color)


def to_rgb(scan: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Any-dtype scan [H, W] -> RGB uint8 (of a 2.5D stack, pass the centre channel: tfseg.data.context).

    Normalised per image between two percentiles, since raw MRI intensities vary a lot between scans.
    """
    scan = np.asarray(scan, np.float32)
    if scan.ndim != 2:
        raise ValueError(f"scan must be [H, W], got shape {scan.shape}")
    lo, hi = np.percentile(scan, (low, high))
    gray = np.clip((scan - lo) / max(float(hi - lo), 1e-6), 0, 1)
    return np.repeat((gray * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def _outlines(channel: np.ndarray) -> list[np.ndarray]:
    binary = (np.asarray(channel) > 0.5).astype(np.uint8)  # 0/1 masks and probabilities alike
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return [c[:, 0, :] for c in contours]


def _dashes(contour: np.ndarray) -> list[np.ndarray]:
    closed = np.concatenate([contour, contour[:1]])
    return [closed[i:i + DASH + 1] for i in range(0, len(closed) - 1, 2 * DASH)]


def draw_contours(scan: np.ndarray, mask: np.ndarray | None, pred: np.ndarray | None = None,
                  *, thickness: int = 1, colors=CLASS_COLORS) -> np.ndarray:
    """Scan [H, W] with the outlines of mask [H, W, K] (solid) and pred [H, W, K] (lighter, dashed).

    Masks may be 0/1 or probabilities (> 0.5 counts as inside); either may be None. Channel k is
    drawn in colors[k] (default: one colour per tfseg.CLASSES entry). Returns RGB uint8 [H, W, 3].
    """
    image = to_rgb(scan)
    for layer, dashed in ((mask, False), (pred, True)):
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim == 2:
            layer = layer[..., None]
        if layer.shape[:2] != image.shape[:2]:
            raise ValueError(f"mask shape {layer.shape} does not match scan shape {image.shape[:2]}")
        for k in range(layer.shape[-1]):
            color = lighter(colors[k]) if dashed else tuple(colors[k])
            for contour in _outlines(layer[..., k]):
                pieces = _dashes(contour) if dashed else [contour]
                cv2.polylines(image, pieces, isClosed=not dashed, color=color, thickness=thickness)
    return image


def color_labels(labels: np.ndarray, colors=CLASS_COLORS) -> np.ndarray:
    """uint8 labels [H, W] (tfseg.labels: 0 background, c + 1 for class c) -> RGB uint8 [H, W, 3]: black
    background, each organ in its CLASS_COLORS colour (the one table of every tfseg picture)."""
    table = np.array([(0, 0, 0), *colors], np.uint8)
    return table[np.asarray(labels)]


def labels_from_colors(image: np.ndarray, colors=CLASS_COLORS) -> np.ndarray:
    """Invert color_labels: RGB uint8 [H, W, 3] -> uint8 labels [H, W] (ValueError on another colour)."""
    image = np.asarray(image)
    labels = np.zeros(image.shape[:2], np.uint8)
    known = np.all(image == 0, axis=-1)
    for label, color in enumerate(colors, start=1):
        here = np.all(image == np.array(color, np.uint8), axis=-1)
        labels[here] = label
        known |= here
    if not known.all():
        raise ValueError("the image has colours other than black and the class colours")
    return labels


def legend_entries(pred: bool = False, classes=CLASSES, colors=CLASS_COLORS) -> list[tuple[str, tuple, str]]:
    """(label, RGB colour, line style) rows of the legend that draw_contours' colours need."""
    rows = [(name.replace("_", " "), tuple(c), "-") for name, c in zip(classes, colors, strict=True)]
    if pred:
        rows += [(f"{name.replace('_', ' ')} (predicted)", lighter(c), "--")
                 for name, c in zip(classes, colors, strict=True)]
    return rows


def save_grid(images, titles, path: str | os.PathLike, *, cols: int = 3,
              legend: bool = True, pred: bool = False, tile_inches: float = 3.2, dpi: int = 110) -> Path:
    """Save images (RGB uint8 or 2-D grey) in a grid with titles and a class legend; returns the path.

    titles may be None. pred=True adds the predicted (dashed) entries to the legend. Written atomically.
    """
    # Imported here: draw_contours alone (e.g. for TensorBoard images) needs no matplotlib.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    images = list(images)
    if not images:
        raise ValueError("save_grid needs at least one image")
    titles = list(titles) if titles is not None else [""] * len(images)
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(cols * tile_inches, rows * (tile_inches + 0.35) + (0.45 if legend else 0)))
    for i, axis in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        axis.set_axis_off()
        if i < len(images):
            image = np.asarray(images[i])
            axis.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            axis.set_title(titles[i], fontsize=7)
    if legend:
        handles = [Line2D([], [], color=np.array(c) / 255, linestyle=style, linewidth=2, label=label)
                   for label, c, style in legend_entries(pred)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if legend else 0, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return path


def pick_slices(masks: np.ndarray, count: int) -> list[int]:
    """Indices (in slice order) of up to `count` slices of [D, H, W, C] masks that show every organ:
    each class's largest slices in turn (the stomach is small next to the bowels: ranked by total
    area it would never be shown), then the slices with the most organ overall."""
    area = masks.sum(axis=(1, 2), dtype=np.int64)  # [D, C]; signed: -area of uint8 sums would wrap
    per_class = [[i for i in np.argsort(-area[:, c], kind="stable") if area[i, c] > 0] for c in range(area.shape[1])]
    candidates = [*itertools.chain.from_iterable(itertools.zip_longest(*per_class)),
                  *np.argsort(-area.sum(axis=1), kind="stable")]
    chosen = dict.fromkeys(int(i) for i in candidates if i is not None)
    return sorted(list(chosen)[:count])
