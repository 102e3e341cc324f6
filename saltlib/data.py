"""Loading and checking a Kaggle-layout TGS data folder.

Layout::

    DATA/train/images/<id>.png   101x101 seismic image (RGB with R=G=B, or grayscale)
    DATA/train/masks/<id>.png    101x101 mask, 8- or 16-bit, salt where > 0
    DATA/train.csv               id,rle_mask (column-major, 1-indexed RLE; empty = no salt)
    DATA/depths.csv              id,z
    DATA/test/images/<id>.png    optional, unlabelled
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from . import rle

IMAGE_SIZE = 101
PROJECT_ROOT = Path(__file__).resolve().parent.parent
KAGGLE_COMPETITION = "tgs-salt-identification-challenge"


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent. The message names it."""


# --------------------------------------------------------------------------- locating the data
def candidate_dirs(path=None) -> list[Path]:
    """Where data is looked for, in order: ``path``, ``$SALT_DATA_DIR``, ``data/``, ``../shared/data/tgs-salt``."""
    if path is not None:
        return [Path(path)]
    out = []
    if os.environ.get("SALT_DATA_DIR"):
        out.append(Path(os.environ["SALT_DATA_DIR"]))
    out.append(PROJECT_ROOT / "data")
    out.append(PROJECT_ROOT.parent / "shared" / "data" / "tgs-salt")
    return out


def find_data_dir(path=None) -> Path:
    """Return the first candidate folder (see :func:`candidate_dirs`) that holds ``train.csv``.

    Raises:
        DataError: naming the folders tried and how to get the data.
    """
    tried = candidate_dirs(path)
    for d in tried:
        if (d / "train.csv").is_file():
            return d.resolve()
    raise DataError(
        "no TGS data found; looked for train.csv in: "
        + ", ".join(str(d) for d in tried)
        + ". Put the Kaggle files there (see data/README.md), set SALT_DATA_DIR, or run "
        "`salt data --kaggle` with Kaggle credentials configured."
    )


def download_kaggle(dest=None) -> Path:
    """Download and unpack the competition data with the ``kaggle`` package (needs credentials).

    This is a thin wrapper over ``kaggle competitions download``; it needs network access and
    ``~/.kaggle/kaggle.json`` (or ``KAGGLE_USERNAME``/``KAGGLE_KEY``).
    """
    dest = Path(dest or PROJECT_ROOT / "data")
    # the one beside this Python first (.venv/bin/kaggle, where `.venv/bin/pip install kaggle` puts it,
    # is not on PATH unless the venv is activated), else PATH's
    beside = Path(sys.executable).parent / "kaggle"
    kaggle = str(beside) if beside.is_file() else shutil.which("kaggle")
    if kaggle is None:
        raise DataError(f"the `kaggle` command is not installed: {Path(sys.executable).parent / 'pip'} install kaggle")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([kaggle, "competitions", "download", "-c", KAGGLE_COMPETITION, "-p", str(dest)], check=True)
    except FileNotFoundError as e:
        raise DataError(f"cannot run {kaggle}: {e}") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"kaggle download failed (exit {e.returncode}); are credentials set?") from e
    extract_kaggle_zips(dest)
    return find_data_dir(dest)


def extract_kaggle_zips(dest) -> None:
    """Unpack every zip under ``dest`` until none is left unpacked: the competition bundle holds
    ``train.zip`` and ``test.zip``, which go to ``train/`` and ``test/``; others unpack in place."""
    dest, done = Path(dest), set()
    while todo := [z for z in sorted(dest.rglob("*.zip")) if z not in done]:
        for z in todo:
            target = dest / "train" if z.stem == "train" else dest / "test" if z.stem == "test" else z.parent
            with zipfile.ZipFile(z) as zf:
                zf.extractall(target)
            done.add(z)


