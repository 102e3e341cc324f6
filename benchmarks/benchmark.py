#!/usr/bin/env python
"""Speed and memory of the shipped model bundle against a reference model, on this machine.

For each configuration, in its own subprocess (so peak memory is clean):

* inference images/s of the whole bundle (every ensemble member), without and with left-right
  flip TTA, on synthetic 101x101 images after a warm-up pass: the median of ``--infer-repeats``
  timings of each (3 by default; on a shared 2-core VM one timing can be twice as slow as the
  next, so every timing is printed, with the machine's idle CPU share during it, and the
  projection at the slowest and the fastest too), each model as ``salt predict`` runs it (loaded by
  ``load_bundle``, which folds the batch norms that follow a convolution into it and moves the final
  convolution of a hypercolumn or image-head model in front of its enlargements:
  ``saltlib.model.inference_form``);
* training images/s of one model of that shape as ``salt train`` builds it (``train_on_batch``, batch 32 by default, Adam,
  BCE + Lovász loss, synthetic images and masks), timed after warm-up steps;
* peak resident memory (VmHWM of the process): after inference, and overall (after training);
* the work: forward floating-point operations per image and model (TensorFlow's graph profiler),
  the rate inference reached (GFLOP/s), and this machine's float32 matrix-multiply rate
  (``tf.matmul`` of 2048x2048 matrices) as a ceiling. Together they tell a slow runtime from a
  slow machine: the projection also prints the time the bundle would need at that ceiling.

Configurations: ``bundle`` (``--model``, default the first ``models/*/bundle.json``) and
``reference``, shaped like the original repository's model (16 base filters, 101x101 input,
two residual blocks per level, depth 4, float32, dropout 0.5). ``--configs`` adds variants of
the reference, e.g. ``w32`` (32 base filters), ``w16-bf16`` (mixed bfloat16), ``w32-bf16``,
``w16-b1`` (one residual block per level), ``w16-d3`` (depth 3), ``w16-bf16-x2`` (input enlarged
to 202x202 inside the model, ``upscale: 2``), ``w16-p128`` (input zero-padded to 128x128 inside the
model, ``pad_to: 128``), ``w16-bf16-se-hc`` (scSE blocks in the decoder and a hypercolumn, ``scse`` and
``hypercolumn``).

The table gives ratios against the reference and a projection of the time the bundle needs to
predict 18,000 images with flip TTA (model time plus PNG reading time measured on real test
images when they are available), with whether it stays under 10 minutes.

    python benchmarks/benchmark.py                       # full run (a few minutes)
    python benchmarks/benchmark.py --quick               # seconds-scale smoke run
    python benchmarks/benchmark.py --configs w32,w16-bf16 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECTION_IMAGES = 18_000
PROJECTION_LIMIT_S = 600.0
REFERENCE = {"base_filters": 16, "depth": 4, "blocks_per_level": 2, "dropout": 0.5, "bf16": False, "upscale": 1,
             "pad_to": 0, "scse": False, "hypercolumn": False}
#: the model-shape keys of a spec: `build_resnet_unet` arguments of the same names
SHAPE_KEYS = ("base_filters", "depth", "blocks_per_level", "dropout", "upscale", "pad_to", "scse", "hypercolumn")


# --------------------------------------------------------------------------- worker (one subprocess)
def _cpu_jiffies() -> tuple[int, int] | None:
    """Machine-wide CPU time so far, (all, idle + iowait) in jiffies, from /proc/stat (None elsewhere)."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v[:8]), v[3] + v[4]) if len(v) > 4 else None


def idle_share(before, after) -> float | None:
    """The share of the machine's CPU time that was idle between two :func:`_cpu_jiffies` readings.

    Args:
        before, after: ``(all, idle)`` jiffies, or None where /proc/stat is not readable.
    Returns:
        a fraction in [0, 1], or None (no reading, or no time passed).
    """
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc (ru_maxrss as a fallback)."""
    cur = peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cur = cur or peak
    return cur, peak


def _synthetic(n: int, seed: int = 0):
    """``n`` smooth random images (N,101,101,1) float32 and blob masks (N,101,101,1) float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:101, :101]
    cy, cx, r = rng.uniform(0, 101, n), rng.uniform(0, 101, n), rng.uniform(5, 60, n)
    masks = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2 < r[:, None, None] ** 2)
    masks[rng.random(n) < 0.4] = False  # like the data: many empty masks
    noise = rng.normal(0, 0.1, (n, 101, 101))
    images = np.clip(0.5 + 0.2 * masks + noise, 0, 1).astype(np.float32)[..., None]
    return images, masks.astype(np.float32)[..., None]


