"""Speed of the data path and the metric on this machine (prints figures; no pass/fail).

    .venv/bin/python benchmarks/bench_data.py

- loading and checking the 3,400 real training images (``data.load_train``, RLE check included;
  target: under 10 s),
- RLE encode/decode of every training mask,
- scoring 4,000 masks at 50 cut-offs (``metric.sweep_thresholds``; target: under 2 s), on synthetic
  masks and noisy logits shaped like the competition's.
"""

from __future__ import annotations

import time

import numpy as np

from saltlib import data, metric, rle


def timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    rows = []
    try:
        root = data.find_data_dir()
        t_cold, ds = timed(lambda: data.load_train(root), repeat=1)
        t_warm, ds = timed(lambda: data.load_train(root), repeat=2)
        rows.append((f"load_train, {len(ds)} images + masks + RLE check (first / warm)",
                     f"{t_cold:.2f} s / {t_warm:.2f} s", "< 10 s"))
        t_nocheck, _ = timed(lambda: data.load_train(root, check_rle=False), repeat=2)
        rows.append(("load_train without the RLE check", f"{t_nocheck:.2f} s", ""))
        t_enc, codes = timed(lambda: [rle.encode(m) for m in ds.masks])
        rows.append((f"rle.encode x {len(ds)}", f"{t_enc:.2f} s ({len(ds) / t_enc:,.0f} masks/s)", ""))
        t_dec, _ = timed(lambda: [rle.decode(c) for c in codes])
        rows.append((f"rle.decode x {len(ds)}", f"{t_dec:.2f} s ({len(ds) / t_dec:,.0f} masks/s)", ""))
    except data.DataError as e:
        rows.append(("real data", f"skipped: {e}", ""))

    rng = np.random.default_rng(0)
    n = 4000
    truth = np.zeros((n, 101, 101), bool)
    for i in range(n):
        if rng.random() > 0.39:
            y, x = rng.integers(0, 101, 2)
            truth[i, : y + 1, : x + 1] = True
    logits = (4 * (truth - 0.5) + rng.normal(0, 2, truth.shape)).astype(np.float32)
    t_first, _ = timed(lambda: metric.sweep_thresholds(truth, logits, np.linspace(-4, 4, 50)), repeat=1)
    t_sweep, res = timed(lambda: metric.sweep_thresholds(truth, logits, np.linspace(-4, 4, 50)))
    rows.append((f"sweep_thresholds, {n} masks x 50 cut-offs (first / best of 3)",
                 f"{t_first:.2f} s / {t_sweep:.2f} s", "< 2 s"))
    t_sizes, _ = timed(lambda: metric.sweep_thresholds(truth, logits, np.linspace(-4, 4, 50), (0, 10, 25, 50, 100, 200)))
    rows.append(("  ... and 6 small-mask sizes", f"{t_sizes:.2f} s", ""))
    t_one, _ = timed(lambda: metric.competition_score(truth, logits > 0))
    rows.append((f"competition_score, {n} masks, one cut-off", f"{t_one:.3f} s", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'time':<28} target")
    for what, t, target in rows:
        print(f"{what:<{width}}  {t:<28} {target}")


if __name__ == "__main__":
    main()