# --------------------------------------------------------------------------- reading PNGs
def read_png(path, kind: str = "image") -> np.ndarray:
    """Read one 101x101 PNG.

    Args:
        path: the file.
        kind: ``"image"`` returns float32 ``(101, 101)`` in [0, 1] (first channel of RGB, or the
            gray level, divided by the mode's maximum); ``"mask"`` returns bool ``(101, 101)``,
            salt where the pixel is > 0.
    Raises:
        DataError: missing, unreadable or corrupt file, or a size other than 101x101.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {kind} file: {path}")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise DataError(f"{kind} {path} is a {im.format} file, not a PNG")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):  # from the header, before decoding any pixels
                raise DataError(
                    f"{kind} {path} is {im.size[0]}x{im.size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
                )
            im.load()
            if im.mode == "P":  # palette indices are not gray levels: map them through the palette
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            mode = im.mode
            arr = np.asarray(im)
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses huge images at open(), before our size check
        raise DataError(f"{kind} {path} is far larger than {IMAGE_SIZE}x{IMAGE_SIZE} ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read {kind} {path}: corrupt or not a PNG ({e})") from e
    if arr.ndim == 3:
        arr = arr[..., 0]
    if kind == "mask":
        return arr > 0
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 65535.0
    elif mode in ("F",):
        scale = 1.0
    else:
        if mode not in ("L", "RGB", "RGBA", "LA", "P"):
            raise DataError(f"image {path} has unsupported PNG mode {mode!r}")
        scale = 255.0
    return arr.astype(np.float32) / scale


def read_images(paths, kind: str = "image") -> np.ndarray:
    """Stack :func:`read_png` over ``paths``: ``(N,101,101,1)`` float32 or ``(N,101,101)`` bool."""
    arrs = [read_png(p, kind) for p in paths]
    if not arrs:
        shape = (0, IMAGE_SIZE, IMAGE_SIZE) + ((1,) if kind == "image" else ())
        return np.zeros(shape, np.float32 if kind == "image" else bool)
    out = np.stack(arrs)
    return out[..., None] if kind == "image" else out


def list_pngs(folder) -> list[str]:
    """Sorted ids (file stems) of the ``*.png`` files in ``folder``.

    Raises:
        DataError: the folder is missing, or holds PNGs named ``*.PNG`` (any other case), which
            would otherwise be left out without a word: every reader builds ``<id>.png``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"missing folder: {folder}")
    odd = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png" and p.suffix != ".png")
    if odd:
        raise DataError(f"{folder}: {len(odd)} file(s) end in another case of .png, e.g. {odd[0]}; "
                        "rename them to .png (ids are read as <id>.png)")
    return sorted(p.stem for p in folder.glob("*.png"))


def check_pngs(folder, limit: int | None = None) -> int:
    """Read every PNG image in ``folder`` (the first ``limit`` by id), one at a time, and keep none:
    a check before hours of work that ends in predicting them.

    Returns:
        the number of images checked.
    Raises:
        DataError: the folder is missing or holds no PNG, or an image is corrupt or not 101x101
            (naming it).
    """
    ids = list_pngs(folder)
    if not ids:
        raise DataError(f"no PNG files in {folder}")
    ids = ids[:limit] if limit else ids
    for i in ids:
        read_png(Path(folder) / f"{i}.png")
    return len(ids)


# --------------------------------------------------------------------------- the data set
@dataclass
class SaltDataset:
    """Training images with masks and depths, aligned by index.

    Attributes:
        ids: ``(N,)`` image ids.
        images: ``(N,101,101,1)`` float32 in [0, 1].
        masks: ``(N,101,101)`` bool, or None for unlabelled data.
        depths: ``(N,)`` float32 depth z (NaN where unknown).
        root: the data folder.
    """

    ids: np.ndarray
    images: np.ndarray
    masks: np.ndarray | None
    depths: np.ndarray
    root: Path | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def coverage(self) -> np.ndarray:
        """Fraction of salt pixels per image, ``(N,)`` in [0, 1]."""
        return self.masks.reshape(len(self), -1).mean(axis=1)

    @property
    def coverage_class(self) -> np.ndarray:
        """``ceil(10 * coverage)``: 0 for empty masks, 1..10 otherwise."""
        return coverage_class(self.masks)

    def subset(self, index) -> "SaltDataset":
        """The images at ``index`` (an int array or boolean mask)."""
        return SaltDataset(
            self.ids[index],
            self.images[index],
            None if self.masks is None else self.masks[index],
            self.depths[index],
            self.root,
        )

    def frame(self) -> pd.DataFrame:
        """One row per image: id, z, coverage, coverage_class, mean and std of intensity."""
        df = pd.DataFrame({"id": self.ids, "z": self.depths})
        flat = self.images.reshape(len(self), -1)
        df["mean"] = flat.mean(axis=1)
        df["std"] = flat.std(axis=1)
        if self.masks is not None:
            df["coverage"] = self.coverage
            df["coverage_class"] = self.coverage_class
        return df


