"""Choosing the post-processing on out-of-fold predictions, and the record of what it scores.

Notebook 03 calls these; ``metrics.json`` (written from :func:`score_record`) is what
``salt runs``, the run report and the model card (:mod:`saltlib.ship`) read, so its layout is
defined and tested here rather than in the notebook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import data, io, metric, predict, train


def choose(truth, candidates: dict, thresholds=metric.LOGIT_THRESHOLDS, min_sizes=(0,), peak_gates=()):
    """Sweep cut-off, small-mask size and peak gate for each kind of logits and pick the best.

    Args:
        truth: ``(N,H,W)`` bool masks.
        candidates: label -> ``(N,H,W)`` logits, e.g. ``{"plain": ..., "flip TTA": ...}``, cheapest
            first: a tie keeps the earlier label.
        thresholds, min_sizes, peak_gates: the grid (see :func:`saltlib.metric.sweep_thresholds`).
    Returns:
        ``(label, sweeps)``: the best label and every label's sweep result.
    """
    if not candidates:
        raise ValueError("choose needs at least one kind of logits")
    sweeps = {label: metric.sweep_thresholds(truth, v, thresholds, min_sizes, peak_gates)
              for label, v in candidates.items()}
    best = max(sweeps, key=lambda label: sweeps[label]["score"])  # max keeps the first of equals
    return best, sweeps


def nested(truth, candidates: dict, fold_of, thresholds=metric.LOGIT_THRESHOLDS, min_sizes=(0,), peak_gates=()):
    """The post-processing choice scored without optimism: each fold's images are post-processed with
    the choice :func:`choose` makes on the *other* folds' images (kind of logits, cut-off, small-mask
    size and gate), so no setting is tuned on the images it is scored on.

    Args:
        truth: ``(N,H,W)`` bool masks.
        candidates: label -> ``(N,H,W)`` logits, as for :func:`choose`.
        fold_of: ``(N,)`` the fold each image was held out in; at least two folds.
        thresholds, min_sizes, peak_gates: the grid, as for :func:`choose`.
    Returns:
        ``(scores, chosen)``: ``(N,)`` per-image scores, and for each fold (an int) the settings
        applied to it: ``{"label", "threshold", "min_size", "peak_gate"}``.
    Raises:
        ValueError: fewer than two folds (nothing to tune on).
        saltlib.predict.NonFiniteLogitsError: NaN or infinite logits (``.indices``: the images).
    """
    truth, fold_of = np.asarray(truth, bool), np.asarray(fold_of)
    folds = np.unique(fold_of)
    if len(folds) < 2:
        raise ValueError(f"nested scoring needs at least two folds, got {folds.tolist()}")
    for v in candidates.values():  # checked here, where the indices are those of the input
        predict.check_finite(v)
    scores, chosen = np.zeros(len(truth)), {}
    for f in folds:
        rest, here = fold_of != f, fold_of == f
        label, sweeps = choose(truth[rest], {k: v[rest] for k, v in candidates.items()},
                               thresholds, min_sizes, peak_gates)
        r = sweeps[label]
        pred = predict.postprocess(candidates[label][here], r["threshold"], r["min_size"], r["peak_gate"])
        scores[here] = metric.image_scores(truth[here], pred)
        chosen[int(f)] = {"label": label, "threshold": r["threshold"], "min_size": r["min_size"],
                          "peak_gate": r["peak_gate"]}
    return scores, chosen


def nesting_groups(fold_of, coverage_class, seed: int = 42, n_parts: int = 5) -> tuple[np.ndarray, str]:
    """The groups :func:`nested` tunes and scores over: the folds, or with a single fold, a
    coverage-stratified split of its images into ``n_parts`` parts (the settings for each part are
    then chosen on the fold's other images, so a one-fold run gets an honest score too).

    Args:
        fold_of: ``(N,)`` the fold each out-of-fold image was held out in.
        coverage_class: ``(N,)`` coverage class of each true mask.
        seed: seed of the split (the run's seed).
        n_parts: parts of a single fold (fewer when the fold has fewer images).
    Returns:
        ``(groups, description)``: ``(N,)`` group of each image and a few words naming them.
    """
    fold_of = np.asarray(fold_of)
    folds = np.unique(fold_of)
    if len(folds) > 1:
        return fold_of, f"the {len(folds)} folds"
    n = min(n_parts, len(fold_of))
    if n < 2:
        raise ValueError(f"nested scoring needs at least two images, got {len(fold_of)}")
    return data.kfold(np.asarray(coverage_class), n, seed), f"{n} parts of fold {int(folds[0])}"


def score_record(truth, pred, fold_of, coverage_class) -> dict:
    """Scores of out-of-fold predictions, as ``metrics.json`` records them.

    Args:
        truth: ``(N,H,W)`` bool true masks.
        pred: ``(N,H,W)`` bool predicted masks (post-processed).
        fold_of: ``(N,)`` the fold each image was held out in.
        coverage_class: ``(N,)`` coverage class of each true mask (0 empty, k up to k*10% salt).
    Returns:
        dict with ``cv_score`` (mean over images), ``per_fold`` and ``per_coverage_class``
        (``{"n", "score", "predicted_empty"}``), keyed by strings; ``empty_accuracy`` (share of
        empty images predicted empty) and ``salt_recall`` (share of images with salt predicted
        non-empty), each None when there is no such image; ``n_images``; and ``scores``, the
        per-image scores (an array, not written to JSON by the notebook).
    """
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    fold_of, coverage_class = np.asarray(fold_of), np.asarray(coverage_class)
    scores = metric.image_scores(truth, pred)
    truth_empty, pred_empty = ~truth.any(axis=(1, 2)), ~pred.any(axis=(1, 2))

    def share(sel, values):
        return float(values[sel].mean()) if sel.any() else None

    return {
        "cv_score": float(scores.mean()) if len(scores) else None,
        "per_fold": {str(int(f)): float(scores[fold_of == f].mean()) for f in np.unique(fold_of)},
        "per_coverage_class": {
            str(int(c)): {"n": int((coverage_class == c).sum()), "score": float(scores[coverage_class == c].mean()),
                          "predicted_empty": float(pred_empty[coverage_class == c].mean())}
            for c in np.unique(coverage_class)
        },
        "empty_accuracy": share(truth_empty, pred_empty),
        "salt_recall": share(~truth_empty, ~pred_empty),
        "n_images": int(len(scores)),
        "scores": scores,
    }


#: IoU bands that :func:`score_lost` splits images with salt, predicted with salt, into
IOU_BANDS = (0.5, 0.7, 0.9, 0.95)


def score_lost(truth, pred) -> list[dict]:
    """Where the score goes: each image in one kind of outcome, and how much of the score each kind loses.

    The kinds, in order: no salt and none predicted; no salt but salt predicted (a false alarm:
    each loses a whole point); salt predicted empty (a miss: a whole point); then images with salt
    predicted with salt, by the IoU of the two masks (up to 0.5 scores 0, above 0.95 scores 1). A
    perfect salt/no-salt decision alone would win back the false alarms' share, no more: the
    misses also need a mask.

    Args:
        truth: ``(N,H,W)`` true masks (bool or 0/1).
        pred: ``(N,H,W)`` predicted masks (post-processed).
    Returns:
        one row per kind, in the order above (a list, so JSON keeps the order): ``{"outcome", "n",
        "share", "lost"}``, the kind, the number of images, their share of the ``N`` images and the
        points of the data-set score they lose (the mean over all ``N`` images of ``1 - score``,
        counting this kind's images only). The ``lost`` values add up to
        ``1 - competition_score(truth, pred)``. Empty for ``N = 0``.
    """
    counts = metric.pixel_counts(truth, pred)  # one pass over the masks, read as the metric reads them
    scores, iou = metric.scores_from_counts(*counts), metric.ious_from_counts(*counts)
    n = len(scores)
    if n == 0:
        return []
    t, p = counts[1] > 0, counts[2] > 0  # salt in the truth, in the prediction
    both = t & p
    lo, *mid, hi = IOU_BANDS
    kinds = {
        "no salt, none predicted": ~t & ~p,
        "no salt, salt predicted": ~t & p,
        "salt, none predicted": t & ~p,
        f"salt, IoU <= {lo:g}": both & (iou <= lo),
    }
    for a, b in zip((lo, *mid), (*mid, hi)):
        kinds[f"salt, IoU {a:g}-{b:g}"] = both & (iou > a) & (iou <= b)
    kinds[f"salt, IoU > {hi:g}"] = both & (iou > hi)
    return [
        {"outcome": kind, "n": int(sel.sum()), "share": float(sel.mean()), "lost": float((1.0 - scores[sel]).sum() / n)}
        for kind, sel in kinds.items()
    ]


def bundle_members(models_dir, folds) -> list[Path]:
    """The model files of the given folds' ensembles, as :func:`saltlib.train.train_fold` recorded
    them in ``done.json`` (the final model and any snapshots), fold by fold.

    Raises:
        FileNotFoundError: a fold is not finished (no ``done.json``).
    """
    models_dir = Path(models_dir)
    out = []
    for f in folds:
        done = models_dir / f"fold{f}" / "done.json"
        if not done.is_file():
            raise FileNotFoundError(f"fold {f} is not trained: {done} is missing")
        out += [done.parent / m for m in io.read_json(done).get("models", ["model.keras"])]
    return out


def bundle_layout(models_dir, folds, ids, split) -> tuple[list[Path], dict]:
    """The bundle's model files (:func:`bundle_members`) and what ``bundle.json`` records about them,
    so that the bundle can be re-scored later on exactly the images its models held out
    (``tools/bundle_cv.py``).

    Args:
        models_dir: the run's model folder.
        folds: the bundled folds, in bundle order.
        ids: ``(N,)`` image ids of the data set the folds were made from.
        split: ``(N,)`` fold of each image.
    Returns:
        ``(paths, layout)``: the model files, and ``{"members": {fold: [model index, ...]},
        "val_ids_sha256": {fold: digest of the held-out ids}}`` keyed by fold strings (the digest
        of :func:`saltlib.train.split_record`).
    """
    paths, members, digests = [], {}, {}
    for f in folds:
        fold_paths = bundle_members(models_dir, [f])
        members[str(int(f))] = list(range(len(paths), len(paths) + len(fold_paths)))
        paths += fold_paths
        digests[str(int(f))] = train.split_record(ids, split, f)["val_ids_sha256"]
    return paths, {"members": members, "val_ids_sha256": digests}


def fold_members(meta: dict, n_models: int, snapshots=(), where="bundle") -> tuple[dict, str]:
    """Which of a bundle's models belong to which fold: the inverse of :func:`bundle_layout`.

    Bundles written since 2026-11-27 record the members of each fold (``meta.members``, each fold's
    final model first). For older ones the models are matched by count, in the order notebook 03
    writes them (each bundled fold's final model, then ``snapshots`` from the bundle's
    ``params.yaml``): right unless a fold was reused from a run with other snapshots. Pass no
    ``snapshots`` to accept only one model per fold when the record is missing.

    Args:
        meta: ``bundle.json``'s ``meta`` (``folds``, and ``members`` when recorded).
        n_models: how many models the bundle lists.
        snapshots: the snapshot epochs of the bundle's parameters (only their count matters).
        where: the bundle folder, for error messages.
    Returns:
        ``({fold: [model index, ...]}, how they were matched)``, folds ascending.
    Raises:
        ValueError: the bundle does not record its folds, its members do not cover its models once
            each, or (matched by count) the model count does not fit the folds.
    """
    folds = meta.get("folds")
    if not folds:
        raise ValueError(f"{where}: bundle.json has no meta.folds, so its models cannot be matched to folds")
    if "members" in meta:
        members = {int(f): [int(k) for k in ks] for f, ks in meta["members"].items()}
        if set(members) != {int(f) for f in folds} or sorted(sum(members.values(), [])) != list(range(n_models)):
            raise ValueError(f"{where}: meta.members {meta['members']} does not list each of the "
                             f"{n_models} model(s) once for folds {folds}")
        return dict(sorted(members.items())), "as bundle.json records them"
    per_fold = 1 + len(set(snapshots))
    if n_models != per_fold * len(folds):
        raise ValueError(f"{where}: {n_models} model(s) for folds {folds} with {per_fold} member(s) each (the final "
                         "model and the snapshots) do not match, and bundle.json has no meta.members to say which is which")
    members = {int(f): list(range(k * per_fold, (k + 1) * per_fold)) for k, f in enumerate(folds)}
    return dict(sorted(members.items())), "matched by count (bundle.json does not record them)"


def check_held_out(meta: dict, ids, split, folds, where="bundle") -> str:
    """Check that a recomputed split holds out, for each of ``folds``, the images that fold's models
    held out, by the digests :func:`bundle_layout` recorded in ``bundle.json``.

    Args:
        meta: ``bundle.json``'s ``meta`` (``val_ids_sha256`` when recorded).
        ids: ``(N,)`` image ids of the data set loaded now.
        split: ``(N,)`` fold of each image, recomputed (:func:`saltlib.data.kfold`).
        folds: the folds to check.
        where: the bundle folder, for error messages.
    Returns:
        a few words on what was checked.
    Raises:
        ValueError: a fold's held-out ids differ from those ``bundle.json`` records (another data
            folder or ``limit``, or a change to the split): its models may have trained on them.
    """
    recorded = meta.get("val_ids_sha256")
    if not recorded:
        return "held-out ids not recorded in bundle.json: the split is recomputed from seed and n_folds"
    for f in folds:
        if recorded.get(str(f)) != train.split_record(ids, split, f)["val_ids_sha256"]:
            raise ValueError(f"{where}: fold {f}'s held-out images differ from those bundle.json records "
                             "(other data, limit or split): its models may have trained on them")
    return "held-out ids match bundle.json"
