"""The numpy augmentation and ``PyDataset`` pipeline used by non-TensorFlow backends (JAX on a GPU
machine without TensorFlow): checked against the TensorFlow implementation and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_seeded_epochs
from saltlib import augment


@pytest.mark.parametrize("start,size", [(0.0, 1.0), (0.0, 0.9), (0.05, 0.9), (0.1, 0.9), (0.013, 0.95)])
def test_resize_matrix_matches_crop_and_resize(start, size):
    """``Wy @ img @ Wx.T`` equals ``tf.image.crop_and_resize`` (bilinear) on the same box."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    img = rng.random((1, 101, 101, 1)).astype(np.float32)
    x0 = size / 3 * (1 - size)  # a different offset on the other axis
    ref = tf.image.crop_and_resize(img, [[start, x0, start + size, x0 + size]], [0], (101, 101)).numpy()
    mine = augment.resize_matrix(start, size, 101) @ img[0, ..., 0] @ augment.resize_matrix(x0, size, 101).T
    np.testing.assert_allclose(mine, ref[0, ..., 0], atol=1e-5)


def test_resize_matrix_hand_computed():
    """n=3, the right half of the side (start 0.5, size 0.5): samples at 1.0, 1.5, 2.0."""
    w = augment.resize_matrix(0.5, 0.5, 3)
    np.testing.assert_allclose(w, [[0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]])
    np.testing.assert_allclose(augment.resize_matrix(0.0, 1.0, 4), np.eye(4))


def _square_batch(n=16):
    rng = np.random.default_rng(0)
    x = rng.random((n, 101, 101, 1)).astype(np.float32) * 0.5
    y = np.zeros((n, 101, 101, 1), np.float32)
    y[:, 30:70, 10:40] = 1.0
    x[y > 0] = 1.0  # the salt square is bright: its pixels must move with the mask
    return x, y


def test_numpy_augmentation_moves_image_and_mask_together():
    x, y = _square_batch()
    xa, ya = augment.augment_batch_numpy(x, y, np.random.default_rng(3), zoom=0.2, p_zoom=1.0, brightness=0.0)
    assert xa.shape == x.shape and ya.shape == y.shape and xa.dtype == np.float32
    assert set(np.unique(ya).tolist()) == {0.0, 1.0}
    assert xa[ya > 0.5].mean() > 0.9 and xa[ya < 0.5].mean() < 0.6
    assert not np.array_equal(ya, y)  # zoomed (p_zoom=1) and some flipped
    np.testing.assert_array_equal(x, _square_batch()[0])  # inputs untouched


def test_numpy_flip_only_and_brightness_range():
    x, y = _square_batch(32)
    xa, ya = augment.augment_batch_numpy(x, y, np.random.default_rng(0), flip=True, zoom=0.0, brightness=0.0)
    flipped = [not np.array_equal(ya[k], y[k]) for k in range(32)]
    assert 0 < sum(flipped) < 32
    for k in range(32):
        expect = (x[k, :, ::-1], y[k, :, ::-1]) if flipped[k] else (x[k], y[k])
        np.testing.assert_array_equal(xa[k], expect[0])
        np.testing.assert_array_equal(ya[k], expect[1])
    xb, yb = augment.augment_batch_numpy(x, y, np.random.default_rng(0), flip=False, zoom=0.0, brightness=0.1)
    np.testing.assert_array_equal(yb, y)
    assert xb.min() >= 0.0 and xb.max() <= 1.0 and not np.allclose(xb, x)
    mean_shift = np.abs(xb.mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3)))
    assert mean_shift.max() <= 0.1 + 1e-5


def _batches(x, y, seed, workers=1):
    nb = augment._numpy_batches_class()(x, y, 4, True, seed, workers, flip=True, zoom=0.2, p_zoom=1.0,
                                        brightness=0.1)
    out = []
    for _ in range(2):
        out.append([nb[i] for i in range(len(nb))])
        nb.on_epoch_end()
    return nb, out


def test_numpy_batches_are_seeded_per_epoch_and_batch():
    x, y = _square_batch(10)
    nb, a = _batches(x, y, 5)
    _, b = _batches(x, y, 5)
    _, c = _batches(x, y, 6)
    assert len(nb) == 3 and [len(bx) for bx, _ in a[0]] == [4, 4, 2]
    assert_seeded_epochs(a, b, c)


