"""Fine-tuning a shipped fold model (``saltlib.train.init_weights``, ``train_fold(init_from=...)``)
and pseudo-labelling test images (``tools/pseudo_label.py``): which predictions count as confident
(hand-built logits), the weights a fine-tuned fold starts from, the images it trains and validates
on, and the guards against leakage and mixed starts. Tiny models on 24 synthetic images."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import yaml

import keras

from conftest import ROOT
from saltlib import data, predict, train

sys.path.insert(0, str(ROOT / "tools"))
import pseudo_label  # noqa: E402

pytestmark = pytest.mark.slow

HEAD = {
    "seed": 7,
    "n_folds": 3,
    "base_filters": 4,
    "depth": 2,
    "blocks_per_level": 1,
    "dropout": 0.1,
    "empty_head": True,
    "mixed_precision": True,
    "batch_size": 4,
    "stages": [{"loss": "bce", "epochs": 2, "lr": 0.01}],
    "val_every": 1,
}


def _logits(*rows):
    """(N, 2, 2) logits from N lists of 4 values (row-major)."""
    return np.array(rows, np.float32).reshape(-1, 2, 2)


@pytest.mark.parametrize(
    "logits, keep",
    [
        # predicted empty, every pixel below -1: kept; one pixel at -0.5 (uncertain): dropped
        (_logits([-3, -2, -1.5, -4]), True),
        (_logits([-3, -2, -0.5, -4]), False),
        # salt on 2 pixels with 0 uncertain pixels: kept; 1 uncertain of 2 salt (0.5 > 0.1): dropped
        (_logits([3, 2, -3, -4]), True),
        (_logits([3, 0.5, -3, -4]), False),
        (_logits([3, 2, -0.2, -4]), False),
    ],
)
def test_select_hand_built(logits, keep):
    masks = logits > 0
    assert pseudo_label.select(logits, masks).tolist() == [keep]
    # salt_only drops every predicted-empty image and keeps the others' answers
    assert pseudo_label.select(logits, masks, salt_only=True).tolist() == [keep and bool(masks.any())]


def test_select_counts_uncertain_pixels_against_the_salt_area():
    # 10 x 10 salt with 5 uncertain pixels around it: 5 / 100 <= 0.1 kept, <= 0.04 not
    logits = np.full((1, 20, 20), -5.0, np.float32)
    logits[0, :10, :10] = 5.0
    logits[0, 10, :5] = -0.5
    masks = logits > 0
    assert pseudo_label.select(logits, masks, max_relative=0.1).tolist() == [True]
    assert pseudo_label.select(logits, masks, max_relative=0.04).tolist() == [False]
    # a wider band makes every background pixel uncertain
    assert pseudo_label.select(logits, masks, uncertain=6.0).tolist() == [False]
    with pytest.raises(ValueError, match="uncertain"):
        pseudo_label.select(logits, masks, uncertain=0.0)


@pytest.fixture(scope="module")
def tiny_bundle(synthetic24, tmp_path_factory):
    """A one-model bundle of fold 1 of the 3-fold split (a tiny empty-head model)."""
    ds = data.load_train(synthetic24.root)
    split = data.kfold(ds, HEAD["n_folds"], HEAD["seed"])
    out = tmp_path_factory.mktemp("tiny") / "models"
    train.train_fold(ds, split, 1, HEAD, out, verbose=0)
    dest = tmp_path_factory.mktemp("bundle") / "b"
    meta = {"folds": [1], "seed": HEAD["seed"], "n_folds": HEAD["n_folds"]}
    return predict.write_bundle(dest, [out / "fold1" / "model.keras"], 0.0, 0, True, meta=meta), ds, split


def test_init_weights_starts_from_the_saved_model(tiny_bundle):
    bundle, ds, split = tiny_bundle
    model = train.build_model(HEAD)  # the training form: fused, decoder-only and image logits
    result = train.init_weights(model, bundle / "model0.keras")
    assert sorted(result["fresh"]) == ["image_logit", "seg_logits"]
    assert "logits" in result["copied"] and "image_fc" in result["copied"]
    saved = keras.saving.load_model(bundle / "model0.keras", compile=False)
    x = ds.images[:6]
    np.testing.assert_allclose(np.asarray(model.predict(x, verbose=0))[..., 0], train.predict_logits(saved, x),
                               atol=0.05, rtol=0.01)
    # the decoder-only head starts as the decoder part of the fused 1x1 convolution
    kernel, bias = model.get_layer("logits").get_weights()
    seg_kernel, seg_bias = model.get_layer("seg_logits").get_weights()
    np.testing.assert_array_equal(seg_kernel, kernel[:, :, : seg_kernel.shape[2], :])
    np.testing.assert_array_equal(seg_bias, bias)


def test_init_weights_refuses_another_architecture(tiny_bundle):
    bundle, _, _ = tiny_bundle
    wider = train.build_model({**HEAD, "base_filters": 8})
    with pytest.raises(ValueError, match="layer 'enc1_conv|another architecture"):
        train.init_weights(wider, bundle / "model0.keras")


@pytest.mark.parametrize("scse, hypercolumn", [(True, True), (True, False), (False, True)])
def test_init_weights_grows_scse_and_hypercolumn_as_the_same_function(tmp_path, scse, hypercolumn):
    # a plain head model with random weights (no zero biases to hide a misplaced channel), float32
    plain = {**HEAD, "mixed_precision": False, "depth": 3}
    src = train.build_model(plain, for_inference=True)
    rng = np.random.default_rng(0)
    src.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in src.get_weights()])
    src.save(tmp_path / "plain.keras")
    grown = train.build_model({**plain, "scse": scse, "hypercolumn": hypercolumn})  # the training form
    result = train.init_weights(grown, tmp_path / "plain.keras")
    assert ("logits" in result["grown"]) == hypercolumn
    assert "seg_logits" in result["fresh"]  # absent from an inference model: derived from the grown logits
    scse_layers = sorted(n for n in result["grown"] if "_scse_" in n)
    assert scse_layers == (sorted(f"dec{i}_scse_{p}" for i in (1, 2, 3) for p in ("cse_fc2", "sse_conv"))
                           if scse else [])
    x = rng.random((3, 101, 101, 1), np.float32)
    out = np.asarray(grown(x, training=False))
    np.testing.assert_allclose(out[..., 0], np.asarray(src(x, training=False))[..., 0], atol=1e-4, rtol=1e-4)
    # the hypercolumn's new channels start at zero, between the finest level's and the image's
    kernel = grown.get_layer("logits").get_weights()[0][0, 0, :, 0]
    old = src.get_layer("logits").get_weights()[0][0, 0, :, 0]
    added = kernel.size - old.size
    assert added == (4 * 2 + 4 * 4 if hypercolumn else 0)  # dec2 (8) and dec3 (16 channels) enlarged
    np.testing.assert_array_equal(kernel[:4], old[:4])
    np.testing.assert_array_equal(kernel[4:4 + added], 0)
    np.testing.assert_array_equal(kernel[4 + added:], old[4:])
    seg = grown.get_layer("seg_logits").get_weights()[0][0, 0, :, 0]
    np.testing.assert_array_equal(seg, kernel[: 4 + added])


@pytest.fixture(scope="module")
def fine_tuned(tiny_bundle, synthetic24, tmp_path_factory):
    bundle, ds, split = tiny_bundle
    work = tmp_path_factory.mktemp("pl")
    labels = work / "labels.npz"
    pseudo_label.main(["label", "--bundle", str(bundle), "--fold", "1", "--data-dir", str(synthetic24.root),
                       "--uncertain", "0.01", "--max-relative", "1000", "--out", str(labels)])
    params_file = work / "finetune.yaml"
    params_file.write_text(yaml.safe_dump({**HEAD, "stages": [{"loss": "lovasz", "epochs": 1, "lr": 0.001}]}))
    out = work / "models"
    pseudo_label.main(["train", "--bundle", str(bundle), "--fold", "1", "--params", str(params_file),
                       "--labels", str(labels), "--data-dir", str(synthetic24.root), "--out", str(out),
                       "--set", "image_loss_weight=0.5"])
    return out / "fold1", labels, params_file, bundle, ds, split


def test_label_keeps_the_confident_test_images(fine_tuned, synthetic24):
    _, labels, _, bundle, _, _ = fine_tuned
    z = np.load(labels)
    test = data.load_test(synthetic24.root)
    b = predict.load_bundle(bundle)
    logits = b.predict_logits(test.images, tta=True)
    keep = pseudo_label.select(logits, predict.postprocess(logits, 0.0, 0), 0.01, 1000)
    assert keep.any()
    assert z["ids"].tolist() == test.ids[keep].tolist()
    np.testing.assert_array_equal(z["masks"], logits[keep] > 0)
    np.testing.assert_array_equal(z["images"], test.images[keep])
    assert str(z["sha256"]) == predict._sha256(bundle / "model0.keras")


def test_fine_tuned_fold_trains_on_the_labels_and_validates_on_its_fold(fine_tuned):
    fold_dir, labels, _, bundle, ds, split = fine_tuned
    n_labels = len(np.load(labels)["ids"])
    record = json.loads((fold_dir / "split.json").read_text())
    assert record == {**train.split_record(ds.ids, split, 1), "train_images": int((split != 1).sum()) + n_labels}
    assert json.loads((fold_dir / "init.json").read_text())["sha256"] == predict._sha256(bundle / "model0.keras")
    record = json.loads((fold_dir / "finetune.json").read_text())
    assert record["n_labels"] == n_labels and record["labels_sha256"] == predict._sha256(labels)
    assert record["command"].startswith("python tools/pseudo_label.py train --bundle ")
    assert record["command"].endswith("--set 'image_loss_weight=0.5'")
    assert json.loads((fold_dir / "recipe.json").read_text())["image_loss_weight"] == 0.5
    summary = json.loads((fold_dir / "done.json").read_text())
    assert summary["n_train"] == (split != 1).sum() + n_labels and summary["n_val"] == (split == 1).sum()
    assert sorted(np.load(fold_dir / "oof.npz")["ids"].tolist()) == sorted(ds.ids[split == 1].tolist())


def test_a_fine_tuned_fold_does_not_resume_from_another_start(fine_tuned, tmp_path):
    fold_dir, labels, _, bundle, ds, split = fine_tuned
    ds, split = pseudo_label.with_labels(ds, split, np.load(labels))
    half = tmp_path / "fold1"
    shutil.copytree(fold_dir, half)
    (half / "done.json").unlink()
    cfg = {**HEAD, "stages": [{"loss": "lovasz", "epochs": 1, "lr": 0.001}], "image_loss_weight": 0.5}
    with pytest.raises(ValueError, match="init.json"):
        train.train_fold(ds, split, 1, cfg, tmp_path, verbose=0)  # from scratch: refused


def test_labels_of_another_model_are_refused(fine_tuned, tmp_path, synthetic24):
    _, labels, params_file, bundle, _, _ = fine_tuned
    z = dict(np.load(labels))
    z["sha256"] = np.array("0" * 64)
    other = tmp_path / "other.npz"
    np.savez(other, **z)
    with pytest.raises(SystemExit, match="another fold's model"):
        pseudo_label.main(["train", "--bundle", str(bundle), "--fold", "1", "--params", str(params_file),
                           "--labels", str(other), "--data-dir", str(synthetic24.root), "--out", str(tmp_path / "m")])
    del z["sha256"]
    np.savez(other, **z)
    with pytest.raises(SystemExit, match="not a file of the label step .no sha256"):
        pseudo_label.main(["train", "--bundle", str(bundle), "--fold", "1", "--params", str(params_file),
                           "--labels", str(other), "--data-dir", str(synthetic24.root), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="no model of fold 0"):
        pseudo_label.main(["label", "--bundle", str(bundle), "--fold", "0", "--data-dir", str(synthetic24.root),
                           "--out", str(tmp_path / "x.npz")])



def _hand_bundle(path, n_models, meta):
    path.mkdir()
    models = [f"model{k}.keras" for k in range(n_models)]
    for m in models:
        (path / m).write_bytes(b"not loaded")
    spec = {"models": models, "threshold": 0.0, "min_size": 0, "tta": True, "meta": meta}
    (path / "bundle.json").write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    "meta, fold, index",
    [
        ({"folds": [0, 1]}, 1, 1),  # one model per fold, matched by position
        ({"folds": [2, 0]}, 0, 1),
        # two members per fold (final model, then a snapshot): fold 1's own final model is model2,
        # not model1 (fold 0's snapshot, which trained on fold 1's images)
        ({"folds": [0, 1], "members": {"0": [0, 1], "1": [2, 3]}}, 1, 2),
        ({"folds": [0, 1], "members": {"0": [0, 1], "1": [2, 3]}}, 0, 0),
    ],
)
def test_member_is_the_folds_own_final_model(tmp_path, meta, fold, index):
    n = sum(len(v) for v in meta["members"].values()) if "members" in meta else len(meta["folds"])
    spec, k = pseudo_label._member(_hand_bundle(tmp_path / "b", n, meta), fold)
    assert k == index and spec["models"][k] == f"model{index}.keras"


def test_member_refuses_a_bundle_with_snapshots_and_no_member_record(tmp_path):
    bundle = _hand_bundle(tmp_path / "b", 4, {"folds": [0, 1]})
    with pytest.raises(SystemExit, match=r"4 model\(s\) for folds \[0, 1\] with 1 member\(s\) each.*no meta.members.*fold 1's is unknown"):
        pseudo_label._member(bundle, 1)


def test_a_bundle_whose_fold_held_out_other_images_is_refused(tiny_bundle, synthetic24, tmp_path):
    bundle, _, _ = tiny_bundle
    other = tmp_path / "b"
    shutil.copytree(bundle, other)
    spec = json.loads((other / "bundle.json").read_text())
    assert spec["meta"].get("val_ids_sha256") is None  # the fixture's bundle does not record it: not checked
    spec["meta"]["val_ids_sha256"] = {"1": "0" * 64}  # another split's fold 1
    (other / "bundle.json").write_text(json.dumps(spec))
    params_file = tmp_path / "p.yaml"
    params_file.write_text(yaml.safe_dump({**HEAD, "stages": [{"loss": "lovasz", "epochs": 1, "lr": 0.001}]}))
    args = ["train", "--bundle", str(other), "--fold", "1", "--params", str(params_file),
            "--data-dir", str(synthetic24.root), "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit, match="fold 1's held-out images differ"):
        pseudo_label.main(args)
    assert not (tmp_path / "m").exists()  # refused before anything was written
