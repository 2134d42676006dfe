"""Tests for tfseg.metric: exact against brute force (all voxel pairs) and against distance transforms."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_allclose
from scipy import ndimage
from scipy.spatial.distance import cdist

from tfseg import CLASSES
from tfseg.evaluation.metric import score_volume, summarize


def brute_force(pred, true):
    """The metric straight from its definition, comparing every voxel pair."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    diagonal = math.sqrt(sum(n * n for n in pred.shape[:3]))
    out = {}
    for c, name in enumerate(CLASSES):
        a, b = np.argwhere(pred[..., c]), np.argwhere(true[..., c])
        if not len(a) and not len(b):
            dice, hd = 1.0, 0.0
        elif not len(a) or not len(b):
            dice, hd = 0.0, 1.0
        else:
            pairs = cdist(a, b)
            hd = min(max(pairs.min(axis=1).max(), pairs.min(axis=0).max()) / diagonal, 1.0)
            dice = 2 * np.sum(pred[..., c] & true[..., c]) / (len(a) + len(b))
        out |= {f"dice_{name}": dice, f"hausdorff_{name}": hd, f"score_{name}": 0.4 * dice + 0.6 * (1 - hd)}
    for m in ("dice", "hausdorff", "score"):
        out[m] = np.mean([out[f"{m}_{name}"] for name in CLASSES])
    return out


def edt_reference(pred, true):
    """Hausdorff per class by full-volume distance transforms (no cropping, no tree), for bigger volumes."""
    diagonal = math.sqrt(sum(n * n for n in pred.shape[:3]))
    out = []
    for c in range(len(CLASSES)):
        a, b = pred[..., c].astype(bool), true[..., c].astype(bool)
        if not a.any() or not b.any():
            out.append(float(a.any() or b.any()))
            continue
        d = max(ndimage.distance_transform_edt(~b)[a].max(), ndimage.distance_transform_edt(~a)[b].max())
        out.append(min(d / diagonal, 1.0))
    return out


def assert_matches(got, want):
    assert set(got) == set(want)
    for key in want:
        assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12, err_msg=key)


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def random_mask(rng, shape):
    """One class channel: noise, smooth blobs, hollow shells, rings, single voxels or nothing."""
    kind = rng.integers(6)
    if kind == 0:
        return rng.random(shape) < rng.uniform(0.01, 0.4)
    if kind == 1:
        return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > rng.uniform(0.0, 0.3)
    centre = [rng.uniform(0, n) for n in shape]
    radius = rng.uniform(1.5, max(shape) / 2 + 1)
    if kind == 2:  # hollow shell: a mask with a hole
        return ball(shape, centre, radius) & ~ball(shape, centre, radius - 1.5)
    if kind == 3:  # ring in every slice: farthest point of the other mask is often inside the hole
        flat = ball(shape[1:], centre[1:], radius) & ~ball(shape[1:], centre[1:], radius / 2)
        return np.broadcast_to(flat, shape) & (rng.random(shape[0]) < 0.6)[:, None, None]
    if kind == 4:
        mask = np.zeros(shape, bool)
        mask[tuple(rng.integers(n) for n in shape)] = True
        return mask
    return np.zeros(shape, bool)


def random_pair(rng, shape):
    true = np.stack([random_mask(rng, shape) for _ in CLASSES], axis=-1)
    if rng.random() < 0.5:  # prediction close to the truth: a few voxels flipped, sometimes shifted
        flip = rng.random(true.shape) < rng.uniform(0, 0.05)
        pred = np.roll(true ^ flip, rng.integers(-1, 2, size=3), axis=(0, 1, 2))
    else:
        pred = np.stack([random_mask(rng, shape) for _ in CLASSES], axis=-1)
    return pred.astype(np.uint8), true.astype(np.uint8)


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 17)), int(rng.integers(1, 17)))
        pred, true = random_pair(rng, shape)
        assert_matches(score_volume(pred, true), brute_force(pred, true))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_sparse_scattered_voxels(seed):
    # Clusters far apart in a larger, anisotropic volume: the regime where whole cubes of query voxels
    # are skipped, so a wrong bound would show here.
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(3, 30)), int(rng.integers(20, 90)), int(rng.integers(20, 90)))
    pred = np.zeros(shape + (3,), np.uint8)
    true = np.zeros_like(pred)
    for mask in (pred, true):
        for _ in range(int(rng.integers(1, 6))):
            corner = [int(rng.integers(n)) for n in shape]
            box = tuple(slice(c, c + int(rng.integers(1, 12))) for c in corner)
            mask[box + (int(rng.integers(3)),)] = rng.random(mask[box + (0,)].shape) < 0.7
    assert_matches(score_volume(pred, true), brute_force(pred, true))


