"""Training one fold: outputs, skipping a finished fold, NaN losses, resuming after SIGKILL or
after a stop signal (SIGINT/SIGTERM stop at an epoch end), and reproducibility. Tiny models (4 base
filters, depth 2) on 24 synthetic images."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import keras

from conftest import ROOT, assert_seeded_epochs, subprocess_env  # noqa: E402
from saltlib import data, metric, params, train  # noqa: E402
from saltlib.train import TrainingError  # noqa: E402

pytestmark = pytest.mark.slow

TINY = {
    "base_filters": 4,
    "depth": 2,
    "blocks_per_level": 1,
    "dropout": 0.1,
    "mixed_precision": True,  # the shipped setting: bf16 compute, float32 weights and logits
    "batch_size": 4,
    "stages": [{"loss": "bce", "epochs": 2, "lr": 0.01}, {"loss": "0.5*bce+lovasz", "epochs": 1, "lr": 0.005}],
    "flip": True,
    "zoom": 0.1,
    "brightness": 0.1,
    "val_every": 1,
    "seed": 7,
}


@pytest.fixture(scope="module")
def dataset(synthetic24):
    ds = data.load_train(synthetic24.root)
    return ds, data.kfold(ds, 3, 42)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    ds, folds = dataset
    out = tmp_path_factory.mktemp("run") / "models"
    summary = train.train_fold(ds, folds, 1, TINY, out, verbose=0)
    return out / "fold1", summary


def test_fold_outputs(trained, dataset):
    fold_dir, summary = trained
    ds, folds = dataset
    names = sorted(p.name for p in fold_dir.iterdir())
    assert names == sorted(
        ["done.json", "history.csv", "model.keras", "oof.npz", "recipe.json", "split.json", "stage1.weights.h5",
         "stage2.weights.h5", "timing.json"]
    ), names  # the BackupAndRestore folders are gone and no temporary file is left
    recorded = json.loads((fold_dir / "recipe.json").read_text())
    assert recorded == train.recipe(TINY) and recorded["stages"] == TINY["stages"]
    assert "val_every" not in recorded and "snapshots" not in recorded and recorded["base_filters"] == 4
    done = json.loads((fold_dir / "done.json").read_text())
    assert done == summary
    val = folds == 1
    assert summary["fold"] == 1 and summary["n_val"] == int(val.sum()) and summary["n_train"] == int((~val).sum())
    assert summary["epochs"] == 3 and summary["seconds"] > 0
    assert 0 <= summary["val_score"] <= 1 and 0 <= summary["val_score_tta"] <= 1

    hist = pd.read_csv(fold_dir / "history.csv")
    assert hist[["stage", "epoch"]].values.tolist() == [[1, 1], [1, 2], [2, 1]]
    assert {"loss", "lr", "val_score", "time"} <= set(hist.columns)
    assert np.isfinite(hist["loss"]).all() and hist["val_score"].between(0, 1).all()
    # cosine decay within each stage: the learning rate falls
    assert hist["lr"].iloc[1] < hist["lr"].iloc[0] <= 0.01

    oof = np.load(fold_dir / "oof.npz", allow_pickle=False)
    assert oof["ids"].tolist() == ds.ids[val].tolist()
    assert oof["logits"].shape == (val.sum(), 101, 101) and oof["logits"].dtype == np.float16
    assert oof["logits_tta"].shape == oof["logits"].shape
    assert summary["val_score"] == pytest.approx(metric.competition_score(ds.masks[val], oof["logits"] > 0))


def test_saved_model_reproduces_oof_logits(trained, dataset):
    fold_dir, _ = trained
    ds, folds = dataset
    model = keras.saving.load_model(fold_dir / "model.keras", compile=False, safe_mode=True)
    x = ds.images[folds == 1]
    logits = train.predict_logits(model, x)
    oof = np.load(fold_dir / "oof.npz")
    # mixed precision is stored with bfloat16 weights, and the OOF logits come from that model
    assert {str(w.dtype) for w in model.get_layer("enc1_conv").weights} == {"bfloat16"}
    assert model.get_layer("logits").compute_dtype == "float32"
    np.testing.assert_allclose(logits, oof["logits"].astype(np.float32), atol=0.02, rtol=0.002)
    tta = train.predict_logits(model, x, tta=True)
    flipped = train.predict_logits(model, x[:, :, ::-1])[:, :, ::-1]
    np.testing.assert_allclose(tta, 0.5 * (logits + flipped), atol=1e-5)
    np.testing.assert_allclose(tta, oof["logits_tta"].astype(np.float32), atol=0.02, rtol=0.002)


@pytest.fixture(scope="module")
def tiny_float32():
    from saltlib.model import build_resnet_unet

    keras.utils.set_random_seed(3)
    return build_resnet_unet(base_filters=4, depth=2, blocks_per_level=1, dropout=0.0)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 11])
def test_predict_batches_matches_keras_predict(tiny_float32, n):
    """Batch by batch with a zero-padded last batch: the same outputs as ``Model.predict`` for any
    count, including none and fewer than one batch."""
    x = np.random.default_rng(n).random((n, 101, 101, 1), dtype=np.float32)
    out = train.predict_batches(tiny_float32, x, batch_size=4)
    assert out.shape == (n, 101, 101, 1)
    if n:
        np.testing.assert_allclose(out, tiny_float32.predict(x, batch_size=4, verbose=0), atol=1e-5)
        # padding the last batch must not change the real images' outputs (inference is per image)
        np.testing.assert_allclose(out[-1:], train.predict_batches(tiny_float32, x[-1:], batch_size=4), atol=1e-5)


def test_predict_batches_rejects_a_bad_batch_size(tiny_float32):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        train.predict_batches(tiny_float32, np.zeros((2, 101, 101, 1), np.float32), batch_size=0)


def _unfinished_copy(fold_dir: Path, work: Path, *extra: str) -> Path:
    """A copy of a finished fold as ``work/fold1`` without ``done.json``, its model and OOF logits
    (its stages all finished), and without any ``extra`` files."""
    import shutil

    shutil.copytree(fold_dir, work / "fold1")
    for name in ("done.json", "model.keras", "oof.npz", *extra):
        (work / "fold1" / name).unlink()
    return work / "fold1"


def test_snapshot_ensemble_from_finished_stages(trained, dataset, tmp_path):
    """``snapshots: [1]``: stage 1's weights join the fold's ensemble. Re-finishing a fold whose
    stages are all trained (done.json and models removed) trains nothing; the OOF logits are the
    mean of the two saved members' logits."""
    fold_dir, summary = trained
    ds, folds = dataset
    work = _unfinished_copy(fold_dir, tmp_path / "models").parent
    rows_before = len(pd.read_csv(work / "fold1" / "history.csv"))
    out = train.train_fold(ds, folds, 1, {**TINY, "snapshots": [1]}, work, verbose=0)
    assert len(pd.read_csv(work / "fold1" / "history.csv")) == rows_before  # nothing retrained
    assert out["models"] == ["model.keras", "snapshot1.keras"]
    assert set(out["member_scores_tta"]) == set(out["models"])
    assert out["seconds"] == pytest.approx(summary["seconds"], abs=0.2)
    x = ds.images[folds == 1]
    members = [keras.saving.load_model(work / "fold1" / m, compile=False) for m in out["models"]]
    mean = np.mean([train.predict_logits(m, x) for m in members], axis=0)
    oof = np.load(work / "fold1" / "oof.npz")
    np.testing.assert_allclose(oof["logits"].astype(np.float32), mean, atol=0.02, rtol=0.002)
    assert not np.allclose(train.predict_logits(members[0], x), train.predict_logits(members[1], x), atol=1e-3)


