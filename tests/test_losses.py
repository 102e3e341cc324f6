"""Losses on logits: values and gradients against float64 numpy references.

The Lovász reference is written from the definition (Berman et al. 2018): sort the hinge errors
``1 - logit * sign`` in decreasing order; the i-th sorted pixel gets the weight
``Delta(S_i) - Delta(S_{i-1})``, where ``S_i`` holds the first i sorted pixels taken as mispredicted
and ``Delta(M) = |M| / |truth ∪ M|`` is the Jaccard loss of mispredicting ``M``; the loss is the dot
product of those weights with ``relu(sorted errors)``. Its gradient w.r.t. the logits is
``-sign * weight`` where the error is positive (the ordering is piecewise constant).
"""

from __future__ import annotations

import numpy as np
import pytest

import tensorflow as tf

from saltlib import losses  # noqa: E402


# --------------------------------------------------------------------------- numpy references
def ref_lovasz_weights(gt_sorted: np.ndarray) -> np.ndarray:
    """Lovász weights for one image's labels sorted by decreasing error, by running counts."""
    gts = int(gt_sorted.sum())
    weights = np.zeros(len(gt_sorted))
    prev, fp = 0.0, 0
    for i, g in enumerate(gt_sorted, start=1):
        fp += int(g == 0)
        delta = i / (gts + fp)  # |M| / |truth ∪ M| with M the first i pixels
        weights[i - 1] = delta - prev
        prev = delta
    return weights


def ref_lovasz(y: np.ndarray, x: np.ndarray):
    """(value, gradient) of the Lovász hinge of one image, float64; y, x flat."""
    y, x = y.astype(np.float64).ravel(), x.astype(np.float64).ravel()
    signs = 2 * y - 1
    errors = 1 - x * signs
    order = np.argsort(-errors, kind="stable")
    w = ref_lovasz_weights(y[order])
    value = float(np.dot(np.maximum(errors[order], 0), w))
    grad = np.zeros_like(x)
    grad[order] = w * (errors[order] > 0) * -signs[order]
    return value, grad


def ref_bce(y, x):
    y, x = y.astype(np.float64).ravel(), x.astype(np.float64).ravel()
    value = float(np.mean(np.logaddexp(0, x) - x * y))  # -y log s(x) - (1-y) log(1-s(x))
    grad = (1 / (1 + np.exp(-x)) - y) / len(x)
    return value, grad


def ref_symmetric(y, x):
    a, ga = ref_lovasz(y, x)
    b, gb = ref_lovasz(1 - y, -x)
    return 0.5 * (a + b), 0.5 * (ga - gb)


def ref_dice(y, x, smooth=1.0):
    y, x = y.astype(np.float64).ravel(), x.astype(np.float64).ravel()
    p = 1 / (1 + np.exp(-x))
    num, den = 2 * np.sum(p * y) + smooth, np.sum(p) + np.sum(y) + smooth
    value = 1 - num / den
    dp = -(2 * y * den - num) / den**2
    return float(value), dp * p * (1 - p)


REFS = {
    "lovasz": (losses.lovasz_hinge, ref_lovasz),
    "bce": (losses.bce, ref_bce),
    "symmetric_lovasz": (losses.symmetric_lovasz, ref_symmetric),
    "dice": (losses.soft_dice, ref_dice),
}


