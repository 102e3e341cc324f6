"""Kaggle run-length encoding: known answers, round trips, and malformed input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from saltlib import rle

# 3x3 masks written out by hand. Column-major, 1-indexed: pixel (row r, column c) is number
# 1 + r + 3*c, i.e. the first column holds pixels 1,2,3, the second 4,5,6, the third 7,8,9.
KNOWN = [
    ([[0, 0, 0], [0, 0, 0], [0, 0, 0]], ""),
    ([[1, 0, 0], [0, 0, 0], [0, 0, 0]], "1 1"),
    ([[0, 0, 0], [0, 0, 0], [0, 0, 1]], "9 1"),
    ([[1, 1, 1], [1, 1, 1], [1, 1, 1]], "1 9"),
    ([[1, 0, 0], [1, 0, 0], [1, 0, 0]], "1 3"),  # the whole first column
    ([[1, 1, 1], [0, 0, 0], [0, 0, 0]], "1 1 4 1 7 1"),  # the top row: one pixel per column
    ([[0, 0, 0], [0, 0, 0], [1, 1, 0]], "3 1 6 1"),
    ([[0, 0, 1], [0, 0, 0], [1, 0, 0]], "3 1 7 1"),  # (2,0) is pixel 3, (0,2) is pixel 7
    ([[0, 0, 0], [0, 0, 1], [1, 0, 1]], "3 1 8 2"),
    ([[0, 1, 0], [0, 1, 0], [1, 1, 0]], "3 4"),  # bottom of column 0 runs on into column 1
]


@pytest.mark.parametrize("mask,text", KNOWN)
def test_known_answers(mask, text):
    m = np.array(mask, bool)
    assert rle.encode(m) == text
    np.testing.assert_array_equal(rle.decode(text, (3, 3)), m)


def test_non_square_known_answer():
    # 2 rows x 3 columns: column-major numbering is [[1, 3, 5], [2, 4, 6]]
    m = np.array([[0, 1, 1], [1, 0, 1]], bool)
    assert rle.encode(m) == "2 2 5 2"
    np.testing.assert_array_equal(rle.decode("2 2 5 2", (2, 3)), m)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.int32, np.float32])
def test_encode_accepts_any_dtype_salt_where_positive(dtype):
    m = np.zeros((101, 101), dtype)
    m[10:20, 30:40] = 65535 if dtype == np.uint16 else 1
    assert rle.encode(m) == rle.encode(m.astype(bool))
    assert rle.encode(m).split()[:2] == [str(1 + 10 + 101 * 30), "10"]


@pytest.mark.parametrize("empty", ["", "   ", None, float("nan")])
def test_empty_inputs_decode_to_empty_mask(empty):
    out = rle.decode(empty)
    assert out.shape == (101, 101) and out.dtype == bool and not out.any()


def test_empty_mask_encodes_to_empty_string():
    assert rle.encode(np.zeros((101, 101), bool)) == ""


def test_full_mask():
    assert rle.encode(np.ones((101, 101), bool)) == "1 10201"
    assert rle.decode("1 10201").all()


def test_decode_tolerates_extra_whitespace():
    np.testing.assert_array_equal(rle.decode("  3 1\t 8 2\n", (3, 3)), rle.decode("3 1 8 2", (3, 3)))


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 3, 3)))


# --------------------------------------------------------------------------- malformed input
MALFORMED = [
    ("1 2 3", "odd number"),
    ("1", "odd number"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("1 2.0", "not an integer"),
    ("a b", "not an integer"),
    ("1_0 5", "not an integer"),  # Python's int() reads this as 10
    ("\u0661 5", "not an integer"),  # an Arabic-Indic one, which int() also takes
    ("1 +-2", "not an integer"),
    ("0 3", "below 1"),  # starts are 1-indexed
    ("-4 3", "below 1"),
    ("5 0", "length 0 is below 1"),
    ("5 -2", "below 1"),
    ("9 2", "past pixel 9"),  # 3x3 mask: pixels 9 and 10
    ("10 1", "past pixel 9"),
    ("1 3 3 2", "overlap"),  # runs 1-3 and 3-4 share pixel 3
    ("5 1 1 1", "out of order"),  # unsorted
    ("2 2 2 2", "overlap"),  # the same run twice
    # values too big for int64 must not overflow into another exception or a wrapped index
    ("1 99999999999999999999", "past pixel 9"),
    ("99999999999999999999 1", "past pixel 9"),
    ("9223372036854775807 9223372036854775807", "past pixel 9"),
    ("-99999999999999999999 1", "below 1"),
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_raises_value_error_saying_what(text, message):
    with pytest.raises(ValueError, match=message) as info:
        rle.decode(text, (3, 3))
    assert "RLE" in str(info.value)


def test_non_string_rejected():
    with pytest.raises(ValueError, match="must be a string"):
        rle.decode(12, (3, 3))


def test_long_malformed_string_is_shortened_in_message():
    text = " ".join(["1 1"] * 200) + " 5"
    with pytest.raises(ValueError) as info:
        rle.decode(text)
    assert len(str(info.value)) < 200


def test_adjacent_runs_are_allowed():
    # touching but not overlapping runs decode (encode would merge them)
    out = rle.decode("1 2 3 2", (3, 3))
    assert out.flatten(order="F").tolist() == [True] * 4 + [False] * 5
    assert rle.encode(out) == "1 4"


# --------------------------------------------------------------------------- properties
masks = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda hw: hnp.arrays(bool, hw, elements=st.booleans())
)


@settings(max_examples=200, deadline=None)
@given(masks)
def test_round_trip_random_masks(mask):
    text = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(text, mask.shape), mask)
    # canonical form: sorted, non-touching runs, 1-indexed, starts and lengths >= 1
    v = np.array(text.split(), int).reshape(-1, 2) if text else np.zeros((0, 2), int)
    assert (v >= 1).all()
    ends = v[:, 0] + v[:, 1]  # one past each run, 1-indexed
    assert (v[1:, 0] > ends[:-1]).all()
    assert v[:, 1].sum() == mask.sum()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_round_trip_blocky_masks(h, w, density, seed):
    # long runs as well as single pixels
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) < density
    m = np.repeat(m, 3, axis=0)[: max(h, 1)]
    assert rle.decode(rle.encode(m), m.shape).tolist() == m.tolist()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), max_size=20))
def test_decode_of_valid_runs_then_encode_is_identity_up_to_merging(pairs):
    # build sorted, non-overlapping runs on a 20x20 mask from random gaps and lengths
    pos, runs = 1, []
    for gap, length in pairs:
        start = pos + gap - 1 if runs else gap
        if start + length - 1 > 400:
            break
        runs.append((start, length))
        pos = start + length + 1
    text = " ".join(f"{s} {n}" for s, n in runs)
    m = rle.decode(text, (20, 20))
    flat = m.flatten(order="F")
    expect = np.zeros(400, bool)
    for s, n in runs:
        expect[s - 1 : s - 1 + n] = True
    np.testing.assert_array_equal(flat, expect)
    np.testing.assert_array_equal(rle.decode(rle.encode(m), (20, 20)), m)


tokens = st.one_of(
    st.integers(-5, 30).map(str),
    st.sampled_from(["", " ", "  ", "\t", "\n", "x", "1.0", "+3", "-0", "1e2", "٣", "0x1", "nan", "\x00",
                     "99999999999999999999", "9223372036854775807", "-9223372036854775809"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=40), st.lists(tokens, max_size=12).map(" ".join)))
def test_random_strings_give_a_mask_or_value_error(text):
    try:
        out = rle.decode(text, (5, 5))
    except ValueError as e:
        assert str(e)  # a message, never an empty error
        return
    assert out.shape == (5, 5) and out.dtype == bool
    # whatever decoded re-encodes to a string that decodes to the same mask
    np.testing.assert_array_equal(rle.decode(rle.encode(out), (5, 5)), out)


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_agrees_with_real_train_csv(real_data):
    from PIL import Image

    table = pd.read_csv(real_data / "train.csv", keep_default_na=False)
    rng = np.random.default_rng(0)
    sample = table.iloc[rng.choice(len(table), 150, replace=False)]
    n_salt = 0
    for i, text in zip(sample["id"], sample["rle_mask"]):
        png = np.asarray(Image.open(real_data / "train" / "masks" / f"{i}.png"))
        mask = (png[..., 0] if png.ndim == 3 else png) > 0
        np.testing.assert_array_equal(rle.decode(text), mask, err_msg=i)
        assert rle.encode(mask) == " ".join(text.split()), i
        n_salt += bool(mask.any())
    assert 50 < n_salt < 150  # the sample holds both empty and salt masks
