"""Fine-tune a shipped fold model, with or without pseudo-labelled test images.

Two steps, each fold on its own::

    # 1. label the unlabelled test images with fold K's model of a bundle (flip TTA and the
    #    bundle's cut-off and min size), keeping only the confident images (see select())
    python tools/pseudo_label.py label --bundle models/resunet16-sehc --fold 0 --out work_runs/pl/labels0.npz
    # 2. fine-tune that model on fold K's training images plus the labelled test images
    #    (leave --labels out for the control: the same fine-tuning without them)
    python tools/pseudo_label.py train --bundle models/resunet16-sehc --fold 0 --params params/finetune.yaml \\
        --labels work_runs/pl/labels0.npz --out work_runs/pl/pl

Leakage: fold K's validation images must not reach its training in any form. The test images are
not in the training set, and their labels come from fold K's own model, which never saw fold K's
validation images; a bundle's ensemble would leak them (fold J's model trained on fold K's images).
So each fold is labelled by its own model, and the pseudo-labelled images are given fold -1 (always
trained on, never validated on). ``finetune.json`` in the fold folder records the command and the
labels (a resume with other labels is refused); ``salt ship`` puts both in the model card. The
fine-tuned fold is scored on its validation images like any fold (``oof.npz``, ``done.json``);
training resumes like ``salt train`` (``saltlib.train.train_fold``).

Measured on fold 0 (2026-11-28, README experiments table): neither one more restart nor the
pseudo-labels of the 1,000 test images beat the shipped model they started from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def select(logits, masks, uncertain: float = 1.0, max_relative: float = 0.1, salt_only: bool = False) -> np.ndarray:
    """Which predictions are confident enough to train on.

    A pixel is uncertain where ``|logit| < uncertain``. A predicted-empty image is kept when no
    pixel is uncertain; an image with predicted salt when its uncertain pixels number at most
    ``max_relative`` times its salt area (the outline of a large body is always a little uncertain).
    On the shipped bundle's out-of-fold images (folds 0 and 1, 1,360 images) these rules keep 42% of
    the predicted-empty images (scoring 0.89-0.91: about one in ten has salt) and 26% of the others
    (scoring 0.97).

    Args:
        logits: ``(N, H, W)`` logits (flip TTA applied).
        masks: ``(N, H, W)`` bool post-processed masks made from ``logits``.
        uncertain: the logit band counted as uncertain (> 0).
        max_relative: the largest ratio of uncertain pixels to salt pixels kept (>= 0).
        salt_only: keep no predicted-empty image. (On fold 0 neither choice helped: README,
            experiments.)
    Returns:
        ``(N,)`` bool.
    """
    if uncertain <= 0 or max_relative < 0:
        raise ValueError(f"uncertain must be > 0 and max_relative >= 0, got {uncertain}, {max_relative}")
    n_uncertain = (np.abs(logits) < uncertain).sum(axis=(1, 2))
    area = masks.sum(axis=(1, 2))
    return np.where(area == 0, (n_uncertain == 0) & (not salt_only), n_uncertain <= max_relative * area)


def with_labels(ds, split, labels):
    """The training set with pseudo-labelled images appended, each in fold -1 (trained on by every
    fold, validated on by none).

    Args:
        ds: a :class:`saltlib.data.SaltDataset` with masks.
        split: ``(N,)`` fold of each image of ``ds``.
        labels: a mapping with ``ids``, ``images`` and ``masks`` (the ``label`` step's file).
    Returns:
        ``(dataset, split)`` with the labelled images last.
    """
    from saltlib import data

    n = len(labels["ids"])
    joined = data.SaltDataset(
        np.concatenate([ds.ids, labels["ids"]]), np.concatenate([ds.images, labels["images"]]),
        np.concatenate([ds.masks, np.asarray(labels["masks"], bool)]),
        np.concatenate([ds.depths, np.full(n, np.nan, np.float32)]), ds.root,
    )
    return joined, np.concatenate([split, np.full(n, -1)])


def _member(bundle_dir, fold: int):
    """``(bundle.json's dict, index of fold's own final model)``; refuses a bundle whose models
    cannot be told apart by fold (snapshots and no ``meta.members``)."""
    from saltlib import evaluate, predict

    spec = predict.read_bundle_spec(bundle_dir)
    try:
        members, _ = evaluate.fold_members(spec["meta"], len(spec["models"]), (), bundle_dir)
    except ValueError as e:
        raise SystemExit(f"{e}: which model is fold {fold}'s is unknown") from None
    if fold not in members:
        raise SystemExit(f"{bundle_dir}: no model of fold {fold} (its folds: {sorted(members)})")
    return spec, members[fold][0]


def label(args) -> None:
    from saltlib import data, io, predict

    spec, k = _member(args.bundle, args.fold)
    test = data.load_test(args.data_dir, images_dir=args.images)
    bundle = predict.load_bundle(args.bundle, members=[k])
    logits = bundle.predict_logits(test.images, tta=True)
    masks = predict.postprocess(logits, bundle.threshold, bundle.min_size, bundle.peak_gate)
    keep = select(logits, masks, args.uncertain, args.max_relative, args.salt_only)
    empty = ~masks.any(axis=(1, 2))
    model_file = Path(args.bundle) / spec["models"][k]
    with io.atomic_path(args.out) as tmp:
        np.savez_compressed(tmp, ids=test.ids[keep], images=test.images[keep], masks=masks[keep],
                            source=str(model_file), sha256=predict._sha256(model_file))
    print(f"{args.out}: {keep.sum()} of {len(keep)} test images kept ({(keep & empty).sum()} of {empty.sum()} "
          f"predicted empty, {(keep & ~empty).sum()} of {(~empty).sum()} with salt), labelled by "
          f"{spec['models'][k]} of {args.bundle}")


def train(args) -> None:
    from saltlib import data, evaluate, io, params, predict, train as training

    spec, k = _member(args.bundle, args.fold)
    meta = spec["meta"]
    cfg = params.load(args.params, overrides=args.set)
    if (cfg["seed"], cfg["n_folds"]) != (meta["seed"], meta["n_folds"]):
        raise SystemExit(f"{args.params}: seed/n_folds {cfg['seed']}/{cfg['n_folds']} differ from the bundle's "
                         f"{meta['seed']}/{meta['n_folds']}: the fold would validate on images its model trained on")
    ds = data.load_train(args.data_dir, limit=meta.get("limit") or None)  # the images the bundle's folds split
    split = data.kfold(ds, cfg["n_folds"], cfg["seed"])
    try:
        evaluate.check_held_out(meta, ds.ids, split, [args.fold], args.bundle)
    except ValueError as e:
        raise SystemExit(f"{e}: the fold would validate on images its model trained on") from None
    if args.labels:
        z = np.load(args.labels)
        missing = {"ids", "images", "masks", "source", "sha256"} - set(z.files)
        if missing:
            raise SystemExit(f"{args.labels}: not a file of the label step (no {', '.join(sorted(missing))})")
        if str(z["sha256"]) != predict._sha256(Path(args.bundle) / spec["models"][k]):
            raise SystemExit(f"{args.labels} was labelled by {z['source']}, not by fold {args.fold}'s model "
                             f"{spec['models'][k]}: another fold's model saw this fold's validation images")
        ds, split = with_labels(ds, split, z)
        print(f"{len(z['ids'])} pseudo-labelled test images from {args.labels} join the training images")
    record = {
        "command": "python tools/pseudo_label.py train " + " ".join(
            f"--{key.replace('_', '-')} {v}" for key, v in vars(args).items() if key not in ("cmd", "set") and v is not None
        ) + "".join(f" --set '{v}'" for v in args.set
        ),
        "labels": args.labels,
        "labels_sha256": predict._sha256(args.labels) if args.labels else None,
        "n_labels": int((split < 0).sum()),
    }
    path = Path(args.out) / f"fold{args.fold}" / "finetune.json"
    if path.exists() and io.read_json(path)["labels_sha256"] != record["labels_sha256"]:
        raise SystemExit(f"{path.parent} was started with other pseudo-labels ({path}); use another --out folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        io.write_json(path, record)
    # SIGINT / SIGTERM stop at an epoch's end, after its checkpoint, as in `salt train`
    with training.stop_at_epoch_end(exit_as="pseudo_label.py train"):
        summary = training.train_fold(ds, split, args.fold, cfg, args.out,
                                      init_from=Path(args.bundle) / spec["models"][k])
    print(summary)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("label", help="pseudo-label the test images with one fold's model")
    a.add_argument("--bundle", required=True)
    a.add_argument("--fold", type=int, required=True)
    a.add_argument("--images", default=None, help="folder of PNGs (default: the data folder's test/images)")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--uncertain", type=float, default=1.0)
    a.add_argument("--max-relative", type=float, default=0.1)
    a.add_argument("--salt-only", action="store_true",
                   help="keep only images with predicted salt (about one in ten confident empty predictions has salt)")
    a.add_argument("--out", required=True)
    b = sub.add_parser("train", help="fine-tune one fold's model (with --labels: on the pseudo-labels too)")
    b.add_argument("--bundle", required=True)
    b.add_argument("--fold", type=int, required=True)
    b.add_argument("--params", required=True)
    b.add_argument("--labels", default=None)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of --params (YAML value), as salt train --set")
    b.add_argument("--data-dir", default=None)
    b.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"label": label, "train": train}[args.cmd](args)


if __name__ == "__main__":
    main()
