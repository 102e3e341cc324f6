"""Loading a Kaggle-layout folder: values, every kind of bad input, data folder lookup, folds.

All data is synthetic (built by ``conftest.make_data_dir`` in a temporary folder), except the
tests marked ``realdata``, which read ../shared/data/tgs-salt when it exists.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_data_dir, tree_hashes
from saltlib import data, rle
from saltlib.data import DataError


# --------------------------------------------------------------------------- good data
def test_synthetic_folder_has_both_mask_depths(synthetic):
    modes = {Image.open(synthetic.mask_path(i)).mode for i in range(len(synthetic.ids))}
    assert modes == {"L", "I;16"}
    salt8 = [i for i in range(len(synthetic.ids))
             if Image.open(synthetic.mask_path(i)).mode == "L" and synthetic.masks[i].any()]
    assert salt8, "an 8-bit mask with salt is part of the fixture"
    assert {Image.open(synthetic.image_path(i)).mode for i in range(3)} == {"RGB"}


def test_load_train_values(synthetic):
    ds = data.load_train(synthetic.root)
    n = len(synthetic.ids)
    assert len(ds) == n
    assert ds.ids.tolist() == synthetic.ids.tolist()
    assert ds.images.shape == (n, 101, 101, 1) and ds.images.dtype == np.float32
    assert ds.masks.shape == (n, 101, 101) and ds.masks.dtype == bool
    assert ds.depths.shape == (n,) and ds.depths.dtype == np.float32
    np.testing.assert_array_equal(ds.images[..., 0], synthetic.images)
    np.testing.assert_array_equal(ds.masks, synthetic.masks)
    np.testing.assert_array_equal(ds.depths, synthetic.depths)
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    assert ds.root == synthetic.root.resolve()
    assert not ds.images[0].any()  # the all-black image


def test_coverage_and_classes(synthetic):
    ds = data.load_train(synthetic.root)
    cov = synthetic.masks.reshape(len(ds), -1).mean(axis=1)
    np.testing.assert_allclose(ds.coverage, cov)
    cls = ds.coverage_class
    assert cls.min() >= 0 and cls.max() <= 10
    assert (cls[cov == 0] == 0).all() and (cls[cov == 1] == 10).all()
    np.testing.assert_array_equal(cls[cov > 0], np.ceil(cov[cov > 0] * 10 - 1e-9))


def _column_cases():
    """Hand-built 4x5 masks and whether each is drawn as whole columns."""
    empty = np.zeros((4, 5), bool)
    two_columns = empty.copy()
    two_columns[:, 1:3] = True
    full = np.ones((4, 5), bool)
    short_column = two_columns.copy()
    short_column[0, 2] = False  # one column stops a pixel short of the top
    blob = empty.copy()
    blob[1:3, 1:3] = True
    rows = empty.copy()
    rows[2:, :] = True  # whole rows are not whole columns
    return [(empty, False), (two_columns, True), (full, True), (short_column, False), (blob, False), (rows, False)]


def test_column_masks_by_hand():
    cases = _column_cases()
    masks = np.stack([m for m, _ in cases])
    assert data.column_masks(masks).tolist() == [want for _, want in cases]
    assert data.column_masks(masks.astype(np.uint8) * 255).tolist() == [want for _, want in cases]  # 0/255 PNG values
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        data.column_masks(masks[0])


@pytest.mark.parametrize(
    "pixels,expected",
    [(0, 0), (1, 1), (1020, 1), (1021, 2), (5100, 5), (5101, 6), (10201, 10)],
)
def test_coverage_class_edges(pixels, expected):
    m = np.zeros((1, 101 * 101), bool)
    m[0, :pixels] = True
    assert data.coverage_class(m.reshape(1, 101, 101)).tolist() == [expected]


def test_frame_and_subset(synthetic):
    ds = data.load_train(synthetic.root)
    df = ds.frame()
    assert list(df.columns) == ["id", "z", "mean", "std", "coverage", "coverage_class"]
    assert len(df) == len(ds) and df["mean"].iloc[0] == 0
    sub = ds.subset(np.array([3, 1]))
    assert sub.ids.tolist() == [ds.ids[3], ds.ids[1]]
    np.testing.assert_array_equal(sub.masks[0], ds.masks[3])
    sub = ds.subset(ds.coverage > 0)
    assert (sub.coverage > 0).all() and len(sub) == int((ds.coverage > 0).sum())


def test_limit_keeps_first_ids(synthetic):
    ds = data.load_train(synthetic.root, limit=5)
    assert ds.ids.tolist() == synthetic.ids[:5].tolist()
    np.testing.assert_array_equal(ds.masks, synthetic.masks[:5])


def test_load_test(synthetic):
    ds = data.load_test(synthetic.root)
    assert ds.ids.tolist() == synthetic.test_ids.tolist()
    assert ds.images.shape == (4, 101, 101, 1) and ds.masks is None
    assert np.isfinite(ds.depths).all()
    other = data.load_test(images_dir=synthetic.root / "test" / "images", limit=2)
    assert len(other) == 2 and np.isnan(other.depths).all()


@pytest.mark.parametrize(
    "mode,make",
    [
        ("L", lambda: Image.fromarray(np.full((101, 101), 51, np.uint8))),
        ("I;16", lambda: Image.fromarray(np.full((101, 101), 13107, np.uint16))),
        ("RGB", lambda: Image.fromarray(np.full((101, 101, 3), 51, np.uint8))),
        ("RGBA", lambda: Image.fromarray(np.full((101, 101, 4), 51, np.uint8))),
        ("LA", lambda: Image.fromarray(np.full((101, 101), 51, np.uint8)).convert("LA")),
    ],
)
def test_read_png_image_modes(tmp_path, mode, make):
    path = tmp_path / "x.png"
    make().save(path)
    assert Image.open(path).mode == mode
    out = data.read_png(path)
    assert out.shape == (101, 101) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.2, atol=1e-6)  # 51/255 and 13107/65535


def test_read_png_palette_image_uses_palette_gray_levels(tmp_path):
    gray = np.tile(np.arange(101, dtype=np.uint8) * 2, (101, 1))
    im = Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    path = tmp_path / "p.png"
    im.save(path)
    assert Image.open(path).mode == "P"
    expected = np.asarray(Image.open(path).convert("L"), np.float32) / 255
    np.testing.assert_allclose(data.read_png(path), expected, atol=1 / 255)


@pytest.mark.parametrize("value,bits", [(1, 8), (255, 8), (1, 16), (65535, 16)])
def test_read_png_mask_salt_where_positive(tmp_path, value, bits):
    m = np.zeros((101, 101), np.uint16 if bits == 16 else np.uint8)
    m[5:9, 7] = value
    path = tmp_path / "m.png"
    Image.fromarray(m).save(path)
    out = data.read_png(path, "mask")
    assert out.dtype == bool and out.sum() == 4 and out[5:9, 7].all()


def test_read_images_empty():
    assert data.read_images([], "image").shape == (0, 101, 101, 1)
    assert data.read_images([], "mask").shape == (0, 101, 101)


# --------------------------------------------------------------------------- bad input
def _rewrite_csv(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _save_gray(path, size=(101, 101), mode="L"):
    Image.fromarray(np.full(size[::-1], 120, np.uint8)).convert(mode).save(path)


def damage_truncated_image(s):
    _truncate(s.image_path(3))
    return [str(s.image_path(3)), "corrupt or not a PNG"]


def damage_truncated_mask(s):
    _truncate(s.mask_path(5))
    return [str(s.mask_path(5)), "cannot read mask"]


def damage_empty_file(s):
    s.image_path(4).write_bytes(b"")
    return [str(s.image_path(4)), "corrupt or not a PNG"]


def damage_text_as_png(s):
    s.image_path(2).write_text("this is not an image\n")
    return [str(s.image_path(2)), "not a PNG"]


def damage_jpeg_as_png(s):
    Image.fromarray(np.full((101, 101, 3), 80, np.uint8)).save(s.image_path(6), format="JPEG")
    return [str(s.image_path(6)), "JPEG file, not a PNG"]


def damage_wrong_size(s):
    _save_gray(s.image_path(7), (100, 101))
    return [str(s.image_path(7)), "is 100x101, expected 101x101"]


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` (8-bit gray) and holds no pixel data: what
    Pillow reads at open() without decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def damage_huge_image(s):
    # 400 M pixels: Pillow refuses it at open() as a decompression bomb, before any size check
    _png_header_only(s.image_path(4), 20000, 20000)
    return [str(s.image_path(4)), "far larger than 101x101"]


def damage_large_image_header(s):
    # 10 M pixels: refused from the header, without decoding (there is nothing to decode)
    _png_header_only(s.image_path(5), 5000, 2000)
    return [str(s.image_path(5)), "is 5000x2000, expected 101x101"]


def damage_wrong_mask_size(s):
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(s.mask_path(1))
    return [str(s.mask_path(1)), "128x128"]


def damage_unsupported_mode(s):
    _save_gray(s.image_path(8), mode="1")  # bilevel
    return [str(s.image_path(8)), "unsupported PNG mode '1'"]


def damage_mask_without_image(s):
    s.image_path(9).unlink()
    return [str(s.mask_path(9)), "mask without image"]


def damage_image_without_mask(s):
    s.mask_path(10).unlink()
    return [str(s.image_path(10)), "image without mask"]


def damage_csv_missing_column(s):
    _rewrite_csv(s.root / "train.csv", lambda df: df[["id"]])
    return [str(s.root / "train.csv"), "lacks column(s) ['rle_mask']"]


def damage_csv_renamed_column(s):
    _rewrite_csv(s.root / "train.csv", lambda df: df.rename(columns={"rle_mask": "rle"}))
    return [str(s.root / "train.csv"), "'rle_mask'"]


def damage_csv_missing_row(s):
    _rewrite_csv(s.root / "train.csv", lambda df: df[df["id"] != s.ids[4]])
    return [str(s.root / "train.csv"), f"no row for image id '{s.ids[4]}'"]


def damage_csv_duplicate_row(s):
    _rewrite_csv(s.root / "train.csv", lambda df: pd.concat([df, df.iloc[[2]]]))
    return [str(s.root / "train.csv"), f"repeats id '{s.ids[2]}'"]


def damage_malformed_rle(s):
    def edit(df):
        df.loc[df["id"] == s.ids[3], "rle_mask"] = "1 2 3"
        return df

    _rewrite_csv(s.root / "train.csv", edit)
    return [str(s.root / "train.csv"), f"malformed RLE for id '{s.ids[3]}'", "odd number"]


def damage_overlapping_rle(s):
    def edit(df):
        df.loc[df["id"] == s.ids[5], "rle_mask"] = "10 5 12 3"
        return df

    _rewrite_csv(s.root / "train.csv", edit)
    return [f"malformed RLE for id '{s.ids[5]}'", "overlap"]


def damage_rle_disagrees(s):
    k = 2  # the all-salt mask; its RLE now misses one pixel
    def edit(df):
        df.loc[df["id"] == s.ids[k], "rle_mask"] = "1 10200"
        return df

    _rewrite_csv(s.root / "train.csv", edit)
    return [f"RLE for id '{s.ids[k]}' disagrees with {s.mask_path(k)} in 1 pixels"]


def damage_rle_on_empty_mask(s):
    def edit(df):
        df.loc[df["id"] == s.ids[1], "rle_mask"] = "100 3"
        return df

    _rewrite_csv(s.root / "train.csv", edit)
    return [f"RLE for id '{s.ids[1]}' disagrees", "in 3 pixels"]


def damage_missing_depth(s):
    _rewrite_csv(s.root / "depths.csv", lambda df: df[df["id"] != s.ids[6]])
    return [str(s.root / "depths.csv"), f"no z for id '{s.ids[6]}'"]


def damage_bad_depth(s):
    def edit(df):
        df.loc[df["id"] == s.ids[0], "z"] = "deep"
        return df

    _rewrite_csv(s.root / "depths.csv", edit)
    return [str(s.root / "depths.csv"), "non-numeric z 'deep'"]


def damage_missing_depths_file(s):
    (s.root / "depths.csv").unlink()
    return [f"missing file: {s.root / 'depths.csv'}"]


def damage_missing_masks_folder(s):
    for p in (s.root / "train" / "masks").iterdir():
        p.unlink()
    (s.root / "train" / "masks").rmdir()
    return [f"missing folder: {s.root / 'train' / 'masks'}"]


def damage_missing_images_folder(s):
    (s.root / "train" / "images").rename(s.root / "train" / "imgs")
    return [f"missing folder: {s.root / 'train' / 'images'}"]


def damage_no_pngs(s):
    for sub in ("images", "masks"):
        for p in (s.root / "train" / sub).iterdir():
            p.unlink()
    return [f"no PNG files in {s.root / 'train' / 'images'}"]


def damage_missing_train_csv(s):
    (s.root / "train.csv").unlink()
    return ["no TGS data found", str(s.root)]


DAMAGES = [v for k, v in sorted(globals().items()) if k.startswith("damage_")]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[7:])
def test_bad_input_names_culprit_and_changes_nothing(synthetic, damage):
    expected = damage(synthetic)
    before = tree_hashes(synthetic.root)
    with pytest.raises(DataError) as info:
        data.load_train(synthetic.root)
    msg = str(info.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert tree_hashes(synthetic.root) == before  # nothing modified, created or deleted


def test_check_rle_false_skips_the_csv_comparison(synthetic):
    damage_rle_disagrees(synthetic)
    ds = data.load_train(synthetic.root, check_rle=False)
    np.testing.assert_array_equal(ds.masks, synthetic.masks)  # masks come from the PNGs


def test_corrupt_test_image_named(synthetic):
    path = synthetic.root / "test" / "images" / f"{synthetic.test_ids[1]}.png"
    _truncate(path)
    with pytest.raises(DataError, match=str(path)):
        data.load_test(synthetic.root)


def test_missing_test_folder(synthetic, tmp_path):
    with pytest.raises(DataError, match="missing folder"):
        data.load_test(images_dir=tmp_path / "nowhere")


def test_read_png_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"missing image file: {tmp_path / 'a.png'}"):
        data.read_png(tmp_path / "a.png")


def test_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- finding the data
@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A fake project at tmp/proj with tmp/shared/data/tgs-salt beside it; no SALT_DATA_DIR."""
    proj = tmp_path / "proj"
    proj.mkdir()
    monkeypatch.setattr(data, "PROJECT_ROOT", proj)
    monkeypatch.delenv("SALT_DATA_DIR", raising=False)
    dirs = {
        "explicit": tmp_path / "explicit",
        "env": tmp_path / "env",
        "data": proj / "data",
        "shared": tmp_path / "shared" / "data" / "tgs-salt",
    }
    for d in dirs.values():
        d.mkdir(parents=True)
    return dirs