def batch(seed, b=5, size=12, channel=False):
    """Masks (one empty, one full, the rest random blobs) and logits that partly agree with them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    y = np.zeros((b, size, size), np.float32)
    for k in range(b):
        if k == 1:
            y[k] = 1
        elif k >= 2:
            y[k] = (yy - rng.uniform(0, size)) ** 2 + (xx - rng.uniform(0, size)) ** 2 < rng.uniform(4, 60)
    x = (2 * y - 1) * rng.uniform(-1, 2) + rng.normal(0, 1.5, y.shape)
    x = x.astype(np.float32)
    if channel:
        return y[..., None], x[..., None]
    return y, x


def keras_value_and_grad(fn, y, x):
    xt = tf.Variable(x)
    with tf.GradientTape() as tape:
        per_image = fn(tf.constant(y), xt)
        total = tf.reduce_sum(per_image)
    return np.asarray(per_image, np.float64), np.asarray(tape.gradient(total, xt), np.float64)


# --------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("channel", [False, True])
def test_value_and_gradient_match_numpy(name, seed, channel):
    fn, ref = REFS[name]
    y, x = batch(seed, channel=channel)
    values, grads = keras_value_and_grad(fn, y, x)
    assert values.shape == (len(y),)
    for k in range(len(y)):
        v, g = ref(y[k], x[k])
        assert values[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
        np.testing.assert_allclose(grads[k].ravel(), g, rtol=1e-4, atol=1e-6, err_msg=f"{name} image {k}")


@pytest.mark.parametrize("name", sorted(REFS))
def test_reference_gradients_match_finite_differences(name):
    """The analytic numpy gradients used above are themselves right (central differences, float64)."""
    _, ref = REFS[name]
    y, x = batch(7, b=3, size=5)
    rng = np.random.default_rng(0)
    for k in range(len(y)):
        xk = x[k].astype(np.float64).ravel()
        _, g = ref(y[k], xk)
        for i in rng.choice(len(xk), 8, replace=False):
            h = 1e-6
            up, down = xk.copy(), xk.copy()
            up[i] += h
            down[i] -= h
            fd = (ref(y[k], up)[0] - ref(y[k], down)[0]) / (2 * h)
            assert fd == pytest.approx(g[i], abs=1e-5), (name, k, i)


def test_lovasz_weights_match_the_cumsum_formula():
    rng = np.random.default_rng(3)
    gt = (rng.random((4, 50)) < 0.3).astype(np.float32)
    gt[0] = 0
    gt[1] = 1
    got = np.asarray(losses.lovasz_grad(tf.constant(gt)))
    for k in range(4):
        np.testing.assert_allclose(got[k], ref_lovasz_weights(gt[k]), atol=1e-6)
        # the weights sum to the Jaccard loss of mispredicting everything: 1 unless nothing to find
        assert got[k].sum() == pytest.approx(1.0)


def test_accepts_bool_masks():
    y, x = batch(1)
    a = np.asarray(losses.lovasz_hinge(y.astype(bool), x))
    b = np.asarray(losses.lovasz_hinge(y, x))
    np.testing.assert_allclose(a, b)


# --------------------------------------------------------------------------- edge cases
def per_image(fn, y, x):
    return np.asarray(fn(np.asarray(y, np.float32), np.asarray(x, np.float32)), np.float64)


SIZE = (2, 16, 16)
EMPTY, FULL = np.zeros(SIZE), np.ones(SIZE)


@pytest.mark.parametrize(
    "fn,y,x,expected",
    [
        (losses.lovasz_hinge, EMPTY, -10 * FULL, 0.0),  # no salt, confidently none predicted
        (losses.lovasz_hinge, FULL, 10 * FULL, 0.0),  # all salt, confidently all predicted
        (losses.lovasz_hinge, EMPTY, 0 * FULL, 1.0),  # relu(1 + max logit)
        (losses.lovasz_hinge, EMPTY, 2 * FULL, 3.0),
        (losses.lovasz_hinge, FULL, 0 * FULL, 1.0),  # every error 1, weights 1/P each
        (losses.symmetric_lovasz, EMPTY, -10 * FULL, 0.0),
        (losses.symmetric_lovasz, FULL, 10 * FULL, 0.0),
        (losses.symmetric_lovasz, EMPTY, 0 * FULL, 1.0),
        (losses.bce, EMPTY, -30 * FULL, np.log1p(np.exp(-30))),
        (losses.bce, FULL, 30 * FULL, np.log1p(np.exp(-30))),
        (losses.bce, EMPTY, 0 * FULL, np.log(2)),
        (losses.soft_dice, EMPTY, -30 * FULL, 0.0),
    ],
)
def test_empty_and_full_masks(fn, y, x, expected):
    out = per_image(fn, y, x)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_perfect_logits_give_zero_lovasz_on_any_mask():
    y, _ = batch(4)
    perfect = np.where(y > 0, 5.0, -5.0)
    np.testing.assert_allclose(per_image(losses.lovasz_hinge, y, perfect), 0, atol=1e-7)
    np.testing.assert_allclose(per_image(losses.symmetric_lovasz, y, perfect), 0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize("scale", [1e4, 1e6])
def test_huge_logits_stay_finite(name, scale):
    """Logits of +-1e4 and +-1e6 (a diverging run): finite, and still the float64 reference's values
    and gradients, not clamped or saturated ones."""
    fn, ref = REFS[name]
    y, x = batch(5)
    x = (np.sign(x) * scale).astype(np.float32)
    values, grads = keras_value_and_grad(fn, y, x)
    assert np.isfinite(values).all() and np.isfinite(grads).all()
    assert (values >= 0).all()
    with np.errstate(over="ignore"):  # exp(1e6) in the references is inf, and 1 / (1 + inf) is 0 as it should be
        for k in range(len(y)):
            v, g = ref(y[k], x[k])
            assert values[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
            np.testing.assert_allclose(grads[k].ravel(), g, rtol=1e-4, atol=1e-6, err_msg=f"{name} image {k}")


def test_losses_are_nonnegative_and_worse_for_worse_logits():
    y, _ = batch(6)
    good = np.where(y > 0, 2.0, -2.0)
    for name, (fn, _) in REFS.items():
        a, b = per_image(fn, y, good), per_image(fn, y, -good)
        assert (a >= 0).all() and (b > a).all(), name


def test_symmetric_variant_is_symmetric():
    y, x = batch(8)
    a = per_image(losses.symmetric_lovasz, y, x)
    b = per_image(losses.symmetric_lovasz, 1 - y, -x)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------- get_loss
@pytest.mark.parametrize(
    "spec,terms",
    [
        ("bce", [(1, "bce")]),
        ("lovasz", [(1, "lovasz")]),
        ("symmetric_lovasz", [(1, "symmetric_lovasz")]),
        ("dice", [(1, "dice")]),
        ("bce+lovasz", [(1, "bce"), (1, "lovasz")]),
        (" bce + lovasz ", [(1, "bce"), (1, "lovasz")]),
        ("0.5*bce+lovasz", [(0.5, "bce"), (1, "lovasz")]),
        ("2*bce+0.25*symmetric_lovasz+dice", [(2, "bce"), (0.25, "symmetric_lovasz"), (1, "dice")]),
        ("0*bce+lovasz", [(0, "bce"), (1, "lovasz")]),
    ],
)
def test_get_loss_combines_terms(spec, terms):
    y, x = batch(9)
    fn = losses.get_loss(spec)
    expected = sum(w * per_image(losses.LOSSES[n], y, x) for w, n in terms)
    np.testing.assert_allclose(per_image(fn, y, x), expected, rtol=1e-5)
    assert "+" not in fn.__name__ and "*" not in fn.__name__  # named after spec, usable in logs


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        (None, "non-empty"),
        (3, "non-empty"),
        ("focal", "unknown loss 'focal'"),
        ("bce+", "unknown loss ''"),
        ("bce++lovasz", "unknown loss ''"),
        ("Lovasz", "unknown loss 'Lovasz'"),
        ("bce*0.5", "unknown loss '0.5'"),
        ("x*bce", "bad loss weight 'x'"),
        ("0.5.1*bce", "bad loss weight"),
        ("*bce", "bad loss weight ''"),
        ("nan*bce", "bad loss weight 'nan'"),
        ("inf*lovasz", "bad loss weight 'inf'"),
        ("-1*bce", "bad loss weight '-1'"),
    ],
)
def test_get_loss_errors(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        losses.get_loss(spec)


# --------------------------------------------------------------------------- the empty-head loss
def ref_empty_head(fn_ref, y, x3, seg_weight=0.5, image_weight=0.1):
    """Per-image value of :func:`losses.with_empty_head` from the numpy references."""
    out = []
    for k in range(len(y)):
        has = float(y[k].any())
        z = float(x3[k, 0, 0, 2])
        image_bce = np.logaddexp(0, z) - z * has
        out.append(fn_ref(y[k], x3[k, ..., 0])[0] + seg_weight * has * fn_ref(y[k], x3[k, ..., 1])[0]
                   + image_weight * image_bce)
    return np.array(out)


@pytest.mark.parametrize("name", ["lovasz", "bce"])
@pytest.mark.parametrize("seed", range(2))
def test_empty_head_loss_matches_numpy(name, seed):
    fn, ref = REFS[name]
    y, x = batch(seed, channel=True)  # image 0 is empty: its decoder-only term must not count
    rng = np.random.default_rng(seed)
    seg = x + rng.normal(0, 1, x.shape).astype(np.float32)
    image = np.broadcast_to(rng.normal(0, 2, (len(y), 1, 1, 1)), x.shape).astype(np.float32)
    x3 = np.concatenate([x, seg, image], axis=-1)
    values, grads = keras_value_and_grad(losses.with_empty_head(fn), y, x3)
    np.testing.assert_allclose(values, ref_empty_head(ref, y, x3), rtol=1e-5, atol=1e-6)
    assert not grads[0, ..., 1].any() and grads[2, ..., 1].any()  # empty image: no decoder-only gradient
    # the image logit's gradient sits on the pixel the loss reads: sigmoid(z) - [salt present]
    for k in range(len(y)):
        expected = 0.1 * (1 / (1 + np.exp(-x3[k, 0, 0, 2])) - float(y[k].any()))
        assert grads[k, 0, 0, 2] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert np.count_nonzero(grads[k, ..., 2]) == 1


def test_empty_head_loss_weights_and_name():
    y, x = batch(0, channel=True)
    x3 = np.concatenate([x, x, np.zeros_like(x)], axis=-1)
    plain = np.asarray(losses.lovasz_hinge(y, x))
    only_fused = np.asarray(losses.with_empty_head(losses.lovasz_hinge, seg_weight=0.0, image_weight=0.0)(y, x3))
    np.testing.assert_allclose(only_fused, plain, rtol=1e-6)
    # a zero image logit costs log 2 per image at any label
    both = np.asarray(losses.with_empty_head(losses.lovasz_hinge, seg_weight=1.0, image_weight=1.0)(y, x3))
    has = y.reshape(len(y), -1).any(axis=1)
    np.testing.assert_allclose(both, plain * (1 + has) + np.log(2), rtol=1e-5)
    assert losses.with_empty_head(losses.get_loss("0.5*bce+lovasz")).__name__ == "0.5xbce_plus_lovasz_with_empty_head"
