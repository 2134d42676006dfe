"""Pictures that read: one colour table (tfseg.draw.CLASS_COLORS) for the client's mask files, the
all-empty marker of evaluate's score chart visible at 0, and a one-epoch learning curve showing its point."""

import cv2
import numpy as np
import pytest

from tfseg import CLASSES
from tfseg.draw import CLASS_COLORS, color_labels, labels_from_colors
from tfseg.evaluation.report import EMPTY_COLOR, plot_scores
from tfseg.labels import label_map, one_hot
from tfseg.serving.client import mask_image, read_mask_image
from tfseg.training.curves import plot_history


def color_pixels(path, rgb, tolerance: int = 40) -> np.ndarray:
    image = cv2.imread(str(path))[..., ::-1].astype(int)
    return np.abs(image - np.array(rgb)).max(axis=-1) <= tolerance


def hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def test_client_mask_files_use_the_class_colours(tmp_path):
    mask = np.zeros((4, 5, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = 1
    mask[3, 3, :2] = 1  # large and small bowel: the small bowel is drawn
    image = mask_image(mask)
    for (y, x), color in zip([(0, 0), (1, 1), (2, 2)], CLASS_COLORS, strict=True):
        assert tuple(image[y, x]) == color
    assert tuple(image[3, 3]) == CLASS_COLORS[1] and tuple(image[0, 1]) == (0, 0, 0)
    path = tmp_path / "slice_mask.png"
    cv2.imwrite(str(path), image[..., ::-1])
    np.testing.assert_array_equal(read_mask_image(path), one_hot(label_map(mask)))
    with pytest.raises(ValueError, match="other than"):
        labels_from_colors(np.full((2, 2, 3), 7, np.uint8))
    np.testing.assert_array_equal(labels_from_colors(color_labels(label_map(mask))), label_map(mask))


def marker_blobs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(height, area) of each connected blob of a colour mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    return [(int(stats[i, cv2.CC_STAT_HEIGHT]), int(stats[i, cv2.CC_STAT_AREA])) for i in range(1, count)]


def test_all_empty_markers_at_zero_are_visible(tmp_path):
    rows = [{"case_day": f"case{i}_day0", "score": s, "empty_score": 0.0} for i, s in enumerate((0.3, 0.5, 0.6))]
    plot_scores(rows, tmp_path / "scores.png")
    blobs = marker_blobs(color_pixels(tmp_path / "scores.png", hex_rgb(EMPTY_COLOR)))
    # the legend's marker and one per volume, each a real shape (not a line flattened on the x axis)
    assert len([b for b in blobs if b[0] >= 4 and b[1] >= 12]) >= len(rows) + 1, blobs


def one_epoch() -> list[dict]:
    """One epoch, each series at its own height so no point hides another."""
    return [{"epoch": 1, "loss": 0.8, "val_loss": 0.6, "val_dice": 0.5,
             **{f"val_dice_{name}": value for name, value in zip(CLASSES, (0.2, 0.35, 0.8), strict=True)}}]


@pytest.mark.parametrize(("key", "color"), [
    ("loss", (0x48, 0x78, 0xd0)), ("val_loss", (0xd6, 0x5f, 0x5f)),
    *((f"val_dice_{name}", color) for name, color in zip(CLASSES, CLASS_COLORS, strict=True)),
])
def test_one_epoch_curves_show_a_point(key, color, tmp_path):
    """A one-epoch history draws no line; its point must show: pixels of the series' colour beyond those of
    the same picture with that value missing (the legend is in both)."""
    with_point, without = one_epoch(), one_epoch()
    without[0][key] = float("nan")
    plot_history(with_point, tmp_path / "with.png")
    plot_history(without, tmp_path / "without.png")
    extra = color_pixels(tmp_path / "with.png", color).sum() - color_pixels(tmp_path / "without.png", color).sum()
    assert extra >= 4, f"{key}: {extra} marker pixels"