@pytest.mark.parametrize("snapshots", [[2], [0], [3, 1]])
def test_snapshots_must_be_earlier_stages(dataset, tmp_path, snapshots):
    ds, folds = dataset
    with pytest.raises(params.ParamError, match=r"fold 1 training configuration: parameter 'snapshots'"):
        train.train_fold(ds, folds, 1, {**TINY, "snapshots": snapshots}, tmp_path, verbose=0)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_finished_fold_is_skipped(trained, dataset, capsys):
    fold_dir, summary = trained
    ds, folds = dataset
    before = {p.name: p.stat().st_mtime_ns for p in fold_dir.iterdir()}
    again = train.train_fold(ds, folds, 1, TINY, fold_dir.parent, verbose=0)
    assert again == summary
    assert "already trained" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in fold_dir.iterdir()} == before  # nothing rewritten


def test_finished_fold_with_another_recipe_is_reused_aloud(trained, dataset, capsys):
    fold_dir, summary = trained
    ds, folds = dataset
    other = {**TINY, "dropout": 0.3, "stages": TINY["stages"][:1]}
    assert train.train_fold(ds, folds, 1, other, fold_dir.parent, verbose=0) == summary
    out = capsys.readouterr().out
    assert "already trained" in out and "NOTE it was trained with a different recipe" in out
    assert "dropout: 0.1 there, 0.3 here" in out and "stages:" in out
    assert json.loads((fold_dir / "recipe.json").read_text()) == train.recipe(TINY)  # the record stays