def _time_reading(n: int) -> dict | None:
    """Seconds per image for reading real test PNGs with saltlib.data.read_images, if available."""
    from saltlib import data

    try:
        root = data.find_data_dir()
    except data.DataError:
        return None
    folder = root / "test" / "images"
    if not folder.is_dir():
        folder = root / "train" / "images"
    paths = sorted(folder.glob("*.png"))[:n]
    if not paths:
        return None
    t = time.perf_counter()
    data.read_images(paths)
    return {"images": len(paths), "s_per_image": (time.perf_counter() - t) / len(paths), "folder": str(folder)}


def _forward_flops(model) -> int:
    """Floating-point operations of one forward pass of ``model`` on one image (inference mode),
    counted by TensorFlow's graph profiler on the frozen graph: 2 per multiply-add of convolutions
    and dense layers, plus the elementwise ops it has statistics for (bias adds, batch norm)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, *model.input_shape[1:]], model.inputs[0].dtype)
    graph = convert_variables_to_constants_v2(
        tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    opts = builder(builder.float_operation()).with_empty_output().build()
    return int(tf.compat.v1.profiler.profile(graph=graph, cmd="op", options=opts).total_float_ops)


def _matmul_gflop_s(n: int = 2048, reps: int = 5) -> float:
    """This machine's float32 matrix-multiply rate in GFLOP/s (``tf.matmul``, n x n, best of ``reps``)."""
    import tensorflow as tf

    a = tf.random.normal([n, n], seed=0)
    tf.matmul(a, a).numpy()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        tf.matmul(a, a).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _training_twin(model, bf16: bool):
    """A model of the same shape as a bundle model (read from its layer names), in its training
    form: with the image head (``image_fc``) that is the three-output model. ``bf16``: in
    ``mixed_bfloat16`` (how ``mixed_precision: true`` trains), else float32."""
    from saltlib.model import build_resnet_unet

    names = [l.name for l in model.layers]
    drops = [l for l in model.layers if l.name == "enc2_drop"]
    head = "image_fc" in names
    upscale = model.get_layer("downscale").pool_size[0] if "downscale" in names else 1
    pad_to = model.get_layer("pad").output.shape[1] if "pad" in names else 0
    return build_resnet_unet(
        base_filters=model.get_layer("enc1_conv").filters,
        depth=sum(bool(re.fullmatch(r"enc\d+_pool", n)) for n in names),  # not the image head's image_pool
        blocks_per_level=sum(n.startswith("enc1_res") and n.endswith("_conv1") for n in names),
        dropout=drops[0].rate if drops else 0.0,
        dtype_policy="mixed_bfloat16" if bf16 else None,
        empty_head=head,
        aux_outputs=head,
        upscale=upscale,
        pad_to=pad_to,
        scse=any(n.endswith("_cse_pool") for n in names),
        # a bundle model has its hypercolumn enlargements as saved (hyper2_resize) or projected (hyper2_resize_1ch)
        hypercolumn=any(re.fullmatch(r"hyper\d+_resize(_1ch)?", n) for n in names),
    )


