"""Segmentation losses on logits, written with ``keras.ops`` (any Keras backend).

All functions take ``y_true`` of shape ``(B, H, W)`` or ``(B, H, W, 1)`` with values in {0, 1}
and ``y_pred`` *logits* (unbounded real numbers, not probabilities) of the same shape, and return a
per-image loss of shape ``(B,)``; Keras averages it over the batch.

The Lovász hinge (Berman, Rannen Triki and Blaschko, "The Lovász-Softmax loss: a tractable surrogate
for the optimization of the intersection-over-union measure in neural networks", CVPR 2018) is a
convex surrogate of the Jaccard (IoU) loss, computed here per image and then averaged, which is the
variant that tracks the per-image competition metric.
"""

from __future__ import annotations

import math

from keras import ops


def _flatten(y_true, y_pred):
    y_pred = ops.cast(y_pred, "float32")
    b = ops.shape(y_pred)[0]
    return ops.reshape(ops.cast(y_true, "float32"), (b, -1)), ops.reshape(y_pred, (b, -1))


def lovasz_grad(gt_sorted):
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors.

    Args:
        gt_sorted: ``(B, P)`` ground truth in {0, 1}, sorted by decreasing error.
    Returns:
        ``(B, P)`` float weights in [0, 1]; each row sums to 1 (the differences telescope to the
        Jaccard loss of getting every pixel wrong). For an empty mask the first element is 1 and
        the rest 0.
    """
    gts = ops.sum(gt_sorted, axis=1, keepdims=True)
    intersection = gts - ops.cumsum(gt_sorted, axis=1)
    union = gts + ops.cumsum(1.0 - gt_sorted, axis=1)  # >= 1 everywhere, never divides by 0
    jaccard = 1.0 - intersection / union
    return ops.concatenate([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=1)


def lovasz_hinge(y_true, y_pred):
    """Binary Lovász hinge per image.

    Args:
        y_true: ``(B, H, W[, 1])`` masks in {0, 1}.
        y_pred: logits, same shape.
    Returns:
        ``(B,)`` losses >= 0. For an empty mask the loss is ``relu(1 + max logit)``: it pushes the
        most confident false positive below -1, which is the behaviour of the reference code.
    """
    labels, logits = _flatten(y_true, y_pred)
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    n = ops.shape(errors)[1]
    errors_sorted, perm = ops.top_k(errors, k=n, sorted=True)
    gt_sorted = ops.take_along_axis(labels, perm, axis=1)
    grad = ops.stop_gradient(lovasz_grad(gt_sorted))
    return ops.sum(ops.relu(errors_sorted) * grad, axis=1)


def symmetric_lovasz(y_true, y_pred):
    """Mean of the Lovász hinge on (mask, logits) and on (1 - mask, -logits): ``(B,)``.

    Treats salt and background alike, so an empty mask is scored by the IoU of its background.
    """
    y_true = ops.cast(y_true, "float32")
    return 0.5 * (lovasz_hinge(y_true, y_pred) + lovasz_hinge(1.0 - y_true, -ops.cast(y_pred, "float32")))


def _bce_elementwise(labels, logits):
    """Binary cross-entropy of each logit against its label, in the stable form
    ``max(x, 0) - x * z + log(1 + exp(-|x|))``."""
    return ops.relu(logits) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))


def bce(y_true, y_pred):
    """Binary cross-entropy on logits, averaged over the pixels of each image: ``(B,)``."""
    labels, logits = _flatten(y_true, y_pred)
    return ops.mean(_bce_elementwise(labels, logits), axis=1)


def soft_dice(y_true, y_pred, smooth: float = 1.0):
    """1 - soft Dice of ``sigmoid(logits)`` per image: ``(B,)``; 0 for empty/empty."""
    labels, logits = _flatten(y_true, y_pred)
    p = ops.sigmoid(logits)
    inter = ops.sum(p * labels, axis=1)
    return 1.0 - (2.0 * inter + smooth) / (ops.sum(p, axis=1) + ops.sum(labels, axis=1) + smooth)


def with_empty_head(loss, seg_weight: float = 0.5, image_weight: float = 0.1):
    """The training loss of a model built with ``empty_head`` and ``aux_outputs``.

    Deep supervision as in the top TGS solutions: the fused logits take ``loss`` on every image;
    the decoder-only logits take ``loss`` on images with salt only (an empty mask gives them no
    shape to learn); the image logit takes the binary cross-entropy of "salt present".

    Args:
        loss: a per-image loss ``(y_true, logits) -> (B,)`` such as :func:`lovasz_hinge`.
        seg_weight: weight of the decoder-only term.
        image_weight: weight of the image term.
    Returns:
        ``fn(y_true, y_pred) -> (B,)`` with ``y_true`` ``(B, H, W, 1)`` masks in {0, 1} and
        ``y_pred`` ``(B, H, W, 3)`` logits: fused, decoder-only, image logit (repeated per pixel).
    """

    def head_loss(y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        b = ops.shape(y_true)[0]
        has_salt = ops.cast(ops.max(ops.reshape(y_true, (b, -1)), axis=1) > 0, "float32")
        return (
            loss(y_true, y_pred[..., 0:1])
            + seg_weight * has_salt * loss(y_true, y_pred[..., 1:2])
            + image_weight * _bce_elementwise(has_salt, y_pred[:, 0, 0, 2])
        )

    head_loss.__name__ = f"{getattr(loss, '__name__', 'loss')}_with_empty_head"
    return head_loss


LOSSES = {
    "bce": bce,
    "lovasz": lovasz_hinge,
    "symmetric_lovasz": symmetric_lovasz,
    "dice": soft_dice,
}


def get_loss(spec: str):
    """A loss function from a name such as ``"bce"``, ``"lovasz"``, ``"bce+lovasz"`` or ``"0.5*bce+lovasz"``.

    Args:
        spec: ``+``-separated terms, each ``name`` or ``weight*name``; names from :data:`LOSSES`.
    Returns:
        ``loss(y_true, y_pred) -> (B,)``, the weighted sum, named after ``spec``.
    Raises:
        ValueError: for an unknown name or a bad weight, naming it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss must be a non-empty string like 'bce+lovasz', got {spec!r}")
    terms = []
    for term in spec.replace(" ", "").split("+"):
        weight, star, name = term.rpartition("*")
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; choose from {sorted(LOSSES)}")
        try:
            w = float(weight) if star else 1.0
        except ValueError:
            w = float("nan")
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"bad loss weight {weight!r} in {spec!r}: need a finite number >= 0") from None
        terms.append((w, LOSSES[name]))

    def loss(y_true, y_pred):
        total = 0.0
        for w, fn in terms:
            total = total + w * fn(y_true, y_pred)
        return total

    loss.__name__ = spec.replace("*", "x").replace("+", "_plus_")
    return loss