@pytest.mark.parametrize(
    "change, named",
    [
        ({"dropout": 0.3}, "dropout: 0.1 there, 0.3 now"),
        ({"seed": 8}, "seed: 7 there, 8 now"),
        # stage 2 is not finished, so a changed stage 2 is not an extension
        ({"stages": [TINY["stages"][0], {"loss": "lovasz", "epochs": 1, "lr": 0.005}]}, "stages:"),
    ],
)
def test_half_trained_fold_refuses_another_recipe(trained, dataset, tmp_path, change, named):
    fold_dir, _ = trained
    ds, folds = dataset
    half = _unfinished_copy(fold_dir, tmp_path / "models", "stage2.weights.h5")
    before = {p.name: p.stat().st_mtime_ns for p in half.iterdir()}
    with pytest.raises(ValueError, match="different recipe") as err:
        train.train_fold(ds, folds, 1, {**TINY, **change}, half.parent, verbose=0)
    assert named in str(err.value) and str(half / "recipe.json") in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in half.iterdir()} == before  # nothing touched


def test_split_record_names_the_images():
    ids = np.array(["c", "a", "b", "d"])
    rec = train.split_record(ids, np.array([0, 1, 1, 0]), 1)
    assert rec["train_images"] == 2 and rec["val_images"] == 2
    import hashlib

    assert rec["val_ids_sha256"] == hashlib.sha256(b"a\nb").hexdigest()  # sorted held-out ids
    assert train.split_record(ids[::-1], np.array([0, 1, 1, 0]), 1) == rec  # same images, any order
    assert train.split_record(ids, np.array([0, 1, 0, 1]), 1)["val_ids_sha256"] != rec["val_ids_sha256"]


def test_fold_records_its_images(trained, dataset):
    fold_dir, _ = trained
    ds, folds = dataset
    assert json.loads((fold_dir / "split.json").read_text()) == train.split_record(ds.ids, folds, 1)


