"""Make one fold model of a shipped bundle a fold folder again, as ``salt train`` leaves it.

A run folder's ``models/fold<k>/`` goes with the run (``papermill_runs/`` is git-ignored); a bundle
keeps only the model files. To build a run from newly trained folds and a fold already shipped
(for example a new recipe's fold 0 next to the shipped fold 1, while the new recipe's fold 1
trains), this writes ``OUT/fold<k>/`` from the bundle, so that ``salt run PARAMS --name RUN
--resume`` (notebook 02 skips finished folds), notebook 03's tuning and ``salt ship`` use it::

    python tools/fold_from_bundle.py models/resunet16-sehc --fold 1 --out papermill_runs/RUN/models

What it writes:

- ``model.keras``: the bundle's file, byte for byte (SHA-256 checked);
- ``oof.npz``: the fold's held-out images predicted here by that file (plain and flip TTA, as
  :func:`saltlib.train.train_fold` saves them), so the scores are this file's own;
- ``recipe.json`` and ``split.json``: from the bundle's ``params.yaml`` and the recomputed split
  (checked against the held-out digest ``bundle.json`` records, where it has one);
- ``done.json`` and ``timing.json``: the scores here, and the training time the bundle's
  ``MODEL_CARD.md`` states for the fold (``--seconds`` where it states none), with ``restored_from``
  (the bundle, the file, its SHA-256 and the git commit checked out), which the model card of a run
  shipping it repeats.

The training history (``history.csv``) is not in a bundle and is not made up. An existing fold
folder is never overwritten; the folder is written beside its destination and renamed at the end.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the training line ``salt ship`` writes for each fold in a model card
CARD_LINE = re.compile(r"^- fold (\d+): (\d+) training images, (\d+) epochs in ([\d.]+) (h|min)\b", re.M)


def card_training(card_text: str, fold: int) -> dict | None:
    """The fold's training line of a model card: ``{"n_train", "epochs", "seconds"}`` (seconds as
    rounded there: 0.01 h or 0.1 min), or None where the card has no such line."""
    for m in CARD_LINE.finditer(card_text):
        if int(m[1]) == fold:
            return {"n_train": int(m[2]), "epochs": int(m[3]),
                    "seconds": float(m[4]) * (3600 if m[5] == "h" else 60)}
    return None


def restore(bundle_dir, fold: int, out, data_dir=None, seconds: float | None = None) -> Path:
    """Write ``out/fold<fold>/`` from ``bundle_dir``'s model of that fold (see the module docstring).

    Args:
        bundle_dir: a bundle folder as ``salt ship`` writes it (``bundle.json``, ``params.yaml``).
        fold: the fold whose model to take.
        out: the run's model folder (``papermill_runs/<run>/models``).
        data_dir: the labelled data (default: as ``salt run`` finds it).
        seconds: the fold's training time, where the bundle's card does not state it.
    Returns:
        the fold folder written.
    Raises:
        SystemExit: naming the file or value: no such fold in the bundle, more than one model for it
            (snapshots), a held-out digest that differs, no training time, an existing fold folder.
    """
    from saltlib import data, evaluate, io, params, predict, runner, train

    bundle_dir = Path(bundle_dir)
    spec = predict.read_bundle_spec(bundle_dir)
    meta = spec.get("meta") or {}
    cfg = params.load(bundle_dir / "params.yaml")
    try:
        members, matched = evaluate.fold_members(meta, len(spec["models"]), cfg["snapshots"], bundle_dir)
    except ValueError as e:
        raise SystemExit(f"{e}: which model is fold {fold}'s is unknown") from None
    if fold not in members:
        raise SystemExit(f"{bundle_dir}: no model of fold {fold} (its folds: {sorted(members)})")
    if len(members[fold]) != 1:
        raise SystemExit(f"{bundle_dir}: fold {fold} has {len(members[fold])} models (snapshots); only a fold of one "
                         "model can be restored")
    src = bundle_dir / spec["models"][members[fold][0]]
    digest = predict._sha256(src)
    if spec.get("sha256", {}).get(src.name, digest) != digest:
        raise SystemExit(f"{src}: SHA-256 {digest} differs from the one bundle.json records: the file changed")
    if seconds is None:
        card = bundle_dir / "MODEL_CARD.md"
        row = card_training(card.read_text(), fold) if card.is_file() else None
        if row is None:
            raise SystemExit(f"{card}: no training line for fold {fold}; give its training time with --seconds")
        seconds, epochs = row["seconds"], row["epochs"]
        seconds_from = f"{card.name} (rounded there)"
    else:
        epochs, seconds_from = sum(s["epochs"] for s in cfg["stages"]), "--seconds"
    dest = Path(out) / f"fold{fold}"
    if dest.exists():
        raise SystemExit(f"{dest} exists; it is not overwritten (pick another --out)")

    ds = data.load_train(data_dir, limit=meta.get("limit") or None)  # the images the bundle's folds split
    split = data.kfold(ds, meta.get("n_folds", cfg["n_folds"]), meta.get("seed", cfg["seed"]))
    try:
        checked = evaluate.check_held_out(meta, ds.ids, split, [fold], bundle_dir)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    val, n_train = np.flatnonzero(split == fold), int((split != fold).sum())

    try:
        with io.atomic_dir(dest, "pick another --out") as tmp:
            shutil.copyfile(src, tmp / "model.keras")
            scores = train.write_oof(tmp, ["model.keras"], ds.ids[val], ds.images[val], ds.masks[val])
            io.write_json(tmp / "recipe.json", train.recipe({k: cfg[k] for k in train.TRAIN_KEYS}))
            io.write_json(tmp / "split.json", train.split_record(ds.ids, split, fold))
            io.write_json(tmp / "timing.json", {"seconds": seconds})
            io.write_json(tmp / "done.json", {
                "fold": fold, "n_train": n_train, "n_val": int(len(val)), **scores, "models": ["model.keras"],
                "epochs": int(epochs), "seconds": round(float(seconds), 1),
                "train_images_per_s": round(n_train * epochs / max(seconds, 1e-9), 2),
                # the commit checked out here: the bundle can be found there should it leave models/ later
                "restored_from": {"bundle": str(bundle_dir), "model": src.name, "sha256": digest,
                                  "commit": runner.git_info().get("commit"),
                                  "seconds_from": seconds_from, "held_out": checked, "matched": matched},
            })
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    done = io.read_json(dest / "done.json")
    print(f"{dest}: {src} (fold {fold}, {len(val)} held-out images; {checked}): val_score {done['val_score']:.4f}, "
          f"with flip TTA {done['val_score_tta']:.4f}; training time {seconds / 3600:.2f} h from {seconds_from}")
    return dest


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="a bundle folder (bundle.json, params.yaml, MODEL_CARD.md)")
    ap.add_argument("--fold", type=int, required=True, help="the fold whose model to take")
    ap.add_argument("--out", required=True, help="the run's model folder; fold<k>/ is written in it")
    ap.add_argument("--data-dir", default=None, help="the labelled data (default: as `salt run` finds it)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="the fold's training time, where the bundle's MODEL_CARD.md does not state it")
    args = ap.parse_args(argv)
    return restore(args.bundle, args.fold, args.out, args.data_dir, args.seconds)


if __name__ == "__main__":
    main()
