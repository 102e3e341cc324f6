"""Cross-validated training of several folds at once on one GPU machine with no TensorFlow.

The project trains on CPU with TensorFlow (``salt train`` / ``salt run``). Where a GPU machine is
lent for a few minutes and has JAX but not TensorFlow, this script trains the same recipe
(``saltlib.train.train_fold``, Keras on the JAX backend with the step compiled by XLA, the numpy
input pipeline) for several folds in parallel processes on the one GPU, and brings the weights
back small enough to copy. Three steps::

    # here (CPU): the training set as one compressed file
    python tools/gpu_cv.py pack --out .devdata/train.npz
    # on the GPU machine (keras carried as a wheel): every job at once, the epochs of the file;
    # workers still running at the deadline (--budget less --overhead seconds) are stopped and
    # export the last stage they finished (plan.json's "partial")
    KERAS_BACKEND=jax python tools/gpu_cv.py train --data .devdata/train.npz \\
        --params params/ship-short.yaml --jobs 2:42 3:42 4:42 --epochs 30,20,40 --budget 415 --out $OUT
    # (without --epochs: a short speed probe first, then every stage scaled down to fit --budget)
    # here: rebuild .keras models, score each on its held-out fold (TensorFlow, CPU), and write
    # fold folders that `salt run --resume` and `salt ship` take like those of `salt train`
    python tools/gpu_cv.py unpack --data-dir ../shared/data/tgs-salt --params params/ship-short.yaml \\
        --weights DIR --out work_runs/gpu --hardware "1 NVIDIA H200 GPU, Keras 3.15.1 on JAX 0.11.2"

A job ``FOLD:SEED`` trains fold ``FOLD`` of the split made with the parameter file's ``seed``,
initialised and shuffled with ``SEED`` (so ``0:7`` is a second model of fold 0, for measuring
what an ensemble adds). The fold split never depends on the job seed. ``probe`` prints the
training speed of the model on random data with and without XLA.

Measured on one H200 (2026-11-26): three folds of ``params/ship-short.yaml`` (90 epochs each)
trained at once in 287 s, ~850 images/s per fold, validation included. Two folds of
``params/gpu-upscale2.yaml`` (202x202) at once (2026-11-27): 5.24 s per epoch each after a 70 s start-up;
the speed probe took 121 s of a 505 s budget and scaled the schedule to half, so give ``--epochs`` when
the speed is known. One job alone on one H100 (2026-11-27): ``gpu-upscale2.yaml`` 3.7 s per epoch (472 s
for the whole 90-epoch job); 32 base filters at 101x101 2.8 s per epoch. A 32-filter model's export (~40 MB
of float16 kernels) is larger than the 16 MiB a device call returns per file: ``export`` splits a job's
weights into files of at most ``--max-file-mib`` (15) MiB, so train one such job per call (64 MiB in all).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- data
def pack(out, data_dir=None) -> None:
    """Write the training set (ids, uint8 images, bit-packed masks, depths) to ``out``."""
    from saltlib import data

    ds = data.load_train(data_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, ids=ds.ids, images=np.round(ds.images[..., 0] * 255).astype(np.uint8),
        masks=np.packbits(ds.masks, axis=-1), depths=ds.depths, root=str(ds.root),
    )
    print(f"packed {len(ds)} images from {ds.root} into {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def load_packed(path, limit: int = 0):
    """The :class:`saltlib.data.SaltDataset` stored by :func:`pack` (its first ``limit`` images
    when ``limit`` > 0, for trying the script out)."""
    from saltlib import data

    z = np.load(path)
    n = limit or len(z["ids"])
    masks = np.unpackbits(z["masks"][:n], axis=-1, count=data.IMAGE_SIZE).astype(bool)
    return data.SaltDataset(
        ids=z["ids"][:n], images=(z["images"][:n].astype(np.float32) / 255.0)[..., None],
        masks=masks, depths=z["depths"][:n],
    )


# --------------------------------------------------------------------------- GPU side
def probe(args) -> None:
    """Print training images/s of the parameter file's model on random data (no input pipeline),
    with the step compiled by XLA or run eagerly, to tell a slow GPU from a slow pipeline."""
    import keras

    from saltlib import train

    cfg, tcfg, _ = _config(args.params, 0)
    for key, value in (kv.split("=", 1) for kv in args.set):
        tcfg[key] = json.loads(value)
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = rng.random((n, 101, 101, 1), dtype=np.float32)
    y = (rng.random((n, 101, 101, 1)) < 0.3).astype(np.float32)
    for jit in args.jit:
        for loss in args.losses:
            model = train.build_model(tcfg)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=train.stage_loss(tcfg, loss),
                          jit_compile=bool(jit))
            t0 = time.time()
            model.fit(x[: args.batch], y[: args.batch], batch_size=args.batch, epochs=1, verbose=0)
            first = time.time() - t0
            t0 = time.time()
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False)
            secs = time.time() - t0
            print(json.dumps({"backend": keras.backend.backend(), "jit": bool(jit), "loss": loss,
                              "mixed_precision": tcfg.get("mixed_precision"), "first_step_s": round(first, 1),
                              "img_per_s": round(n / secs, 1)}), flush=True)


def _weights_in_order(z) -> list:
    """The float32 arrays of an exported ``w<i>`` npz (or a dict of them) in ``get_weights`` order
    (by number: w999 before w1000)."""
    return [_float32(z[k]) for k in sorted((k for k in z if k[0] == "w"), key=lambda k: int(k[1:]))]


MAX_FILE_MIB = 15.0  # a device call returns files of up to 16 MiB
JOB_FILE = re.compile(r"f(\d+)s(\d+)\.npz")  # one job's main weights file: f<fold>s<seed>.npz


def _part_path(main: Path, k: int) -> Path:
    """Where part ``k`` (1, 2, ...) of the job whose main file is ``main`` continues."""
    return main.with_name(f"{main.stem}.part{k}.npz")


def _save_job(out, fold, seed, arrays: dict, meta: dict, max_mib: float) -> list[Path]:
    """Write one job's arrays as ``f<fold>s<seed>.npz`` (with ``meta`` and ``n_parts``) and, where they
    hold more than ``max_mib`` MiB, the rest as ``f<fold>s<seed>.part<k>.npz`` (k = 1, 2, ...), each at
    most ``max_mib`` MiB before compression unless one array alone is larger. A device call returns
    files of up to 16 MiB: a 32-filter model's kernels (~40 MB in float16) need three files.

    Returns:
        the paths written, the main file first.
    """
    limit = max_mib * 2**20
    parts, size = [{}], 0
    for key, a in arrays.items():
        if parts[-1] and size + a.nbytes > limit:
            parts.append({})
            size = 0
        parts[-1][key] = a
        size += a.nbytes
    main = out / f"f{fold}s{seed}.npz"
    paths = [main] + [_part_path(main, k) for k in range(1, len(parts))]
    np.savez_compressed(paths[0], n_parts=np.int64(len(parts)), **meta, **parts[0])
    for path, part in zip(paths[1:], parts[1:]):
        np.savez_compressed(path, **part)
    return paths


def _load_job(path) -> dict:
    """The arrays of a job written by :func:`_save_job`, its parts merged in (a missing part is an
    error naming it)."""
    path = Path(path)
    z = dict(np.load(path))
    for k in range(1, int(z.pop("n_parts", 1))):
        part = _part_path(path, k)
        if not part.is_file():
            raise SystemExit(f"{path}: its weights continue in {part.name}, which is missing "
                             f"(copy every f*s*.part*.npz the device call returned)")
        z.update(np.load(part))
    return z


def _config(params_path, seed, epochs=None):
    from saltlib import params, train

    cfg = params.load(params_path)
    tcfg = {k: cfg[k] for k in train.DEFAULTS if k in cfg}
    split_seed = tcfg["seed"]
    tcfg["seed"] = seed
    if epochs is not None:
        tcfg["stages"] = [dict(st, epochs=e) for st, e in zip(tcfg["stages"], epochs) if e > 0]
    return cfg, tcfg, split_seed


def worker(args) -> None:
    """Train one job (one process)."""
    from saltlib import data, train

    epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else None
    cfg, tcfg, split_seed = _config(args.params, args.seed, epochs)
    ds = load_packed(args.data, args.limit)
    folds = data.kfold(ds, cfg["n_folds"], split_seed)
    train.train_fold(ds, folds, args.fold, tcfg, Path(args.out), verbose=2)


def _launch(args, jobs, epochs, out_root, deadline=None):
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # several processes share the GPU
    procs = []
    for fold, seed in jobs:
        out = out_root / f"s{seed}"
        out.mkdir(parents=True, exist_ok=True)
        log = open(out_root / f"f{fold}s{seed}.log", "w")
        cmd = [sys.executable, __file__, "worker", "--data", args.data, "--params", args.params,
               "--fold", str(fold), "--seed", str(seed), "--out", str(out), "--epochs", epochs,
               "--limit", str(args.limit)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for p, _ in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time()) if deadline else None))
        except subprocess.TimeoutExpired:  # past the deadline: stop it, keep what the others finished
            p.kill()
            codes.append(p.wait())
    for _, log in procs:
        log.close()
    return codes


def _probe_times(out_root, jobs, started: float) -> tuple[float, float]:
    """The slowest job's mean seconds per epoch (leaving out the first two, which compile the
    training and the validation steps) and its seconds from launch to the end of its first epoch
    less one epoch (process start, data and compiling one training step)."""
    import pandas as pd

    per_epoch, start_up = 0.0, 0.0
    for fold, seed in jobs:
        t = pd.read_csv(out_root / f"s{seed}" / f"fold{fold}" / "history.csv")["time"].to_numpy()
        epoch = float(np.diff(t)[1:].mean())
        per_epoch, start_up = max(per_epoch, epoch), max(start_up, float(t[0] - started - epoch))
    return per_epoch, start_up


def train_jobs(args) -> None:
    """Probe the speed with every job running at once, then train them all to fit the budget.

    The time kept aside for what is not epochs: the probe's start-up (process, data, the first
    compile), ~15 s per later stage and for the final out-of-fold predictions (measured on an
    H200: each later stage's compile took 10-15 s), and ``--overhead`` for the export.
    """
    t0 = time.time()
    jobs = [tuple(int(v) for v in j.split(":")) for j in args.jobs]
    work = Path(args.work)
    for sub in ("probe", "run"):  # a folder from an earlier call would be "already trained" and exported again
        if (work / sub).exists() and any((work / sub).iterdir()):
            raise SystemExit(f"--work {work}: {work / sub} holds an earlier call's folds; give a new --work folder")
    if args.probe_epochs < 3:
        raise SystemExit(f"--probe-epochs {args.probe_epochs}: at least 3 (the first epochs compile; the rest are timed)")
    _, tcfg, _ = _config(args.params, 0)
    planned = [st["epochs"] for st in tcfg["stages"]]
    deadline = t0 + args.budget - args.overhead
    if args.epochs:  # speed known from an earlier probe: no probe
        epochs = [int(e) for e in args.epochs.split(",")]
        if len(epochs) != len(planned) or min(epochs) < 1:
            raise SystemExit(f"--epochs {args.epochs}: give one count >= 1 for each of the {len(planned)} stages "
                             f"of {args.params} (planned {','.join(map(str, planned))})")
        plan = {"planned": planned, "epochs": epochs, "jobs": args.jobs}
        print("plan:", json.dumps(plan), flush=True)
        plan["exit_codes"] = _launch(args, jobs, args.epochs, work / "run", deadline)
        plan["train_s"] = time.time() - t0
        print("done:", json.dumps(plan), flush=True)
        return export(work / "run", jobs, Path(args.out), plan, args.params, args.max_file_mib)
    codes = _launch(args, jobs, f"{args.probe_epochs}", work / "probe")
    if any(codes):
        os.system(f"tail -n 40 {work / 'probe'}/*.log")
        raise SystemExit(f"probe failed: exit codes {codes}")
    per_epoch, start_up = _probe_times(work / "probe", jobs, t0)
    probe_s = time.time() - t0
    left = args.budget - probe_s - args.overhead - start_up - 15.0 * len(planned)
    fit = int(left // per_epoch)
    scale = min(1.0, fit / sum(planned))
    epochs = [max(1, int(e * scale)) for e in planned]
    plan = {"per_epoch_s": per_epoch, "start_up_s": start_up, "probe_s": probe_s, "planned": planned,
            "epochs": epochs, "jobs": args.jobs}
    print("plan:", json.dumps(plan), flush=True)
    codes = _launch(args, jobs, ",".join(map(str, epochs)), work / "run", deadline)
    plan["train_s"] = time.time() - t0 - probe_s
    plan["exit_codes"] = codes
    print("done:", json.dumps(plan), flush=True)
    if any(codes):
        os.system(f"tail -n 30 {work / 'run'}/*.log")
    export(work / "run", jobs, Path(args.out), plan, args.params, args.max_file_mib)


def _finished_model(fold_dir, params_path, seed):
    """``(path of an inference .keras or None, stages finished, stages planned, complete)`` for one
    job's fold folder.

    A job that finished has ``model.keras`` (complete). One that did not (stopped at the deadline,
    or failed) keeps the weights of each stage it finished (``stage<i>.weights.h5``): the last of
    them is saved as ``stage<i>.keras`` (the inference form, as ``salt train`` saves), so the GPU
    time is not lost. ``planned`` is None where ``recipe.json`` is missing.
    """
    from saltlib import train

    fold_dir = Path(fold_dir)
    recipe = json.loads((fold_dir / "recipe.json").read_text()) if (fold_dir / "recipe.json").exists() else {}
    planned = len(recipe.get("stages") or []) or None
    if (fold_dir / "model.keras").exists():
        return fold_dir / "model.keras", planned, planned, True
    done = sorted(int(p.name[len("stage"):-len(".weights.h5")]) for p in fold_dir.glob("stage*.weights.h5"))
    if not done:
        return None, 0, planned, False
    _, tcfg, _ = _config(params_path, seed)  # the architecture (stage lengths do not matter here)
    model = train.build_model(tcfg)
    model.load_weights(fold_dir / f"stage{done[-1]}.weights.h5")
    return train.save_model(model, tcfg, fold_dir / f"stage{done[-1]}.keras"), done[-1], planned, False


def export(run_root, jobs, out, plan, params_path, max_mib: float = MAX_FILE_MIB) -> None:
    """Weights as float16 conv kernels (+ float32 rest) per job, and the logs, into ``out``.

    A job's weights beyond ``max_mib`` MiB continue in ``f<fold>s<seed>.part<k>.npz`` files
    (:func:`_save_job`). Each ``f<fold>s<seed>.npz`` also holds ``complete``, ``finished_stages``
    and ``planned_stages`` (0: unknown): a job that did not finish (stopped at the deadline, or
    failed) exports its last finished stage, and ``plan.json`` lists it under ``partial``.
    """
    import keras

    out.mkdir(parents=True, exist_ok=True)
    found = {}
    for fold, seed in jobs:
        found[fold, seed] = _finished_model(run_root / f"s{seed}" / f"fold{fold}", params_path, seed)
    plan["partial"] = {f"{fold}:{seed}": f"stage {k} of {n or '?'}" for (fold, seed), (path, k, n, complete)
                       in found.items() if path is not None and not complete}
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for p in sorted(run_root.rglob("*")):
            if p.suffix in (".csv", ".json", ".log"):
                tar.add(p, arcname=str(p.relative_to(run_root)))
        (run_root / "plan.json").write_text(json.dumps(plan, indent=1))
        tar.add(run_root / "plan.json", arcname="plan.json")
    for (fold, seed), (path, finished, planned, complete) in found.items():
        if path is None:
            print(f"no model for job {fold}:{seed}: it ended before its first stage finished")
            continue
        if not complete:
            print(f"job {fold}:{seed} did not finish (stopped at the deadline, or failed; see its log): "
                  f"exporting stage {finished} of {planned or '?'}")
        weights = [_float32(w) for w in keras.saving.load_model(path, compile=False).get_weights()]
        arrays = {f"w{i:03d}": (w.astype(np.float16) if w.ndim == 4 else w) for i, w in enumerate(weights)}
        meta = {"complete": np.bool_(complete), "finished_stages": np.int64(finished or 0),
                "planned_stages": np.int64(planned or 0)}
        paths = _save_job(out, fold, seed, arrays, meta, max_mib)
        if len(paths) > 1:
            print(f"job {fold}:{seed}: weights in {len(paths)} files ({', '.join(p.name for p in paths)})")


def _float32(w: np.ndarray) -> np.ndarray:
    """``w`` as float32. A bfloat16 array (what a mixed-precision model's saved file holds) is stored
    by ``np.savez`` as raw 2-byte records (dtype ``V2``) and read back so."""
    import ml_dtypes

    if w.dtype.kind == "V" and w.dtype.itemsize == 2:
        w = w.view(ml_dtypes.bfloat16)
    return np.asarray(w, np.float32)


# --------------------------------------------------------------------------- back here
def _fold_records(logs, seed, fold, dest, row, hardware) -> None:
    """Make ``dest`` a fold folder as ``salt train`` leaves it (so ``salt run --resume`` and the
    model card use it): the worker's ``history.csv``, ``recipe.json``, ``split.json``, ``timing.json`` and
    ``done.json`` from ``logs``, the scores replaced by those of the rebuilt model here, its
    ``models`` by that model alone (snapshot members are not exported: notebook 03 would look for
    their files), and ``hardware`` (what trained it) added."""
    from saltlib import io

    if not Path(logs).exists():
        return
    with tarfile.open(logs) as tar:
        names = set(tar.getnames())
        for name in ("history.csv", "recipe.json", "split.json", "timing.json", "done.json"):
            member = f"s{seed}/fold{fold}/{name}"
            if member in names:
                with io.atomic_path(dest / name) as tmp:
                    tmp.write_bytes(tar.extractfile(member).read())
    if (dest / "done.json").exists():
        done = io.read_json(dest / "done.json")
        dropped = [m for m in done.get("models", []) if m != "model.keras"]
        if dropped:  # only the final model is exported and rebuilt here; the scores above are its own
            print(f"{dest}: the worker's {', '.join(dropped)} not exported; the fold's ensemble is model.keras alone")
        done.update(val_score=row["val_score"], val_score_tta=row["val_score_tta"], models=["model.keras"],
                    member_scores_tta={"model.keras": row["val_score_tta"]}, hardware=hardware)
        io.write_json(dest / "done.json", done)


def unpack(args) -> None:
    """Rebuild each job's ``.keras`` model, score it on its held-out fold (flip TTA too) and write
    its fold folder as ``salt train`` would. A job that did not finish (its last finished stage)
    goes to ``fold<k>-stage<i>`` with its scores but without the fold records, so ``salt run
    --resume`` does not take it for a finished fold; ``scores.json`` marks it ``partial``."""
    from saltlib import data, train

    cfg, tcfg, split_seed = _config(args.params, 0)
    ds = data.load_train(args.data_dir)
    folds = data.kfold(ds, cfg["n_folds"], split_seed)
    out = Path(args.out)
    rows = []
    for npz in sorted(Path(args.weights).glob("f*s*.npz")):
        match = JOB_FILE.fullmatch(npz.name)
        if not match:  # a part file (f<fold>s<seed>.part<k>.npz): read with its main file
            continue
        fold, seed = int(match[1]), int(match[2])
        z = _load_job(npz)
        model = train.build_model(tcfg, for_inference=True)  # the exported model.keras's layers
        model.set_weights(_weights_in_order(z))
        finished, planned = (int(z[k]) if k in z else 0 for k in ("finished_stages", "planned_stages"))
        partial = "complete" in z and not bool(z["complete"])  # did not finish: its last finished stage
        # not a fold folder (no done.json, another name): `salt run --resume` must not take it as finished
        dest = out / f"s{seed}" / (f"fold{fold}-stage{finished}" if partial else f"fold{fold}")
        dest.mkdir(parents=True, exist_ok=True)
        train.save_model(model, tcfg, dest / "model.keras")
        val = np.flatnonzero(folds == fold)
        scores = train.write_oof(dest, ["model.keras"], ds.ids[val], ds.images[val], ds.masks[val])  # what is saved
        row = {"fold": fold, "seed": seed, "n_val": len(val),
               "val_score": scores["val_score"], "val_score_tta": scores["val_score_tta"]}
        if partial:
            row["partial"] = f"stage {finished} of {planned or '?'}"
        else:
            _fold_records(Path(args.weights) / "logs.tar.gz", seed, fold, dest, row, args.hardware)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "scores.json").write_text(json.dumps(rows, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None)
    p = sub.add_parser("worker")
    for a in ("--data", "--params", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", help="comma-separated epochs per stage (default: the file's)")
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p = sub.add_parser("probe")
    p.add_argument("--params", required=True)
    p.add_argument("--set", nargs="*", default=[], help="KEY=JSON overrides of the parameter file")
    p.add_argument("--jit", type=int, nargs="+", default=[1, 0])
    p.add_argument("--losses", nargs="+", default=["bce", "lovasz"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p = sub.add_parser("train")
    for a in ("--data", "--params", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--jobs", nargs="+", required=True, help="FOLD:SEED ...")
    p.add_argument("--budget", type=float, default=540, help="seconds for probe + training + export")
    p.add_argument("--overhead", type=float, default=30,
                   help="seconds kept for the export, beyond the measured start-up and compiling")
    p.add_argument("--probe-epochs", type=int, default=4, help="epochs of the speed probe (>= 3)")
    p.add_argument("--epochs", help="comma-separated epochs per stage: skip the probe and train these")
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--work", default="/tmp/gpu_cv")
    p.add_argument("--max-file-mib", type=float, default=MAX_FILE_MIB,
                   help="largest weights file to write; a job's further weights go to f<fold>s<seed>.part<k>.npz "
                        "(a device call returns at most 8 files of 16 MiB, 64 MiB in all)")
    p = sub.add_parser("unpack")
    for a in ("--params", "--weights", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--hardware", required=True,
                   help="what trained the weights, for the model card (e.g. 'NVIDIA H200, Keras 3.15.1 on JAX 0.11.2')")
    p.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    {"pack": lambda: pack(args.out, args.data_dir), "worker": lambda: worker(args), "train": lambda: train_jobs(args), "probe": lambda: probe(args),
     "unpack": lambda: unpack(args)}[args.cmd]()


if __name__ == "__main__":
    main()
