"""The competition metric: hand-computed answers and an independent slow reference.

The Kaggle definition (TGS Salt Identification Challenge, "Evaluation"): per image, for each IoU
threshold t in 0.50, 0.55, ..., 0.95 a predicted object is a hit if its IoU with the true object is
*greater than* t; the image scores the mean over the ten thresholds of TP / (TP + FP + FN). With at
most one object per image that is simply the fraction of thresholds with ``IoU > t``. An image with
no salt and no predicted salt scores 1 (no TP, FP or FN); one with exactly one of them empty scores 0.
So an IoU of exactly 0.5 scores 0, an IoU of exactly 0.7 scores 0.4 (0.50..0.65 hit, 0.70 does not),
and only an IoU above 0.95 scores 1.

The reference below compares IoUs with the thresholds in exact rational arithmetic (``Fraction``),
so it does not depend on how 0.55 or 0.7 round in floating point.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from saltlib import metric

THRESHOLDS = [Fraction(50 + 5 * k, 100) for k in range(10)]


def ref_image_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """Kaggle score of one image, loop by loop (slow, exact)."""
    t, p = truth.astype(bool), pred.astype(bool)
    if not t.any() and not p.any():
        return 1.0
    inter = int(np.sum(t & p))
    union = int(np.sum(t | p))
    iou = Fraction(inter, union)
    hits = 0
    for thr in THRESHOLDS:
        if iou > thr:
            hits += 1  # one TP: the single true object is matched
        # else: one FN (truth not matched) and/or one FP (prediction not matched): precision 0
    return hits / len(THRESHOLDS)


def ref_sweep_table(truth, values, thresholds, min_sizes) -> np.ndarray:
    table = np.zeros((len(min_sizes), len(thresholds)))
    for i, m in enumerate(min_sizes):
        for j, thr in enumerate(thresholds):
            scores = []
            for t, v in zip(truth, values):
                p = v > thr
                if p.sum() < m:
                    p = np.zeros_like(p)
                scores.append(ref_image_score(t, p))
            table[i, j] = np.mean(scores)
    return table


def pair(n_truth: int, n_pred: int, n_inter: int, size: int = 20):
    """A (truth, pred) pair of ``size`` x ``size`` masks with the given pixel counts."""
    assert n_inter <= min(n_truth, n_pred) and n_truth + n_pred - n_inter <= size * size
    flat_t = np.zeros(size * size, bool)
    flat_p = np.zeros(size * size, bool)
    flat_t[:n_truth] = True
    flat_p[n_truth - n_inter : n_truth - n_inter + n_pred] = True
    return flat_t.reshape(size, size), flat_p.reshape(size, size)


# (truth pixels, pred pixels, intersection) -> IoU and the expected score
HAND = [
    (0, 0, 0, 1.0),  # empty truth, empty prediction
    (0, 1, 0, 0.0),  # empty truth, one false-positive pixel
    (0, 200, 0, 0.0),
    (1, 0, 0, 0.0),  # salt missed entirely
    (150, 0, 0, 0.0),
    (10, 10, 0, 0.0),  # disjoint
    (10, 10, 10, 1.0),  # perfect
    (10, 5, 5, 0.0),  # IoU exactly 0.5: not > 0.5
    (100, 51, 51, 0.1),  # IoU 0.51: only t = 0.50
    (100, 49, 49, 0.0),  # IoU 0.49
    (20, 11, 11, 0.1),  # IoU exactly 0.55: hits 0.50 only
    (10, 7, 7, 0.4),  # IoU exactly 0.7: 0.50, 0.55, 0.60, 0.65
    (100, 71, 71, 0.5),  # IoU 0.71
    (20, 19, 19, 0.9),  # IoU exactly 0.95: all but 0.95
    (100, 96, 96, 1.0),  # IoU 0.96
    (60, 60, 45, 0.2),  # IoU 45 / 75 = 0.6 exactly: 0.50 and 0.55 hit, 0.60 does not
]


@pytest.mark.parametrize("n_truth,n_pred,n_inter,expected", HAND)
def test_hand_computed(n_truth, n_pred, n_inter, expected):
    t, p = pair(n_truth, n_pred, n_inter)
    assert t.sum() == n_truth and p.sum() == n_pred and (t & p).sum() == n_inter
    got = metric.image_scores(t[None], p[None])
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, abs=1e-12)
    assert ref_image_score(t, p) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_truth,n_pred,n_inter,expected", HAND)
def test_ious_from_pixel_counts_hand_computed(n_truth, n_pred, n_inter, expected):
    """IoU = intersection / union from the same hand cases; 1 when both masks are empty."""
    t, p = pair(n_truth, n_pred, n_inter)
    union = n_truth + n_pred - n_inter
    want = 1.0 if union == 0 else n_inter / union
    counts = metric.pixel_counts(t[None], p[None])
    assert [int(c[0]) for c in counts] == [n_inter, n_truth, n_pred]
    assert metric.ious_from_counts(*counts)[0] == pytest.approx(want, abs=1e-12)
    # and the score from the same counts is the hand-computed one
    assert metric.scores_from_counts(*counts)[0] == pytest.approx(expected, abs=1e-12)


def test_competition_score_is_mean_of_image_scores():
    pairs = [pair(*h[:3]) for h in HAND]
    truth = np.stack([a for a, _ in pairs])
    pred = np.stack([b for _, b in pairs])
    expected = np.mean([h[3] for h in HAND])
    assert metric.competition_score(truth, pred) == pytest.approx(expected)
    np.testing.assert_allclose(metric.image_scores(truth, pred), [h[3] for h in HAND])


def test_shapes_and_dtypes_are_equivalent():
    rng = np.random.default_rng(0)
    truth = rng.random((6, 15, 15)) < 0.4
    pred = truth ^ (rng.random((6, 15, 15)) < 0.1)
    base = metric.image_scores(truth, pred)
    variants = [
        (truth[..., None], pred[..., None]),  # (N,H,W,1)
        (truth[..., None], pred),  # mixed
        (truth.astype(np.uint8), pred.astype(np.uint8)),  # 0/1
        (truth.astype(np.float32), pred.astype(np.int64)),
        (truth.astype(np.uint16) * 65535, pred),  # 16-bit PNG values
    ]
    for t, p in variants:
        np.testing.assert_array_equal(metric.image_scores(t, p), base)
    # a single (H, W) mask counts as one image
    assert metric.image_scores(truth[0], pred[0]).tolist() == [base[0]]


@pytest.mark.parametrize("bad", [np.zeros((2, 5, 5, 2)), np.zeros(5), np.zeros((1, 1, 5, 5, 1))])
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError, match="shape"):
        metric.image_scores(bad, bad)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        metric.image_scores(np.zeros((2, 5, 5)), np.zeros((3, 5, 5)))


def _random_case(seed, n=24, size=12):
    """Truth masks (some empty, some full) and logit maps that roughly follow them."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for k in range(n):
        kind = k % 4
        if kind == 1:
            truth[k] = (yy - rng.uniform(0, size)) ** 2 + (xx - rng.uniform(0, size)) ** 2 < rng.uniform(1, 40)
        elif kind == 2:
            truth[k] = yy > rng.integers(0, size)
        elif kind == 3 and k % 8 == 3:
            truth[k] = True
    values = np.where(truth, 1.0, -1.0) * rng.uniform(0.2, 2) + rng.normal(0, 1.0, truth.shape)
    return truth, values


