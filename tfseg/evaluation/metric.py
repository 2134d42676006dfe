"""The competition metric: 0.4 x 3D Dice + 0.6 x (1 - normalised 3D Hausdorff) per (case-day, class).

`score_volume` scores one case-day; `summarize` averages many, as the leaderboard does. Hausdorff is
exact: nearest distances come from a k-d tree over the other mask's surface voxels, not from distance
transforms, which take seconds once scattered false positives stretch the box to the whole volume.
"""

import math

import numpy as np
from scipy.spatial import cKDTree

from tfseg import CLASSES

METRICS = ("dice", "hausdorff", "score")
_CELL = 8  # side of the cubes used to skip far-from-maximal query voxels (any value is exact)


def _as_bool(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 4 or mask.shape[-1] != len(CLASSES):
        raise ValueError(f"{name} must have shape [D, H, W, {len(CLASSES)}] (one case-day, channels "
                         f"{', '.join(CLASSES)}), got shape {mask.shape}")
    if 0 in mask.shape:
        raise ValueError(f"{name} has an empty dimension: shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8:
        ok = mask.max() <= 1  # fast path for the usual dtype
    else:
        ok = bool(((mask == 0) | (mask == 1)).all())
    if not ok:
        raise ValueError(f"{name} must hold only 0 and 1 (threshold probabilities, scale 0/255 masks), "
                         f"got values in [{mask.min()}, {mask.max()}]")
    return mask.view(bool) if mask.dtype == np.uint8 else mask != 0


def _span(profile: np.ndarray) -> slice:
    hits = np.flatnonzero(profile)
    return slice(hits[0], hits[-1] + 1)


def _crop(mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """mask[box] with a one-voxel empty border, so that neighbour look-ups never wrap around."""
    out = np.zeros(tuple(s.stop - s.start + 2 for s in box), bool)
    out[1:-1, 1:-1, 1:-1] = mask[box]
    return out


def _coords(flat_index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.column_stack(np.unravel_index(flat_index, shape)).astype(np.float64)


def _neighbours(mask: np.ndarray, index: np.ndarray) -> np.ndarray:
    """How many of the 6 neighbours of each voxel `index` (flat) are in `mask`, a bordered crop."""
    flat = mask.ravel()
    count = np.zeros(len(index), np.uint8)
    for stride in (mask.shape[1] * mask.shape[2], mask.shape[2], 1):
        count += flat[index - stride]
        count += flat[index + stride]
    return count


def _directed(src: np.ndarray, dst: np.ndarray, dst_mask: np.ndarray) -> float:
    """max over voxels `src` (flat indices) of the Euclidean distance to the nearest voxel of `dst`.

    `dst` holds the flat indices of `dst_mask`, a bordered crop (see `_crop`); both are non-empty.
    """
    outside = src[~dst_mask.ravel()[src]]  # voxels inside dst are at distance 0
    if not len(outside):
        return 0.0
    # Voxels next to dst are at distance 1, the least any voxel outside can have: only others can do better.
    query = _coords(outside[_neighbours(dst_mask, outside) == 0], dst_mask.shape)
    if not len(query):
        return 1.0
    # The nearest dst voxel to a voxel outside dst has a 6-neighbour outside dst (else a neighbour
    # would be one step closer), so dst's surface voxels suffice as targets.
    surface = dst[_neighbours(dst_mask, dst) < 6]
    tree = cKDTree(_coords(surface, dst_mask.shape), balanced_tree=False, compact_nodes=False)
    # Distance to dst is 1-Lipschitz, so no voxel of a cube is farther than its first voxel's distance
    # plus the cube diagonal: query one voxel per cube, then only the cubes that could beat the best.
    cells = (query // _CELL).astype(np.int64)
    keys = np.ravel_multi_index(cells.T, cells.max(axis=0) + 1)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    near = tree.query(query[first])[0]
    best = near.max()
    open_cells = near + math.sqrt(3) * (_CELL - 1) + 1e-9 > best
    rest = query[open_cells[inverse]]
    return float(max(best, tree.query(rest)[0].max())) if len(rest) else float(best)


def _score_class(pred: np.ndarray, true: np.ndarray, diagonal: float) -> tuple[float, float]:
    """(dice, hausdorff) of one class in a volume: pred and true are contiguous bool [D, H, W]."""
    union = pred | true
    slices = union.reshape(union.shape[0], -1).any(axis=1)
    if not slices.any():
        return 1.0, 0.0
    # Exact to crop to the union's box: outside it both masks are empty and every nearest voxel is inside.
    box = (_span(slices), _span(union.any(axis=(0, 2))), _span(union.reshape(-1, union.shape[2]).any(axis=0)))
    pred, true = _crop(pred, box), _crop(true, box)
    on_pred, on_true = np.flatnonzero(pred), np.flatnonzero(true)
    if not len(on_pred) or not len(on_true):
        return 0.0, 1.0
    dice = 2 * int(np.count_nonzero(true.ravel()[on_pred])) / (len(on_pred) + len(on_true))
    distance = max(_directed(on_pred, on_true, true), _directed(on_true, on_pred, pred))
    return dice, min(distance / diagonal, 1.0)


def score_volume(pred, true) -> dict:
    """Score one case-day: masks [D, H, W, 3] (uint8 or bool 0/1, channels in `tfseg.CLASSES` order).

    Returns `dice`, `hausdorff`, `score` (means over the classes) and `dice_<class>`,
    `hausdorff_<class>`, `score_<class>` per class; hausdorff is normalised by the volume diagonal.
    Raises ValueError on a wrong rank, channel count, mismatched shapes or non-0/1 values.
    """
    pred, true = _as_bool(pred, "pred"), _as_bool(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    diagonal = math.sqrt(sum(n * n for n in pred.shape[:3]))
    row = {}
    for c, name in enumerate(CLASSES):
        dice, hd = _score_class(np.ascontiguousarray(pred[..., c]), np.ascontiguousarray(true[..., c]),
                                diagonal)
        row |= {f"dice_{name}": dice, f"hausdorff_{name}": hd, f"score_{name}": 0.4 * dice + 0.6 * (1 - hd)}
    means = {m: float(np.mean([row[f"{m}_{name}"] for name in CLASSES])) for m in METRICS}
    return means | row


def summarize(rows: list[dict]) -> dict:
    """Average `score_volume` results: overall (over every (case-day, class), as the leaderboard does)
    and per class; plus `volumes`, the number of rows. Extra keys in the rows are ignored."""
    if not rows:
        raise ValueError("summarize needs at least one scored volume, got none")
    keys = [f"{m}_{name}" for m in METRICS for name in CLASSES]
    for i, row in enumerate(rows):
        if missing := [k for k in keys if k not in row]:
            raise ValueError(f"row {i} lacks {', '.join(missing)}: pass score_volume results")
    out = {"volumes": len(rows)}
    for m in METRICS:
        out[m] = float(np.mean([row[f"{m}_{name}"] for row in rows for name in CLASSES]))
    return out | {k: float(np.mean([row[k] for row in rows])) for k in keys}
