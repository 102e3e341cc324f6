"""The ``salt`` command: papermill runs, run listings, training, prediction and data set-up.

    salt run PARAMS.yaml [--name NAME] [--set key=value ...]   run notebooks 01-04 into papermill_runs/NAME
    salt runs                                                  table of runs + papermill_runs/index.html
    salt train PARAMS.yaml --out DIR [--folds 0,1]             train folds without notebooks (resumable;
                                                               SIGINT/SIGTERM stop at the epoch's end)
    salt predict --model models/NAME --images DIR --out submission.csv
    salt data [--kaggle]                                       find (or download) the data and check it
    salt ship RUN_DIR --name NAME                              copy a run's bundle to models/NAME + model card
    salt kernel                                                install the 'salt' Jupyter kernel spec
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from . import data, params, train

    overrides = list(args.set or ())
    if args.folds:  # checked like any parameter (against n_folds); bundles are not made here, so
        # bundle_folds (which must lie within folds) is cleared
        if not all(f.strip().isascii() and f.strip().isdigit() for f in args.folds.split(",")):
            raise params.ParamError(f"--folds {args.folds!r}: expected fold numbers separated by commas, e.g. 0,1")
        overrides += ["bundle_folds=[]", f"folds=[{args.folds}]"]
    try:
        cfg = params.load(args.params, overrides=overrides)
    except params.ParamError as e:  # name the option the user typed, not the override it became
        raise params.ParamError(str(e).replace(f"--set folds=[{args.folds}]", f"--folds {args.folds}")) from None
    ds = data.load_train(cfg.get("data_dir") or None, limit=cfg.get("limit") or None)
    folds = data.kfold(ds, cfg["n_folds"], cfg["seed"])
    tcfg = {k: cfg[k] for k in train.DEFAULTS if k in cfg}
    # SIGINT / SIGTERM (kill -INT, kill, Ctrl-C) stop at the end of the epoch in progress, after
    # its checkpoint; the exit status is 128 + the signal's number, as for a process it killed
    with train.stop_at_epoch_end(exit_as="salt train"):
        for f in cfg["folds"]:
            train.train_fold(ds, folds, f, tcfg, Path(args.out), verbose=2)
    return 0


def _cmd_run(args) -> int:
    from . import runner

    try:
        run_dir = runner.run_pipeline(args.params, name=args.name, overrides=args.set, runs_dir=args.runs_dir,
                                      resume=args.resume, force=args.force)
    except runner.RunError as e:
        print(f"salt run: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {run_dir / 'index.html'}")
    return 0


def _cmd_runs(args) -> int:
    from . import runner

    runner.list_runs(args.runs_dir)
    return 0


def _cmd_predict(args) -> int:
    from . import predict

    members = None if args.members is None else [m.strip() for m in args.members.split(",")]
    tta = {"stored": None, "on": True, "off": False}[args.tta]
    out = predict.predict_folder(args.model, args.images, args.out, batch_size=args.batch_size,
                                 compute_dtype=args.compute_dtype, tta=tta, members=members,
                                 runtime=args.runtime)
    print(f"wrote {out}")
    return 0


def _cmd_data(args) -> int:
    from . import data

    root = data.download_kaggle(args.dest) if args.kaggle else data.find_data_dir(args.dest)
    print(f"data folder: {root}")
    ds = data.load_train(root)  # checks every image, mask and RLE; raises DataError naming a bad one
    test = root / "test" / "images"
    n_test = data.check_pngs(test) if test.is_dir() else 0  # each read: corrupt or wrong-size ones named
    print(f"checked {len(ds)} training images, masks and RLEs ({(ds.coverage == 0).mean():.1%} empty); "
          + (f"{n_test} test images" if test.is_dir() else f"no test images ({test} is not a folder)"))
    return 0


def _cmd_ship(args) -> int:
    from . import ship

    dest = ship.ship(args.run, args.name, benchmark_file=args.benchmark)
    print(f"shipped {dest}")
    return 0


def _cmd_kernel(args) -> int:
    from . import runner

    print(runner.ensure_kernel())
    return 0


def main(argv=None) -> int:
    from .data import DataError
    from .litert import ConversionError
    from .train import TrainingError

    parser = argparse.ArgumentParser(prog="salt", description="Salt segmentation runs and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run notebooks 01-04 with a parameter file into papermill_runs/NAME")
    p.add_argument("params")
    p.add_argument("--name", help="run folder name (default: parameter file stem + time)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter (YAML value)")
    p.add_argument("--runs-dir", default=None, help="where run folders go (default papermill_runs/)")
    p.add_argument("--resume", action="store_true",
                   help="run the failed or killed run --name again in its folder (training resumes from checkpoints)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: also a run marked running on another host (killed with its machine)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("runs", help="list runs and write papermill_runs/index.html")
    p.add_argument("--runs-dir", default=None)
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("train", help="train folds of a parameter file into a folder (resumable)")
    p.add_argument("params")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", help="comma-separated folds, overriding the file's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="predict a folder of PNGs with a model bundle into a submission CSV")
    p.add_argument("--model", required=True, help="bundle folder, e.g. models/NAME")
    p.add_argument("--images", required=True, help="folder of 101x101 PNGs")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--compute-dtype", choices=("auto", "float32", "stored"), default="auto",
                   help="auto (default): bfloat16 models compute in float32 unless the CPU/GPU has native bfloat16; "
                        "float32: always; stored: as stored")
    p.add_argument("--runtime", choices=("auto", "keras", "tflite"), default="auto",
                   help="auto (default): TensorFlow Lite on a CPU without native bfloat16 (float32, same logits, "
                        "1.4-1.8x faster there), Keras elsewhere; keras / tflite: always that one")
    p.add_argument("--tta", choices=("stored", "on", "off"), default="stored",
                   help="flip TTA: as the bundle says (default), or forced on/off (off: half the time)")
    p.add_argument("--members", metavar="I,J",
                   help="predict with these of the bundle's models only, by index (e.g. 0: one model, "
                        "half the time of a two-model bundle); default: all, as shipped")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("data", help="find (or download from Kaggle) the data folder and check every file")
    p.add_argument("--kaggle", action="store_true", help="download with the kaggle package (needs credentials)")
    p.add_argument("--dest", default=None)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("ship", help="copy a finished run's bundle to models/NAME with a model card")
    p.add_argument("run", help="run folder, e.g. papermill_runs/NAME")
    p.add_argument("--name", required=True)
    p.add_argument("--benchmark", help="text printed by benchmarks/benchmark.py, added to the card")
    p.set_defaults(func=_cmd_ship)

    p = sub.add_parser("kernel", help="install the project's Jupyter kernel spec ('salt') into this environment")
    p.set_defaults(func=_cmd_kernel)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ValueError, OSError, TrainingError, ConversionError) as e:  # OSError: missing, existing, unwritable paths
        print(f"salt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
