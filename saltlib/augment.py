"""Batch augmentation and training input pipelines.

Two implementations of the same augmentation: TensorFlow ops in a ``tf.data`` pipeline (the
TensorFlow backend, the default), and numpy in a ``keras.utils.PyDataset`` (any other Keras backend,
for example JAX on a GPU machine with no TensorFlow installed). :func:`make_dataset` picks by backend.

Geometric changes are applied identically to image and mask: a horizontal flip (seismic sections
are not symmetric top-to-bottom, so no vertical flip) and a random zoom-in crop, which is a small
scale change plus a shift. Intensity changes (brightness and contrast) touch the image only.
"""

from __future__ import annotations

import math

import numpy as np


def _uniform(shape, seed, k: int, minval=0.0, maxval=1.0):
    """Uniform random numbers: stateless from ``(seed, k)`` when a seed is given, else stateful."""
    import tensorflow as tf

    if seed is None:
        return tf.random.uniform(shape, minval, maxval)
    return tf.random.stateless_uniform(
        shape, tf.random.experimental.stateless_fold_in(seed, k), minval, maxval
    )


def augment_batch(images, masks, flip: bool = True, zoom: float = 0.1, p_zoom: float = 0.5,
                  brightness: float = 0.1, seed=None):
    """Augment a batch.

    Args:
        images: ``(B, H, W, 1)`` float32 in [0, 1].
        masks: ``(B, H, W, 1)`` float32 in {0, 1}.
        flip: flip left-right with probability 1/2.
        zoom: largest fraction cut from the side of the crop (0 disables zoom/shift).
        p_zoom: probability that an image is zoomed.
        brightness: largest additive brightness change and relative contrast change (0 disables).
        seed: ``(2,)`` int tensor: the batch's random numbers are a function of it (stateless
            ops), so the result does not depend on thread timing; None uses stateful ops.
    Returns:
        ``(images, masks)`` with the same shapes; masks stay in {0, 1}.
    """
    import tensorflow as tf

    b = tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]
    if flip:
        do = _uniform([b, 1, 1, 1], seed, 1) < 0.5
        images = tf.where(do, tf.reverse(images, axis=[2]), images)
        masks = tf.where(do, tf.reverse(masks, axis=[2]), masks)
    if zoom > 0:
        size = 1.0 - _uniform([b], seed, 2, 0.0, zoom)
        size = tf.where(_uniform([b], seed, 3) < p_zoom, size, tf.ones([b]))
        y0 = _uniform([b], seed, 4) * (1.0 - size)
        x0 = _uniform([b], seed, 5) * (1.0 - size)
        boxes = tf.stack([y0, x0, y0 + size, x0 + size], axis=1)
        idx = tf.range(b)
        both = tf.concat([images, masks], axis=-1)
        both = tf.image.crop_and_resize(both, boxes, idx, (h, w), method="bilinear")
        images = both[..., :1]
        masks = tf.cast(both[..., 1:] > 0.5, masks.dtype)
    if brightness > 0:
        add = _uniform([b, 1, 1, 1], seed, 6, -brightness, brightness)
        mul = _uniform([b, 1, 1, 1], seed, 7, 1.0 - brightness, 1.0 + brightness)
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = tf.clip_by_value((images - mean) * mul + mean + add, 0.0, 1.0)
    return images, masks


def resize_matrix(start: float, size: float, n: int) -> np.ndarray:
    """Bilinear interpolation matrix of a crop, as ``tf.image.crop_and_resize`` samples it.

    Args:
        start: crop start, as a fraction of the side (0 = first pixel centre, 1 = last).
        size: crop length as a fraction of the side (``start + size <= 1``).
        n: side length in pixels (input and output).
    Returns:
        ``(n, n)`` float32 ``W`` with ``out = W @ image`` along that axis: output pixel ``i``
        samples position ``(start + i * size / (n - 1)) * (n - 1)``; each row sums to 1.
    """
    pos = (start + np.arange(n) * size / (n - 1)) * (n - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((n, n), np.float32)
    np.add.at(w, (np.arange(n), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n), hi), frac)
    return w


