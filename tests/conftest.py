"""Shared fixtures: a small synthetic Kaggle-layout data folder, the real data folder if present,
and helpers for tests that run Python in a subprocess.

The synthetic folder mimics the real files: RGB images with R=G=B, masks that are 16-bit
(``I;16``, values {0, 65535}) or 8-bit (``L``), ``train.csv`` with column-major 1-indexed RLEs,
``depths.csv`` and ``test/images``. Nothing is written inside the repository.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from saltlib import rle

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = ROOT.parent / "shared" / "data" / "tgs-salt"
SIZE = 101

# keep TensorFlow quiet in this process and in the subprocesses the tests start
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class Synthetic:
    """A synthetic data folder and the arrays that were written into it.

    Attributes:
        root: the data folder (holds train/, train.csv, depths.csv, test/).
        ids: sorted ``(N,)`` train ids.
        images: ``(N, 101, 101)`` float32 gray levels in [0, 1] (exactly k/255).
        masks: ``(N, 101, 101)`` bool.
        depths: ``(N,)`` float32.
        test_ids: sorted test ids.
    """

    root: Path
    ids: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    depths: np.ndarray
    test_ids: np.ndarray

    def image_path(self, i) -> Path:
        return self.root / "train" / "images" / f"{self.ids[i]}.png"

    def mask_path(self, i) -> Path:
        return self.root / "train" / "masks" / f"{self.ids[i]}.png"


def _blob_mask(rng, coverage: float) -> np.ndarray:
    """A mask whose salt is a random ellipse (or a band from the bottom) covering about ``coverage``."""
    if coverage <= 0:
        return np.zeros((SIZE, SIZE), bool)
    if coverage >= 1:
        return np.ones((SIZE, SIZE), bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if rng.random() < 0.5:  # salt from the bottom up, with a wavy top
        top = SIZE * (1 - coverage) + 4 * np.sin(xx[0] / rng.uniform(5, 15) + rng.uniform(0, 6))
        return yy >= top[None, :]
    cy, cx = rng.uniform(20, 80, 2)
    r = np.sqrt(coverage * SIZE * SIZE / np.pi)
    a = r * rng.uniform(0.7, 1.3)
    b = r * r / a
    return ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1


def _save_mask(mask: np.ndarray, path: Path, bits: int) -> None:
    if bits == 16:
        Image.fromarray((mask * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((mask * 255).astype(np.uint8)).save(path)


def _save_rgb(gray: np.ndarray, path: Path) -> None:
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(path)


def make_data_dir(root, n: int = 12, n_test: int = 4, seed: int = 0) -> Synthetic:
    """Write a synthetic Kaggle-layout data folder under ``root``.

    Image 0 is all black with an empty mask (as 80 real images are); about a third of the masks
    are empty (8-bit, like the real empty masks); the others have salt of varied coverage, saved
    16-bit except every fourth, saved 8-bit. Salt pixels are brighter, so a model can learn.

    Args:
        root: folder to create.
        n: number of train images.
        n_test: number of test images.
        seed: random seed.
    Returns:
        a :class:`Synthetic` describing what was written.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("train/images", "train/masks", "test/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = np.array(sorted({f"{rng.integers(16**10):010x}" for _ in range(n)}))
    while len(ids) < n:  # astronomically unlikely id collision
        ids = np.array(sorted(set(ids) | {f"{rng.integers(16**10):010x}"}))
    images = np.zeros((n, SIZE, SIZE), np.float32)
    masks = np.zeros((n, SIZE, SIZE), bool)
    rows = []
    for k, i in enumerate(ids):
        if k == 0 or k % 3 == 1:
            cov = 0.0
        elif k == 2:
            cov = 1.0
        else:
            cov = rng.uniform(0.02, 0.95)
        m = _blob_mask(rng, cov)
        if k == 0:
            gray = np.zeros((SIZE, SIZE), np.uint8)
        else:
            base = rng.normal(90, 25, (SIZE, SIZE)) + 60 * m
            gray = np.clip(base, 0, 255).astype(np.uint8)
        _save_rgb(gray, root / "train" / "images" / f"{i}.png")
        bits = 8 if (not m.any() or k % 4 == 3) else 16
        _save_mask(m, root / "train" / "masks" / f"{i}.png", bits)
        images[k] = gray / np.float32(255)
        masks[k] = m
        rows.append({"id": i, "rle_mask": rle.encode(m)})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    test_ids = np.array(sorted(f"t{rng.integers(16**9):09x}" for _ in range(n_test)))
    for t in test_ids:
        _save_rgb(np.clip(rng.normal(100, 30, (SIZE, SIZE)), 0, 255).astype(np.uint8),
                  root / "test" / "images" / f"{t}.png")
    depths = rng.integers(50, 960, n + n_test).astype(np.float32)
    pd.DataFrame({"id": list(ids) + list(test_ids), "z": depths.astype(int)}).to_csv(
        root / "depths.csv", index=False
    )
    return Synthetic(root, ids, images, masks, depths[:n], test_ids)


@pytest.fixture
def synthetic(tmp_path) -> Synthetic:
    """A fresh 12-image synthetic data folder (tests may damage it)."""
    return make_data_dir(tmp_path / "data", n=12, n_test=4, seed=0)


@pytest.fixture(scope="session")
def synthetic24(tmp_path_factory) -> Synthetic:
    """A 24-image synthetic data folder shared by the session (read-only: do not modify)."""
    return make_data_dir(tmp_path_factory.mktemp("data24"), n=24, n_test=4, seed=1)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real TGS data folder, or skip."""
    path = Path(os.environ.get("SALT_DATA_DIR") or REAL_DATA)
    if not (path / "train.csv").is_file():
        pytest.skip(f"real TGS data not found at {path} (set SALT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, real_data):
    """The shared smoke run of the whole pipeline (:mod:`_smoke`), finished or not."""
    import _smoke

    return _smoke.get(tmp_path_factory, real_data)


@pytest.fixture(scope="session")
def smoke_ok(smoke):
    """The shared smoke run; the test fails, with its output, if the run did not finish."""
    if smoke.returncode != 0:
        pytest.fail(smoke.describe())
    return smoke


def assert_seeded_epochs(a, b, c) -> None:
    """Batches of two epochs each from an input pipeline, as ``[[(x, y), ...], [...]]``: ``a`` and
    ``b`` used the same seed and must be identical, ``c`` another seed; the two epochs of ``a``
    must differ from each other and from ``c``'s first."""
    for ea, eb in zip(a, b, strict=True):
        for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    flat = lambda e: np.concatenate([x.ravel() for x, _ in e])  # noqa: E731
    assert not np.array_equal(flat(a[0]), flat(a[1])) and not np.array_equal(flat(a[0]), flat(c[0]))


def load_tool(name: str):
    """The module ``tools/<name>.py`` (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_hashes(root) -> dict:
    """sha256 of every file under ``root`` (relative path -> digest), to check nothing changed."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def subprocess_env(**extra) -> dict:
    """Environment for a Python subprocess: quiet TensorFlow, the repo importable, plus ``extra``."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MPLCONFIGDIR", "/tmp/salt-mpl")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run ``code`` with this interpreter in a fresh process; fail the test with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
        env=subprocess_env(**env), cwd=ROOT,
    )
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
