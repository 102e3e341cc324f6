"""Carry a fold from one machine to another through git: an unfinished one at a stage boundary.

``salt train`` keeps a fold's state in ``papermill_runs/<run>/models/fold<k>/``, which is
git-ignored: a fold that needs more than one sitting, on machines that do not keep that folder
between sittings, would start again from scratch each time. Between two stages nothing but the
weights is needed to go on (each stage starts a fresh optimizer and learning-rate schedule), so
``park`` copies what a resume reads into a small folder that can be committed::

    python tools/park_fold.py park papermill_runs/RUN/models/fold0 checkpoints/RUN

and, on the next machine, ``unpark`` puts it back as a fold folder that ``salt train`` (or
``salt run --resume``) finishes with the same parameter file::

    python tools/park_fold.py unpark checkpoints/RUN/fold0 papermill_runs/RUN/models
    salt train PARAMS --out papermill_runs/RUN/models --folds 0

What is carried: ``recipe.json`` and ``split.json`` (so the resume is checked against the same
recipe and images), ``timing.json`` and ``history.csv`` (cut to the stages carried: the training
time and learning curve go on), ``init.json`` for a fine-tuned fold, and the weights of the last
finished stage (``stage<i>.weights.h5``, float32 as training keeps them, without the optimizer state
that ``save_weights`` stores beside them and no stage reads; ``salt train`` takes the
last stage whose weights are there as the end of every stage before it). The stages still to come
see the same augmented batches as in an uninterrupted run (their data streams are seeded per
stage); only dropout's random stream differs. Earlier stages' weights go too where
``--also-stages`` names them (a recipe whose ``snapshots`` ensemble them). ``park.json`` records
each file's SHA-256, the stage reached, the training seconds so far, the git commit and the
machine; ``unpark`` checks the digests. Epochs of a stage in progress (``backup<i>/``) are not
carried by default: park after a stage ends (a fold that went on training meanwhile can be parked at its
last finished stage: ``timing.json``'s ``stage_end`` gives the training seconds when that stage's
weights were saved, and the parked copy carries those; a file written before ``stage_end`` existed,
by a process that updated it only when a stage's ``fit`` ended or was interrupted, is carried as it
is). With ``--in-progress`` the stage in progress goes too, so that a sitting that ends in the middle
of a long stage loses no epoch: its last epoch checkpoint (``backup<i>/``: the counter and the
weights file it names, *with* the optimizer state, since the stage goes on with the same Adam
moments and learning-rate step), the history rows of the epochs it holds, and ``timing.json`` as it
is (its seconds include the part of an epoch that was running when training stopped, as a resume on
the same machine counts them; stop ``salt train`` just after an epoch ends to waste nothing). The
resumed stage is then the one an uninterrupted run trains, but for dropout's random stream. Such a
park is three times the size (a 5.1M-parameter model: 62 MB instead of 21 MB). Stop ``salt train``
before parking a stage in progress: a checkpoint that changes while it is copied is refused.

A finished fold (``done.json``) that does not ship (a fold trained for a recipe's cross-validation
beyond the bundle's folds, say) is parked whole, so that its scores survive the run folder: its
model files (``done.json``'s ``models``), ``oof.npz`` (the held-out logits that notebook 03 and
``tools/nested_cv.py`` score), ``done.json`` and the records, full history and timing; no stage
weights (a 5.1M-parameter fold: 38 MB). Unparked, ``salt train`` skips it as finished. A shipped
fold needs no park: ``tools/fold_from_bundle.py`` brings it back from the bundle. Neither command
overwrites anything; each writes beside its destination and renames at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the files a resume reads besides the weights; the first two must be there
RECORDS = ("recipe.json", "split.json", "timing.json", "history.csv", "init.json")
STAGE = re.compile(r"^stage(\d+)\.weights\.h5$")
BACKUP = re.compile(r"^backup(\d+)$")


def _fold_number(path: Path) -> int:
    m = re.fullmatch(r"fold(\d+)", path.name)
    if not m:
        raise SystemExit(f"{path}: a fold folder is named fold<k> (fold0, fold1, ...)")
    return int(m[1])


def park(fold_dir, dest_root, also_stages=(), in_progress=False) -> Path:
    """Copy what resuming ``fold_dir`` needs into ``dest_root/fold<k>/`` (see the module docstring).

    Args:
        fold_dir: a fold folder ``OUT/fold<k>``: unfinished with at least one finished stage, or
            finished (``done.json``; then its model and out-of-fold logits go, see the module docstring).
        dest_root: the folder to park it in (``checkpoints/<run>``).
        also_stages: earlier stages whose weights go too: those the run's ``snapshots`` name
            (``recipe.json`` does not record them; a resume that needs one missing says so).
        in_progress: carry the stage in progress too (its ``backup<i>/`` epoch checkpoint), so the
            resume goes on from its last finished epoch; without it, from the last finished stage.
    Returns:
        the parked fold folder.
    Raises:
        SystemExit: naming the folder or file: not a fold folder, finished, no finished stage (and
            no stage in progress to carry), a missing record, an existing destination, a stage in
            progress that is not the one after the last finished stage or whose checkpoint is
            incomplete or changed while it was copied.
    """
    fold_dir = Path(fold_dir)
    fold = _fold_number(fold_dir)
    dest = Path(dest_root) / fold_dir.name
    for name in RECORDS[:2]:
        if not (fold_dir / name).is_file():
            raise SystemExit(f"{fold_dir}: no {name}; is this a fold folder that salt train started?")
    if (fold_dir / "done.json").exists():
        if in_progress or also_stages:
            raise SystemExit(f"{fold_dir}: the fold is finished (done.json); it is parked with its model and"
                             " out-of-fold logits, without --in-progress or --also-stages")
        return _park_finished(fold_dir, fold, dest)
    recipe = json.loads((fold_dir / "recipe.json").read_text())
    stages = {int(m[1]) for p in fold_dir.iterdir() if (m := STAGE.match(p.name))}
    last = max(stages, default=0)
    backups = sorted(int(m[1]) for p in fold_dir.iterdir() if p.is_dir() and (m := BACKUP.match(p.name)))
    running = None  # (stage, epochs finished, {name under the fold folder: path}) of the stage in progress carried
    if in_progress:
        if backups != [last + 1]:
            found = ", ".join(f"backup{b}" for b in backups) or "none"
            raise SystemExit(f"{fold_dir}: --in-progress carries the checkpoint of stage {last + 1} (backup{last + 1}/),"
                             f" the stage after the last finished one; found {found}")
        running = (last + 1, *_backup_files(fold_dir / f"backup{last + 1}"))
    if not stages and running is None:
        raise SystemExit(f"{fold_dir}: no stage has finished (no stage<i>.weights.h5); nothing to park yet"
                         + (f" (park the stage in progress with --in-progress)" if backups == [1] else ""))
    absent = sorted(set(also_stages) - stages)
    if absent:
        raise SystemExit(f"{fold_dir}: no stage{absent[0]}.weights.h5 (stages finished: {sorted(stages)})")
    weights = [f"stage{s}.weights.h5" for s in sorted({last, *also_stages} - {0})]
    if dest.exists():
        raise SystemExit(f"{dest} exists; park into another folder or remove it first")
    names = [n for n in RECORDS if (fold_dir / n).is_file()] + weights + (list(running[2]) if running else [])
    timing = json.loads((fold_dir / "timing.json").read_text()) if (fold_dir / "timing.json").is_file() else {}
    left = [] if running else [f"backup{b}" for b in backups]
    ends = {k: v for k, v in timing.get("stage_end", {}).items() if int(k) <= last}
    if running is not None:  # the time so far, as a resume here would count it
        if "stage_end" in timing:
            timing = {"seconds": timing["seconds"], "stage_end": ends}
    elif str(last) in ends:  # the time at the stage carried, not the one in progress
        timing = {"seconds": ends[str(last)], "stage_end": ends}
    elif timing and left:
        print(f"note: {fold_dir / 'timing.json'} has no stage_end for stage {last}; its seconds"
              f" ({timing.get('seconds')}) may include time of the stage in progress ({', '.join(left)})")
    epochs = sum(int(st["epochs"]) for st in recipe["stages"][:last]) + (running[1] if running else 0)

    import pandas as pd

    from saltlib import io
    from saltlib.predict import _sha256

    record = _record(fold_dir, fold, recipe, last, epochs, timing.get("seconds"))
    if running is not None:
        record["in_progress"] = {"stage": running[0], "epoch": running[1],
                                 "epochs": int(recipe["stages"][running[0] - 1]["epochs"])}

    try:
        with io.atomic_dir(dest, "park into another folder") as tmp:
            # the files a running salt train may rewrite: the stage weights carried and the epoch checkpoint
            sources = {n: fold_dir / n for n in weights} | (running[2] if running else {})
            before = _digests(sources)
            for n in names:
                if n in weights:
                    _copy_without_optimizer(fold_dir / n, tmp / n)
                elif n == "history.csv":  # the rows of the stages and epochs carried
                    rows = pd.read_csv(fold_dir / n)
                    keep = rows["stage"] <= last
                    if running is not None:
                        keep |= (rows["stage"] == running[0]) & (rows["epoch"] <= running[1])
                    rows[keep].to_csv(tmp / n, index=False)
                elif n == "timing.json":
                    io.write_json(tmp / n, timing)
                else:
                    (tmp / n).parent.mkdir(exist_ok=True)  # backup<i>/ of the stage in progress
                    try:
                        shutil.copy2(fold_dir / n, tmp / n)
                    except FileNotFoundError:
                        if n not in sources:
                            raise
                        # an epoch checkpoint replaced meanwhile: the check below names it
            changed = [n for n, digest in _digests(sources).items() if digest != before[n] or digest is None]
            if changed:
                raise SystemExit(f"{fold_dir}: {', '.join(changed)} changed while it was copied; stop salt train first")
            record["files"] = {n: _sha256(tmp / n) for n in names}
            io.write_json(tmp / "park.json", record)
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    size = sum((dest / n).stat().st_size for n in names) / 2**20
    where = (f"epoch {running[1]} of {record['in_progress']['epochs']} of stage {running[0]}" if running
             else f"stage {last}")
    print(f"parked fold {fold} at {where} of {record['stages']} ({epochs} of {record['epochs_total']} epochs)"
          f" in {dest} ({size:.1f} MiB)")
    if left:
        print(f"not carried: {', '.join(left)} (epochs of the stage in progress; they are trained again;"
              " --in-progress carries them)")
    return dest


def _record(fold_dir: Path, fold: int, recipe: dict, stage: int, epochs_done: int, seconds) -> dict:
    """``park.json``'s fields for a fold parked at ``stage`` (its last finished one) after
    ``epochs_done`` epochs and ``seconds`` of training; ``files`` is filled once the copies exist."""
    from saltlib import hardware, runner

    return {
        "parked_from": str(fold_dir),
        "fold": fold,
        "stage": stage,
        "stages": len(recipe["stages"]),
        "epochs_done": epochs_done,
        "epochs_total": sum(int(st["epochs"]) for st in recipe["stages"]),
        "seconds": seconds,
        "files": {},  # name -> SHA-256 of the parked copy
        "commit": runner.git_info().get("commit"),
        "machine": hardware.describe(),
        "parked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _park_finished(fold_dir: Path, fold: int, dest: Path) -> Path:
    """``park`` of a finished fold: its model files, ``oof.npz``, ``done.json`` and the records, as
    they are (see the module docstring)."""
    from saltlib import io
    from saltlib.predict import _sha256

    done = json.loads((fold_dir / "done.json").read_text())
    recipe = json.loads((fold_dir / "recipe.json").read_text())
    models = done.get("models", [])
    names = [n for n in RECORDS if (fold_dir / n).is_file()] + ["done.json", *models, "oof.npz"]
    missing = [n for n in names if not (fold_dir / n).is_file()]
    if missing:
        raise SystemExit(f"{fold_dir}: no {missing[0]} (a finished fold carries done.json's models and oof.npz)")
    if dest.exists():
        raise SystemExit(f"{dest} exists; park into another folder or remove it first")
    stages = len(recipe["stages"])
    record = _record(fold_dir, fold, recipe, stages, sum(int(st["epochs"]) for st in recipe["stages"]),
                     done.get("seconds"))
    record["finished"] = True
    try:
        with io.atomic_dir(dest, "park into another folder") as tmp:
            for n in names:
                shutil.copy2(fold_dir / n, tmp / n)
            record["files"] = {n: _sha256(tmp / n) for n in names}
            changed = [n for n, digest in _digests({n: fold_dir / n for n in names}).items()
                       if digest != record["files"][n]]
            if changed:
                raise SystemExit(f"{fold_dir}: {', '.join(changed)} changed while it was copied; park it again")
            io.write_json(tmp / "park.json", record)
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    size = sum((dest / n).stat().st_size for n in names) / 2**20
    print(f"parked finished fold {fold} ({record['epochs_total']} epochs; {', '.join(models)} and oof.npz)"
          f" in {dest} ({size:.1f} MiB)")
    return dest


def _digests(paths: dict) -> dict:
    """SHA-256 of each file of ``{name: path}``; ``None`` for one that is gone (a running
    ``salt train`` removes an epoch checkpoint's weights once the next one is written)."""
    from saltlib.predict import _sha256

    return {n: _sha256(p) if p.is_file() else None for n, p in paths.items()}


def _backup_files(folder: Path):
    """The stage in progress in ``folder`` (``backup<i>/``): ``(epochs finished, {path relative to
    the fold folder: source})`` for its counter and the weights file the counter names
    (``latest.weights.h5`` for a checkpoint of Keras' own scheme)."""
    meta_path = folder / "training_metadata.json"
    if not meta_path.is_file():
        raise SystemExit(f"{meta_path}: missing; the stage in progress has no finished epoch to carry")
    try:
        meta = json.loads(meta_path.read_text())
        epoch = int(meta["epoch"])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{meta_path}: not a checkpoint counter ({e})") from None
    if meta.get("batch"):
        raise SystemExit(f"{meta_path}: a checkpoint in the middle of an epoch (batch {meta['batch']}); "
                         "salt train checkpoints at epoch ends")
    weights = folder / (meta.get("weights") or "latest.weights.h5")
    if not weights.is_file():
        raise SystemExit(f"{weights}: missing (the counter {meta_path.name} names it)")
    return epoch, {f"{folder.name}/{meta_path.name}": meta_path, f"{folder.name}/{weights.name}": weights}


def _copy_without_optimizer(src: Path, dst: Path) -> None:
    """Copy a Keras weights file (HDF5) without its ``optimizer`` group: ``model.save_weights`` of a
    compiled model stores Adam's two moments beside the weights (a 5.1M-parameter model: 20.5 MB of
    weights, 41 MB of optimizer state), and no stage reads them, as each starts a fresh optimizer.
    Loading the copy gives the same model weights."""
    import h5py

    with h5py.File(src, "r") as s, h5py.File(dst, "w") as d:
        for key, value in s.attrs.items():
            d.attrs[key] = value
        for key in s:
            if key != "optimizer":
                s.copy(s[key], d, name=key)


def unpark(parked, out) -> Path:
    """Put a parked fold back as ``out/fold<k>/``, its files checked against ``park.json``.

    Args:
        parked: a folder ``park`` wrote (``checkpoints/<run>/fold<k>``).
        out: the run's model folder (``papermill_runs/<run>/models``).
    Returns:
        the fold folder written; ``salt train PARAMS --out OUT --folds k`` finishes it.
    Raises:
        SystemExit: naming the file: no ``park.json``, a missing or changed file, an existing fold folder.
    """
    from saltlib import io
    from saltlib.predict import _sha256

    parked = Path(parked)
    fold = _fold_number(parked)
    record_path = parked / "park.json"
    if not record_path.is_file():
        raise SystemExit(f"{parked}: no park.json; not a folder that park_fold.py park wrote")
    record = json.loads(record_path.read_text())
    for n, digest in record["files"].items():
        if not (parked / n).is_file():
            raise SystemExit(f"{parked / n}: missing (park.json lists it)")
        if _sha256(parked / n) != digest:
            raise SystemExit(f"{parked / n}: its SHA-256 differs from the one park.json records; the file changed")
    dest = Path(out) / f"fold{fold}"
    if dest.exists():
        raise SystemExit(f"{dest} exists; unpark into another run's model folder or remove it first")

    try:
        with io.atomic_dir(dest, "unpark into another run's model folder") as tmp:
            for n in record["files"]:
                (tmp / n).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(parked / n, tmp / n)
            shutil.copy2(record_path, tmp / "parked.json")
    except FileExistsError as e:
        raise SystemExit(str(e)) from None
    running = record.get("in_progress")
    if record.get("finished"):
        print(f"finished fold {fold} back in {dest} ({record['epochs_total']} epochs; done.json): its oof.npz"
              f" scores in notebook 03 and tools/nested_cv.py, and salt train skips it")
        return dest
    where = (f"after epoch {running['epoch']} of {running['epochs']} of stage {running['stage']}" if running
             else f"at the end of stage {record['stage']}")
    print(f"fold {fold} back in {dest} {where} of {record['stages']} "
          f"({record['epochs_done']} of {record['epochs_total']} epochs); salt train PARAMS --out {out} "
          f"--folds {fold} goes on")
    return dest


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("park", help="copy an unfinished fold's resume state, or a finished fold's model and out-of-fold logits, into a folder to commit")
    p.add_argument("fold_dir", help="papermill_runs/RUN/models/fold<k>")
    p.add_argument("dest", help="the folder to park it in, e.g. checkpoints/RUN (fold<k>/ is made there)")
    p.add_argument("--also-stages", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help="earlier stages whose weights go too (the run's snapshots), e.g. 2")
    p.add_argument("--in-progress", action="store_true",
                   help="carry the stage in progress too (its last epoch checkpoint, with the optimizer state)")
    u = sub.add_parser("unpark", help="put a parked fold back where salt train resumes it")
    u.add_argument("parked", help="checkpoints/RUN/fold<k>")
    u.add_argument("out", help="the run's model folder, e.g. papermill_runs/RUN/models")
    args = ap.parse_args(argv)
    if args.command == "park":
        return park(args.fold_dir, args.dest, args.also_stages, args.in_progress)
    return unpark(args.parked, args.out)


if __name__ == "__main__":
    main()
