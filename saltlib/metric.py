"""The TGS competition metric, in vectorized numpy.

Per image: IoU between the true and predicted salt masks, then the mean over the thresholds
0.50, 0.55, ..., 0.95 of ``[IoU > t]``. An image whose truth and prediction are both empty scores
1; an image with exactly one of them empty scores 0. The data-set score is the mean over images.
"""

from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.arange(0.5, 1.0, 0.05)


#: the cut-offs notebook 03 and tools/nested_cv.py try, in logit units (0 is probability 0.5)
LOGIT_THRESHOLDS = np.round(np.linspace(-4, 4, 81), 2)


def _as_masks(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (N,H,W) or (N,H,W,1), got {a.shape}")
    return a.astype(bool, copy=False) if a.dtype == bool else a > 0


def ious_from_counts(intersection, truth_area, pred_area) -> np.ndarray:
    """Per-image IoU from pixel counts (any matching shapes); 1 where truth and prediction are both empty.

    Args:
        intersection: pixels that are salt in both truth and prediction.
        truth_area, pred_area: salt pixels in the truth and in the prediction.
    Returns:
        float64 IoUs in [0, 1] with the same shape.
    """
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(truth_area, dtype=np.float64) + pred_area - intersection
    return np.divide(intersection, union, out=np.ones_like(union), where=union > 0)


def scores_from_counts(intersection, truth_area, pred_area) -> np.ndarray:
    """Per-image scores from pixel counts (any matching shapes).

    Args:
        intersection: pixels that are salt in both truth and prediction.
        truth_area, pred_area: salt pixels in the truth and in the prediction.
    Returns:
        float64 scores in [0, 1] with the same shape.
    """
    iou = ious_from_counts(intersection, truth_area, pred_area)
    return (iou[..., None] > IOU_THRESHOLDS + 1e-12).mean(axis=-1)


def image_scores(truth, pred) -> np.ndarray:
    """Competition score of each image.

    Args:
        truth, pred: ``(N,H,W)`` or ``(N,H,W,1)`` masks, bool or 0/1 (salt where > 0).
    Returns:
        ``(N,)`` float64 scores in [0, 1].
    """
    return scores_from_counts(*pixel_counts(truth, pred))


def pixel_counts(truth, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Salt pixels per image: ``(intersection, truth_area, pred_area)``, each ``(N,)`` int.

    What :func:`scores_from_counts` and :func:`ious_from_counts` take, read from the masks once.

    Args:
        truth, pred: ``(N,H,W)`` or ``(N,H,W,1)`` masks, bool or 0/1 (salt where > 0).
    """
    t = _as_masks(truth, "truth")
    p = _as_masks(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} != pred shape {p.shape}")
    return np.logical_and(t, p).sum(axis=(1, 2)), t.sum(axis=(1, 2)), p.sum(axis=(1, 2))


def competition_score(truth, pred) -> float:
    """Mean of :func:`image_scores` over images: the Kaggle leaderboard number."""
    return float(image_scores(truth, pred).mean())


def threshold_counts(truth, values, thresholds):
    """Pixel counts for the masks ``values > t`` at every cut-off ``t``, in one pass.

    Args:
        truth: ``(N,H,W)`` or ``(N,H,W,1)`` masks, or one ``(H,W)`` mask (N = 1).
        values: probabilities or logits, same shape as ``truth``.
        thresholds: ``(T,)`` cut-offs (any order).
    Returns:
        ``(intersection, truth_area, pred_area)``: arrays of shape ``(N, T)``, ``(N, 1)``, ``(N, T)``.
    Raises:
        ValueError: shapes differ, or ``values`` hold NaN or infinity (named by image index).
    """
    t = _as_masks(truth, "truth")
    t = t.reshape(len(t), -1)  # a single (H,W) mask is one image, as in image_scores
    v = np.asarray(values)
    if v.ndim == 4 and v.shape[-1] == 1:
        v = v[..., 0]
    if v.ndim == 2:
        v = v[None]
    v = v.reshape(len(v), -1)
    if v.shape != t.shape:
        raise ValueError(f"values shape {v.shape} != truth shape {t.shape}")
    bad = np.flatnonzero(~np.isfinite(v).all(axis=1)) if v.dtype.kind == "f" else []
    if len(bad):  # NaN > t is False for every t: a silent "no salt", so refuse instead (and infinity)
        raise ValueError(f"values are NaN or infinite in {len(bad)} image(s), first at index {bad[0]}: "
                         "a diverged model?")
    thr = np.asarray(thresholds, dtype=np.float64)
    # in chunks of images: the temporaries stay small and are reused, which is ~3x faster on
    # thousands of masks than one pass (that spends most of its time faulting in fresh memory)
    parts = [_counts(t[i : i + _CHUNK], v[i : i + _CHUNK], thr) for i in range(0, len(t), _CHUNK)]
    if not parts:
        return _counts(t, v, thr)
    return tuple(np.concatenate(p) for p in zip(*parts))


_CHUNK = 256


def _counts(t, v, thr):
    """:func:`threshold_counts` for ``(n, P)`` bool truth and values and ``(T,)`` float64 cut-offs."""
    order = np.argsort(thr)
    n_thr = len(thr)
    # bucket k = number of sorted thresholds strictly below the value; value > thr_sorted[j] <=> k > j
    bucket = _buckets(v, thr[order])
    offset = (np.arange(len(t)) * (n_thr + 1))[:, None]
    size = len(t) * (n_thr + 1)
    all_hist = np.bincount((bucket + offset).ravel(), minlength=size).reshape(len(t), n_thr + 1)
    truth_hist = np.bincount((bucket + offset)[t], minlength=size).reshape(len(t), n_thr + 1)
    # counts of buckets > j: reverse cumulative sum, shifted by one
    pred_sorted = np.cumsum(all_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    inter_sorted = np.cumsum(truth_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n_thr)
    return inter_sorted[:, inverse], t.sum(axis=1)[:, None], pred_sorted[:, inverse]


def _buckets(values, sorted_thr):
    """Number of ``sorted_thr`` entries strictly below each value (``searchsorted(side="left")``).

    Evenly spaced cut-offs (the usual sweep) take an arithmetic fast path, corrected exactly at the
    edges; other cut-offs use ``np.searchsorted``.
    """
    n = len(sorted_thr)
    step = np.diff(sorted_thr)
    if n < 3 or not np.allclose(step, step[0], rtol=1e-9, atol=0) or step[0] <= 0:
        return np.searchsorted(sorted_thr, values, side="left").astype(np.int64)
    thr = sorted_thr  # float64: comparisons below are exact, as in ``values > t``
    k = np.ceil((values - thr[0]) * (1.0 / step[0]))
    np.clip(k, 0, n, out=k)
    k = k.astype(np.int64)
    # exact correction: k counts thresholds < value
    up = np.concatenate([thr, [np.inf]])[k]
    k += values > up
    down = np.concatenate([[-np.inf], thr])[k]
    k -= values <= down
    return k


def sweep_thresholds(truth, values, thresholds=None, min_sizes=(0,), peak_gates=()):
    """Score every cut-off (and optionally every small-mask size and peak gate) and pick the best.

    A prediction ``values > t`` whose area is below ``min_size`` pixels is emptied, and so is every
    prediction of an image whose largest value is at most the peak gate ``g``.

    Args:
        truth: ``(N,H,W)`` masks.
        values: probabilities in [0, 1] or logits, same shape.
        thresholds: cut-offs to try; default 50 points spanning the range of ``values``
            (0.02..0.98 for probabilities, -4..4 for logits).
        min_sizes: small-mask sizes (pixels) to try.
        peak_gates: peak gates to try besides none (a gate is kept only where it scores higher).
    Returns:
        dict with ``threshold``, ``min_size``, ``peak_gate`` (None: no gate), ``score`` (the best),
        and ``table``: an array of shape ``(len(min_sizes), len(thresholds))`` of scores at the
        chosen gate, plus the tried ``thresholds`` and ``min_sizes``.
    """
    v = np.asarray(values)
    if thresholds is None:
        if v.min() >= 0 and v.max() <= 1:
            thresholds = np.linspace(0.02, 0.98, 50)
        else:
            thresholds = np.linspace(-4, 4, 50)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    inter, truth_area, pred_area = threshold_counts(truth, v, thresholds)
    peak = v.reshape(len(v), -1).max(axis=1) if len(v) else np.zeros(0)
    best_table, best_gate = None, None
    for gate in [None, *peak_gates]:
        shown = np.ones((len(v), 1), bool) if gate is None else (peak > gate)[:, None]
        table = np.empty((len(min_sizes), len(thresholds)))
        for i, m in enumerate(min_sizes):
            keep = shown & (pred_area >= m) if m else np.broadcast_to(shown, pred_area.shape)
            table[i] = scores_from_counts(inter * keep, truth_area, pred_area * keep).mean(axis=0)
        if best_table is None or table.max() > best_table.max():
            best_table, best_gate = table, None if gate is None else float(gate)
    i, j = np.unravel_index(np.argmax(best_table), best_table.shape)
    return {
        "threshold": float(thresholds[j]),
        "min_size": int(min_sizes[i]),
        "peak_gate": best_gate,
        "score": float(best_table[i, j]),
        "table": best_table,
        "thresholds": thresholds,
        "min_sizes": np.asarray(min_sizes),
    }