def test_half_trained_fold_refuses_other_images(trained, dataset, tmp_path, capsys):
    """Resuming on other images (another ``limit`` or ``data_dir``) would train on images the fold
    held out: refused, naming what changed, nothing touched. A finished fold is reused with a note."""
    fold_dir, summary = trained
    ds, folds = dataset
    half = _unfinished_copy(fold_dir, tmp_path / "models", "stage2.weights.h5")
    other = {**train.split_record(ds.ids, folds, 1), "train_images": 9999, "val_ids_sha256": "0" * 64}
    (half / "split.json").write_text(json.dumps(other))
    before = {p.name: p.stat().st_mtime_ns for p in half.iterdir()}
    with pytest.raises(ValueError, match="started on other images") as err:
        train.train_fold(ds, folds, 1, TINY, half.parent, verbose=0)
    assert f"train_images: 9999 there, {len(ds.ids) - (folds == 1).sum()} now" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in half.iterdir()} == before

    done = tmp_path / "done"
    import shutil

    shutil.copytree(fold_dir, done / "fold1")
    (done / "fold1" / "split.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert train.train_fold(ds, folds, 1, TINY, done, verbose=0) == summary
    assert "NOTE it was trained on other images" in capsys.readouterr().out


def test_more_stages_after_finished_ones_resume(trained, dataset, tmp_path):
    """A warm restart added to a fold whose stages are all finished trains only the new stage
    and records the longer recipe."""
    fold_dir, _ = trained
    ds, folds = dataset
    work = _unfinished_copy(fold_dir, tmp_path / "models").parent
    longer = {**TINY, "stages": TINY["stages"] + [{"loss": "lovasz", "epochs": 1, "lr": 0.001}]}
    out = train.train_fold(ds, folds, 1, longer, work, verbose=0)
    assert out["epochs"] == 4
    hist = pd.read_csv(work / "fold1" / "history.csv")
    assert hist[["stage", "epoch"]].values.tolist() == [[1, 1], [1, 2], [2, 1], [3, 1]]
    assert json.loads((work / "fold1" / "recipe.json").read_text()) == train.recipe(longer)


def test_recipe_recorded_before_a_key_existed_reads_it_as_its_default():
    """Folds recorded before ``empty_head`` existed (the shipped ones) still resume and are reused quietly."""
    old = train.recipe(TINY)
    del old["empty_head"]
    assert train.recipe_diff(old, TINY) == {}
    assert train.recipe_diff(old, {**TINY, "empty_head": True}) == {"empty_head": (False, True)}


def test_empty_head_fold_trains_and_saves_the_inference_form(dataset, tmp_path):
    ds, folds = dataset
    cfg = {**TINY, "empty_head": True, "stages": [{"loss": "bce", "epochs": 1, "lr": 0.01},
                                                   {"loss": "lovasz", "epochs": 1, "lr": 0.005}]}
    assert train.stage_loss(cfg, "bce").__name__ == "bce_with_empty_head"
    assert train.stage_loss(TINY, "bce").__name__ == "bce"
    summary = train.train_fold(ds, folds, 1, cfg, tmp_path, verbose=0)
    fold_dir = tmp_path / "fold1"
    assert json.loads((fold_dir / "recipe.json").read_text())["empty_head"] is True
    assert np.isfinite(pd.read_csv(fold_dir / "history.csv")["loss"]).all()
    model = keras.saving.load_model(fold_dir / "model.keras", compile=False, safe_mode=True)
    assert model.output.shape[-1] == 1 and "image_fc" in {layer.name for layer in model.layers}
    # the saved inference model is the trained one less the auxiliary outputs
    trained_model = train.build_model(cfg)
    trained_model.load_weights(fold_dir / "stage2.weights.h5")
    x = ds.images[folds == 1]
    full = np.asarray(trained_model.predict(x, verbose=0))
    np.testing.assert_allclose(train.predict_logits(model, x), full[..., 0], atol=0.05, rtol=0.01)
    oof = np.load(fold_dir / "oof.npz")
    assert summary["val_score"] == pytest.approx(metric.competition_score(ds.masks[folds == 1], oof["logits"] > 0))


def test_same_seed_same_result(trained, dataset, tmp_path):
    """Reproducibility. Measured on this CPU: bit-identical losses, logits and scores (the
    augmentation uses stateless per-batch seeds). The test allows 1e-5 on losses and 0.01 on
    logits, and demands the same val score."""
    fold_dir, summary = trained
    ds, folds = dataset
    np.testing.assert_array_equal(data.kfold(ds, 3, 42), folds)
    again = train.train_fold(ds, folds, 1, TINY, tmp_path, verbose=0)
    assert again["val_score"] == pytest.approx(summary["val_score"], abs=1e-9)
    assert again["val_score_tta"] == pytest.approx(summary["val_score_tta"], abs=1e-9)
    h1 = pd.read_csv(fold_dir / "history.csv")
    h2 = pd.read_csv(tmp_path / "fold1" / "history.csv")
    np.testing.assert_allclose(h2["loss"], h1["loss"], atol=1e-5)
    a = np.load(fold_dir / "oof.npz")["logits"].astype(np.float32)
    b = np.load(tmp_path / "fold1" / "oof.npz")["logits"].astype(np.float32)
    np.testing.assert_allclose(b, a, atol=0.01)


def test_augmentation_is_seeded_per_batch():
    """make_dataset: same seed -> same batches epoch by epoch; epochs and seeds differ; masks stay
    binary and geometric changes move image and mask together."""
    from saltlib import augment

    rng = np.random.default_rng(0)
    x = rng.random((12, 101, 101, 1)).astype(np.float32)
    y = np.zeros((12, 101, 101), bool)
    y[:, 30:70, 10:40] = True
    x[..., 0][y] = 1.0  # the salt square is bright: its pixels must move with the mask

    def epochs(seed, n=2, initial_epoch=0):
        ds = augment.make_dataset(x, y, 4, training=True, seed=seed, flip=True, zoom=0.2, p_zoom=1.0,
                                  brightness=0.0, initial_epoch=initial_epoch)
        it = iter(ds)  # endless: epoch after epoch of ceil(12 / 4) = 3 batches
        return [[tuple(t.numpy() for t in next(it)) for _ in range(3)] for _ in range(n)]

    a, b, c = epochs(5), epochs(5), epochs(6)
    assert_seeded_epochs(a, b, c)
    # a run resumed at epoch 1 gets the uninterrupted run's epoch 1, not its epoch 0 again
    resumed = epochs(5, n=1, initial_epoch=1)[0]
    for (xr, yr), (xa, ya) in zip(resumed, a[1], strict=True):
        np.testing.assert_array_equal(xr, xa)
        np.testing.assert_array_equal(yr, ya)
    for xb, yb in a[0] + a[1]:
        assert xb.shape[1:] == (101, 101, 1) and yb.shape == xb.shape
        assert set(np.unique(yb).tolist()) <= {0.0, 1.0}
        inside = xb[yb > 0.5]
        assert inside.mean() > 0.9  # bright pixels under the moved mask
    val = list(augment.make_dataset(x, y, 5, training=False))
    assert [len(v[0]) for v in val] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([v[0].numpy() for v in val]), x)


NAN_CFG = {**TINY, "blocks_per_level": 0, "mixed_precision": False, "dropout": 0.0,
           "stages": [{"loss": "bce", "epochs": 2, "lr": 0.01}]}


@pytest.mark.parametrize("case", ["huge_lr", "nan_images"])
def test_nan_loss_raises_training_error(dataset, tmp_path, case):
    ds, folds = dataset
    cfg = dict(NAN_CFG)
    if case == "huge_lr":
        cfg["stages"] = [{"loss": "bce", "epochs": 2, "lr": 1e30}]
    else:
        images = ds.images.copy()
        images[:, 40:60, 40:60] = np.nan
        ds = data.SaltDataset(ds.ids, images, ds.masks, ds.depths, ds.root)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*lower the learning rate or check the data"):
        train.train_fold(ds, folds, 0, cfg, tmp_path, verbose=0)
    fold_dir = tmp_path / "fold0"
    assert not (fold_dir / "done.json").exists() and not (fold_dir / "model.keras").exists()
    assert not (fold_dir / "stage1.weights.h5").exists()
    assert not list(fold_dir.glob(".*.tmp*"))  # no half-written file left behind