def test_numpy_pipeline_resumes_at_its_initial_epoch(monkeypatch):
    """make_dataset(initial_epoch=e) off TensorFlow starts at epoch e's batches."""
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    x, y = _square_batch(10)
    aug = dict(flip=True, zoom=0.2, p_zoom=1.0, brightness=0.05)
    run = augment.make_dataset(x, y[..., 0] > 0, 4, training=True, seed=3, **aug)
    run.on_epoch_end()  # the uninterrupted run, now in epoch 1
    resumed = augment.make_dataset(x, y[..., 0] > 0, 4, training=True, seed=3, initial_epoch=1, **aug)
    for i in range(len(run)):
        np.testing.assert_array_equal(resumed[i][0], run[i][0])
        np.testing.assert_array_equal(resumed[i][1], run[i][1])
    fresh = augment.make_dataset(x, y[..., 0] > 0, 4, training=True, seed=3, **aug)
    assert not np.array_equal(fresh[0][0], resumed[0][0])


def test_make_dataset_is_numpy_pipeline_off_tensorflow(monkeypatch):
    """Under a non-TensorFlow backend make_dataset returns the PyDataset; validation data keep
    their order, unaugmented."""
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    x, y = _square_batch(10)
    ds = augment.make_dataset(x, y[..., 0] > 0, 4, training=False)
    assert isinstance(ds, keras.utils.PyDataset)
    np.testing.assert_array_equal(np.concatenate([ds[i][0] for i in range(len(ds))]), x)
    np.testing.assert_array_equal(np.concatenate([ds[i][1] for i in range(len(ds))]), y)


@pytest.mark.slow
def test_fit_on_numpy_batches_learns():
    """keras fit on the PyDataset (here under TensorFlow): the loss falls on an easy task."""
    import keras

    from saltlib.train import build_model

    x, y = _square_batch(16)
    ds = augment._numpy_batches_class()(x, y, 8, True, 0, 2, flip=True, zoom=0.1, p_zoom=0.5, brightness=0.05)
    keras.utils.set_random_seed(0)
    model = build_model({"base_filters": 4, "depth": 2, "blocks_per_level": 1, "dropout": 0.0,
                         "mixed_precision": False})
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    hist = model.fit(ds, epochs=6, verbose=0).history["loss"]
    assert hist[-1] < 0.7 * hist[0], hist


# --------------------------------------------------------------------------- the TensorFlow pipeline's transforms, one at a time
def _tf_augment(x, y, **kwargs):
    import tensorflow as tf

    xa, ya = augment.augment_batch(tf.constant(x), tf.constant(y), seed=tf.constant([3, 4], tf.int32), **kwargs)
    return xa.numpy(), ya.numpy()


def _batch(b=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.8, (b, 101, 101, 1)).astype(np.float32)
    y = (rng.random((b, 101, 101, 1)) < 0.3).astype(np.float32)
    return x, y


def test_tf_flip_only_mirrors_image_and_mask_together():
    x, y = _batch()
    xa, ya = _tf_augment(x, y, flip=True, zoom=0.0, brightness=0.0)
    flipped = [np.array_equal(xa[k], x[k, :, ::-1]) and np.array_equal(ya[k], y[k, :, ::-1]) for k in range(len(x))]
    kept = [np.array_equal(xa[k], x[k]) and np.array_equal(ya[k], y[k]) for k in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))  # each image is one or the other, mask with it
    assert any(flipped) and any(kept)  # both happen in 16 images (probability 1 - 2 / 2**16)


def test_tf_brightness_only_is_a_bounded_affine_change_of_the_image():
    """``(x - mean) * mul + mean + add`` with mul in [0.9, 1.1] and add in [-0.1, 0.1] per image, clipped to
    [0, 1]; masks untouched. Recovered by a least-squares fit of each augmented image on the original."""
    x, y = _batch()
    x[0, :5] = 0.99  # some pixels near the top, so that clipping can happen
    xa, ya = _tf_augment(x, y, flip=False, zoom=0.0, brightness=0.1)
    np.testing.assert_array_equal(ya, y)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    muls = []
    for k in range(len(x)):
        inside = (xa[k] > 0) & (xa[k] < 1)
        a, c = np.polyfit(x[k][inside].astype(np.float64), xa[k][inside].astype(np.float64), 1)
        mean = x[k].mean(dtype=np.float64)
        add = c - mean * (1 - a)
        assert 0.9 - 1e-4 <= a <= 1.1 + 1e-4 and -0.1 - 1e-4 <= add <= 0.1 + 1e-4, (k, a, add)
        np.testing.assert_allclose(xa[k], np.clip((x[k] - mean) * a + mean + add, 0, 1), atol=1e-5)
        muls.append(a)
    assert np.ptp(muls) > 0.02  # the change differs from image to image