def _fill(folder):
    (folder / "train.csv").write_text("id,rle_mask\n")


@pytest.mark.parametrize(
    "filled,env,explicit,winner",
    [
        (["explicit", "env", "data", "shared"], True, True, "explicit"),
        (["env", "data", "shared"], True, False, "env"),
        (["data", "shared"], True, False, "data"),  # SALT_DATA_DIR set but empty: next in line
        (["data", "shared"], False, False, "data"),
        (["shared"], False, False, "shared"),
        (["env", "shared"], False, False, "shared"),  # env folder not named: not looked at
    ],
)
def test_data_dir_resolution_order(layout, monkeypatch, filled, env, explicit, winner):
    for name in filled:
        _fill(layout[name])
    if env:
        monkeypatch.setenv("SALT_DATA_DIR", str(layout["env"]))
    got = data.find_data_dir(layout["explicit"] if explicit else None)
    assert got == layout[winner].resolve()


def test_explicit_path_without_data_does_not_fall_back(layout):
    _fill(layout["shared"])
    with pytest.raises(DataError) as info:
        data.find_data_dir(layout["explicit"])
    assert str(layout["explicit"]) in str(info.value)
    assert str(layout["shared"]) not in str(info.value)


def test_no_data_error_says_how_to_get_it(layout, monkeypatch):
    monkeypatch.setenv("SALT_DATA_DIR", str(layout["env"]))
    with pytest.raises(DataError) as info:
        data.find_data_dir()
    msg = str(info.value)
    for d in ("env", "data", "shared"):
        assert str(layout[d]) in msg
    assert "SALT_DATA_DIR" in msg and "salt data --kaggle" in msg and "data/README.md" in msg


