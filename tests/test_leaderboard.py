"""The leaderboard score against an implementation written here from the competition's text: 2D Dice per
row, scipy's directed_hausdorff on coordinates divided by each axis' size, empty cases, options."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_allclose
from scipy.spatial.distance import directed_hausdorff

from tests.test_metric import random_pair
from tfseg import CLASSES
from tfseg.evaluation.metric import leaderboard_summary, leaderboard_volume, unit_hausdorff


def reference_hausdorff(pred, true):
    """Symmetric Hausdorff of two [D, H, W] masks in the unit cube, divided by sqrt(3), by scipy."""
    if not pred.any() and not true.any():
        return math.nan
    if not pred.any() or not true.any():
        return 1.0
    a = np.argwhere(pred) / np.asarray(pred.shape, float)
    b = np.argwhere(true) / np.asarray(true.shape, float)
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3)


def reference_score(volumes, empty_dice="skip", hausdorff="joined"):
    """The leaderboard over (pred, true) volume pairs [D, H, W, 3]: mean row Dice, mean Hausdorff."""
    dices, distances = [], []
    for pred, true in volumes:
        pred, true = pred.astype(bool), true.astype(bool)
        for k in range(pred.shape[0]):
            for c in range(len(CLASSES)):
                p, t = pred[k, ..., c], true[k, ..., c]
                if not p.any() and not t.any():
                    if empty_dice != "skip":
                        dices.append(1.0 if empty_dice == "one" else 0.0)
                    continue
                dices.append(2 * np.sum(p & t) / (p.sum() + t.sum()))
        if hausdorff == "joined":
            distances.append(reference_hausdorff(pred.any(axis=-1), true.any(axis=-1)))
        else:
            distances += [reference_hausdorff(pred[..., c], true[..., c]) for c in range(len(CLASSES))]
    dice = np.mean(dices) if dices else math.nan
    distance = np.nanmean(distances) if not np.isnan(distances).all() else math.nan
    return {"dice": dice, "hausdorff": distance, "score": 0.4 * dice + 0.6 * (1 - distance)}


def ours(volumes, empty_dice="skip", hausdorff="joined"):
    rows = [leaderboard_volume(p, t, empty_dice=empty_dice) for p, t in volumes]
    return leaderboard_summary(rows, hausdorff=hausdorff)


def assert_same(got, want):
    for key, value in want.items():
        assert_allclose(got[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("empty_dice", "hausdorff"), [("skip", "joined"), ("zero", "joined"), ("one", "per_class"),
                                                       ("skip", "per_class")])
def test_matches_the_reference_on_random_volumes(seed, empty_dice, hausdorff):
    rng = np.random.default_rng(seed)
    shapes = [(5, 9, 7), (3, 12, 12), (8, 6, 10)]  # none cubic: per-axis scaling matters
    volumes = [random_pair(rng, shape) for shape in shapes]
    assert_same(ours(volumes, empty_dice, hausdorff), reference_score(volumes, empty_dice, hausdorff))


@settings(max_examples=120, deadline=None)
@given(arrays(bool, (4, 6, 3)), arrays(bool, (4, 6, 3)))
def test_unit_hausdorff_matches_scipy_on_arbitrary_masks(pred, true):
    got, want = unit_hausdorff(pred, true), reference_hausdorff(pred, true)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


def test_unit_hausdorff_is_exact_around_a_hole_in_a_long_thin_volume():
    """A ring (the farthest point of the truth sits in the prediction's hole) in a 40 x 8 x 8 volume:
    surface-only shortcuts must still find it, with every axis scaled differently."""
    true = np.zeros((40, 8, 9), bool)
    pred = np.zeros_like(true)
    pred[5:35, 1:7, 1:8] = True
    pred[15:25, 3:5, 3:6] = False  # a hole inside the prediction
    true[20, 4, 4] = True  # the truth lies in the hole's middle
    assert unit_hausdorff(pred, true) == pytest.approx(reference_hausdorff(pred, true), abs=1e-12)


def test_the_two_normalisations_differ_on_a_non_cubic_volume():
    """One voxel one slice off in a 10 x 100 x 100 volume: 1/10 of the unit cube in z, 1/141 of the
    voxel diagonal in tfseg's per-organ metric; the leaderboard weighs z errors far more."""
    pred = np.zeros((10, 100, 100, 3), np.uint8)
    true = np.zeros_like(pred)
    pred[4, 50, 50, 0] = 1
    true[5, 50, 50, 0] = 1
    row = leaderboard_volume(pred, true)
    assert row["hausdorff"] == pytest.approx(0.1 / math.sqrt(3))
    from tfseg.evaluation.metric import score_volume

    assert score_volume(pred, true)["hausdorff_large_bowel"] == pytest.approx(1 / math.sqrt(10**2 + 2 * 100**2))


def test_empty_cases():
    empty = np.zeros((4, 5, 5, 3), np.uint8)
    organ = empty.copy()
    organ[1, 2, 2, 1] = 1
    both_empty = ours([(empty, empty)])  # nothing counts: NaN, as nanmean over nothing
    assert math.isnan(both_empty["dice"]) and math.isnan(both_empty["hausdorff"])
    missed = ours([(empty, organ)])  # one row counts with Dice 0; the case-day has Hausdorff 1
    assert missed["dice"] == 0.0 and missed["hausdorff"] == 1.0 and missed["score"] == 0.0
    assert ours([(organ, organ)])["score"] == 1.0
    # skipped rows weigh nothing; counted as one they pull the Dice up
    half = organ.copy()
    half[1, 2, 3, 1] = 1  # Dice of the one non-empty row: 2 / 3
    assert ours([(half, organ)])["dice"] == pytest.approx(2 / 3)
    rows = 4 * 3
    assert ours([(half, organ)], empty_dice="one")["dice"] == pytest.approx((2 / 3 + rows - 1) / rows)
    assert ours([(half, organ)], empty_dice="zero")["dice"] == pytest.approx(2 / 3 / rows)


def test_classes_are_joined_for_the_hausdorff():
    """A stomach predicted where the truth has small bowel: Dice 0 in both rows, yet the joined volumes
    are identical, so the (default) joined Hausdorff is 0 and the per-class one is 1."""
    pred = np.zeros((3, 6, 6, 3), np.uint8)
    true = np.zeros_like(pred)
    pred[1, 2:4, 2:4, 2] = 1
    true[1, 2:4, 2:4, 1] = 1
    assert ours([(pred, true)])["hausdorff"] == 0.0
    assert ours([(pred, true)], hausdorff="per_class")["hausdorff"] == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [({"empty_dice": "nan"}, "empty_dice"),
                                                 ({"hausdorff": "mean"}, "hausdorff")])
def test_bad_options_raise(kwargs, message):
    pred = np.zeros((2, 3, 3, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        ours([(pred, pred)], **kwargs)


def test_summary_needs_rows():
    with pytest.raises(ValueError, match="at least one"):
        leaderboard_summary([])