@pytest.mark.parametrize("seed", range(4))
def test_image_scores_match_reference(seed):
    truth, values = _random_case(seed)
    for thr in (-0.5, 0.0, 0.7):
        pred = values > thr
        ref = [ref_image_score(t, p) for t, p in zip(truth, pred)]
        np.testing.assert_allclose(metric.image_scores(truth, pred), ref, atol=1e-12)


THRESHOLD_SETS = {
    "even": np.linspace(-2, 2, 21),  # evenly spaced: the arithmetic fast path
    "uneven": np.array([-1.3, -0.2, 0.0, 0.05, 0.5, 1.7]),  # np.searchsorted path
    "unsorted": np.array([0.5, -1.0, 0.0, 1.0, -0.5]),
    "two": np.array([0.0, 0.3]),
}


@pytest.mark.parametrize("name", sorted(THRESHOLD_SETS))
@pytest.mark.parametrize("seed", range(3))
def test_sweep_table_matches_reference_in_every_cell(name, seed):
    thresholds = THRESHOLD_SETS[name]
    truth, values = _random_case(seed + 10)
    rng = np.random.default_rng(seed)
    # a third of the values sit exactly on a cut-off: "values > t" must be strict there
    on = rng.random(values.shape) < 0.33
    values = np.where(on, rng.choice(thresholds, values.shape), values)
    min_sizes = (0, 1, 5, 30)
    out = metric.sweep_thresholds(truth, values, thresholds, min_sizes)
    ref = ref_sweep_table(truth, values, thresholds, min_sizes)
    assert out["table"].shape == (len(min_sizes), len(thresholds))
    np.testing.assert_allclose(out["table"], ref, atol=1e-12)
    i, j = np.unravel_index(np.argmax(ref), ref.shape)
    assert out["score"] == pytest.approx(ref.max())
    assert ref[list(min_sizes).index(out["min_size"]), list(thresholds).index(out["threshold"])] == pytest.approx(ref.max())
    np.testing.assert_array_equal(out["thresholds"], thresholds)