def worker(spec: dict) -> dict:
    """Measure one configuration; see the module docstring. Returns a JSON-able dict."""
    t_start = time.perf_counter()
    import keras
    import numpy as np

    from saltlib import hardware, litert, predict, train
    from saltlib.model import build_resnet_unet, inference_form

    res = {"name": spec["name"], "rss_after_import_mb": round(_rss_mb()[0], 1)}
    runtime = litert.resolve_runtime(spec.get("runtime", "keras"))
    if spec.get("bundle"):
        b = predict.load_bundle(spec["bundle"], runtime=runtime)
        models = b.models
        res.update(
            source=str(spec["bundle"]), n_models=len(models), bundle_tta=b.tta,
            dtype=next(l for l in models[0].layers if isinstance(l, keras.layers.Conv2D)).dtype_policy.name,
        )
    else:
        keras.utils.set_random_seed(0)
        m = build_resnet_unet(
            **{k: spec[k] for k in SHAPE_KEYS}, dtype_policy="mixed_bfloat16" if spec["bf16"] else None,
        )
        models = [inference_form(m)]  # as load_bundle gives it to `salt predict`; trained below as built
        # TensorFlow Lite runs float32 only: a bfloat16 variant is measured with Keras
        b = predict.Bundle(models=models, tta=True, runtime="keras" if spec["bf16"] else runtime)
        res.update(
            n_models=1, dtype="mixed_bfloat16" if spec["bf16"] else "float32",
            shape={k: spec[k] for k in SHAPE_KEYS},
        )
    res["params_per_model"] = int(models[0].count_params())
    res["gflop_per_image"] = sum(_forward_flops(m) for m in models) / 1e9  # the whole ensemble, no TTA
    res["matmul_gflop_s"] = _matmul_gflop_s(1024 if spec.get("quick") else 2048)

    # inference: whole ensemble, without and with flip TTA, after a warm-up on the same shapes
    n_inf, ib = spec["infer_images"], spec["infer_batch_size"]
    x, _ = _synthetic(n_inf, seed=1)
    res["runtime"] = b.runtime
    res["convert_s"] = 0.0  # the Keras runtime converts nothing
    if b.runtime == "tflite":  # what `salt predict` does once before predicting (TTA as stored)
        t = time.perf_counter()
        b.lite(True)
        res["convert_s"] = time.perf_counter() - t
    for tta in (False, True):  # traces the ensemble's graph of each setting (converts it with tflite)
        b.predict_logits(x[: 2 * ib], batch_size=ib, tta=tta)
    runs, idle = {False: [], True: []}, {False: [], True: []}
    for _ in range(spec["infer_repeats"]):  # interleaved, so a slow spell hits both
        for tta in (False, True):
            cpu, t = _cpu_jiffies(), time.perf_counter()
            b.predict_logits(x, batch_size=ib, tta=tta)
            runs[tta].append(n_inf / (time.perf_counter() - t))
            idle[tta].append(idle_share(cpu, _cpu_jiffies()))
    for tta, key in ((False, "infer_img_s"), (True, "infer_tta_img_s")):
        res[key] = float(np.median(runs[tta]))
        res[key + "_runs"] = [float(v) for v in runs[tta]]
        res[key + "_idle"] = idle[tta]  # the machine's idle CPU share during each timing (None: unknown)
    res["infer_gflop_s"] = res["infer_img_s"] * res["gflop_per_image"]
    res["peak_rss_infer_mb"] = round(_rss_mb()[1], 1)

    # training: one model of this shape, batch `batch_size`, timed after warm-up steps
    bs, warm, steps = spec["batch_size"], spec["warmup_steps"], spec["train_steps"]
    model = models[0] if spec.get("bundle") else m
    if spec.get("bundle"):  # stored in inference form; trained in mixed_bfloat16 where it is native
        bf16 = hardware.native_bfloat16()
        model = _training_twin(model, bf16=bf16)
        res["train_dtype"] = "mixed_bfloat16" if bf16 else "float32"
    # the loss `salt train` compiles; the image head's training form has 3 outputs (fused, decoder, image)
    loss = train.stage_loss({"empty_head": model.output_shape[-1] == 3}, "bce+lovasz")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
    xs, ys = _synthetic(bs * 4, seed=2)
    batches = [(xs[i * bs:(i + 1) * bs], ys[i * bs:(i + 1) * bs]) for i in range(4)]
    t = time.perf_counter()
    model.train_on_batch(*batches[0])
    res["first_step_s"] = time.perf_counter() - t
    for i in range(warm):
        model.train_on_batch(*batches[(i + 1) % 4])
    t = time.perf_counter()
    for i in range(steps):
        loss = model.train_on_batch(*batches[i % 4])
    res["train_img_s"] = steps * bs / (time.perf_counter() - t)
    res["train_loss_finite"] = bool(np.isfinite(np.asarray(loss, dtype=float)).all())
    res["peak_rss_mb"] = round(_rss_mb()[1], 1)
    if spec.get("read_images"):
        res["reading"] = _time_reading(spec["read_images"])
    res["worker_s"] = time.perf_counter() - t_start
    return res


# --------------------------------------------------------------------------- driver
def default_bundle() -> Path | None:
    """The first folder under models/ (sorted) that holds a bundle.json, or None."""
    found = sorted(p.parent for p in (ROOT / "models").glob("*/bundle.json")
                   if not p.parent.name.startswith("."))  # not a `salt ship` still at work
    return found[0] if found else None


