"""Dropping stray pieces of predicted masks: per slice (8-connected) and in 3D (26-connected)."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from tfseg.evaluation import postprocess as components


def blobs() -> np.ndarray:
    """Two slices; class 0: 4 px and 9 px squares, class 1: a single pixel, class 2 (slice 1): a 9 px square
    and two diagonal neighbours (one 8-connected component of 2 px)."""
    masks = np.zeros((2, 20, 20, 3), np.uint8)
    masks[0, 0:2, 0:2, 0] = 1
    masks[0, 10:13, 10:13, 0] = 1
    masks[0, 5, 5, 1] = 1
    masks[1, 0:3, 0:3, 2] = 1
    masks[1, 8, 8, 2] = masks[1, 9, 9, 2] = 1
    return masks


@pytest.mark.parametrize(("min_pixels", "kept"), [
    (0, (13, 1, 11)),
    (1, (13, 1, 11)),
    (2, (13, 0, 11)),  # components smaller than min_pixels go; a 2 px diagonal pair is one component
    (3, (13, 0, 9)),
    (5, (9, 0, 9)),
    (10, (0, 0, 0)),
])
def test_remove_small_components(min_pixels, kept):
    masks = blobs()
    out = components.remove_small(masks, min_pixels)
    assert tuple(int(out[..., c].sum()) for c in range(3)) == kept
    assert out.dtype == np.uint8 and ((out == 0) | (out == masks)).all()  # only removes, never adds
    assert_array_equal(masks, blobs())  # input untouched


def pieces_3d() -> np.ndarray:
    """One volume: class 0 a 27-voxel cube, a 4-voxel bar and a voxel touching the cube's corner
    diagonally (the same 26-connected component); class 1 two equal 8-voxel cubes; class 2 empty."""
    masks = np.zeros((8, 12, 12, 3), np.uint8)
    masks[0:3, 0:3, 0:3, 0] = 1
    masks[3, 3, 3, 0] = 1
    masks[5:7, 8, 8, 0] = masks[6:8, 9, 9, 0] = 1
    masks[0:2, 0:2, 0:2, 1] = masks[5:7, 9:11, 9:11, 1] = 1
    return masks


@pytest.mark.parametrize(("fraction", "kept"), [
    (0.0, (32, 16, 0)),
    (0.1, (32, 16, 0)),  # 4 >= 0.1 x 28
    (0.2, (28, 16, 0)),  # the bar goes; the corner voxel belongs to the cube
    (1.0, (28, 16, 0)),  # only the largest, and equal largest ones both stay
])
def test_keep_large_3d(fraction, kept):
    masks = pieces_3d()
    out = components.keep_large_3d(masks, fraction)
    assert tuple(int(out[..., c].sum()) for c in range(3)) == kept
    assert ((out == 0) | (out == masks)).all()
    assert_array_equal(masks, pieces_3d())  # input untouched


def test_clean_runs_slices_then_3d():
    masks = pieces_3d()
    # per slice, pieces under 2 px go (the corner voxel, the bar's ends), then 3D ones under half the largest
    out = components.clean(masks, min_pixels=2, min_fraction=0.5)
    assert tuple(int(out[..., c].sum()) for c in range(3)) == (27, 16, 0)