def coverage_class(masks) -> np.ndarray:
    """``ceil(10 * salt fraction)`` per mask: 0 (empty) .. 10 (over 90% salt)."""
    masks = np.asarray(masks)
    cov = masks.reshape(len(masks), -1).mean(axis=1)
    return np.ceil(np.round(cov * 10, 9)).astype(np.int64)


def column_masks(masks) -> np.ndarray:
    """Which masks are drawn as whole columns: some salt, and every column all salt or none.

    Some of the training masks were labelled this way (salt from the top of the image to the bottom
    between two vertical edges, or the whole image), a shape the seismic image often does not show.

    Args:
        masks: ``(N, H, W)`` masks, bool or 0/1 (salt where > 0).
    Returns:
        ``(N,)`` bool; False for an empty mask.
    """
    m = np.asarray(masks) > 0
    if m.ndim != 3:
        raise ValueError(f"masks must have shape (N,H,W), got {m.shape}")
    any_salt, full = m.any(axis=1), m.all(axis=1)  # (N, W): columns with some salt, columns all salt
    return any_salt.any(axis=1) & (any_salt == full).all(axis=1)


def _read_csv(path, columns) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several parser errors
        raise DataError(f"cannot parse {path}: {e}") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; found {list(df.columns)}")
    if df["id"].duplicated().any():
        raise DataError(f"{path} repeats id {df['id'][df['id'].duplicated()].iloc[0]!r}")
    return df


def read_depths(root) -> pd.Series:
    """``depths.csv`` as a float Series indexed by id (error naming the file if malformed)."""
    path = Path(root) / "depths.csv"
    df = _read_csv(path, ["id", "z"])
    z = pd.to_numeric(df["z"], errors="coerce")
    if z.isna().any():
        raise DataError(f"{path}: non-numeric z {df['z'][z.isna()].iloc[0]!r} for id {df['id'][z.isna()].iloc[0]!r}")
    return pd.Series(z.to_numpy(np.float32), index=df["id"])


def load_train(path=None, check_rle: bool = True, limit: int | None = None) -> SaltDataset:
    """Load and check the labelled training set.

    Args:
        path: data folder; default from :func:`find_data_dir`.
        check_rle: decode every ``train.csv`` RLE and compare it with its PNG mask.
        limit: keep only the first ``limit`` ids (sorted), for quick runs.
    Returns:
        a :class:`SaltDataset` sorted by id.
    Raises:
        DataError: naming the culprit file or id: a missing folder/file, a corrupt or wrong-size
            PNG, image and mask ids that differ, ids missing from ``train.csv`` or ``depths.csv``,
            or an RLE that is malformed or disagrees with its mask.
    """
    root = find_data_dir(path)
    img_dir, mask_dir = root / "train" / "images", root / "train" / "masks"
    img_ids, mask_ids = list_pngs(img_dir), list_pngs(mask_dir)
    if set(img_ids) != set(mask_ids):
        only_img = sorted(set(img_ids) - set(mask_ids))
        only_mask = sorted(set(mask_ids) - set(img_ids))
        if only_mask:
            raise DataError(f"mask without image: {mask_dir / (only_mask[0] + '.png')} ({len(only_mask)} such)")
        raise DataError(f"image without mask: {img_dir / (only_img[0] + '.png')} ({len(only_img)} such)")
    if not img_ids:
        raise DataError(f"no PNG files in {img_dir}")
    table = _read_csv(root / "train.csv", ["id", "rle_mask"]).set_index("id")["rle_mask"]
    missing = sorted(set(img_ids) - set(table.index))
    if missing:
        raise DataError(f"{root / 'train.csv'} has no row for image id {missing[0]!r} ({len(missing)} such)")
    ids = np.array(img_ids[:limit] if limit else img_ids)
    depths = read_depths(root)
    no_z = [i for i in ids.tolist() if i not in depths.index]
    if no_z:
        raise DataError(f"{root / 'depths.csv'} has no z for id {no_z[0]!r}")
    images = read_images([img_dir / f"{i}.png" for i in ids], "image")
    masks = read_images([mask_dir / f"{i}.png" for i in ids], "mask")
    if check_rle:
        for k, i in enumerate(ids.tolist()):
            try:
                decoded = rle.decode(table[i])
            except ValueError as e:
                raise DataError(f"{root / 'train.csv'}: malformed RLE for id {i!r}: {e}") from None
            if not np.array_equal(decoded, masks[k]):
                diff = int((decoded != masks[k]).sum())
                raise DataError(
                    f"{root / 'train.csv'}: RLE for id {i!r} disagrees with {mask_dir / (i + '.png')} "
                    f"in {diff} pixels"
                )
    return SaltDataset(ids, images, masks, depths.loc[ids].to_numpy(np.float32), root)