# --------------------------------------------------------------------------- folds
def realistic_classes(n=400, seed=0):
    """Coverage classes shaped like the real data: ~39% empty, the rest spread over 1..10."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.39, 0, rng.integers(1, 11, n))


@pytest.mark.parametrize("n_folds", [2, 5, 7])
def test_kfold_deterministic_and_seeded(n_folds):
    classes = realistic_classes()
    a = data.kfold(classes, n_folds, seed=1)
    b = data.kfold(classes, n_folds, seed=1)
    c = data.kfold(classes, n_folds, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert sorted(set(a.tolist())) == list(range(n_folds))


@pytest.mark.parametrize("n_folds,seed", [(5, 42), (5, 0), (3, 7), (10, 1)])
def test_kfold_stratified(n_folds, seed):
    classes = realistic_classes(seed=seed)
    assert np.bincount(classes).min() >= n_folds
    folds = data.kfold(classes, n_folds, seed)
    for c in np.unique(classes):
        counts = np.bincount(folds[classes == c], minlength=n_folds)
        assert counts.max() - counts.min() <= 1, (c, counts)
    sizes = np.bincount(folds, minlength=n_folds)
    assert sizes.max() - sizes.min() <= 1 + len(np.unique(classes)) // n_folds


@pytest.mark.parametrize(
    "classes,merged",
    [
        # the rarest first: 5 (1 image) is as near 1 as 9 and goes to the lower, 1 (now 3) then to 0,
        # 10 (3) to 9; 0 and 9 have 5 or more and stay
        ([0] * 30 + [1] * 2 + [5] * 1 + [10] * 3 + [9] * 8, [0] * 30 + [0] * 2 + [0] * 1 + [9] * 3 + [9] * 8),
        # 4 (1 image) skips the empty classes 3 and 5 and joins the nearest class with members, 6 (not 1)
        ([1] * 6 + [4] + [6] * 6, [1] * 6 + [6] + [6] * 6),
        # no class is rare: nothing changes
        ([0] * 5 + [3] * 5, [0] * 5 + [3] * 5),
        # two rare classes: they merge with each other and then hold enough
        ([1, 1, 1, 8, 8], [1, 1, 1, 1, 1]),
    ],
)
def test_merge_rare_classes_by_hand(classes, merged):
    np.testing.assert_array_equal(data.merge_rare_classes(np.array(classes), 5), merged)


def test_kfold_rare_classes_still_split_without_warnings():
    """sklearn warns when a class has fewer members than folds; merging first leaves none such."""
    classes = np.array([0] * 30 + [1] * 2 + [5] * 1 + [10] * 3 + [9] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folds = data.kfold(classes, 5, 0)
    assert sorted(set(folds.tolist())) == list(range(5))
    for group in (classes <= 5, classes >= 9):  # the merged groups are each stratified
        counts = np.bincount(folds[group], minlength=5)
        assert counts.max() - counts.min() <= 1, counts


def test_kfold_few_images_per_class():
    # 12 images, no class with 5 members: merged until each has 5 or more, then stratified
    classes = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folds = data.kfold(classes, 5, 0)
    assert sorted(set(folds.tolist())) == list(range(5))
    assert sorted(np.bincount(folds).tolist()) == [2, 2, 2, 3, 3]


def test_kfold_of_dataset(synthetic):
    ds = data.load_train(synthetic.root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning about rare classes in 12 images
        folds = data.kfold(ds, 3, 42)
        np.testing.assert_array_equal(folds, data.kfold(ds.coverage_class, 3, 42))
    assert folds.shape == (len(ds),) and set(folds.tolist()) == {0, 1, 2}


def test_kfold_too_few_images():
    with pytest.raises(DataError, match="cannot split 3 images into 5 folds"):
        data.kfold(np.array([0, 0, 1]), 5, 0)


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.slow
def test_real_training_set(real_data):
    ds = data.load_train(real_data)  # its speed (target: under 10 s) is benchmarks/bench_data.py's
    assert len(ds) == 3400 and len(set(ds.ids.tolist())) == 3400
    empty = float((ds.coverage == 0).mean())
    assert 0.37 < empty < 0.41, empty
    black = int((ds.images.reshape(len(ds), -1).max(axis=1) == 0).sum())
    assert black == 70
    assert not ds.masks[ds.images.reshape(len(ds), -1).max(axis=1) == 0].any()  # black -> empty
    # drawn as whole columns, read independently from train.csv: in the column-major RLE such a mask is
    # runs that each start at the top of a column and cover whole columns
    def whole_columns(rle):
        pairs = [int(v) for v in rle.split()]
        h = data.IMAGE_SIZE
        return bool(pairs) and all((a - 1) % h == 0 and n % h == 0 for a, n in zip(pairs[::2], pairs[1::2]))

    csv = pd.read_csv(real_data / "train.csv", dtype=str, keep_default_na=False).set_index("id")
    by_rle = {i for i in ds.ids if whole_columns(csv.loc[i, "rle_mask"])}
    assert set(ds.ids[data.column_masks(ds.masks)]) == by_rle and len(by_rle) == 95
    assert np.isfinite(ds.depths).all() and 50 <= ds.depths.min() and ds.depths.max() <= 959
    folds = data.kfold(ds, 5, 42)
    np.testing.assert_array_equal(folds, data.kfold(ds, 5, 42))
    for c in range(11):
        counts = np.bincount(folds[ds.coverage_class == c], minlength=5)
        assert counts.max() - counts.min() <= 1


@pytest.mark.realdata
def test_real_test_images(real_data):
    ds = data.load_test(real_data, limit=50)
    assert len(ds) == 50 and ds.images.shape == (50, 101, 101, 1)
    assert np.isfinite(ds.depths).all()


def test_make_data_dir_is_deterministic(tmp_path):
    a = make_data_dir(tmp_path / "a", n=6, seed=3)
    b = make_data_dir(tmp_path / "b", n=6, seed=3)
    assert a.ids.tolist() == b.ids.tolist()
    assert tree_hashes(a.root) == tree_hashes(b.root)
    df = pd.read_csv(a.root / "train.csv", keep_default_na=False)
    for i, text in zip(df["id"], df["rle_mask"]):
        k = a.ids.tolist().index(i)
        np.testing.assert_array_equal(rle.decode(text), a.masks[k])
    assert isinstance(a.root, Path)


def test_list_pngs_refuses_other_cases_of_the_extension(tmp_path):
    for name in ("a.png", "b.PNG", "c.Png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"2 file\(s\) end in another case of .png, e.g. b.PNG"):
        data.list_pngs(tmp_path)
    (tmp_path / "b.PNG").unlink()
    (tmp_path / "c.Png").unlink()
    assert data.list_pngs(tmp_path) == ["a"]


def test_kaggle_bundle_unpacks_the_zips_inside_it(tmp_path):
    """The competition download is one zip holding train.zip and test.zip: all of it is unpacked,
    the inner ones into train/ and test/."""
    import io as _io
    import zipfile

    def zip_bytes(files: dict) -> bytes:
        buf = _io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, payload in files.items():
                zf.writestr(name, payload)
        return buf.getvalue()

    train = zip_bytes({"images/a.png": b"x", "masks/a.png": b"y"})
    test = zip_bytes({"images/t.png": b"z"})
    (tmp_path / "tgs-salt-identification-challenge.zip").write_bytes(
        zip_bytes({"train.zip": train, "test.zip": test, "train.csv": "id,rle_mask\n", "depths.csv": "id,z\n"}))
    data.extract_kaggle_zips(tmp_path)
    assert (tmp_path / "train" / "images" / "a.png").read_bytes() == b"x"
    assert (tmp_path / "train" / "masks" / "a.png").is_file() and (tmp_path / "test" / "images" / "t.png").is_file()
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "depths.csv").is_file()


def test_kaggle_download_uses_the_kaggle_beside_this_python(tmp_path, monkeypatch):
    """``.venv/bin/pip install kaggle`` puts the command in .venv/bin, which is not on PATH unless the
    venv is activated: it is found there (a fake one here), and its absence is named before any folder
    is made."""
    import subprocess
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match=rf"the `kaggle` command is not installed: {bindir / 'pip'} install kaggle"):
        data.download_kaggle(tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    (bindir / "kaggle").write_text("#!/bin/sh\nexit 3\n")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd) or
                        (_ for _ in ()).throw(subprocess.CalledProcessError(3, cmd)))
    with pytest.raises(data.DataError, match="kaggle download failed \\(exit 3\\)"):
        data.download_kaggle(tmp_path / "dest")
    assert calls[0][0] == str(bindir / "kaggle") and calls[0][-1] == str(tmp_path / "dest")
