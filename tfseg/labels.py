"""One number per organ: the label maps tfseg writes for people (NIfTI label maps, coloured mask PNGs).

Masks are [..., 3] channels of 0/1 in tfseg.CLASSES order, and organs may overlap (the Kaggle labels
do, mostly bowel on bowel). A label map keeps one organ per pixel: 0 background, 1 large bowel,
2 small bowel, 3 stomach (the channel index + 1); where organs overlap the higher label wins (stomach
over small bowel over large bowel), so the smaller, more specific organ stays visible.
"""

import numpy as np

from tfseg import CLASSES

LABELS = {name: index + 1 for index, name in enumerate(CLASSES)}  # large_bowel 1, small_bowel 2, stomach 3


def label_map(masks: np.ndarray) -> np.ndarray:
    """0/1 masks [..., C] in CLASSES order -> uint8 labels [...]: 0 background, c + 1 for channel c,
    the highest label where channels overlap."""
    masks = np.asarray(masks) > 0
    labels = np.zeros(masks.shape[:-1], np.uint8)
    for channel in range(masks.shape[-1]):  # later channels overwrite earlier ones: higher label wins
        labels[masks[..., channel]] = channel + 1
    return labels


def one_hot(labels: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """uint8 labels [...] -> 0/1 masks uint8 [..., num_classes] (overlaps already resolved by label_map)."""
    labels = np.asarray(labels)
    return np.stack([labels == c + 1 for c in range(num_classes)], axis=-1).astype(np.uint8)


def legend() -> str:
    """'1 large bowel, 2 small bowel, 3 stomach' for help texts and file headers."""
    return ", ".join(f"{number} {name.replace('_', ' ')}" for name, number in LABELS.items())