def augment_batch_numpy(images, masks, rng: np.random.Generator, flip: bool = True,
                        zoom: float = 0.1, p_zoom: float = 0.5, brightness: float = 0.1):
    """:func:`augment_batch` in numpy (same transformations and ranges).

    Args:
        images: ``(B, H, W, 1)`` float32 in [0, 1] (``H == W``).
        masks: ``(B, H, W, 1)`` float32 in {0, 1}.
        rng: the random generator that draws this batch's changes.
        flip, zoom, p_zoom, brightness: as in :func:`augment_batch`.
    Returns:
        new ``(images, masks)`` arrays with the same shapes; masks stay in {0, 1}.
    """
    images = np.array(images, np.float32)
    masks = np.array(masks, np.float32)
    b, h, w = images.shape[:3]
    if flip:
        do = rng.random(b) < 0.5
        images[do] = images[do, :, ::-1]
        masks[do] = masks[do, :, ::-1]
    if zoom > 0:
        size = np.where(rng.random(b) < p_zoom, 1.0 - rng.uniform(0.0, zoom, b), 1.0)
        y0, x0 = rng.random(b) * (1.0 - size), rng.random(b) * (1.0 - size)
        for k in np.flatnonzero(size < 1.0):
            wy, wx = resize_matrix(y0[k], size[k], h), resize_matrix(x0[k], size[k], w)
            images[k, ..., 0] = wy @ images[k, ..., 0] @ wx.T
            masks[k, ..., 0] = (wy @ masks[k, ..., 0] @ wx.T) > 0.5
    if brightness > 0:
        add = rng.uniform(-brightness, brightness, (b, 1, 1, 1)).astype(np.float32)
        mul = rng.uniform(1.0 - brightness, 1.0 + brightness, (b, 1, 1, 1)).astype(np.float32)
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        images = np.clip((images - mean) * mul + mean + add, 0.0, 1.0)
    return images, masks


def _numpy_batches_class():
    import keras

    class NumpyBatches(keras.utils.PyDataset):
        """Shuffled, augmented ``(image, mask)`` batches from numpy arrays, for any Keras backend.

        Batch ``i`` of epoch ``e`` is a function of ``(seed, e, i)`` alone (its own
        ``numpy.random.Generator``), so worker threads cannot change the random numbers.
        """

        def __init__(self, images, masks, batch_size, training, seed=0, workers=1, **aug):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=16)
            self.images, self.masks = images, masks
            self.batch_size, self.training, self.seed, self.aug = batch_size, training, seed, aug
            self.epoch = 0

        def __len__(self):
            return math.ceil(len(self.images) / self.batch_size)

        def _order(self, epoch):
            if not self.training:
                return np.arange(len(self.images))
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

        def __getitem__(self, i):
            idx = self._order(self.epoch)[i * self.batch_size:(i + 1) * self.batch_size]
            x, y = self.images[idx], self.masks[idx]
            if self.training and self.aug:
                x, y = augment_batch_numpy(x, y, np.random.default_rng([self.seed, self.epoch, i]), **self.aug)
            return x, y

        def on_epoch_end(self):
            self.epoch += 1

    return NumpyBatches


def make_dataset(images, masks, batch_size: int, training: bool, seed: int = 0, workers: int = 4,
                 initial_epoch: int = 0, **aug):
    """Training batches: a ``tf.data.Dataset`` under the TensorFlow backend, else a
    ``keras.utils.PyDataset`` with the numpy augmentation.

    Epoch ``e``'s order and augmentation are a function of ``(seed, e)`` alone, so a training run
    resumed at epoch ``e`` (``initial_epoch``) gets exactly the batches the uninterrupted run would
    have had, not epoch 0's again.

    Args:
        images: ``(N, H, W, 1)`` float32.
        masks: ``(N, H, W)`` or ``(N, H, W, 1)`` bool/0-1.
        batch_size: global batch size.
        training: shuffle every epoch (with ``seed``), augment with ``aug`` and drop nothing. Under
            TensorFlow the training dataset is endless, epoch after epoch of ``ceil(N / batch_size)``
            batches: give ``fit`` that number as ``steps_per_epoch``. Without ``training``: one
            pass in order, unaugmented.
        seed: shuffle and augmentation seed: the same seed gives the same batches, epoch by epoch
            (stateless per-epoch shuffles and per-batch augmentation seeds, so the parallel ``map``
            cannot reorder random numbers between batches).
        workers: threads of the numpy pipeline (not used by ``tf.data``).
        initial_epoch: the first epoch's number (0-based): where a resumed run starts.
        **aug: keyword arguments of :func:`augment_batch`.
    """
    import keras

    masks = masks.reshape(masks.shape[:3] + (1,)).astype("float32")
    images = images.astype("float32")
    if keras.backend.backend() != "tensorflow":
        batches = _numpy_batches_class()(images, masks, batch_size, training, seed, workers, **aug)
        batches.epoch = initial_epoch
        return batches
    import tensorflow as tf

    base = tf.data.Dataset.from_tensor_slices((images, masks))
    if not training:
        return base.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    n = len(images)

    def one_epoch(epoch):
        epoch_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch  # distinct per (seed, epoch)
        ds = base.shuffle(n, seed=epoch_seed, reshuffle_each_iteration=False).batch(batch_size)
        if aug:
            ds = ds.enumerate().map(
                lambda i, xy: augment_batch(xy[0], xy[1], seed=tf.stack([epoch_seed, i]), **aug),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return ds

    return tf.data.Dataset.counter(initial_epoch).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)
