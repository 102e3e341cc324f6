"""Nested cross-validation of the post-processing choice of a finished run.

Notebook 03 tunes the cut-off, the small-mask size and (with ``peak_gates``) the largest-logit gate
on the same out-of-fold images it scores, so its CV score is a little optimistic. This script
scores the choice honestly: for each fold, the settings are tuned on the other folds' out-of-fold
predictions and applied to this fold. It prints the nested score with and without the gate::

    python tools/nested_cv.py papermill_runs/resunet16-eh
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saltlib import data, metric, params, predict, train  # noqa: E402

def load_oof(run_dir, tta: bool = True):
    """``(masks, logits, fold of each image)`` of every fold of the run, from its ``oof.npz`` files."""
    cfg = params.load(Path(run_dir) / "params.yaml")
    ds = data.load_train(cfg["data_dir"] or None, limit=cfg["limit"] or None)
    oof = train.load_oof(Path(run_dir) / "models", ds, data.kfold(ds, cfg["n_folds"], cfg["seed"]), cfg["folds"])
    return ds.masks[oof["idx"]], oof["logits_tta" if tta else "logits"], oof["fold"], cfg


def tune(truth, logits, min_sizes, gates):
    """Best ``(score, threshold, min_size, gate)`` over the grid (gate None: no gate)."""
    r = metric.sweep_thresholds(truth, logits, metric.LOGIT_THRESHOLDS, min_sizes, gates)
    return r["score"], r["threshold"], r["min_size"], r["peak_gate"]


def nested(truth, logits, fold_of, min_sizes, gates):
    """Per-image scores, each fold's settings tuned on the other folds; and the settings."""
    scores, chosen = np.zeros(len(truth)), {}
    for f in np.unique(fold_of):
        train, test = fold_of != f, fold_of == f
        _, t, m, g = tune(truth[train], logits[train], min_sizes, gates)
        scores[test] = metric.image_scores(truth[test], predict.postprocess(logits[test], t, m, g))
        chosen[int(f)] = (t, m, g)
    return scores, chosen


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--no-tta", action="store_true", help="score the plain logits instead of flip TTA")
    args = ap.parse_args(argv)
    truth, logits, fold_of, cfg = load_oof(args.run_dir, tta=not args.no_tta)
    gates = cfg["peak_gates"] or [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    print(f"{len(truth)} out-of-fold images, folds {cfg['folds']}, TTA {not args.no_tta}")
    for label, g in (("cut-off + min size", []), ("cut-off + min size + peak gate", gates)):
        scores, chosen = nested(truth, logits, fold_of, cfg["min_sizes"], g)
        per_fold = ", ".join(f"{f}: {scores[fold_of == f].mean():.4f} {chosen[f]}" for f in chosen)
        print(f"{label}: nested CV {scores.mean():.4f}  (per fold, with the settings tuned on the others: {per_fold})")


if __name__ == "__main__":
    main()