def test_strategy_must_be_known(dataset, tmp_path):
    ds, folds = dataset
    with pytest.raises(params.ParamError, match=r"fold 0 training configuration: parameter 'strategy' must be one of"):
        train.train_fold(ds, folds, 0, {**NAN_CFG, "strategy": "tpu"}, tmp_path, verbose=0)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_configurations_built_in_code_pass_the_checks(dataset, tmp_path, monkeypatch):
    """Tuples and numpy scalars (what code, not a YAML file, gives) are taken as lists and numbers;
    a fold the split does not have is refused before anything is written."""
    ds, folds = dataset
    cfg = {**NAN_CFG, "stages": tuple(dict(st, epochs=np.int64(st["epochs"]), lr=np.float32(st["lr"]))
                                      for st in NAN_CFG["stages"]),
           "batch_size": np.int64(NAN_CFG["batch_size"]), "seed": np.int32(3), "dropout": np.float64(0.0)}
    seen = {}
    monkeypatch.setattr(train.params, "check", lambda values, source, base=None: seen.update(values) or values)
    with pytest.raises(ValueError, match=r"fold 5 holds no images: the split has folds \[0, 1, 2\]"):
        train.train_fold(ds, folds, 5, cfg, tmp_path, verbose=0)
    assert not any(tmp_path.iterdir())
    assert type(seen["batch_size"]) is int and type(seen["seed"]) is int and type(seen["dropout"]) is float
    assert isinstance(seen["stages"], list) and type(seen["stages"][0]["lr"]) is float
    monkeypatch.undo()
    with pytest.raises(ValueError, match="fold 5 holds no images"):  # the real checks accept it all
        train.train_fold(ds, folds, 5, cfg, tmp_path, verbose=0)


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "parameter 'batch_size'"),
    ("stages", [{"loss": "lovasz", "epochs": 1, "lr": 0}], "parameter 'stages' stage 1: lr must be"),
    ("base_filters", "16", "parameter 'base_filters' must be"),
])
def test_direct_callers_get_the_parameter_checks(dataset, tmp_path, key, value, message):
    """train_fold is called by notebooks, `salt train` and tools: the same checks as a run's parameters."""
    ds, folds = dataset
    with pytest.raises(params.ParamError, match=rf"fold 0 training configuration: {message}"):
        train.train_fold(ds, folds, 0, {**NAN_CFG, key: value}, tmp_path, verbose=0)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- kill and resume
RESUME_EPOCHS = 10


def _write_params(path: Path, data_dir: Path) -> Path:
    path.write_text(
        f"data_dir: {str(data_dir)!r}\n"
        "n_folds: 3\nfolds: [0]\nseed: 3\n"
        "base_filters: 4\ndepth: 2\nblocks_per_level: 0\ndropout: 0.0\nmixed_precision: false\n"
        "batch_size: 4\nval_every: 1\n"
        "stages:\n"
        "  - {loss: bce, epochs: 1, lr: 0.01}\n"
        f"  - {{loss: lovasz, epochs: {RESUME_EPOCHS}, lr: 0.005}}\n"
        "  - {loss: bce, epochs: 2, lr: 0.003}\n"  # a stage after the resumed one starts at its epoch 1
    )
    return path


def _train_cmd(params: Path, out: Path):
    return [sys.executable, "-m", "saltlib.cli", "train", str(params), "--out", str(out)]


def _history(path: Path):
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None


