"""The competition's metrics, exact: the leaderboard score, and tfseg's per-organ 3D diagnostic.

Leaderboard (`leaderboard_volume` per case-day, `leaderboard_summary` over many), the competition's
Evaluation text with the readings it leaves open as options:
- Dice is 2D: one value per submission row (slice, class), averaged over all rows; rows where both
  masks are empty are skipped (the host's clarification), or counted as 0 or 1 (`empty_dice`).
- Hausdorff is 3D per case-day, slices stacked as z with depth 1, every axis divided by the volume's
  size (a unit cube) and the distance by sqrt(3); the three classes of a slice are joined first (as
  openai/mle-bench's grader does) or kept apart (`hausdorff="per_class"`); both empty: skipped;
  exactly one empty: 1.
- score = 0.4 x mean Dice + 0.6 x (1 - mean Hausdorff).

Per-organ 3D (`score_volume`, `summarize`): per (case-day, class) 0.4 x 3D Dice + 0.6 x (1 - 3D
Hausdorff / voxel diagonal), 1 and 0 when both masks are empty: the better per-organ diagnostic.

Hausdorff distances are exact: nearest distances come from a k-d tree over the other mask's surface
voxels, not from distance transforms, which take seconds once scattered false positives stretch the
box to the whole volume.
"""

import math

import numpy as np

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