@pytest.mark.parametrize("seed", range(10))
def test_matches_brute_force_for_few_voxels_against_a_scattered_cloud(seed):
    # A few true voxels and a cloud of lone pred voxels: many query voxels of similar distance, one per
    # cube or so, so skipping a cube that could still hold the farthest voxel would change the result.
    rng = np.random.default_rng(300 + seed)
    shape = (20, 60, 50)
    cloud = (rng.random(shape + (3,)) < 0.004).astype(np.uint8)
    few = np.zeros_like(cloud)
    few[tuple(rng.integers(0, n, size=(3, 3)) for n in shape) + (np.arange(3),)] = 1
    assert_matches(score_volume(cloud, few), brute_force(cloud, few))
    assert_matches(score_volume(few, cloud), brute_force(few, cloud))


@pytest.mark.parametrize("k", range(8))
def test_farthest_voxel_behind_a_nearer_one_in_the_same_cube(k):
    # true: the origin. pred: near (k, k, k), far = near + (7, 7, 7) (d = (k + 7) * sqrt(3), the answer)
    # and a rival on the z axis a little nearer than far. For one k, near and far share a cube of the
    # search grid with near as its first voxel, so the rival must not make that cube look hopeless.
    shape = (16, 16, 30)
    pred = np.zeros(shape + (3,), np.uint8)
    true = np.zeros_like(pred)
    true[0, 0, 0] = 1
    far = (k + 7) * math.sqrt(3)
    rival = math.ceil(k * math.sqrt(3) + 11)  # past near + 11, short of far
    assert rival < far
    pred[k, k, k] = pred[k + 7, k + 7, k + 7] = pred[0, 0, rival] = 1
    got = score_volume(pred, true)
    assert_allclose(got["hausdorff"], far / math.sqrt(sum(n * n for n in shape)), rtol=1e-12)
    assert_matches(got, brute_force(pred, true))


@pytest.mark.parametrize("seed", range(3))
def test_hausdorff_matches_distance_transform_on_larger_volumes(seed):
    rng = np.random.default_rng(200 + seed)
    shape = (24, 70, 60)
    pred, true = random_pair(rng, shape)
    got = score_volume(pred, true)
    assert_allclose([got[f"hausdorff_{name}"] for name in CLASSES], edt_reference(pred, true), rtol=1e-12)


@settings(max_examples=150, deadline=None)
@given(arrays(bool, (3, 5, 4, 3)), arrays(bool, (3, 5, 4, 3)))
def test_matches_brute_force_on_arbitrary_tiny_masks(pred, true):
    assert_matches(score_volume(pred, true), brute_force(pred, true))


def test_farthest_voxel_inside_a_hole_counts():
    # True is a hollow sphere, pred the filled ball: the pred voxel farthest from true is the centre,
    # deep inside pred, so using only pred's surface voxels would miss it.
    shape = (15, 15, 15)
    filled = ball(shape, (7, 7, 7), 6)
    shell = filled & ~ball(shape, (7, 7, 7), 4.5)
    pred = np.repeat(filled[..., None], 3, axis=-1)
    true = np.repeat(shell[..., None], 3, axis=-1)
    got = score_volume(pred, true)
    # Shell voxels nearest the centre are offsets like (4, 2, 1): sqrt(21) = 4.58, just past the 4.5 hole;
    # every shell voxel is in pred, so that is the Hausdorff distance; the diagonal is sqrt(3 * 15^2).
    assert_allclose(got["hausdorff"], math.sqrt(21) / math.sqrt(3 * 15**2))
    assert_matches(got, brute_force(pred, true))