def parse_variant(text: str) -> dict:
    """``w<filters>[-bf16][-b<blocks>][-d<depth>][-drop<rate>][-x<upscale>][-p<pad_to>][-se][-hc]`` -> a
    reference-like model spec (``-se``: scSE blocks, ``-hc``: hypercolumn)."""
    m = re.fullmatch(r"w(\d+)((?:-bf16|-fp32|-b\d+|-d\d+|-drop[0-9.]+|-x\d|-p\d+|-se|-hc)*)", text.strip())
    if not m:
        raise SystemExit(f"--configs {text!r}: expected w<filters>[-bf16][-b<blocks>][-d<depth>][-drop<rate>][-x<upscale>]"
                         "[-p<pad_to>][-se][-hc], e.g. w32-bf16, w16-bf16-x2, w16-p128 or w16-bf16-se-hc")
    spec = dict(REFERENCE, base_filters=int(m.group(1)), name=text.strip())
    for part in filter(None, m.group(2).split("-")):
        if part == "bf16":
            spec["bf16"] = True
        elif part == "se":
            spec["scse"] = True
        elif part == "hc":
            spec["hypercolumn"] = True
        elif part == "fp32":
            spec["bf16"] = False
        elif part.startswith("drop"):
            spec["dropout"] = float(part[4:])
        elif part.startswith("x"):
            spec["upscale"] = int(part[1:])
        elif part.startswith("p"):
            spec["pad_to"] = int(part[1:])
        elif part.startswith("b"):
            spec["blocks_per_level"] = int(part[1:])
        elif part.startswith("d"):
            spec["depth"] = int(part[1:])
    if spec["pad_to"] and spec["pad_to"] < 101 * spec["upscale"]:
        raise SystemExit(f"--configs {text!r}: pad_to {spec['pad_to']} is smaller than the input "
                         f"({101 * spec['upscale']}x{101 * spec['upscale']})")
    return spec


def run_worker(spec: dict, verbose: bool) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"benchmark of {spec['name']!r} failed (exit {p.returncode})")
    if verbose:
        sys.stderr.write(p.stderr)
    res = json.loads(lines[-1][len("RESULT "):])
    res["subprocess_s"] = time.perf_counter() - t
    return res


