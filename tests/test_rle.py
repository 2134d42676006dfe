import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfseg.kaggle import rle


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_random_masks_round_trip(height, width, density, seed):
    mask = (np.random.default_rng(seed).random((height, width)) < density).astype(np.uint8)
    encoded = rle.encode(mask)
    decoded = rle.decode(encoded, (height, width))
    assert decoded.dtype == np.uint8 and decoded.shape == (height, width)
    np.testing.assert_array_equal(decoded, mask)
    assert rle.encode(decoded) == encoded


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), max_size=30))
def test_valid_strings_round_trip(gaps_and_lengths):
    """encode(decode(r)) == r for every valid r (runs sorted and separated)."""
    pairs, pos = [], 0
    for gap, length in gaps_and_lengths:
        pos += gap if pairs else gap - 1
        pairs += [pos + 1, length]
        pos += length
    text = " ".join(map(str, pairs))
    shape = (7, max(1, -(-pos // 7)) + 1)
    assert rle.encode(rle.decode(text, shape)) == text


def test_row_major_golden_non_square():
    # A 2 x 3 mask (H=2, W=3): pixels 2,3 of row 0 and pixel 1 of row 1 are row-major indices 2,3,4.
    mask = rle.decode("2 3", (2, 3))
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 0, 0]])
    tall = np.zeros((4, 2), np.uint8)
    tall[:, 1] = 1  # one column: a run per row in row-major order
    assert rle.encode(tall) == "2 1 4 1 6 1 8 1"


@pytest.mark.parametrize("empty", ["", "   ", float("nan"), None])
def test_empty_means_empty_mask(empty):
    assert not rle.decode(empty, (3, 4)).any()
    assert rle.encode(np.zeros((3, 4))) == ""


@pytest.mark.parametrize(("text", "message"), [
    ("1 2 3", "odd number of tokens"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("0 2", "is < 1"),
    ("-1 2", "is < 1"),
    ("1 0", "length 0"),
    ("5 1 1 1", "unsorted"),
    ("1 3 2 1", "overlapping"),
    ("1 2 3 1", "touching"),
    ("12 2", "past the 3 x 4"),
])
def test_bad_rle_raises_naming_problem(text, message):
    with pytest.raises(ValueError, match=message):
        rle.decode(text, (3, 4))


def reference_decode(text: str, shape):
    """The RLE rules written plainly: ASCII integer pairs, starts >= 1, lengths >= 1, each run starting
    after the previous one's end plus a gap, inside H x W. None where the text breaks a rule."""
    tokens = text.split()
    if len(tokens) % 2 or any(not t.lstrip("-").isascii() or not t.lstrip("-").isdigit() or t.count("-") > 1
                              or ("-" in t and not t.startswith("-")) for t in tokens):
        return None
    numbers = [int(t) for t in tokens]
    size = shape[0] * shape[1]
    flat = np.zeros(size, np.uint8)
    end = 0  # 1-based exclusive end of the previous run
    for start, length in zip(numbers[0::2], numbers[1::2], strict=True):
        if start < 1 or length < 1 or start <= end or start + length - 1 > size:
            return None
        flat[start - 1:start - 1 + length] = 1
        end = start + length
    return flat.reshape(shape)


NUMBERS = st.one_of(st.integers(-3, 60), st.integers(-2**70, 2**70), st.sampled_from([2**63, 2**63 - 1, -2**63]))
TOKENS = st.one_of(NUMBERS.map(str), st.sampled_from(["+5", "1.5", "\u0663", "\uff11", "1e3", "0x10", "--1", "", "-"]),
                   st.text(max_size=4))


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKENS, max_size=8), st.sampled_from([" ", "  ", "\t", "\n"]))
def test_every_string_is_decoded_exactly_or_refused(tokens, separator):
    text = separator.join(tokens)
    want = reference_decode(text, (6, 7)) if text.strip() else np.zeros((6, 7), np.uint8)
    if want is None:
        with pytest.raises(ValueError):
            rle.decode(text, (6, 7))
    else:
        np.testing.assert_array_equal(rle.decode(text, (6, 7)), want)