@pytest.mark.parametrize("axis", range(3))
def test_nearest_voxel_deep_inside_a_face(axis):
    # true: a slab 4 voxels thick across the whole volume; pred: the slab plus one voxel 6 steps above
    # the middle of its face. The nearest true voxel is straight below, in the middle of the face.
    true = np.zeros((12, 12, 12), np.uint8)
    true[:4] = 1
    pred = true.copy()
    pred[9, 6, 6] = 1
    pred, true = (np.repeat(np.moveaxis(m, 0, axis)[..., None], 3, axis=-1) for m in (pred, true))
    got = score_volume(pred, true)
    assert_allclose(got["hausdorff"], 6 / math.sqrt(3 * 12**2))
    assert_matches(got, brute_force(pred, true))


def test_both_empty_is_perfect():
    empty = np.zeros((4, 6, 5, 3), np.uint8)
    got = score_volume(empty, empty)
    for name in CLASSES:
        assert (got[f"dice_{name}"], got[f"hausdorff_{name}"], got[f"score_{name}"]) == (1.0, 0.0, 1.0)
    assert (got["dice"], got["hausdorff"], got["score"]) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize("empty_side", ["pred", "true"])
def test_one_empty_scores_zero(empty_side):
    full = np.zeros((4, 6, 5, 3), np.uint8)
    full[1, 2:4, 1:3, :] = 1
    empty = np.zeros_like(full)
    pred, true = (empty, full) if empty_side == "pred" else (full, empty)
    got = score_volume(pred, true)
    for name in CLASSES:
        assert (got[f"dice_{name}"], got[f"hausdorff_{name}"], got[f"score_{name}"]) == (0.0, 1.0, 0.0)


def test_identical_masks_score_one():
    rng = np.random.default_rng(7)
    mask = (rng.random((5, 20, 18, 3)) < 0.3).astype(np.uint8)
    got = score_volume(mask, mask.copy())
    assert (got["dice"], got["hausdorff"], got["score"]) == (1.0, 0.0, 1.0)


def test_two_single_voxels_by_hand():
    # Volume 4 x 10 x 10: diagonal sqrt(16 + 100 + 100) = sqrt(216) = 14.697.
    # true voxel (0, 0, 0), pred voxel (3, 4, 0): distance sqrt(9 + 16) = 5, so HD = 5 / 14.697 = 0.34021,
    # Dice 0 (no overlap), score = 0.4 * 0 + 0.6 * (1 - 0.34021) = 0.39588.
    pred = np.zeros((4, 10, 10, 3), np.uint8)
    true = np.zeros_like(pred)
    true[0, 0, 0, 1] = 1
    pred[3, 4, 0, 1] = 1
    got = score_volume(pred, true)
    assert_allclose([got["dice_small_bowel"], got["hausdorff_small_bowel"], got["score_small_bowel"]],
                    [0.0, 0.34021, 0.39588], atol=5e-6)
    # The two empty classes score 1, so the means are (1 + 0.39588 + 1) / 3 etc.
    assert_allclose(got["score"], (2 + 0.39588) / 3, atol=5e-6)
    assert_allclose(got["hausdorff"], 0.34021 / 3, atol=5e-6)


def test_partial_overlap_by_hand():
    # 1 x 1 x 4 volume, diagonal sqrt(1 + 1 + 16) = sqrt(18) = 4.2426.
    # true = voxels x 0, 1; pred = x 1, 2: overlap 1, Dice = 2 * 1 / (2 + 2) = 0.5;
    # pred x 2 is 1 from true x 1 and true x 0 is 1 from pred x 1: HD = 1 / 4.2426 = 0.23570;
    # score = 0.4 * 0.5 + 0.6 * (1 - 0.23570) = 0.65858.
    pred = np.zeros((1, 1, 4, 3), bool)
    true = np.zeros_like(pred)
    true[0, 0, [0, 1], 2] = True
    pred[0, 0, [1, 2], 2] = True
    got = score_volume(pred, true)
    assert_allclose([got["dice_stomach"], got["hausdorff_stomach"], got["score_stomach"]],
                    [0.5, 0.23570, 0.65858], atol=5e-6)