def _fmt(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def print_table(rows: list[dict], ref: dict | None) -> list[dict]:
    cols = [
        ("config", lambda r: r["name"], 14),
        ("models", lambda r: str(r["n_models"]), 6),
        ("params/model", lambda r: f"{r['params_per_model']:,}", 12),
        ("dtype", lambda r: r["dtype"].replace("mixed_", ""), 9),  # inference (training: train_dtype if given)
        ("runtime", lambda r: r.get("runtime", "keras"), 7),  # inference
        ("train img/s", lambda r: _fmt(r["train_img_s"]), 11),
        ("infer img/s", lambda r: _fmt(r["infer_img_s"]), 11),
        ("infer+TTA img/s", lambda r: _fmt(r["infer_tta_img_s"]), 15),
        ("GFLOP/img", lambda r: _fmt(r["gflop_per_image"], 2), 9),  # whole ensemble, one pass (no TTA)
        ("infer GFLOP/s", lambda r: _fmt(r["infer_gflop_s"], 0), 13),
        ("peak RSS infer MB", lambda r: _fmt(r["peak_rss_infer_mb"], 0), 17),
        ("peak RSS MB", lambda r: _fmt(r["peak_rss_mb"], 0), 11),
    ]
    head = " | ".join(name.ljust(w) for name, _, w in cols)
    print(head)
    print("-|-".join("-" * w for _, _, w in cols))
    for r in rows:
        print(" | ".join(f(r).ljust(w) for _, f, w in cols))
    ratios = []
    if ref is not None:
        print()
        print("ratio to reference (x / reference): train img/s | infer img/s | infer+TTA img/s | peak RSS")
        for r in rows:
            if r is ref:
                continue
            q = {
                "name": r["name"],
                "train_img_s": r["train_img_s"] / ref["train_img_s"],
                "infer_img_s": r["infer_img_s"] / ref["infer_img_s"],
                "infer_tta_img_s": r["infer_tta_img_s"] / ref["infer_tta_img_s"],
                "peak_rss_mb": r["peak_rss_mb"] / ref["peak_rss_mb"],
            }
            ratios.append(q)
            print(
                f"  {r['name']:<14} {q['train_img_s']:.2f}x | {q['infer_img_s']:.2f}x | "
                f"{q['infer_tta_img_s']:.2f}x | {q['peak_rss_mb']:.2f}x"
            )
    return ratios


def projection(bundle_row: dict, matmul_gflop_s: float | None = None) -> dict:
    """Seconds to predict PROJECTION_IMAGES images with the bundle and flip TTA, plus reading them.

    ``seconds`` is at the median timing; ``slowest_seconds`` and ``fastest_seconds`` at the slowest and
    fastest of the timings (on a shared VM the fastest is the nearest to the machine's uncontended speed).

    With ``matmul_gflop_s`` (the machine's float32 matrix-multiply rate), also ``ceiling_model_s``:
    the model time if every forward operation ran at that rate (2 passes per image with TTA), a
    lower bound that no runtime on this machine beats by much."""
    model_s = PROJECTION_IMAGES / bundle_row["infer_tta_img_s"]
    runs = bundle_row.get("infer_tta_img_s_runs") or [bundle_row["infer_tta_img_s"]]
    slowest_model_s, fastest_model_s = PROJECTION_IMAGES / min(runs), PROJECTION_IMAGES / max(runs)
    reading = bundle_row.get("reading")
    read_s = PROJECTION_IMAGES * reading["s_per_image"] if reading else 0.0
    convert_s = bundle_row.get("convert_s") or 0.0  # TensorFlow Lite: converting the ensemble, once
    total = model_s + read_s + convert_s
    ceiling_s = None
    if matmul_gflop_s and bundle_row.get("gflop_per_image"):
        ceiling_s = PROJECTION_IMAGES * 2 * bundle_row["gflop_per_image"] / matmul_gflop_s
    return {
        "images": PROJECTION_IMAGES, "tta": True, "model_s": model_s, "read_s": read_s, "convert_s": convert_s,
        "read_measured": bool(reading), "seconds": total, "limit_s": PROJECTION_LIMIT_S,
        "slowest_seconds": slowest_model_s + read_s + convert_s, "fastest_seconds": fastest_model_s + read_s + convert_s,
        "under_limit": total < PROJECTION_LIMIT_S, "ceiling_model_s": ceiling_s,
    }


def machine_info() -> dict:
    from saltlib import hardware

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "bfloat16": hardware.describe(), "cpu": hardware.cpu_model()}
    try:
        import importlib.metadata as md

        info["tensorflow"] = md.version("tensorflow-cpu") if _has("tensorflow-cpu") else md.version("tensorflow")
        info["keras"] = md.version("keras")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bundle folder (default: the first models/*/bundle.json)")
    ap.add_argument("--no-bundle", action="store_true", help="measure only the reference (and --configs)")
    ap.add_argument("--quick", action="store_true", help="few steps and images: a smoke run of the script")
    ap.add_argument("--configs", default="", help="comma-separated extra variants, e.g. w32,w16-bf16,w32-bf16,w16-b1")
    ap.add_argument("--runtime", choices=("auto", "keras", "tflite"), default="auto",
                    help="what runs inference: auto (default, as `salt predict`: TensorFlow Lite on a CPU without "
                         "native bfloat16, Keras elsewhere), keras or tflite (float32 models only)")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    ap.add_argument("--infer-batch-size", type=int, default=64, help="inference batch size (default 64)")
    ap.add_argument("--train-steps", type=int, help="timed training steps (default 20, quick 2)")
    ap.add_argument("--warmup-steps", type=int, help="untimed steps after the first (default 3, quick 1)")
    ap.add_argument("--infer-images", type=int, help="images per inference timing (default 512, quick 64)")
    ap.add_argument("--infer-repeats", type=int,
                    help="timings of inference with and without TTA, of which the median counts (default 3, quick 1)")
    ap.add_argument("--read-images", type=int, help="real PNGs read to time reading (default 500, quick 20)")
    ap.add_argument("--reference", default="w16",
                    help="shape of the reference in --configs syntax (default w16 = the original repository's "
                         "model; smaller ones such as w2-d1-b1 only to test this script)")
    ap.add_argument("--json", help="also write the results as JSON to this path")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr (TensorFlow logs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.infer_repeats is not None and args.infer_repeats < 1:
        ap.error(f"--infer-repeats must be at least 1, got {args.infer_repeats}")
    sys.path.insert(0, str(ROOT))

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    q = args.quick
    common = {
        "batch_size": args.batch_size,
        "infer_batch_size": args.infer_batch_size,
        "runtime": args.runtime,
        "train_steps": args.train_steps or (2 if q else 20),
        "warmup_steps": args.warmup_steps if args.warmup_steps is not None else (1 if q else 3),
        "infer_images": args.infer_images or (64 if q else 512),
        "infer_repeats": args.infer_repeats if args.infer_repeats is not None else (1 if q else 3),
        "quick": q,
    }
    specs = []
    bundle = None if args.no_bundle else (Path(args.model) if args.model else default_bundle())
    if bundle is not None:
        from saltlib.predict import read_bundle_spec  # fail here, clearly, on an incomplete bundle

        read_bundle_spec(bundle)
        specs.append({**common, "name": "bundle", "bundle": str(bundle),
                      "read_images": args.read_images or (20 if q else 500)})
    else:
        print("no model bundle found under models/ (or --no-bundle): measuring the reference only\n")
    ref_spec = {**parse_variant(args.reference), **common, "name": "reference"}
    specs.append(ref_spec)
    for v in filter(None, args.configs.split(",")):
        specs.append({**parse_variant(v), **common})

    info = machine_info()
    print(f"machine: {info.get('cpu') or '?'}, {info['cpu_count']} cores; TensorFlow {info.get('tensorflow', '?')}, "
          f"Keras {info.get('keras', '?')}; {info['bfloat16']}")
    print(f"training: batch {common['batch_size']}, {common['warmup_steps']} warm-up + {common['train_steps']} timed "
          f"steps, synthetic data, bce+lovasz; inference: {common['infer_images']} images, batch "
          f"{common['infer_batch_size']}, median of {common['infer_repeats']} timing(s), runtime {common['runtime']}"
          f"{' (QUICK: figures are rough)' if q else ''}")
    print(f"reference: {ref_spec['base_filters']} base filters, 101x101, depth {ref_spec['depth']}, "
          f"{ref_spec['blocks_per_level']} residual block(s) per level, {'bfloat16' if ref_spec['bf16'] else 'float32'}, "
          f"dropout {ref_spec['dropout']:g}{'' if args.reference == 'w16' else ' (NOT the original shape)'}\n")
    rows = []
    for s in specs:
        print(f"measuring {s['name']} ...", file=sys.stderr, flush=True)
        rows.append(run_worker(s, args.verbose))
    ref = next(r for r in rows if r["name"] == "reference")
    ratios = print_table(rows, ref)
    info["matmul_gflop_s"] = max(r["matmul_gflop_s"] for r in rows)
    print(f"\nfloat32 matrix multiply on this machine: {info['matmul_gflop_s']:.0f} GFLOP/s (best of the workers; "
          f"inference above reaches {ref['infer_gflop_s'] / info['matmul_gflop_s']:.0%} of it with the reference)")
    result = {"machine": info, "settings": common, "rows": rows, "ratios": ratios}
    if bundle is not None:
        pr = projection(rows[0], info["matmul_gflop_s"])
        result["projection"] = pr
        read = (f"{pr['read_s']:.0f} s reading PNGs" if pr["read_measured"] else "PNG reading not measured (no data)")
        print(
            f"\nprojection: {PROJECTION_IMAGES:,} images with the bundle ({rows[0]['n_models']} model(s), flip TTA): "
            f"{pr['seconds'] / 60:.1f} min ({pr['model_s']:.0f} s model with {rows[0]['runtime']}, {read}"
            + (f", {pr['convert_s']:.0f} s converting to TensorFlow Lite" if pr["convert_s"] else "") + ") -> "
            f"{'UNDER' if pr['under_limit'] else 'OVER'} the 10-minute target"
            + (f"; {pr['slowest_seconds'] / 60:.1f} min at the slowest of the {common['infer_repeats']} timings, "
               f"{pr['fastest_seconds'] / 60:.1f} min at the fastest"
               if common["infer_repeats"] > 1 else "")
        )
        if common["infer_repeats"] > 1:
            def rates(row, key):
                return ", ".join(f"{v:.1f}" + (f" ({100 * i:.0f}% idle)" if i is not None else "")
                                 for v, i in zip(row[key + "_runs"], row[key + "_idle"]))

            each = "; ".join(f"{r['name']}: {rates(r, 'infer_img_s')} / TTA {rates(r, 'infer_tta_img_s')}"
                             for r in rows)
            print(f"  each timing, images/s, with the machine's idle CPU share ({each}): a rate near 1/2 or 1/3 of the "
                  "fastest with the CPU partly idle points to stalls (threads waiting, or the VM) rather than to the "
                  "model's cost (README, Speed)")
        print(f"  at this machine's matrix-multiply rate the model part would still take {pr['ceiling_model_s'] / 60:.1f} min "
              f"({rows[0]['gflop_per_image']:.2f} GFLOP per image and pass, 2 passes with TTA)")
    if args.json:
        from saltlib import io

        io.write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