def load_test(path=None, images_dir=None, limit: int | None = None) -> SaltDataset:
    """Load unlabelled images (default ``DATA/test/images``); masks are None."""
    if images_dir is None:
        root = find_data_dir(path)
        images_dir = root / "test" / "images"
    else:
        root = None
    ids = list_pngs(images_dir)
    if not ids:
        raise DataError(f"no PNG files in {images_dir}")
    ids = np.array(ids[:limit] if limit else ids)
    z = np.full(len(ids), np.nan, np.float32)
    if root is not None and (root / "depths.csv").is_file():
        d = read_depths(root)
        z = d.reindex(ids).to_numpy(np.float32)
    return SaltDataset(ids, read_images([Path(images_dir) / f"{i}.png" for i in ids]), None, z, root)


def merge_rare_classes(classes, n_min: int) -> np.ndarray:
    """Merge every class with fewer than ``n_min`` members into its nearest class, so that each
    class can be stratified over ``n_min`` folds.

    The rarest class goes first (the lower class on a tie), into the nearest class that has members
    (the lower one on a tie), and counts are updated after each merge, so a rare class never lands
    in another rare or empty one and stays there. Classes with enough members are left as they are.

    Args:
        classes: ``(N,)`` non-negative int class of each image (e.g. coverage classes 0..10).
        n_min: the fewest members a class may keep (the number of folds).
    Returns:
        ``(N,)`` int array: the merged class of each image (a copy).
    """
    classes = np.asarray(classes).astype(np.int64, copy=True)
    counts = np.bincount(classes) if len(classes) else np.zeros(0, np.int64)
    while True:
        present = np.flatnonzero(counts)
        rare = present[counts[present] < n_min]
        if len(present) < 2 or not len(rare):
            return classes
        c = rare[np.argmin(counts[rare])]
        others = present[present != c]
        target = others[np.argmin(2 * np.abs(others - c) + (others > c))]
        classes[classes == c] = target
        counts[target] += counts[c]
        counts[c] = 0


def kfold(dataset_or_classes, n_folds: int = 5, seed: int = 42) -> np.ndarray:
    """Deterministic fold of each image, stratified by coverage class.

    Classes with fewer than ``n_folds`` images (only in small subsets: each class of the full
    training set has hundreds) are first merged into their nearest class (:func:`merge_rare_classes`).

    Args:
        dataset_or_classes: a :class:`SaltDataset` or an ``(N,)`` array of coverage classes.
        n_folds: number of folds (>= 2).
        seed: shuffling seed; the same seed and data give the same folds.
    Returns:
        ``(N,)`` int array of fold numbers 0..n_folds-1.
    """
    from sklearn.model_selection import StratifiedKFold

    classes = (
        dataset_or_classes.coverage_class
        if isinstance(dataset_or_classes, SaltDataset)
        else np.asarray(dataset_or_classes)
    )
    if len(classes) < n_folds:
        raise DataError(f"cannot split {len(classes)} images into {n_folds} folds")
    classes = merge_rare_classes(classes, n_folds)  # now every class has at least n_folds members
    folds = np.empty(len(classes), np.int64)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(skf.split(np.zeros(len(classes)), classes)):
        folds[val] = f
    return folds