def test_hausdorff_is_normalised_by_the_diagonal_and_stays_at_most_one():
    # Opposite corners are the farthest apart two voxels can be: (D-1, H-1, W-1) apart, always less
    # than the diagonal sqrt(D^2 + H^2 + W^2), so HD stays below the cap of 1 reached only by an empty mask.
    for shape in [(1, 1, 2), (2, 2, 2), (144, 5, 3), (3, 40, 1)]:
        pred = np.zeros(shape + (3,), np.uint8)
        true = np.zeros_like(pred)
        pred[0, 0, 0] = 1
        true[-1, -1, -1] = 1
        got = score_volume(pred, true)["hausdorff"]
        far = math.dist((0, 0, 0), [n - 1 for n in shape])
        assert_allclose(got, far / math.sqrt(sum(n * n for n in shape)))
        assert 0 < got < 1


def test_classes_are_scored_independently():
    rng = np.random.default_rng(3)
    pred, true = random_pair(rng, (6, 16, 14))
    pred[..., 0], true[..., 0] = 0, 0  # both empty: perfect
    pred[..., 1], true[..., 1] = 1, 0  # only pred: zero
    got = score_volume(pred, true)
    assert got["score_large_bowel"] == 1.0 and got["score_small_bowel"] == 0.0
    # Changing the other channels leaves the stomach's numbers unchanged.
    other_pred, other_true = pred.copy(), true.copy()
    other_pred[..., :2], other_true[..., :2] = random_pair(rng, (6, 16, 14))[0][..., :2], 1
    again = score_volume(other_pred, other_true)
    for m in ("dice", "hausdorff", "score"):
        assert again[f"{m}_stomach"] == got[f"{m}_stomach"]
        assert_allclose(got[m], np.mean([got[f"{m}_{name}"] for name in CLASSES]))


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_accepts_bool_and_0_1_arrays_of_any_dtype(dtype):
    pred, true = random_pair(np.random.default_rng(11), (5, 12, 10))
    assert_matches(score_volume(pred.astype(dtype), true.astype(dtype)), score_volume(pred, true))


@pytest.mark.parametrize(
    ("pred_shape", "true_shape", "message"),
    [
        ((4, 6, 5), (4, 6, 5), r"shape \[D, H, W, 3\].*\(4, 6, 5\)"),
        ((2, 4, 6, 5, 3), (2, 4, 6, 5, 3), r"shape \[D, H, W, 3\]"),
        ((4, 6, 5, 2), (4, 6, 5, 2), r"got shape \(4, 6, 5, 2\)"),
        ((4, 6, 5, 3), (4, 6, 4, 3), r"differ: \(4, 6, 5, 3\) vs \(4, 6, 4, 3\)"),
        ((0, 6, 5, 3), (0, 6, 5, 3), "empty dimension"),
    ],
)
def test_bad_shapes_raise(pred_shape, true_shape, message):
    with pytest.raises(ValueError, match=message):
        score_volume(np.zeros(pred_shape, np.uint8), np.zeros(true_shape, np.uint8))


@pytest.mark.parametrize("bad", [np.full((2, 3, 3, 3), 255, np.uint8), np.full((2, 3, 3, 3), 0.7)])
def test_non_binary_values_raise(bad):
    with pytest.raises(ValueError, match="pred must hold only 0 and 1"):
        score_volume(bad, np.zeros((2, 3, 3, 3), np.uint8))


def test_summarize_averages_over_every_case_day_and_class():
    rng = np.random.default_rng(5)
    rows = [score_volume(*random_pair(rng, (4, 12, 12))) | {"id": f"case{i}_day1"} for i in range(4)]
    got = summarize(rows)
    assert got["volumes"] == 4
    for m in ("dice", "hausdorff", "score"):
        pairs = [row[f"{m}_{name}"] for row in rows for name in CLASSES]
        assert_allclose(got[m], sum(pairs) / len(pairs))
        assert_allclose(got[m], np.mean([row[m] for row in rows]))  # three classes per row: same thing
        for name in CLASSES:
            assert_allclose(got[f"{m}_{name}"], np.mean([row[f"{m}_{name}"] for row in rows]))


def test_summarize_rejects_empty_or_foreign_rows():
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    row = score_volume(np.zeros((1, 2, 2, 3), bool), np.zeros((1, 2, 2, 3), bool))
    with pytest.raises(ValueError, match="row 1 lacks dice_stomach"):
        summarize([row, {k: v for k, v in row.items() if k != "dice_stomach"}])
