"""Re-score a shipped bundle on the folds its models held out, from the committed files alone.

A bundle (``models/<name>/``) holds one model per fold (plus any snapshots) and the post-processing
chosen in notebook 03. Each fold's model never trained on that fold's images, so predicting them
again with the *committed* model files (bfloat16 weights, as shipped) checks the model card's CV
score without the run folder that made it. It prints three scores on those images:

- as shipped: each fold's images through its own model(s) with the bundle's TTA, cut-off, size and gate;
- untuned: logit 0, no TTA, no size filter;
- nested: the post-processing chosen on the other folds only (:func:`saltlib.evaluate.nested`; a
  one-fold bundle is split into five parts), over the bundle's ``params.yaml`` grid (``min_sizes``,
  ``peak_gates``).

::

    python tools/bundle_cv.py models/resunet16-eh [--data-dir ../shared/data/tgs-salt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saltlib import data, evaluate, metric, params, predict, train  # noqa: E402


def fold_members(bundle: predict.Bundle, snapshots) -> dict:
    """``{fold: [model index, ...]}``: the bundle's models in the order notebook 03 wrote them
    (each bundled fold's final model, then its snapshots).

    Raises:
        ValueError: the bundle does not record its folds, or its model count does not match them.
    """
    folds = bundle.meta.get("folds")
    if not folds:
        raise ValueError(f"{bundle.path}: bundle.json has no meta.folds, so its models cannot be matched to folds")
    per_fold = 1 + len(set(snapshots))
    if len(bundle.models) != per_fold * len(folds):
        raise ValueError(f"{bundle.path}: {len(bundle.models)} model(s) for folds {folds} with {per_fold} member(s) "
                         "each (the final model and the snapshots of params.yaml) do not match")
    return {int(f): list(range(k * per_fold, (k + 1) * per_fold)) for k, f in enumerate(folds)}


def oof_logits(bundle: predict.Bundle, ds, fold_of, members: dict, batch_size: int = 64) -> dict:
    """Each bundled fold's held-out images through that fold's models: ``idx``, ``fold``, ``plain``
    and ``flip TTA`` logits (mean over the fold's members), concatenated in fold order."""
    out = {"idx": [], "fold": [], "plain": [], "flip TTA": []}
    for f, ks in members.items():
        idx = np.flatnonzero(fold_of == f)
        x = ds.images[idx]
        for label, tta in (("plain", False), ("flip TTA", True)):
            out[label].append(np.mean([train.predict_logits(bundle.models[k], x, batch_size, tta=tta) for k in ks],
                                      axis=0))
        out["idx"].append(idx)
        out["fold"].append(np.full(len(idx), f))
    return {k: np.concatenate(v) for k, v in out.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="a bundle folder with bundle.json and params.yaml (as `salt ship` writes it)")
    ap.add_argument("--data-dir", default=None, help="the labelled data (default: as `salt run` finds it)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    t0 = time.time()
    bundle = predict.load_bundle(args.bundle)
    cfg = params.load(Path(args.bundle) / "params.yaml")
    members = fold_members(bundle, cfg["snapshots"])
    meta = bundle.meta
    ds = data.load_train(args.data_dir, limit=meta.get("limit") or None)
    fold_of = data.kfold(ds, meta["n_folds"], meta["seed"])
    oof = oof_logits(bundle, ds, fold_of, members, args.batch_size)
    truth, fold_col = ds.masks[oof["idx"]], oof["fold"]
    shipped = oof["flip TTA" if bundle.tta else "plain"]
    pred = predict.postprocess(shipped, bundle.threshold, bundle.min_size, bundle.peak_gate)
    scores = metric.image_scores(truth, pred)
    result = {
        "n_images": len(truth),
        "shipped": float(scores.mean()),
        "per_fold": {f: float(scores[fold_col == f].mean()) for f in members},
        "untuned": metric.competition_score(truth, oof["plain"] > 0),
        "card": meta.get("cv_score"),
        "nested": None,
    }
    print(f"{bundle.describe()}; {len(truth)} held-out images of folds {list(members)} ({ds.root})")
    print(f"as shipped: CV {result['shipped']:.4f} (per fold "
          + ", ".join(f"{f}: {s:.4f}" for f, s in result["per_fold"].items())
          + (f"; bundle.json records {result['card']:.4f})" if result["card"] is not None else ")"))
    print(f"untuned (logit 0, no TTA, no size filter): {result['untuned']:.4f}")
    groups, over = evaluate.nesting_groups(fold_col, data.coverage_class(truth), meta["seed"])
    candidates = {"plain": oof["plain"], "flip TTA": oof["flip TTA"]}
    nested, chosen = evaluate.nested(truth, candidates, groups, metric.LOGIT_THRESHOLDS, cfg["min_sizes"],
                                     cfg["peak_gates"])
    result["nested"] = float(nested.mean())
    print(f"nested over {over} (post-processing chosen on the others): {result['nested']:.4f}")
    for f, c in chosen.items():
        gate = "" if c["peak_gate"] is None else f", gate {c['peak_gate']:+.1f}"
        print(f"  group {f}: {nested[groups == f].mean():.4f} with {c['label']}, cut-off {c['threshold']:+.2f}, "
              f"min size {c['min_size']}{gate}")
    print(f"{time.time() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