def _farthest(tree, coords: np.ndarray, scale: np.ndarray) -> float:
    """max over voxels `coords` (indices [N, 3]) of the distance from coords * scale to the tree's nearest point."""
    if not len(coords):
        return 0.0
    # Distance to a set is 1-Lipschitz, so no voxel of a cube is farther than its first voxel's distance
    # plus the cube's diagonal: query one voxel per cube, then only the cubes that could beat the best.
    cells = (coords // _CELL).astype(np.int64)
    keys = np.ravel_multi_index(cells.T, cells.max(axis=0) + 1)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    near = tree.query(coords[first] * scale, workers=-1)[0]
    best = near.max()
    reach = float(np.linalg.norm((_CELL - 1) * scale)) * (1 + 1e-9) + 1e-12
    rest = coords[(near + reach > best)[inverse]]
    return float(max(best, tree.query(rest * scale, workers=-1)[0].max())) if len(rest) else float(best)


def _directed(src: np.ndarray, dst: np.ndarray, dst_mask: np.ndarray, scale: np.ndarray) -> float:
    """max over voxels `src` (flat indices) of the distance to the nearest voxel of `dst`, with voxel
    coordinates multiplied by `scale` per axis.

    `dst` holds the flat indices of `dst_mask`, a bordered crop (see `_crop`); both are non-empty.
    """
    outside = src[~dst_mask.ravel()[src]]  # voxels inside dst are at distance 0
    if not len(outside):
        return 0.0
    # The nearest dst voxel to a voxel outside dst has a 6-neighbour outside dst (else a neighbour
    # would be closer, whatever the positive axis scales), so dst's surface voxels suffice as targets.
    surface = dst[_neighbours(dst_mask, dst) < 6]
    from scipy.spatial import cKDTree  # here: commands that only name the metric's options start at once

    tree = cKDTree(_coords(surface, dst_mask.shape) * scale, balanced_tree=False, compact_nodes=False)
    # Voxels next to dst are at most one (largest) axis step away; the others are farther than any
    # such step in unit scale, so they decide the maximum unless there are none or they are closer.
    touching = _neighbours(dst_mask, outside) > 0
    best = _farthest(tree, _coords(outside[~touching], dst_mask.shape), scale)
    if touching.any() and best < scale.max():
        best = max(best, _farthest(tree, _coords(outside[touching], dst_mask.shape), scale))
    return best


def _hausdorff(pred: np.ndarray, true: np.ndarray, scale: np.ndarray) -> float | None:
    """Symmetric Hausdorff distance of two contiguous bool [D, H, W] masks in scaled voxel units;
    None when both are empty, inf when exactly one is."""
    union = pred | true
    slices = union.reshape(union.shape[0], -1).any(axis=1)
    if not slices.any():
        return None
    # Exact to crop to the union's box: outside it both masks are empty and every nearest voxel is inside.
    box = (_span(slices), _span(union.any(axis=(0, 2))), _span(union.reshape(-1, union.shape[2]).any(axis=0)))
    pred, true = _crop(pred, box), _crop(true, box)
    on_pred, on_true = np.flatnonzero(pred), np.flatnonzero(true)
    if not len(on_pred) or not len(on_true):
        return math.inf
    return max(_directed(on_pred, on_true, true, scale), _directed(on_true, on_pred, pred, scale))


def _score_class(pred: np.ndarray, true: np.ndarray, diagonal: float) -> tuple[float, float]:
    """(dice, hausdorff) of one class in a volume: pred and true are contiguous bool [D, H, W]."""
    distance = _hausdorff(pred, true, np.ones(3))
    if distance is None:
        return 1.0, 0.0
    if math.isinf(distance):
        return 0.0, 1.0
    dice = 2 * int(np.count_nonzero(pred & true)) / (int(np.count_nonzero(pred)) + int(np.count_nonzero(true)))
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


# ---- the leaderboard score ---------------------------------------------------------------------

EMPTY_DICE = {"skip": math.nan, "zero": 0.0, "one": 1.0}  # a row where both masks are empty
HAUSDORFF_MODES = ("joined", "per_class")
UNIT_CUBE_DIAGONAL = math.sqrt(3)


def _check_readings(empty_dice: str, hausdorff: str) -> None:
    if empty_dice not in EMPTY_DICE:
        raise ValueError(f"empty_dice must be one of {', '.join(EMPTY_DICE)}, got {empty_dice!r}")
    if hausdorff not in HAUSDORFF_MODES:
        raise ValueError(f"hausdorff must be one of {', '.join(HAUSDORFF_MODES)}, got {hausdorff!r}")


def unit_hausdorff(pred, true) -> float:
    """The leaderboard's Hausdorff of two [D, H, W] masks: coordinates divided by the size of each axis,
    the distance by sqrt(3); NaN when both are empty (skipped), 1 when exactly one is."""
    pred, true = np.ascontiguousarray(pred, bool), np.ascontiguousarray(true, bool)
    distance = _hausdorff(pred, true, 1.0 / np.asarray(pred.shape, np.float64))
    if distance is None:
        return math.nan
    return 1.0 if math.isinf(distance) else distance / UNIT_CUBE_DIAGONAL


def leaderboard_volume(pred, true, *, empty_dice: str = "skip") -> dict:
    """One case-day's part of the leaderboard score: masks [D, H, W, 3] as for score_volume.

    Returns per class `dice_sum_<class>` and `dice_rows_<class>` (its rows' Dice summed, and how many
    rows count) and `hausdorff_<class>`; `hausdorff` of the class-joined volume (NaN: skipped); and
    this volume's own `dice`, `score` and `score_<class>` for reports (the leaderboard averages rows
    and volumes over the whole set: see leaderboard_summary).
    """
    _check_readings(empty_dice, "joined")
    pred, true = _as_bool(pred, "pred"), _as_bool(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    axes = (1, 2)
    inter = np.count_nonzero(pred & true, axis=axes).astype(np.float64)  # [D, 3]: one value per row
    total = np.count_nonzero(pred, axis=axes) + np.count_nonzero(true, axis=axes)
    dice = np.divide(2 * inter, total, out=np.full(inter.shape, EMPTY_DICE[empty_dice]), where=total > 0)
    row = {"hausdorff": unit_hausdorff(pred.any(axis=-1), true.any(axis=-1))}
    for c, name in enumerate(CLASSES):
        counted = ~np.isnan(dice[:, c])
        row |= {f"dice_sum_{name}": float(dice[counted, c].sum()), f"dice_rows_{name}": int(counted.sum()),
                f"hausdorff_{name}": unit_hausdorff(pred[..., c], true[..., c])}
    return row | _scores([row], "joined")


def _nanmean(values) -> float:
    values = np.asarray(list(values), np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def _scores(rows: list[dict], hausdorff: str) -> dict:
    """Leaderboard averages over `rows` (leaderboard_volume results): overall and per class."""
    out = {}
    rows_total = sum(r[f"dice_rows_{c}"] for r in rows for c in CLASSES)
    out["dice"] = sum(r[f"dice_sum_{c}"] for r in rows for c in CLASSES) / rows_total if rows_total else math.nan
    if hausdorff == "joined":
        out["hausdorff"] = _nanmean(r["hausdorff"] for r in rows)
    else:
        out["hausdorff"] = _nanmean(r[f"hausdorff_{c}"] for r in rows for c in CLASSES)
    out["score"] = 0.4 * out["dice"] + 0.6 * (1 - out["hausdorff"])
    for c in CLASSES:
        counted = sum(r[f"dice_rows_{c}"] for r in rows)
        out[f"dice_{c}"] = sum(r[f"dice_sum_{c}"] for r in rows) / counted if counted else math.nan
        out[f"hausdorff_{c}"] = _nanmean(r[f"hausdorff_{c}"] for r in rows)
        out[f"score_{c}"] = 0.4 * out[f"dice_{c}"] + 0.6 * (1 - out[f"hausdorff_{c}"])
    return out


def leaderboard_summary(rows: list[dict], *, hausdorff: str = "joined") -> dict:
    """The leaderboard score over case-days (leaderboard_volume results): `score`, `dice` (mean over
    every counted row), `hausdorff` (mean over case-days, or over (case-day, class) with
    hausdorff="per_class"), the same per class (the per-class Hausdorff is always per class), and
    `volumes`. NaN where nothing counts (every row and volume empty in both)."""
    _check_readings("skip", hausdorff)
    if not rows:
        raise ValueError("leaderboard_summary needs at least one scored volume, got none")
    return {"volumes": len(rows)} | _scores(rows, hausdorff)


# ---- what tfseg reports ------------------------------------------------------------------------

ORGAN3D = "organ3d_"  # prefix of the per-organ 3D metric's keys beside the leaderboard's


class Scores:
    """Case-days scored as tfseg reports them: the leaderboard score (the headline, `score`), the
    per-organ 3D metric under `organ3d_*`, and what an all-empty prediction would get (`empty_score`)."""

    def __init__(self, *, empty_dice: str = "skip", hausdorff: str = "joined"):
        _check_readings(empty_dice, hausdorff)
        self.empty_dice, self.hausdorff = empty_dice, hausdorff
        self.board, self.organ, self.empty = [], [], []

    def add(self, case_day: str, pred, true) -> dict:
        """Score one case-day's masks [D, H, W, 3]; returns its row for per-volume reports (with the
        leaderboard's parts, so that rows of several reports combine: combine_rows)."""
        board = leaderboard_volume(pred, true, empty_dice=self.empty_dice)
        organ = score_volume(pred, true)
        empty = leaderboard_volume(np.zeros_like(true), true, empty_dice=self.empty_dice)
        self.board.append(board)
        self.organ.append(organ)
        self.empty.append(empty)
        return ({"case_day": case_day} | board | {ORGAN3D + k: v for k, v in organ.items()}
                | {"empty_score": empty["score"]})

    def summary(self) -> dict:
        """Leaderboard averages (score, dice, hausdorff, per class), organ3d_* averages, empty_score(s)."""
        if not self.board:
            raise ValueError("no case-day scored")
        empty = leaderboard_summary(self.empty, hausdorff=self.hausdorff)
        return (_with_organ3d(leaderboard_summary(self.board, hausdorff=self.hausdorff), self.organ)
                | {"empty_score": empty["score"], **{f"empty_score_{c}": empty[f"score_{c}"] for c in CLASSES}}
                | {"dice_empty_rows": self.empty_dice, "hausdorff_classes": self.hausdorff})


def combine_rows(rows: list[dict], *, hausdorff: str = "joined") -> dict:
    """The leaderboard and organ3d_* summary of per-volume rows (Scores.add results, e.g. read back from
    several folds' per_volume.csv): what the competitors compared out of fold."""
    organ = [{k.removeprefix(ORGAN3D): v for k, v in r.items() if k.startswith(ORGAN3D)} for r in rows]
    return _with_organ3d(leaderboard_summary(rows, hausdorff=hausdorff), organ)


def _with_organ3d(board: dict, organ_rows: list[dict]) -> dict:
    """A leaderboard summary with the per-organ 3D metric's averages (score_volume rows) beside it."""
    return board | {ORGAN3D + k: v for k, v in summarize(organ_rows).items() if k != "volumes"}