@pytest.mark.parametrize("as_probability", [False, True])
def test_sweep_default_thresholds(as_probability):
    truth, values = _random_case(3)
    if as_probability:
        values = 1 / (1 + np.exp(-values))
    out = metric.sweep_thresholds(truth, values, min_sizes=(0, 10))
    lo, hi = (0.02, 0.98) if as_probability else (-4, 4)
    assert len(out["thresholds"]) == 50
    assert out["thresholds"][0] == pytest.approx(lo) and out["thresholds"][-1] == pytest.approx(hi)
    ref = ref_sweep_table(truth[:8], values[:8], out["thresholds"][::7], (0, 10))
    sub = metric.sweep_thresholds(truth[:8], values[:8], out["thresholds"][::7], (0, 10))
    np.testing.assert_allclose(sub["table"], ref, atol=1e-12)


def test_sweep_accepts_channel_axis():
    truth, values = _random_case(5)
    a = metric.sweep_thresholds(truth, values, np.linspace(-1, 1, 9), (0, 3))
    b = metric.sweep_thresholds(truth[..., None], values[..., None], np.linspace(-1, 1, 9), (0, 3))
    np.testing.assert_array_equal(a["table"], b["table"])


def test_threshold_counts_are_pixel_counts():
    truth, values = _random_case(7)
    thr = np.array([0.3, -0.4, 0.0])
    inter, t_area, p_area = metric.threshold_counts(truth, values, thr)
    for j, t in enumerate(thr):
        pred = values > t
        np.testing.assert_array_equal(inter[:, j], (pred & truth).sum(axis=(1, 2)))
        np.testing.assert_array_equal(p_area[:, j], pred.sum(axis=(1, 2)))
    np.testing.assert_array_equal(t_area[:, 0], truth.sum(axis=(1, 2)))


def test_threshold_counts_of_one_2d_mask_is_one_image():
    """A single (H, W) mask counts as one image, as in image_scores (not one image per row)."""
    truth = np.array([[1, 1, 0], [0, 1, 0]], bool)
    values = np.array([[2.0, -1.0, 0.5], [0.2, 3.0, -2.0]])
    inter, t_area, p_area = metric.threshold_counts(truth, values, [0.0, 1.0])
    # cut-off 0: predicted {(0,0), (0,2), (1,0), (1,1)}, 2 of them in truth; cut-off 1: {(0,0), (1,1)}
    assert inter.tolist() == [[2, 2]] and t_area.tolist() == [[3]] and p_area.tolist() == [[4, 2]]
    assert [a.tolist() for a in metric.threshold_counts(truth[None], values[None], [0.0, 1.0])] == \
        [inter.tolist(), t_area.tolist(), p_area.tolist()]


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_chunked_counts_equal_reference(monkeypatch, chunk):
    monkeypatch.setattr(metric, "_CHUNK", chunk)
    truth, values = _random_case(11, n=17)
    thresholds = np.linspace(-1, 1, 11)
    out = metric.sweep_thresholds(truth, values, thresholds, (0, 4))
    np.testing.assert_allclose(out["table"], ref_sweep_table(truth, values, thresholds, (0, 4)), atol=1e-12)
    inter, t_area, p_area = metric.threshold_counts(truth, values, thresholds)
    assert inter.shape == p_area.shape == (17, 11) and t_area.shape == (17, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("thresholds", [np.linspace(-2, 2, 21), np.array([-1.3, 0.0, 0.7])])
def test_non_finite_values_are_refused_on_both_paths(thresholds, bad):
    """NaN logits (a diverged model) would read as "no salt" at every cut-off; both the evenly
    spaced fast path and the searchsorted path refuse them, and infinities, naming the first image."""
    truth, values = _random_case(4)
    values = values.astype(np.float32)
    values[3, 5, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite in 1 image\(s\), first at index 3"):
        metric.sweep_thresholds(truth, values, thresholds)


def test_sweep_peak_gates_hand_case():
    """Two images with the same 4-pixel prediction at logit 1: one is salt (its peak 3.0), one is
    empty (peak 1.0). No cut-off in (0, 1) separates them; the gate 2.0 does, and a gate that
    changes nothing is not chosen over none."""
    truth = np.zeros((2, 4, 4), bool)
    truth[0, :2, :2] = True
    logits = np.full((2, 4, 4), -5.0)
    logits[:, :2, :2] = 1.0
    logits[0, 0, 0] = 3.0
    thresholds = [0.0, 0.5]
    r = metric.sweep_thresholds(truth, logits, thresholds)
    assert r["score"] == 0.5 and r["peak_gate"] is None
    r = metric.sweep_thresholds(truth, logits, thresholds, peak_gates=[-10.0, 2.0, 5.0])
    assert r["score"] == 1.0 and r["peak_gate"] == 2.0 and r["table"].shape == (1, 2)
    r = metric.sweep_thresholds(truth, logits, thresholds, min_sizes=[0, 5], peak_gates=[2.0])
    assert (r["score"], r["min_size"], r["peak_gate"]) == (1.0, 0, 2.0)  # size 5 would empty the salt too
