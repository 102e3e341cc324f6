"""Batch augmentation for tf.data pipelines (TensorFlow ops; used with any Keras backend).

Geometric changes are applied identically to image and mask: a horizontal flip (seismic sections
are not symmetric top-to-bottom, so no vertical flip) and a random zoom-in crop, which is a small
scale change plus a shift. Intensity changes (brightness and contrast) touch the image only.
"""

from __future__ import annotations

import tensorflow as tf


def _uniform(shape, seed, k: int, minval=0.0, maxval=1.0):
    """Uniform random numbers: stateless from ``(seed, k)`` when a seed is given, else stateful."""
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


def make_dataset(images, masks, batch_size: int, training: bool, seed: int = 0, **aug):
    """A ``tf.data.Dataset`` of ``(image, mask)`` batches.

    Args:
        images: ``(N, H, W, 1)`` float32.
        masks: ``(N, H, W)`` or ``(N, H, W, 1)`` bool/0-1.
        batch_size: global batch size.
        training: shuffle every epoch (with ``seed``), augment with ``aug`` and drop nothing.
        seed: shuffle and augmentation seed: the same seed gives the same batches, epoch by epoch
            (augmentation draws per-batch seeds from a seeded stream and uses stateless ops, so the
            parallel ``map`` cannot reorder random numbers between batches).
        **aug: keyword arguments of :func:`augment_batch`.
    """
    masks = masks.reshape(masks.shape[:3] + (1,)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((images.astype("float32"), masks))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and aug:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: augment_batch(xy[0], xy[1], seed=s, **aug), num_parallel_calls=tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)
