"""Nested cross-validation of the post-processing choice of a finished run.

Notebook 03 tunes flip TTA or not, the cut-off, the small-mask size and (with ``peak_gates``) the
largest-logit gate on the same out-of-fold images it scores, so its CV score is a little optimistic.
It also records the nested score (``cv_score_nested`` in ``metrics.json``), with the run's
``peak_gates``. This script prints that score with and without a gate, for runs of any age: for each
fold, every setting is chosen on the other folds' out-of-fold predictions and applied to this fold
(:func:`saltlib.evaluate.nested`; a one-fold run is split into five parts instead)::

    python tools/nested_cv.py papermill_runs/resunet16-sehc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saltlib import data, evaluate, metric, params, train  # noqa: E402

#: gates tried on the second line when the run's parameter file tried none (its notebook 03 then tried
#: none, so its ``cv_score_nested`` is the first line's figure)
DEFAULT_GATES = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]


def load_oof(run_dir):
    """``(masks, {"plain": logits, "flip TTA": logits}, fold of each image, params)`` of every fold of
    the run, from its ``oof.npz`` files."""
    cfg = params.load(Path(run_dir) / "params.yaml")
    ds = data.load_train(cfg["data_dir"] or None, limit=cfg["limit"] or None)
    oof = train.load_oof(Path(run_dir) / "models", ds, data.kfold(ds, cfg["n_folds"], cfg["seed"]), cfg["folds"])
    return ds.masks[oof["idx"]], {"plain": oof["logits"], "flip TTA": oof["logits_tta"]}, oof["fold"], cfg


def _setting(c: dict) -> str:
    gate = "" if c["peak_gate"] is None else f", gate {c['peak_gate']:+.1f}"
    return f"{c['label']}, cut-off {c['threshold']:+.2f}, min size {c['min_size']}{gate}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--no-tta", action="store_true", help="choose among the plain logits only (no flip TTA)")
    args = ap.parse_args(argv)
    truth, candidates, fold_of, cfg = load_oof(args.run_dir)
    if args.no_tta:
        del candidates["flip TTA"]
    gates = cfg["peak_gates"] or DEFAULT_GATES
    groups, over = evaluate.nesting_groups(fold_of, data.coverage_class(truth), cfg["seed"])
    print(f"{len(truth)} out-of-fold images, folds {cfg['folds']}, nested over {over}, "
          f"choosing among: {', '.join(candidates)}")
    for label, g in (("TTA or not + cut-off + min size", []), ("TTA or not + cut-off + min size + peak gate", gates)):
        scores, chosen = evaluate.nested(truth, candidates, groups, metric.LOGIT_THRESHOLDS, cfg["min_sizes"], g)
        print(f"{label}: nested CV {scores.mean():.4f}")
        for f, c in chosen.items():
            print(f"  group {f}: {scores[groups == f].mean():.4f} with {_setting(c)} (chosen on the others)")


if __name__ == "__main__":
    main()
