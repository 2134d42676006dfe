"""Run-length encoding of masks as in the competition's train.csv and submissions.

Pairs `start length`, starts 1-based, over the row-major (C-order) flattening of an H x W mask.
Public and stable: other tools call `decode` and `encode`.
"""

import math
import re

import numpy as np

_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes other scripts' digits and "+1"
_LARGEST = 2**40  # larger starts or lengths are refused before they reach int64 arithmetic


def _is_empty(rle) -> bool:
    if rle is None:
        return True
    if isinstance(rle, float) and math.isnan(rle):
        return True
    return isinstance(rle, str) and not rle.strip()


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """RLE string -> uint8 0/1 mask of shape (H, W). Empty string, None or NaN -> empty mask.

    Raises ValueError naming the problem for malformed input (odd token count, a token that is not
    an ASCII integer or is out of range, start < 1, length < 1, unsorted/overlapping/touching runs,
    a run past H x W): any string is either decoded exactly or refused so.
    """
    height, width = (int(v) for v in shape)
    size = height * width
    if _is_empty(rle):
        return np.zeros((height, width), np.uint8)
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of tokens ({len(tokens)}): expected 'start length' pairs")
    if bad := next((t for t in tokens if not _INTEGER.fullmatch(t)), None):
        raise ValueError(f"RLE token {bad!r} is not an integer")
    if bad := next((t for t in tokens if len(t) > 14 or abs(int(t)) > _LARGEST), None):
        raise ValueError(f"RLE token {bad[:30]!r}{'...' if len(bad) > 30 else ''} is out of range: no mask has "
                         f"{_LARGEST} pixels")
    values = np.array([int(t) for t in tokens], np.int64)
    starts, lengths = values[0::2], values[1::2]
    if (bad := np.flatnonzero(starts < 1)).size:
        raise ValueError(f"RLE start {starts[bad[0]]} (run {bad[0] + 1}) is < 1: starts are 1-based")
    if (bad := np.flatnonzero(lengths < 1)).size:
        raise ValueError(f"RLE length {lengths[bad[0]]} (run {bad[0] + 1}) is < 1")
    ends = starts + lengths  # 1-based, exclusive
    if (bad := np.flatnonzero(starts[1:] <= ends[:-1])).size:
        i = bad[0]
        raise ValueError(f"RLE runs {i + 1} and {i + 2} are unsorted, overlapping or touching "
                         f"(start {starts[i]} length {lengths[i]}, then start {starts[i + 1]})")
    if ends[-1] - 1 > size:
        raise ValueError(f"RLE run 'start {starts[-1]} length {lengths[-1]}' ends at pixel {ends[-1] - 1}, "
                         f"past the {height} x {width} = {size} pixels of the mask")
    edges = np.zeros(size + 1, np.int32)
    edges[starts - 1] = 1  # runs are sorted and separated, so no index repeats
    edges[ends - 1] = -1
    return np.cumsum(edges[:size]).astype(np.uint8).reshape(height, width)


def encode(mask: np.ndarray) -> str:
    """0/non-zero mask (H, W) -> RLE string; '' for an empty mask."""
    flat = np.asarray(mask).reshape(-1) != 0
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, stops = changes[0::2], changes[1::2]
    pairs = np.stack([starts + 1, stops - starts], axis=1).reshape(-1)
    return " ".join(map(str, pairs.tolist()))
