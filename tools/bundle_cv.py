"""Re-score a shipped bundle on the folds its models held out, from the committed files alone.

A bundle (``models/<name>/``) holds one model per fold (plus any snapshots) and the post-processing
chosen in notebook 03. Each fold's model never trained on that fold's images, so predicting them
again with the *committed* model files (bfloat16 weights, as shipped) checks the model card's CV
score without the run folder that made it. It prints three scores on those images:

- as shipped: each fold's images through its own model(s) with the bundle's TTA, cut-off, size and gate;
- untuned: logit 0, no TTA, no size filter;
- nested: the post-processing chosen on the other folds only (:func:`saltlib.evaluate.nested`; a
  one-fold bundle is split into five parts), over the bundle's ``params.yaml`` grid (``min_sizes``,
  ``peak_gates``; ``--no-gates`` leaves the gates out), and without the gates as well when the grid has them.

``--write`` records the result in the bundle: ``bundle_cv.json`` and a section of ``MODEL_CARD.md``
(replaced on each rerun), so the card's check is the tool's output, not hand-written text.

Bundles written since 2026-11-27 record which models belong to which fold and a digest of the
images each fold held out; the tool checks the recomputed split against it and refuses a mismatch.

::

    python tools/bundle_cv.py models/resunet16-sehc [--data-dir ../shared/data/tgs-salt] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saltlib import data, evaluate, hardware, metric, params, predict, runner, ship, train  # noqa: E402


def oof_logits(bundle: predict.Bundle, ds, fold_of, members: dict, batch_size: int = 64) -> dict:
    """Each bundled fold's held-out images through that fold's models: ``idx``, ``fold``, ``plain``
    and ``flip TTA`` logits (mean over the fold's members; TTA as :func:`saltlib.train.predict_logits`
    does it), concatenated in fold order."""
    out = {"idx": [], "fold": [], "plain": [], "flip TTA": []}
    for f, ks in members.items():
        idx = np.flatnonzero(fold_of == f)
        x = ds.images[idx]
        plain = np.mean([train.predict_logits(bundle.models[k], x, batch_size) for k in ks], axis=0)
        flipped = np.mean([train.predict_logits(bundle.models[k], x[:, :, ::-1], batch_size)[:, :, ::-1]
                           for k in ks], axis=0)
        out["plain"].append(plain)
        out["flip TTA"].append(0.5 * (plain + flipped))
        out["idx"].append(idx)
        out["fold"].append(np.full(len(idx), f))
    return {k: np.concatenate(v) for k, v in out.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="a bundle folder with bundle.json and params.yaml (as `salt ship` writes it)")
    ap.add_argument("--data-dir", default=None, help="the labelled data (default: as `salt run` finds it)")
    ap.add_argument("--no-gates", action="store_true", help="leave the peak gates of params.yaml out of the nested grid")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--write", action="store_true",
                    help="record the result in the bundle: bundle_cv.json and a section of MODEL_CARD.md")
    args = ap.parse_args(argv)
    if args.write:
        ship.card_path(args.bundle)  # a card that cannot take the section fails now, not after the scoring
    t0, git = time.time(), runner.git_info()  # the code as it starts
    bundle = predict.load_bundle(args.bundle)
    cfg = params.load(Path(args.bundle) / "params.yaml")
    members, matched = evaluate.fold_members(bundle.meta, len(bundle.models), cfg["snapshots"], bundle.path)
    meta = bundle.meta
    ds = data.load_train(args.data_dir, limit=meta.get("limit") or None)
    fold_of = data.kfold(ds, meta["n_folds"], meta["seed"])
    checked = evaluate.check_held_out(meta, ds.ids, fold_of, members, bundle.path)
    oof = oof_logits(bundle, ds, fold_of, members, args.batch_size)
    truth, fold_col = ds.masks[oof["idx"]], oof["fold"]
    shipped = oof["flip TTA" if bundle.tta else "plain"]
    pred = predict.postprocess(shipped, bundle.threshold, bundle.min_size, bundle.peak_gate)
    scores = metric.image_scores(truth, pred)
    result = {
        "n_images": len(truth),
        "folds": list(members),
        "compute_dtype": bundle.compute_dtype,
        "matched": matched,
        "checked": checked,
        "shipped": float(scores.mean()),
        "per_fold": {f: float(scores[fold_col == f].mean()) for f in members},
        "untuned": metric.competition_score(truth, oof["plain"] > 0),
        "card": meta.get("cv_score"),
        "card_folds": [int(f) for f in meta.get("tuned_on_folds", list(members))],  # the images `card` is over
        "nested": None,
        "score_lost": evaluate.score_lost(truth, pred),
    }
    print(f"{bundle.describe()}")
    print(f"{len(truth)} held-out images of folds {list(members)} ({ds.root}); models {matched}; {checked}")
    tuned_on = result["card_folds"]
    print(f"as shipped: CV {result['shipped']:.4f} (per fold "
          + ", ".join(f"{f}: {s:.4f}" for f, s in result["per_fold"].items())
          + (f"; bundle.json records {result['card']:.4f} over folds {tuned_on}, from the training-time logits)"
             if result["card"] is not None else ")"))
    print(f"untuned (logit 0, no TTA, no size filter): {result['untuned']:.4f}")
    print("score lost as shipped: " + "; ".join(f"{row['outcome']} {row['n']} images, {row['lost']:.4f}"
                                                  for row in result["score_lost"] if row["n"]))
    groups, over = evaluate.nesting_groups(fold_col, ds.coverage_class[oof["idx"]], meta["seed"])
    gates = [] if args.no_gates else cfg["peak_gates"]
    candidates = {"plain": oof["plain"], "flip TTA": oof["flip TTA"]}
    nested, chosen = evaluate.nested(truth, candidates, groups, metric.LOGIT_THRESHOLDS, cfg["min_sizes"], gates)
    result.update(nested=float(nested.mean()), nested_over=over, nested_gates=bool(gates), nested_no_gates=None,
                  nested_choice={str(f): c for f, c in chosen.items()})
    print(f"nested over {over} (TTA or not, cut-off, size{', gate' if gates else ''} chosen on the others): "
          f"{result['nested']:.4f}")
    for f, c in chosen.items():
        gate = "" if c["peak_gate"] is None else f", gate {c['peak_gate']:+.1f}"
        print(f"  group {f}: {nested[groups == f].mean():.4f} with {c['label']}, cut-off {c['threshold']:+.2f}, "
              f"min size {c['min_size']}{gate}")
    if gates:
        plain, _ = evaluate.nested(truth, candidates, groups, metric.LOGIT_THRESHOLDS, cfg["min_sizes"], [])
        result["nested_no_gates"] = float(plain.mean())
        print(f"nested with no gate in the grid: {result['nested_no_gates']:.4f}")
    result.update(seconds=time.time() - t0, date=datetime.date.today().isoformat(),
                  commit=git.get("commit"), dirty=git.get("dirty"),
                  cpu=f"{hardware.cpu_model() or platform.machine()}, {os.cpu_count()} cores",
                  command="python tools/bundle_cv.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"{result['seconds']:.0f} s")
    if args.write:
        print(f"wrote {ship.write_check(args.bundle, result)} and bundle_cv.json")
    return result


if __name__ == "__main__":
    main()