def test_killed_training_resumes_from_last_epoch(synthetic24, tmp_path):
    params = _write_params(tmp_path / "tiny.yaml", synthetic24.root)
    out = tmp_path / "models"
    fold_dir = out / "fold0"
    hist_path = fold_dir / "history.csv"
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(_train_cmd(params, out), stdout=log1, stderr=subprocess.STDOUT,
                            env=subprocess_env(), cwd=ROOT)
    deadline = time.time() + 400
    try:
        # kill once stage 2 has completed two epochs: its BackupAndRestore checkpoint then holds
        # at least epoch 1 (the checkpoint of epoch k is written before history row k + 1)
        while time.time() < deadline and proc.poll() is None:
            h = _history(hist_path)
            if h is not None and ((h["stage"] == 2) & (h["epoch"] >= 2)).any():
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log1.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = time.time()
    h = _history(hist_path)
    done_before = int((h["stage"] == 2).sum())
    assert 2 <= done_before < RESUME_EPOCHS, "killed mid-run"
    assert not (fold_dir / "done.json").exists() and not (fold_dir / "model.keras").exists()
    assert (fold_dir / "stage1.weights.h5").exists() and (fold_dir / "backup2").is_dir()
    # the killed process kept the time of the stage-2 epochs it finished (timing.json is written at
    # every epoch's end, before the history row): at least the time from stage 1's row to the last
    # stage-2 row, on top of stage 1's own seconds
    seconds_killed = json.loads((fold_dir / "timing.json").read_text())["seconds"]
    stage2_span = h.loc[h["stage"] == 2, "time"].max() - h.loc[h["stage"] == 1, "time"].max()
    assert seconds_killed >= stage2_span > 0

    second = subprocess.run(_train_cmd(params, out), capture_output=True, text=True, timeout=400,
                            env=subprocess_env(), cwd=ROOT)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    # stage 1 is not retrained, stage 2 resumes where it stopped
    assert "stage 1 (bce): finished earlier, loading its weights" in log
    epochs_run = [int(k) for k in re.findall(rf"Epoch (\d+)/{RESUME_EPOCHS}", log)]
    assert epochs_run, log[-3000:]
    # after the last epoch with a checkpoint: done_before + 1, or done_before if the kill fell
    # between writing its history row and its checkpoint; never epoch 1
    assert epochs_run[0] in (done_before, done_before + 1)
    assert epochs_run == list(range(epochs_run[0], RESUME_EPOCHS + 1))

    h = pd.read_csv(hist_path)
    assert h[["stage", "epoch"]].values.tolist() == (
        [[1, 1]] + [[2, e] for e in range(1, RESUME_EPOCHS + 1)] + [[3, 1], [3, 2]]
    )
    # each stage's cosine schedule runs to its end: the restored epoch of stage 2 must not carry
    # over into stage 3 (it did: Keras keeps model._initial_epoch after a restore)
    last_lr = h.groupby("stage")["lr"].last()
    np.testing.assert_allclose(last_lr.loc[[2, 3]], 1e-5, rtol=1e-3)
    assert (h["time"].iloc[: epochs_run[0]] < killed_at).all()  # rows before the resume are the old ones
    assert (h["time"].iloc[epochs_run[0]:] > killed_at).all()
    assert (fold_dir / "done.json").exists() and (fold_dir / "model.keras").exists()
    assert not (fold_dir / "backup2").exists()
    summary = json.loads((fold_dir / "done.json").read_text())
    assert summary["epochs"] == 1 + RESUME_EPOCHS + 2
    assert summary["seconds"] > seconds_killed  # the resumed run adds its time to the killed one's
    ends = json.loads((fold_dir / "timing.json").read_text())["stage_end"]
    assert sorted(ends) == ["1", "2", "3"] and ends["1"] < seconds_killed < ends["2"] < ends["3"]
    assert ends["3"] == pytest.approx(summary["seconds"], abs=0.1)

    # the resumed epochs trained on the batches an uninterrupted run trains on (the data stream
    # starts at the restored epoch), so its losses match epoch for epoch
    whole = subprocess.run(_train_cmd(params, tmp_path / "whole"), capture_output=True, text=True, timeout=400,
                           env=subprocess_env(), cwd=ROOT)
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-4000:]
    h_whole = pd.read_csv(tmp_path / "whole" / "fold0" / "history.csv")
    np.testing.assert_allclose(h["loss"], h_whole["loss"], rtol=1e-4, atol=1e-6)

    # (a third start that finds the fold finished: test_finished_fold_is_skipped, in-process)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_at_an_epoch_end_and_resumes(synthetic24, tmp_path, sig):
    """``kill -INT`` / ``kill`` stop ``salt train`` at the end of the epoch in progress, after its
    checkpoint: the next start resumes at the following epoch, none lost and none repeated. The
    process starts with SIGINT ignored, as one started by ``nohup salt train ... &`` does."""
    params = _write_params(tmp_path / "tiny.yaml", synthetic24.root)
    out = tmp_path / "models"
    fold_dir, name = out / "fold0", signal.Signals(sig).name
    log_path = tmp_path / "run1.log"
    with open(log_path, "w") as log1:
        proc = subprocess.Popen(_train_cmd(params, out), stdout=log1, stderr=subprocess.STDOUT, env=subprocess_env(),
                                cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            deadline = time.time() + 400
            while time.time() < deadline and proc.poll() is None:
                h = _history(fold_dir / "history.csv")
                if h is not None and (h["stage"] == 2).any():
                    break
                time.sleep(0.05)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(sig)
            proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = log_path.read_text()
    assert proc.returncode == 128 + sig, log[-3000:]
    stopped = int((_history(fold_dir / "history.csv")["stage"] == 2).sum())
    assert 1 <= stopped < RESUME_EPOCHS
    assert f"{name} received: training stops at the end of this epoch" in log
    assert f"salt train: {name}: stopped fold 0 after epoch {stopped} of stage 2's {RESUME_EPOCHS}" in log
    # the checkpoint is of the last epoch with a history row; the stage is not marked finished
    assert json.loads((fold_dir / "backup2" / "training_metadata.json").read_text())["epoch"] == stopped
    assert not (fold_dir / "stage2.weights.h5").exists() and not (fold_dir / "done.json").exists()

    second = subprocess.run(_train_cmd(params, out), capture_output=True, text=True, timeout=400,
                            env=subprocess_env(), cwd=ROOT)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert [int(k) for k in re.findall(rf"Epoch (\d+)/{RESUME_EPOCHS}", log)] == list(range(stopped + 1, RESUME_EPOCHS + 1))
    h = pd.read_csv(fold_dir / "history.csv")
    assert h[["stage", "epoch"]].values.tolist() == (
        [[1, 1]] + [[2, e] for e in range(1, RESUME_EPOCHS + 1)] + [[3, 1], [3, 2]]
    )
    assert (fold_dir / "done.json").exists()


def test_stop_handler_sets_the_request_and_restores_handlers(dataset, tmp_path):
    """The first signal inside ``stop_at_epoch_end`` only asks to stop (a fold not yet started
    refuses to start, writing nothing); the second interrupts at once; leaving the block puts the
    previous handlers back and forgets the request."""
    ds, folds = dataset
    before = signal.getsignal(signal.SIGTERM)
    with train.stop_at_epoch_end():
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(train.StopRequested, match="SIGTERM: stopped before fold 0; run the same command again") as e:
            train.train_fold(ds, folds, 0, NAN_CFG, tmp_path / "out", verbose=0)
        assert e.value.signum == signal.SIGTERM
        assert not (tmp_path / "out").exists()
        with pytest.raises(KeyboardInterrupt, match="SIGINT received twice"):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    assert train._STOP["signum"] is None


def test_stop_as_a_command_exits_with_the_signal_status(dataset, tmp_path, capsys):
    """With ``exit_as``, a stop leaves the block as ``SystemExit(128 + signal)``, its message on
    stderr under the command's name, and the handlers put back."""
    ds, folds = dataset
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with train.stop_at_epoch_end(exit_as="salt train"):
            signal.raise_signal(signal.SIGTERM)
            train.train_fold(ds, folds, 0, NAN_CFG, tmp_path / "out", verbose=0)
    assert e.value.code == 128 + signal.SIGTERM
    assert "salt train: SIGTERM: stopped before fold 0; run the same command again" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before and train._STOP["signum"] is None


def test_cli_train_reports_bad_params(tmp_path):
    params = tmp_path / "bad.yaml"
    params.write_text("depth: 9\n")
    proc = subprocess.run(_train_cmd(params, tmp_path / "out"), capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 2
    assert "parameter 'depth' must be <= 5" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_load_oof_gathers_folds_and_checks_the_split(tmp_path):
    """Two folds' oof.npz (as train_fold writes them) read back in fold order, positions matching
    the dataset; a file whose ids belong to another fold is refused, naming it."""
    from types import SimpleNamespace

    ds = SimpleNamespace(ids=np.array(["a", "b", "c", "d", "e"]))
    split = np.array([1, 0, 1, 0, 1])
    for f, ids in ((0, ["d", "b"]), (1, ["a", "c", "e"])):
        (tmp_path / f"fold{f}").mkdir()
        logits = np.full((len(ids), 2, 2), f, np.float16)
        np.savez(tmp_path / f"fold{f}" / "oof.npz", ids=np.array(ids), logits=logits, logits_tta=logits + 0.5)
    oof = train.load_oof(tmp_path, ds, split, [1, 0])
    assert oof["idx"].tolist() == [0, 2, 4, 3, 1] and oof["fold"].tolist() == [1, 1, 1, 0, 0]
    assert oof["logits"].dtype == np.float32 and oof["logits"][:, 0, 0].tolist() == [1, 1, 1, 0, 0]
    assert oof["logits_tta"][:, 0, 0].tolist() == [1.5, 1.5, 1.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"fold0.oof\.npz: out-of-fold ids differ from fold 0"):
        train.load_oof(tmp_path, ds, np.zeros(5, int) + 1, [0])
    # a sixth image in fold 0 that the saved file lacks (another limit): refused, not silently partial
    bigger = SimpleNamespace(ids=np.array(["a", "b", "c", "d", "e", "f"]))
    with pytest.raises(ValueError, match=r"fold0.oof\.npz: out-of-fold ids differ from fold 0"):
        train.load_oof(tmp_path, bigger, np.array([1, 0, 1, 0, 1, 0]), [0])
    # saved ids that are not among the images loaded (a smaller limit): named, not a bare KeyError
    smaller = SimpleNamespace(ids=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"fold0.oof\.npz: 1 of its 2 out-of-fold ids \(e\.g\. 'd'\) are not among the 3"):
        train.load_oof(tmp_path, smaller, np.array([1, 0, 1]), [0])


def _dense_model(seed: int):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_backup_is_consistent_whenever_the_kill_comes(tmp_path):
    """The checkpoint's weights and epoch counter never disagree: weights written for epoch 2 but
    killed before its counter leave epoch 1's checkpoint whole, so a resume repeats epoch 2 from
    epoch 1's weights (as an uninterrupted run trains it), not from weights that already trained it."""
    Backup = train._callbacks_module()[3]
    folder = tmp_path / "backup"
    model = _dense_model(1)
    saver = Backup(str(folder), delete_checkpoint=False)
    saver.set_model(model)
    saver._current_epoch, saver._last_batch_seen = 1, 0
    saver._save_model()
    epoch1 = [w.copy() for w in model.get_weights()]
    # epoch 2 trains and its weights reach the disk; the kill comes before the counter
    model.set_weights([w + 1.0 for w in epoch1])
    model.save_weights(str(folder / "epoch2-batch0.weights.h5"))
    resumed = _dense_model(2)
    loader = Backup(str(folder), delete_checkpoint=False)
    loader.set_model(resumed)
    loader.on_train_begin()
    assert resumed._initial_epoch == 1
    for a, b in zip(resumed.get_weights(), epoch1):
        np.testing.assert_array_equal(a, b)
    # a whole epoch-2 checkpoint replaces epoch 1's: one weights file, named by the counter
    saver._current_epoch = 2
    saver._save_model()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch2-batch0.weights.h5", "training_metadata.json"]
    assert json.loads((folder / "training_metadata.json").read_text())["weights"] == "epoch2-batch0.weights.h5"
    # a backup of the earlier scheme (latest.weights.h5, a counter naming no file) still loads
    old = tmp_path / "old"
    old.mkdir()
    model.save_weights(str(old / "latest.weights.h5"))
    (old / "training_metadata.json").write_text(json.dumps({"epoch": 3, "batch": 0}))
    again = _dense_model(3)
    loader = Backup(str(old), delete_checkpoint=False)
    loader.set_model(again)
    loader.on_train_begin()
    assert again._initial_epoch == 3
    for a, b in zip(again.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("weight", [0.0, 0.1, 1.0, 2.5])
def test_image_loss_weight_scales_the_image_term(weight):
    """``image_loss_weight`` multiplies the image logit's salt-present cross-entropy, and nothing
    else: the loss minus its value at weight 0 is weight x that cross-entropy (numpy, by hand)."""
    rng = np.random.default_rng(0)
    y = np.zeros((3, 4, 4, 1), np.float32)
    y[0, 1, 1, 0] = 1.0  # images 0 and 2 have salt, image 1 is empty
    y[2, :2, :, 0] = 1.0
    pred = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    image_logit = np.array([1.5, -0.5, -2.0], np.float32)
    pred[..., 2] = image_logit[:, None, None]
    has_salt = np.array([1.0, 0.0, 1.0])
    bce = np.log1p(np.exp(-image_logit)) * has_salt + np.log1p(np.exp(image_logit)) * (1 - has_salt)
    base = np.asarray(train.stage_loss({"empty_head": True, "image_loss_weight": 0.0}, "bce")(y, pred))
    loss = np.asarray(train.stage_loss({"empty_head": True, "image_loss_weight": weight}, "bce")(y, pred))
    np.testing.assert_allclose(loss - base, weight * bce, rtol=1e-4, atol=1e-5)
    assert train.DEFAULTS["image_loss_weight"] == 0.1  # the weight of every head model trained before it existed


def test_build_model_passes_scse_and_hypercolumn():
    """The parameters reach the model, in both its training and its inference form."""
    cfg = {"base_filters": 2, "depth": 2, "blocks_per_level": 1, "empty_head": True, "mixed_precision": False}
    plain = {layer.name for layer in train.build_model(cfg).layers}
    assert not {"hypercolumn", "dec1_scse_add"} & plain
    for for_inference in (False, True):
        model = train.build_model({**cfg, "scse": True, "hypercolumn": True}, for_inference=for_inference)
        names = {layer.name for layer in model.layers}
        assert {"dec1_scse_add", "dec2_scse_add"} <= names and train._has_hypercolumn(model)
        # the inference form enlarges and concatenates; the training form convolves part by part
        assert {"hypercolumn", "hyper2_resize"} <= names if for_inference else not {"hypercolumn"} & names
        assert model.get_layer("logits").kernel.shape == (1, 1, 2 + 4 + 16, 1)  # dec1, dec2, image features
    assert not train._has_hypercolumn(train.build_model(cfg))
