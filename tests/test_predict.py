"""Tests of saltlib.predict (post-processing, bundles, submissions, predict_folder, `salt predict`)
and of the benchmark script. Tiny models (2 base filters, depth 1) keep them fast."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saltlib import litert, predict, rle
from saltlib.data import DataError
from saltlib.predict import BundleError

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers / fixtures
def tiny_model(seed: int):
    import keras

    from saltlib.model import build_resnet_unet

    keras.utils.set_random_seed(seed)
    return build_resnet_unet(base_filters=2, depth=1, blocks_per_level=1, dropout=0.0, name=f"tiny{seed}")


def tiny_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish random images so predictions are not constant
    x = rng.random((n, 101, 101, 1)).astype(np.float32)
    return ((x + x[:, ::-1] * 0.5 + np.linspace(0, 1, 101)[None, None, :, None]) / 2.5).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models saved as .keras files: (paths, in-memory models)."""
    d = tmp_path_factory.mktemp("models")
    paths, ms = [], []
    for s in range(2):
        m = tiny_model(s)
        p = d / f"m{s}.keras"
        m.save(p)
        paths.append(p)
        ms.append(m)
    return paths, ms


@pytest.fixture(scope="module")
def bundle_dir(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle") / "b"
    return predict.write_bundle(d, models[0], threshold=0.05, min_size=3, tta=True, meta={"cv": 0.5})


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """A folder of 7 synthetic 101x101 PNGs (grayscale and RGB)."""
    d = tmp_path_factory.mktemp("pngs")
    x = tiny_images(7, seed=3)
    for k in range(7):
        a = np.round(x[k, :, :, 0] * 255).astype(np.uint8)
        im = Image.fromarray(a) if k % 2 else Image.fromarray(np.stack([a] * 3, -1))
        im.save(d / f"img{k:02d}.png")
    return d


def copy_dir(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


# --------------------------------------------------------------------------- postprocess
def test_postprocess_threshold_and_min_size_boundary():
    logits = np.full((3, 101, 101), -1.0, np.float32)
    logits[0, :2, :2] = 0.5  # 4 pixels above 0
    logits[1, :5, 0] = 0.5  # 5 pixels
    logits[2, 0, 0] = 0.0  # exactly at the threshold: not salt
    m = predict.postprocess(logits, threshold=0.0, min_size=5)
    assert m.dtype == bool and m.shape == (3, 101, 101)
    assert m[0].sum() == 0  # 4 < 5 -> emptied
    assert m[1].sum() == 5  # 5 == min_size -> kept
    assert m[2].sum() == 0  # > threshold is strict
    m = predict.postprocess(logits, threshold=0.0, min_size=4)
    assert m[0].sum() == 4
    assert predict.postprocess(logits, threshold=0.6).sum() == 0
    assert predict.postprocess(logits, threshold=-2.0).all()
    # (N,H,W,1) and single (H,W) inputs
    assert predict.postprocess(logits[..., None]).shape == (3, 101, 101)
    assert predict.postprocess(logits[1]).shape == (1, 101, 101)
    # the input is not modified
    assert logits[0, 0, 0] == 0.5


@pytest.mark.parametrize(
    "gate,kept",
    [
        (None, [True, True, True]),
        (0.5, [False, True, True]),  # image 0 peaks at exactly 0.5: gated (<=)
        (0.9, [False, False, True]),
        (3.0, [False, False, False]),
    ],
)
def test_postprocess_peak_gate(gate, kept):
    """Peaks 0.5, 0.9 and 3.0, each over a 9-pixel patch above the cut-off 0."""
    logits = np.full((3, 101, 101), -2.0, np.float32)
    for k, peak in enumerate([0.5, 0.9, 3.0]):
        logits[k, 10:13, 10:13] = 0.2
        logits[k, 11, 11] = peak
    m = predict.postprocess(logits, threshold=0.0, peak_gate=gate)
    assert [bool(x) for x in m.any(axis=(1, 2))] == kept
    assert all(m[k].sum() == 9 for k in range(3) if kept[k])  # the gate empties whole images only
    # the gate and the small-mask size act together: a 9-pixel patch passes min_size 9, not 10
    assert [bool(x) for x in predict.postprocess(logits, 0.0, min_size=9, peak_gate=gate).any(axis=(1, 2))] == kept
    assert not predict.postprocess(logits, 0.0, min_size=10, peak_gate=gate).any()


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_postprocess_refuses_non_finite_logits(bad_value):
    """``NaN > 0`` is False, so a diverged model would read as "no salt": refused, naming the images."""
    logits = np.full((4, 101, 101), 1.0, np.float32)
    logits[1, 3, 4] = bad_value
    logits[3, 100, 100] = bad_value
    with pytest.raises(predict.NonFiniteLogitsError, match=r"for 2 image\(s\), first at index 1") as e:
        predict.postprocess(logits)
    assert e.value.indices == [1, 3]
    assert isinstance(e.value, ValueError)
    assert predict.postprocess(logits[[0, 2]]).all()  # the finite images alone pass
    again = pickle.loads(pickle.dumps(e.value))  # e.g. raised in a worker process
    assert again.indices == [1, 3] and str(again) == str(e.value)


@pytest.mark.parametrize("dtype", [np.int32, np.float16, bool])
def test_postprocess_gate_on_any_dtype(dtype):
    """Integer, half and bool logits: the gate compares each image's largest value."""
    logits = np.zeros((3, 101, 101), dtype)
    logits[1, :3, :3] = 1
    m = predict.postprocess(logits, threshold=0.5, peak_gate=0.5)
    assert m.sum(axis=(1, 2)).tolist() == [0, 9, 0]
    assert predict.postprocess(logits, threshold=0.5, peak_gate=1.0).sum() == 0  # gated: peak 1 <= 1
    assert predict.postprocess(np.zeros((0, 101, 101), dtype), peak_gate=0.5).shape == (0, 101, 101)


# --------------------------------------------------------------------------- bundles
def test_bundle_round_trip_same_logits(models, bundle_dir):
    from saltlib.train import predict_logits

    paths, ms = models
    spec = json.loads((bundle_dir / "bundle.json").read_text())
    assert spec["models"] == ["model0.keras", "model1.keras"]
    assert spec["threshold"] == 0.05 and spec["min_size"] == 3 and spec["tta"] is True
    assert spec["input_shape"] == [101, 101, 1] and spec["meta"] == {"cv": 0.5}
    assert not [p for p in bundle_dir.iterdir() if p.name.startswith(".")]  # no temp files left

    b = predict.load_bundle(bundle_dir)
    assert len(b.models) == 2 and b.tta and b.threshold == 0.05 and b.min_size == 3 and b.meta == {"cv": 0.5}
    x = tiny_images(5)
    # each loaded model gives the same logits as the model it was saved from
    for loaded, orig in zip(b.models, ms):
        np.testing.assert_allclose(predict_logits(loaded, x), predict_logits(orig, x), atol=1e-5)
    # ensemble = mean of the models; TTA = average with the flipped prediction, flipped back
    per_model = []
    for orig in ms:
        plain = np.asarray(orig.predict(x, verbose=0))[..., 0]
        flipped = np.asarray(orig.predict(x[:, :, ::-1], verbose=0))[..., 0][:, :, ::-1]
        per_model.append((plain, 0.5 * (plain + flipped)))
    no_tta = b.predict_logits(x, tta=False)
    with_tta = b.predict_logits(x)
    assert no_tta.shape == (5, 101, 101) and no_tta.dtype == np.float32
    np.testing.assert_allclose(no_tta, (per_model[0][0] + per_model[1][0]) / 2, atol=1e-5)
    np.testing.assert_allclose(with_tta, (per_model[0][1] + per_model[1][1]) / 2, atol=1e-5)
    assert not np.allclose(no_tta, with_tta)  # the flip really changes something
    np.testing.assert_array_equal(b.predict_masks(x), predict.postprocess(with_tta, 0.05, 3))
    # (N,101,101) images are accepted as well
    np.testing.assert_allclose(b.predict_logits(x[..., 0]), with_tta, atol=1e-6)


def ramp_model(k: int):
    """A model with hand-computable logits: the image times (k + 1) * column / 100."""
    import keras

    ramp = ((k + 1) * np.arange(101) / 100).astype(np.float32).reshape(1, 1, 101, 1)
    inputs = keras.Input((101, 101, 1))
    return keras.Model(inputs, keras.layers.Lambda(lambda t: t * ramp)(inputs), name=f"ramp{k}")


@pytest.mark.parametrize("n,batch_size", [(5, 64), (5, 2), (7, 1), (1, 3)])
def test_ensemble_flip_tta_hand_computed(n, batch_size):
    """Two ramp models: without TTA the mean is 1.5 x column / 100; with TTA each ramp r(c) is
    averaged with r(100 - c), so member k gives (k + 1) / 2 and the mean 0.75, whatever the column.
    Any batch size, including one image per batch with TTA and batches that do not divide N."""
    b = predict.Bundle(models=[ramp_model(0), ramp_model(1)], tta=True)
    x = tiny_images(n)[..., 0]
    np.testing.assert_allclose(b.predict_logits(x, batch_size=batch_size), 0.75 * x, rtol=1e-6, atol=1e-7)
    no_tta = b.predict_logits(x, batch_size=batch_size, tta=False)
    np.testing.assert_allclose(no_tta, 1.5 * x * np.arange(101) / 100, rtol=1e-6, atol=1e-7)
    assert no_tta.dtype == np.float32 and no_tta.shape == (n, 101, 101)
    # one graph per TTA setting, built once
    assert b.ensemble(True) is b.ensemble(True) and b.ensemble(True) is not b.ensemble(False)


def test_flip_ensemble_needs_a_member():
    from saltlib.model import FlipEnsemble

    with pytest.raises(ValueError, match="at least one member"):
        FlipEnsemble([])


def test_write_bundle_rewrites_in_place_and_drops_stale_files(models, tmp_path):
    paths, _ = models
    d = predict.write_bundle(tmp_path / "b", paths, 0.0, 0, False)
    (d / "README.md").write_text("model card")  # other files in the folder are kept
    # rewrite with the folder's own files, swapped and reduced to one model
    predict.write_bundle(d, [d / "model1.keras"], 1.5, 10, True, meta={"x": 1})
    spec = json.loads((d / "bundle.json").read_text())
    assert spec["models"] == ["model0.keras"] and spec["threshold"] == 1.5
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "bundle.json", "model0.keras"]
    assert (d / "model0.keras").read_bytes() == paths[1].read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for f in ("bundle.json", "model0.keras"):  # readable like any new file (not a staging file's 0600)
        assert (d / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_bundle_peak_gate_round_trip(models, tmp_path):
    """Written, read back and applied; a bundle without the key (as before the gate existed)
    loads with the gate off."""
    paths, _ = models
    x = tiny_images(4)
    plain = predict.write_bundle(tmp_path / "p", paths, 0.05, 3, True)
    assert "peak_gate" not in json.loads((plain / "bundle.json").read_text())
    assert predict.load_bundle(plain).peak_gate is None
    logits = predict.load_bundle(plain).predict_logits(x)
    peak = logits.max(axis=(1, 2))
    low_to_high = np.sort(peak)
    gate = round(float(low_to_high[1] + low_to_high[2]) / 2, 6)  # between the 2nd and 3rd peak: gates two of four
    d = predict.write_bundle(tmp_path / "g", paths, 0.05, 3, True, peak_gate=gate)
    assert json.loads((d / "bundle.json").read_text())["peak_gate"] == gate
    b = predict.load_bundle(d)
    assert b.peak_gate == gate and f"peak_gate={gate:g}" in b.describe()
    gated, ungated = b.predict_masks(x), predict.postprocess(logits, 0.05, 3)
    np.testing.assert_array_equal(gated, predict.postprocess(logits, 0.05, 3, gate))
    gated_out = peak <= gate
    assert gated_out.sum() == 2 and not gated[gated_out].any() and ungated[gated_out].any()  # the gate removed salt
    np.testing.assert_array_equal(gated[~gated_out], ungated[~gated_out])
    _edit_spec(plain, lambda s: s.update(peak_gate="high"))
    with pytest.raises(BundleError, match=r"peak_gate must be a finite number or null, got 'high'"):
        predict.load_bundle(plain)
    with pytest.raises(BundleError, match=r"peak_gate must be a finite number or null, got inf"):
        predict.write_bundle(tmp_path / "q", paths, 0.0, 0, False, peak_gate=float("inf"))


def test_write_bundle_rejects_bad_input(models, tmp_path):
    paths, _ = models
    with pytest.raises(BundleError, match="at least one model"):
        predict.write_bundle(tmp_path / "b", [], 0.0, 0, False)
    with pytest.raises(BundleError, match="nope.keras"):
        predict.write_bundle(tmp_path / "b", [tmp_path / "nope.keras"], 0.0, 0, False)
    (tmp_path / "junk.keras").write_text("not a zip")
    with pytest.raises(BundleError, match="junk.keras"):
        predict.write_bundle(tmp_path / "b", [tmp_path / "junk.keras"], 0.0, 0, False)
    with pytest.raises(BundleError, match="min_size"):
        predict.write_bundle(tmp_path / "b", paths, 0.0, -1, False)
    with pytest.raises(BundleError, match="threshold"):
        predict.write_bundle(tmp_path / "b", paths, float("nan"), 0, False)


def _edit_spec(d: Path, fn):
    spec = json.loads((d / "bundle.json").read_text())
    fn(spec)
    (d / "bundle.json").write_text(json.dumps(spec))


@pytest.mark.parametrize(
    "case, culprit, pattern",
    [
        ("no_folder", None, "not found"),
        ("no_json", "bundle.json", "bundle.json is missing"),
        ("bad_json", "bundle.json", "not valid JSON"),
        ("not_object", "bundle.json", "JSON object"),
        ("missing_key", "bundle.json", "lacks key"),
        ("unknown_key", "bundle.json", "unknown key"),
        ("bad_type", "bundle.json", "tta must be"),
        ("path_escape", "bundle.json", "plain file name"),
        ("twice", "bundle.json", "'model0.keras' is listed more than once"),
        ("missing_model", "model1.keras", "is missing"),
        ("damaged_model", "model0.keras", "damaged"),
        ("corrupt_model", "model0.keras", "cannot load model"),
    ],
)
def test_incomplete_bundle_raises_naming_the_file(bundle_dir, tmp_path, case, culprit, pattern):
    d = copy_dir(bundle_dir, tmp_path / "b")
    if case == "no_folder":
        d = tmp_path / "does-not-exist"
    elif case == "no_json":
        (d / "bundle.json").unlink()
    elif case == "bad_json":
        (d / "bundle.json").write_text('{"models": ["model0.keras"], ')
    elif case == "not_object":
        (d / "bundle.json").write_text("[1, 2]")
    elif case == "missing_key":
        _edit_spec(d, lambda s: s.pop("threshold"))
    elif case == "unknown_key":
        _edit_spec(d, lambda s: s.update(extra=1))
    elif case == "bad_type":
        _edit_spec(d, lambda s: s.update(tta="yes"))
    elif case == "path_escape":
        _edit_spec(d, lambda s: s.update(models=["../m0.keras"]))
    elif case == "twice":
        _edit_spec(d, lambda s: s.update(models=["model0.keras", "model1.keras", "model0.keras"]))
    elif case == "missing_model":
        (d / "model1.keras").unlink()
    elif case == "damaged_model":
        with open(d / "model0.keras", "r+b") as f:
            f.seek(100)
            f.write(b"\x00garbage\x00")
    elif case == "corrupt_model":  # no checksum recorded: Keras itself must fail, and we name the file
        (d / "model0.keras").write_bytes(b"PK\x03\x04 truncated")
        _edit_spec(d, lambda s: s.pop("sha256"))
    with pytest.raises(BundleError, match=pattern) as e:
        predict.load_bundle(d)
    assert str(d / culprit if culprit else d) in str(e.value)
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------- submissions
def test_write_and_read_submission(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((4, 101, 101)) > 0.7
    masks[1] = False
    ids = ["a", "0001", "c", "d"]
    out = predict.write_submission(ids, masks, tmp_path / "sub.csv")
    df = predict.read_submission(out)
    assert df["id"].tolist() == ids  # leading zeros kept
    assert df["rle_mask"][1] == ""
    for k in range(4):
        np.testing.assert_array_equal(rle.decode(df["rle_mask"][k]), masks[k])
    assert out.read_text().splitlines()[0] == "id,rle_mask"
    with pytest.raises(ValueError, match="duplicate"):
        predict.write_submission(["a", "a"], masks[:2], tmp_path / "dup.csv")
    assert not (tmp_path / "dup.csv").exists()
    (tmp_path / "bad.csv").write_text("id,rle_mask\nx,1 2 3\n")
    with pytest.raises(DataError, match="'x'"):
        predict.read_submission(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- predict_folder
def test_predict_folder_writes_one_checked_row_per_image(bundle_dir, images_dir, tmp_path, capsys):
    from saltlib.data import read_images

    out = predict.predict_folder(bundle_dir, images_dir, tmp_path / "sub" / "submission.csv", batch_size=4,
                                 chunk_size=3)
    text = capsys.readouterr().out
    assert "chunk 3/3" in text and "images/s" in text
    df = predict.read_submission(out)
    ids = sorted(p.stem for p in images_dir.glob("*.png"))
    assert df["id"].tolist() == ids
    b = predict.load_bundle(bundle_dir)
    expected = predict.postprocess(
        b.predict_logits(read_images([images_dir / f"{i}.png" for i in ids])), b.threshold, b.min_size
    )
    assert expected.any()  # the comparison below is not trivially about empty masks
    for k, r in enumerate(df["rle_mask"]):
        np.testing.assert_array_equal(rle.decode(r), expected[k])
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv"]


def test_predict_folder_applies_the_bundles_min_size_and_gate(models, images_dir, tmp_path):
    """A bundle whose small-mask size and peak gate each empty some images: the submission holds
    exactly the masks numpy gives from the logits (cut-off, then the gate, then the size), and each
    setting changed at least one image."""
    from saltlib.data import read_images

    ids = sorted(p.stem for p in images_dir.glob("*.png"))
    plain = predict.write_bundle(tmp_path / "plain", models[0], threshold=0.0, min_size=0, tta=False)
    logits = predict.load_bundle(plain).predict_logits(read_images([images_dir / f"{i}.png" for i in ids]))
    area, peak = (logits > 0).sum(axis=(1, 2)), logits.max(axis=(1, 2))
    assert (area > 0).sum() >= 3, "the tiny models must draw salt on several images for this test"
    salted = np.flatnonzero(area > 0)
    low, next_low = np.sort(peak[salted])[:2]
    gate = float(low + next_low) / 2  # empties the salted image with the lowest peak (peak <= gate)
    min_size = int(np.sort(area[peak > gate])[0]) + 1  # and the smallest mask the gate kept
    expected = (logits > 0) & (peak > gate)[:, None, None] & (area >= min_size)[:, None, None]
    assert ((area > 0) & (peak <= gate)).any() and ((peak > gate) & (area > 0) & (area < min_size)).any()
    assert expected.any()
    gated = predict.write_bundle(tmp_path / "gated", models[0], threshold=0.0, min_size=min_size, tta=False,
                                 peak_gate=gate)
    df = predict.read_submission(predict.predict_folder(gated, images_dir, tmp_path / "s.csv", batch_size=3,
                                                        runtime="keras"))  # the runtime of the logits above
    assert df["id"].tolist() == ids
    for k, r in enumerate(df["rle_mask"]):
        np.testing.assert_array_equal(rle.decode(r), expected[k], err_msg=ids[k])


@pytest.mark.parametrize("bad", ["truncated", "not_png", "wrong_size"])
def test_predict_folder_bad_image_keeps_existing_output(bundle_dir, images_dir, tmp_path, bad):
    d = copy_dir(images_dir, tmp_path / "imgs")
    culprit = d / "img03.png"
    if bad == "truncated":
        culprit.write_bytes(culprit.read_bytes()[:60])
    elif bad == "not_png":
        culprit.write_text("hello, I am not an image")
    else:
        Image.fromarray(np.zeros((101, 100), np.uint8)).save(culprit)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "submission.csv"
    out.write_bytes(b"id,rle_mask\nold,1 1\n")
    before = out.read_bytes()
    with pytest.raises(DataError) as e:
        predict.predict_folder(bundle_dir, d, out, verbose=False)
    assert str(culprit) in str(e.value)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["submission.csv"]  # no temp files behind


def test_predict_folder_missing_or_empty_folder(bundle_dir, tmp_path):
    with pytest.raises(DataError, match="missing folder"):
        predict.predict_folder(bundle_dir, tmp_path / "nowhere", tmp_path / "s.csv", verbose=False)
    with pytest.raises(DataError, match="missing folder"):  # the output's new folders are not made for nothing
        predict.predict_folder(bundle_dir, tmp_path / "nowhere", tmp_path / "new" / "deep" / "s.csv", verbose=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG files in .*empty"):
        predict.predict_folder(bundle_dir, tmp_path / "empty", tmp_path / "s.csv", verbose=False)
    assert not (tmp_path / "s.csv").exists()


def test_predict_folder_refuses_unwritable_output_before_work(bundle_dir, images_dir, tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        predict.predict_folder(bundle_dir, images_dir, tmp_path / "adir", verbose=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="cannot write the output"):
        predict.predict_folder(bundle_dir, images_dir, tmp_path / "afile" / "s.csv", verbose=False)
    with pytest.raises(DataError, match=r"cannot write the output .*afile is not a folder"):
        predict.predict_folder(bundle_dir, images_dir, tmp_path / "afile" / "deeper" / "s.csv", verbose=False)
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a dangling link where a folder should be
    with pytest.raises(DataError, match=r"cannot write the output .*link is not a folder"):
        predict.predict_folder(bundle_dir, images_dir, tmp_path / "link" / "s.csv", verbose=False)
    (tmp_path / "link").unlink()
    with pytest.raises(ValueError, match="batch_size"):
        predict.predict_folder(bundle_dir, images_dir, tmp_path / "s.csv", batch_size=0, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


def test_predict_folder_failure_while_writing_leaves_old_output(bundle_dir, images_dir, tmp_path, monkeypatch):
    out = tmp_path / "submission.csv"
    out.write_text("id,rle_mask\nold,\n")

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(predict.pd.DataFrame, "to_csv", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        predict.predict_folder(bundle_dir, images_dir, out, verbose=False)
    assert out.read_text() == "id,rle_mask\nold,\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_predict_folder_refuses_nan_logits(bundle_dir, images_dir, tmp_path, monkeypatch):
    """A diverged model's NaN logits would pass ``> threshold`` as "no salt": refused, naming an image."""
    out = tmp_path / "submission.csv"
    real = predict.Bundle.predict_logits

    def nan_in_second(self, images, batch_size=64):
        logits = real(self, images, batch_size)
        logits[1, 5, 5] = np.nan
        return logits

    monkeypatch.setattr(predict.Bundle, "predict_logits", nan_in_second)
    ids = sorted(p.stem for p in images_dir.glob("*.png"))
    with pytest.raises(ValueError, match=rf"NaN or infinite logits for 1 image\(s\) .* e.g. {ids[1]} .*nothing written"):
        predict.predict_folder(bundle_dir, images_dir, out, verbose=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_load_bundle_members_loads_the_chosen_models(models, bundle_dir):
    from saltlib.train import predict_logits

    _, ms = models
    x = tiny_images(3)
    one = predict.load_bundle(bundle_dir, members=[1])
    assert one.files == ["model1.keras"] and len(one.models) == 1
    np.testing.assert_allclose(one.predict_logits(x), predict_logits(ms[1], x, tta=True), atol=1e-5)
    both = predict.load_bundle(bundle_dir, members=["1", "0"])  # as the CLI passes them; order kept
    assert both.files == ["model1.keras", "model0.keras"]
    np.testing.assert_allclose(both.predict_logits(x), predict.load_bundle(bundle_dir).predict_logits(x), atol=1e-6)


@pytest.mark.parametrize("members", [[], [2], [-1], [0, 0], ["x"], [0.5], 3])
def test_load_bundle_rejects_bad_members(bundle_dir, members):
    with pytest.raises(ValueError, match=r"members .* for bundle .*give distinct indices of its 2 model\(s\), 0..1"):
        predict.load_bundle(bundle_dir, members=members)


def test_predict_folder_tta_and_members_overrides(bundle_dir, images_dir, tmp_path, capsys):
    from saltlib.data import read_images
    from saltlib.train import predict_logits

    out = predict.predict_folder(bundle_dir, images_dir, tmp_path / "fast.csv", tta=False, members=[0])
    assert "not as shipped: tta=False; models model0.keras only" in capsys.readouterr().out
    ids = sorted(p.stem for p in images_dir.glob("*.png"))
    m0 = predict.load_bundle(bundle_dir).models[0]
    logits = predict_logits(m0, read_images([images_dir / f"{i}.png" for i in ids]), tta=False)
    expected = predict.postprocess(logits, 0.05, 3)
    assert expected.any()
    got = predict.read_submission(out)
    assert got["id"].tolist() == ids
    for k, r in enumerate(got["rle_mask"]):
        np.testing.assert_array_equal(rle.decode(r), expected[k])
    # as stored: no override line
    predict.predict_folder(bundle_dir, images_dir, tmp_path / "as_stored.csv", tta=True, members=[0, 1])
    assert "not as shipped" not in capsys.readouterr().out


def test_predict_folder_bad_members_fail_before_any_work(bundle_dir, images_dir, tmp_path):
    with pytest.raises(ValueError, match="members \\[5\\]"):
        predict.predict_folder(bundle_dir, images_dir, tmp_path / "s.csv", members=[5])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI
def _salt(*args, timeout=120):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "saltlib.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=timeout,
    )


def test_cli_predict_missing_model_folder(tmp_path, images_dir):
    r = _salt("predict", "--model", str(tmp_path / "nomodel"), "--images", str(images_dir),
              "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 2
    assert "salt predict: error:" in r.stderr and str(tmp_path / "nomodel") in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s.csv").exists()


def test_cli_predict_unknown_runtime(tmp_path, bundle_dir, images_dir):
    r = _salt("predict", "--model", str(bundle_dir), "--images", str(images_dir), "--out", str(tmp_path / "s.csv"),
              "--runtime", "onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--runtime: invalid choice: 'onnx'" in r.stderr and not (tmp_path / "s.csv").exists()


def test_cli_predict_bad_members(tmp_path, bundle_dir, images_dir):
    r = _salt("predict", "--model", str(bundle_dir), "--images", str(images_dir), "--out", str(tmp_path / "s.csv"),
              "--members", "0,2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "salt predict: error: members ['0', '2'] for bundle" in r.stderr and "0..1" in r.stderr
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_cli_predict_end_to_end(tmp_path, bundle_dir, images_dir):
    out = tmp_path / "s.csv"
    r = _salt("predict", "--model", str(bundle_dir), "--images", str(images_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "not as shipped" not in r.stdout
    assert len(predict.read_submission(out)) == 7
    fast = tmp_path / "fast.csv"
    r = _salt("predict", "--model", str(bundle_dir), "--images", str(images_dir), "--out", str(fast),
              "--tta", "off", "--members", "1")
    assert r.returncode == 0, r.stderr
    assert "not as shipped: tta=False; models model1.keras only" in r.stdout
    assert len(predict.read_submission(fast)) == 7
    # the runtime as asked, logged; both write the same submission
    runs = {}
    for runtime in ("keras", "tflite"):
        runs[runtime] = tmp_path / f"{runtime}.csv"
        r = _salt("predict", "--model", str(bundle_dir), "--images", str(images_dir), "--out", str(runs[runtime]),
                  "--runtime", runtime)
        assert r.returncode == 0, r.stderr
        assert f"computing in float32 with {runtime}" in r.stdout
        assert ("converted the ensemble to TensorFlow Lite" in r.stdout) == (runtime == "tflite")
    assert runs["keras"].read_text() == runs["tflite"].read_text() == out.read_text()


# --------------------------------------------------------------------------- compute dtype of bfloat16 bundles
@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory):
    """A bundle of one tiny model stored in bfloat16 (as mixed-precision recipes ship), and its model."""
    import keras

    from saltlib.model import build_resnet_unet

    keras.utils.set_random_seed(5)
    m = build_resnet_unet(base_filters=4, depth=2, blocks_per_level=1, dropout=0.0, empty_head=True,
                          dtype_policy="bfloat16", name="tinybf16")
    # larger weights than the initialisation so the logits are far from zero and bf16 rounding shows
    m.set_weights([np.asarray(w, np.float32) * 1.5 for w in m.get_weights()])
    d = tmp_path_factory.mktemp("bf16") / "m.keras"
    m.save(d)
    return predict.write_bundle(d.parent / "b", [d], threshold=0.0, min_size=0, tta=True), m


@pytest.mark.parametrize("compute_dtype,native,expected", [
    ("auto", "0", "float32"),      # emulated bfloat16: rebuilt in float32
    ("auto", "1", "bfloat16"),     # native bfloat16: kept
    ("float32", "1", "float32"),
    ("stored", "0", "bfloat16"),
])
def test_bf16_bundle_compute_dtype(bf16_bundle, monkeypatch, compute_dtype, native, expected):
    path, stored = bf16_bundle
    monkeypatch.setenv("SALT_BF16", native)
    b = predict.load_bundle(path, compute_dtype=compute_dtype)
    assert b.compute_dtype == expected and f"computing in {expected}" in b.describe()
    conv = b.models[0].get_layer("enc1_conv")
    assert conv.dtype_policy.compute_dtype == expected and conv.dtype_policy.variable_dtype == expected
    # the same network: every weight equal to the stored bfloat16 value, exactly (the final
    # convolution's kernel split over its inputs by project_head: its slices, in order), except
    # where fold_batchnorm folded a batch norm into the convolution before it: that convolution
    # holds the folded weights (computed in float32, then stored in its variable dtype)
    import keras

    from saltlib.model import FoldedBatchNorm, _folded

    loaded = {layer.name: layer for layer in b.models[0].layers}
    folded = {stored.get_layer(n).input._keras_history.operation.name: stored.get_layer(n)
              for n, layer in loaded.items() if isinstance(layer, FoldedBatchNorm)}
    assert len(folded) == 5  # the middle batch norm of each level's one residual block (depth 2: 5 levels)
    for layer in stored.layers:
        if not layer.weights or isinstance(loaded[layer.name], FoldedBatchNorm):
            continue
        if layer.name == "logits":
            parts = [loaded[f"logits_{t._keras_history.operation.name}"] for t in stored.get_layer("fuse_concat").input]
            got = [np.concatenate([part.get_weights()[0] for part in parts], 2), parts[0].get_weights()[1]]
        else:
            got = loaded[layer.name].get_weights()
        want = _folded(layer, folded[layer.name]) if layer.name in folded else layer.get_weights()
        for w, ref in zip(got, want, strict=True):
            ref = np.asarray(keras.ops.cast(np.asarray(ref, np.float32), loaded[layer.name].variable_dtype), np.float32)
            np.testing.assert_array_equal(np.asarray(w, np.float32), ref)
    x = tiny_images(4, seed=9)
    want = np.asarray(stored.predict(x, verbose=0), np.float32)
    got = b.predict_logits(x, tta=False)
    assert np.abs(want).max() > 0.5
    # float32 compute gives the float32 network's logits (within float32 rounding), which differ from
    # the stored bfloat16 model's by its rounding (8 bits of mantissa); bfloat16 compute also rounds
    # the folded kernels to bfloat16 and sums the split final convolution in another order, and
    # lands no further from the float32 network than the stored model does
    exact = np.asarray(predict._float32_twin(stored)(x, training=False))[..., 0]
    np.testing.assert_allclose(exact, want[..., 0], atol=0.05 * np.abs(want).max())
    if expected == "float32":
        np.testing.assert_allclose(got, exact, atol=1e-5 * np.abs(exact).max())
    else:
        err_got, err_stored = np.abs(got - exact).max(), np.abs(want[..., 0] - exact).max()
        assert err_got <= 1.5 * err_stored, (err_got, err_stored)


def test_load_bundle_rejects_unknown_compute_dtype(bf16_bundle):
    with pytest.raises(ValueError, match="compute_dtype must be"):
        predict.load_bundle(bf16_bundle[0], compute_dtype="float16")


# --------------------------------------------------------------------------- benchmark script
@pytest.mark.slow
def test_benchmark_quick(bundle_dir, tmp_path):
    js = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--model", str(bundle_dir), "--quick",
         "--reference", "w2-d1-b1", "--batch-size", "8", "--infer-repeats", "2", "--json", str(js)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("train img/s", "infer img/s", "TTA", "peak RSS", "18,000 images", "ratio"):
        assert needle in out, out
    res = json.loads(js.read_text())
    names = [row["name"] for row in res["rows"]]
    assert names[:2] == ["bundle", "reference"]
    for row in res["rows"][:2]:
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["infer_tta_img_s"] > 0
        assert row["peak_rss_mb"] > 100
    assert res["projection"]["images"] == 18000 and res["projection"]["seconds"] > 0
    for row in res["rows"]:  # two timings each; the median of two is their mean
        for key in ("infer_img_s", "infer_tta_img_s"):
            assert len(row[key + "_runs"]) == 2 and row[key] == pytest.approx(sum(row[key + "_runs"]) / 2)
    pr = res["projection"]
    # the bundle's runtime as `salt predict` picks it; TensorFlow Lite adds its one conversion
    assert res["rows"][0]["runtime"] == litert.resolve_runtime("auto")
    assert (pr["convert_s"] > 0) == (res["rows"][0]["runtime"] == "tflite") and pr["convert_s"] == res["rows"][0]["convert_s"]
    assert ("s converting to TensorFlow Lite" in out) == (pr["convert_s"] > 0) and "runtime auto" in out
    slowest = 18000 / min(res["rows"][0]["infer_tta_img_s_runs"]) + pr["read_s"] + pr["convert_s"]
    assert res["projection"]["slowest_seconds"] == pytest.approx(slowest)
    assert res["projection"]["slowest_seconds"] >= res["projection"]["seconds"]
    fastest = 18000 / max(res["rows"][0]["infer_tta_img_s_runs"]) + pr["read_s"] + pr["convert_s"]
    assert res["projection"]["fastest_seconds"] == pytest.approx(fastest)
    assert res["projection"]["fastest_seconds"] <= res["projection"]["seconds"]
    assert "at the slowest of the 2 timings" in out and "median of 2 timing(s)" in out
    assert "min at the fastest" in out and "each timing, images/s, with the machine's idle CPU share (bundle: " in out
    for row in res["rows"]:  # the idle share of each timing, where /proc/stat is readable
        for key in ("infer_img_s_idle", "infer_tta_img_s_idle"):
            assert len(row[key]) == 2 and all(i is None or 0 <= i <= 1 for i in row[key])
            if Path("/proc/stat").exists():
                assert None not in row[key] and "% idle)" in out
    assert "matrix multiply" in out and "GFLOP/img" in out
    assert res["machine"]["matmul_gflop_s"] > 0 and 0 < res["projection"]["ceiling_model_s"]
    for row in res["rows"][:2]:
        assert row["gflop_per_image"] > 0
        assert row["infer_gflop_s"] == pytest.approx(row["infer_img_s"] * row["gflop_per_image"])


@pytest.mark.parametrize("before,after,share", [
    ((1000, 200), (1400, 300), 0.25),  # 400 jiffies passed, 100 of them idle
    ((1000, 200), (1400, 200), 0.0),
    ((1000, 200), (1400, 600), 1.0),
    ((1000, 200), (1000, 200), None),  # no time passed
    (None, (1400, 300), None),  # no /proc/stat
])
def test_benchmark_idle_share(before, after, share):
    assert _benchmark_module().idle_share(before, after) == share


def _benchmark_module():
    """benchmarks/benchmark.py imported as a module (it is a script, not part of a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "benchmarks" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("empty_head,upscale,pad_to,scse,hypercolumn", [
    (False, 1, 0, False, False), (True, 1, 0, False, False), (True, 2, 0, False, False), (True, 1, 128, False, False),
    (True, 1, 0, True, False), (True, 1, 0, False, True), (False, 1, 0, True, True),
])
def test_benchmark_trains_a_bundle_model_in_its_training_form(empty_head, upscale, pad_to, scse, hypercolumn):
    """A bundle model is timed through a twin of the same shape (mixed bfloat16 where the machine has
    it natively, else float32: what ``mixed_precision: auto`` trains); a model with
    the image head gets the head's three-output training form (and its loss), like `salt train`."""
    from saltlib.model import build_resnet_unet
    from saltlib.train import _has_hypercolumn

    bench = _benchmark_module()
    stored = build_resnet_unet(base_filters=2, depth=2, blocks_per_level=1, dropout=0.1, empty_head=empty_head,
                               dtype_policy="bfloat16", upscale=upscale, pad_to=pad_to, scse=scse,
                               hypercolumn=hypercolumn)
    twin = bench._training_twin(stored, bf16=True)
    assert twin.get_layer("enc1_conv").dtype_policy.name == "mixed_bfloat16"
    assert bench._training_twin(stored, bf16=False).get_layer("enc1_conv").dtype_policy.name == "float32"
    assert twin.get_layer("enc1_conv").output.shape[1] == (pad_to or 101 * upscale)
    assert twin.output_shape == (None, 101, 101, 3 if empty_head else 1)
    assert ("image_fc" in {l.name for l in twin.layers}) == empty_head
    assert twin.get_layer("enc1_conv").filters == 2 and twin.get_layer("enc2_drop").rate == 0.1
    # every stored layer is in the twin with the same weight shapes (the training form adds the
    # decoder-only logits and the image logit)
    for layer in stored.layers:
        if layer.weights:  # the head's training form convolves part by part: no resize/concat layers
            assert [w.shape for w in twin.get_layer(layer.name).weights] == [w.shape for w in layer.weights], layer.name
    assert (twin.count_params() > stored.count_params()) == empty_head
    names = {l.name for l in twin.layers}  # the decoder options too (scSE: ~1.4x the time per step)
    assert any(n.endswith("_cse_pool") for n in names) == scse
    assert _has_hypercolumn(twin) == hypercolumn == _has_hypercolumn(stored)


@pytest.mark.parametrize("bias,expected", [
    # 3x3 conv, 1 -> 2 channels, 'same' on 5x5: 25 pixels x 2 channels x 9 multiply-adds x 2 = 900;
    # the bias adds one operation per output value (50); dense 50 -> 3: 2 x 50 x 3 = 300 (+ 3 bias)
    (False, 900 + 300),
    (True, 900 + 50 + 300 + 3),
])
def test_benchmark_counts_forward_flops(bias, expected):
    import keras

    bench = _benchmark_module()
    x = keras.Input((5, 5, 1))
    y = keras.layers.Conv2D(2, 3, padding="same", use_bias=bias)(x)
    y = keras.layers.Dense(3, use_bias=bias)(keras.layers.Flatten()(y))
    assert bench._forward_flops(keras.Model(x, y)) == expected


def test_benchmark_projection_ceiling():
    bench = _benchmark_module()
    row = {"infer_tta_img_s": 30.0, "gflop_per_image": 5.0}
    pr = bench.projection(row, matmul_gflop_s=100.0)
    assert pr["seconds"] == pytest.approx(600.0) and not pr["under_limit"]  # 18,000 / 30 = 600 s: not under
    assert pr["ceiling_model_s"] == pytest.approx(18_000 * 2 * 5.0 / 100.0)
    assert bench.projection(row)["ceiling_model_s"] is None


def test_benchmark_projection_median_slowest_fastest():
    """Three TTA timings of 12, 24 and 36 images/s (median 24): 18,000 images take 750 s at the median,
    1,500 s at the slowest and 500 s at the fastest, plus 18,000 x 1 ms of reading each time."""
    bench = _benchmark_module()
    row = {"infer_tta_img_s": 24.0, "infer_tta_img_s_runs": [12.0, 36.0, 24.0],
           "reading": {"s_per_image": 0.001}}
    pr = bench.projection(row)
    assert pr["model_s"] == pytest.approx(750.0) and pr["read_s"] == pytest.approx(18.0)
    assert pr["seconds"] == pytest.approx(768.0)
    assert pr["slowest_seconds"] == pytest.approx(1518.0) and pr["fastest_seconds"] == pytest.approx(518.0)
    assert not pr["under_limit"] and pr["convert_s"] == 0.0
    # a TensorFlow Lite row adds its conversion, once, to every projection
    pr = bench.projection({**row, "convert_s": 12.0})
    assert pr["convert_s"] == 12.0 and pr["seconds"] == pytest.approx(780.0)
    assert pr["slowest_seconds"] == pytest.approx(1530.0) and pr["fastest_seconds"] == pytest.approx(530.0)


@pytest.mark.parametrize("text,expected", [
    ("w32", {"base_filters": 32, "bf16": False}),
    ("w16-bf16-x2", {"base_filters": 16, "bf16": True, "upscale": 2}),
    ("w16-b1-d3-drop0.1", {"blocks_per_level": 1, "depth": 3, "dropout": 0.1}),
    ("w16-p128", {"pad_to": 128, "upscale": 1}),
    ("w16-x2-p208", {"pad_to": 208, "upscale": 2}),
    ("w16-bf16-se-hc", {"bf16": True, "scse": True, "hypercolumn": True}),
    ("w16-hc", {"scse": False, "hypercolumn": True}),
])
def test_benchmark_variants(text, expected):
    bench = _benchmark_module()
    got = bench.parse_variant(text)
    assert {k: got[k] for k in expected} == expected and got["name"] == text
    with pytest.raises(SystemExit, match="expected w<filters>"):
        bench.parse_variant(text + "-q")
    with pytest.raises(SystemExit, match="pad_to 128 is smaller than the input"):
        bench.parse_variant(text.split("-p")[0] + "-x2-p128")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_postprocess_cuts_where_the_sweep_cut(dtype):
    """A logit equal to a cut-off rounded to float32 (0.1f > 0.1 in float64, not in float32): the
    mask notebook 03 scored at cut-off 0.1 is the mask the bundle predicts."""
    from saltlib import metric

    v = np.full((1, 101, 101), 0.1, dtype)
    truth = np.zeros((1, 101, 101), bool)
    truth[0, :4, :4] = True
    sweep = metric.sweep_thresholds(truth, v, thresholds=[0.1])
    _, _, area = metric.threshold_counts(truth, v, [0.1])
    mask = predict.postprocess(v, 0.1)
    assert mask.sum() == area[0, 0] == (101 * 101 if dtype == np.float32 else 0)  # 0.1f is above 0.1, 0.1 in float16 below
    assert sweep["score"] == metric.competition_score(truth, mask)


@pytest.mark.parametrize("repeats", ["0", "-2"])
def test_benchmark_rejects_fewer_than_one_inference_timing(repeats, capsys):
    with pytest.raises(SystemExit):
        _benchmark_module().main(["--infer-repeats", repeats])
    assert f"--infer-repeats must be at least 1, got {repeats}" in capsys.readouterr().err


# --------------------------------------------------------------------------- hypercolumn bundles
@pytest.mark.parametrize("runtime", ["keras", "tflite"])
def test_load_bundle_projects_the_hypercolumn_and_keeps_the_logits(tmp_path, runtime):
    """A hypercolumn + image-head model is loaded with its final convolution moved in front of the
    enlargements (``project_head``): the bundle's logits are the saved model's, with either runtime."""
    import keras

    from saltlib.model import build_resnet_unet
    from saltlib.train import predict_logits

    if runtime == "tflite" and not litert.available():
        pytest.skip("TensorFlow Lite is not available here")
    keras.utils.set_random_seed(7)
    m = build_resnet_unet(base_filters=2, depth=2, blocks_per_level=1, dropout=0.0, scse=True,
                          hypercolumn=True, empty_head=True)
    m.set_weights([np.asarray(w) * 1.5 for w in m.get_weights()])  # logits well away from 0
    m.save(tmp_path / "m.keras")
    b = predict.load_bundle(predict.write_bundle(tmp_path / "b", [tmp_path / "m.keras"], 0.0, 0, True),
                            runtime=runtime)
    names = {layer.name for layer in b.models[0].layers}
    assert "hypercolumn" not in names and "hyper2_resize_1ch" in names
    x = tiny_images(5, seed=4)
    want = predict_logits(m, x, tta=True)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(b.predict_logits(x), want, atol=1e-4 * np.abs(want).max())
