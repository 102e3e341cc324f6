"""tools/gpu_cv.py: the pieces that run here (packing the data, turning the GPU machine's weights
and logs back into fold folders) and the choice of step compilation per backend."""

from __future__ import annotations

import io as _io
import json
import tarfile

import numpy as np
import pytest

from conftest import ROOT, load_tool
from saltlib import data, io, train


@pytest.fixture(scope="module")
def gpu_cv():
    return load_tool("gpu_cv")


def test_pack_round_trip(gpu_cv, synthetic24, tmp_path):
    """The packed training set loads back exactly (8-bit images, masks, depths), and ``limit``
    takes the first images."""
    gpu_cv.pack(tmp_path / "train.npz", synthetic24.root)
    ds, back = data.load_train(synthetic24.root), gpu_cv.load_packed(tmp_path / "train.npz")
    np.testing.assert_array_equal(back.ids, ds.ids)
    np.testing.assert_array_equal(back.masks, ds.masks)
    np.testing.assert_allclose(back.images, ds.images, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(back.depths, ds.depths)
    assert len(gpu_cv.load_packed(tmp_path / "train.npz", limit=5)) == 5


@pytest.mark.parametrize("empty_head", [False, True])
def test_bfloat16_weights_survive_npz(gpu_cv, tmp_path, empty_head):
    """A mixed-precision model's saved file holds bfloat16 weights; ``np.savez`` stores those as
    raw 2-byte records (dtype V2), which ``set_weights`` cannot take. ``_float32`` reads them back
    as the same numbers, so export -> npz -> unpack rebuilds the saved model exactly."""
    import keras

    cfg = {"base_filters": 4, "depth": 2, "blocks_per_level": 1, "dropout": 0.0, "mixed_precision": True,
           "empty_head": empty_head}
    saved = train.save_model(train.build_model(cfg), cfg, tmp_path / "m.keras")
    weights = keras.saving.load_model(saved, compile=False).get_weights()
    np.savez(tmp_path / "w.npz", **{f"w{i:03d}": w for i, w in enumerate(weights)})
    z = np.load(tmp_path / "w.npz")
    assert any(z[k].dtype.kind == "V" for k in z.files)  # what broke the first unpack
    back = gpu_cv._weights_in_order(z)
    assert all(b.dtype == np.float32 for b in back)
    for w, b in zip(weights, back):
        np.testing.assert_array_equal(np.asarray(w, np.float32), b)
    rebuilt = train.build_model(cfg, for_inference=True)  # as unpack does (no training-only heads)
    rebuilt.set_weights(back)
    x = np.random.default_rng(0).random((2, 101, 101, 1), dtype=np.float32)
    np.testing.assert_array_equal(train.predict_logits(rebuilt, x),
                                  train.predict_logits(keras.saving.load_model(saved, compile=False), x))


def test_fold_records_make_a_salt_train_fold(gpu_cv, tmp_path):
    """The worker's records come out of the logs archive into the fold folder; ``done.json`` gets
    the scores measured here and the hardware that trained it."""
    files = {
        "history.csv": b"stage,epoch,time,loss,lr,val_score\n1,1,0.0,0.5,0.001,\n",
        "recipe.json": json.dumps({"seed": 42, "dropout": 0.25}).encode(),
        "timing.json": b'{"seconds": 287.1}',
        "done.json": json.dumps({"fold": 2, "epochs": 90, "seconds": 287.1, "val_score": 0.5,
                                 "val_score_tta": 0.5, "models": ["model.keras", "snapshot2.keras"]}).encode(),
    }
    logs = tmp_path / "logs.tar.gz"
    with tarfile.open(logs, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"s42/fold2/{name}")
            info.size = len(payload)
            tar.addfile(info, _io.BytesIO(payload))
    dest = tmp_path / "fold2"
    dest.mkdir()
    row = {"val_score": 0.78, "val_score_tta": 0.79}
    gpu_cv._fold_records(logs, 42, 2, dest, row, "one test GPU")
    for name in ("history.csv", "recipe.json", "timing.json"):
        assert (dest / name).read_bytes() == files[name]
    done = io.read_json(dest / "done.json")
    assert done["val_score"] == 0.78 and done["val_score_tta"] == 0.79
    assert done["member_scores_tta"] == {"model.keras": 0.79}
    assert done["models"] == ["model.keras"]  # the snapshot was not exported: the bundle must not list it
    assert done["hardware"] == "one test GPU" and done["epochs"] == 90
    gpu_cv._fold_records(tmp_path / "no-logs.tar.gz", 42, 3, tmp_path, row, "x")  # no archive: nothing written
    assert not (tmp_path / "done.json").exists()


@pytest.mark.parametrize("backend,expected", [("tensorflow", False), ("jax", True), ("torch", False)])
def test_jit_compile_only_under_jax(monkeypatch, backend, expected):
    """JAX without XLA runs every operation eagerly (a GPU did not finish one epoch in 95 s);
    TensorFlow's XLA step is slower on these CPUs."""
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    assert train.jit_compile() is expected


def test_weights_in_order_is_numeric(gpu_cv, tmp_path):
    """Models with over 999 weight arrays (depth 5, 8 blocks per level: 1,134) export w1000...: a
    text sort would put w1000 before w101."""
    arrays = {f"w{i:03d}": np.full((1,), i, np.float32) for i in (99, 100, 101, 999, 1000, 1001)}
    np.savez(tmp_path / "w.npz", **dict(reversed(list(arrays.items()))))
    assert [float(a[0]) for a in gpu_cv._weights_in_order(np.load(tmp_path / "w.npz"))] == [99, 100, 101, 999, 1000, 1001]


@pytest.mark.parametrize("change,message", [
    ({"epochs": "30,20"}, "one count >= 1 for each of the 3 stages"),
    ({"epochs": "30,0,40"}, "one count >= 1 for each of the 3 stages"),
    ({"probe_epochs": 2}, "--probe-epochs 2: at least 3"),
    ({"stale": True}, "holds an earlier call's folds"),
])
def test_train_refuses_bad_plans_before_launching(gpu_cv, tmp_path, monkeypatch, change, message):
    import argparse

    launched = []
    monkeypatch.setattr(gpu_cv, "_launch", lambda *a, **k: launched.append(a) or [0])
    work = tmp_path / "work"
    if change.pop("stale", False):
        (work / "run" / "s0" / "fold2").mkdir(parents=True)
    args = argparse.Namespace(jobs=["2:0"], work=str(work), params=str(ROOT / "params" / "ship-short.yaml"),
                              budget=540, overhead=30, probe_epochs=4, epochs=None, data="x", out="y", limit=0)
    for k, v in change.items():
        setattr(args, k, v)
    with pytest.raises(SystemExit, match=message):
        gpu_cv.train_jobs(args)
    assert launched == []


def test_a_job_stopped_at_the_deadline_exports_its_last_finished_stage(gpu_cv, synthetic24, tmp_path, capsys):
    """A worker killed in stage 3 leaves stage1/stage2 weights and no model.keras: the export saves
    stage 2 in its inference form instead of losing the job, says so in plan.json, and unpack
    scores it into a folder that is not a finished fold (no done.json, not named fold<k>). A job
    killed in stage 1 exports nothing."""
    import argparse

    import keras

    params_path = ROOT / "params" / "smoke.yaml"
    _, tcfg, _ = gpu_cv._config(params_path, 7)
    run_root, out = tmp_path / "run", tmp_path / "out"
    finished, stopped, early = (run_root / "s7" / f"fold{k}" for k in (0, 1, 2))
    for d in (finished, stopped, early):
        d.mkdir(parents=True)
        io.write_json(d / "recipe.json", {"stages": [{"loss": "bce"}, {"loss": "lovasz"}, {"loss": "lovasz"}]})
    keras.utils.set_random_seed(3)
    first = train.build_model(tcfg)
    first.save_weights(stopped / "stage1.weights.h5")
    train.save_model(first, tcfg, tmp_path / "stage1-reference.keras")
    keras.utils.set_random_seed(4)
    model = train.build_model(tcfg)  # other weights: the export must take the last stage
    model.save_weights(stopped / "stage2.weights.h5")
    train.save_model(model, tcfg, finished / "model.keras")  # job 0's model, and the stage-2 reference below
    plan = {"epochs": [1, 1, 1]}
    gpu_cv.export(run_root, [(0, 7), (1, 7), (2, 7)], out, plan, params_path)
    printed = capsys.readouterr().out
    assert "job 1:7 did not finish (stopped at the deadline, or failed; see its log): exporting stage 2 of 3" in printed
    assert "no model for job 2:7: it ended before its first stage finished" in printed
    assert "job 0:7" not in printed and sorted(p.name for p in out.glob("*.npz")) == ["f0s7.npz", "f1s7.npz"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert json.loads(tar.extractfile("plan.json").read())["partial"] == {"1:7": "stage 2 of 3"}
    z = np.load(out / "f1s7.npz")
    assert int(z["finished_stages"]) == 2 and int(z["planned_stages"]) == 3 and not z["complete"]
    assert int(np.load(out / "f0s7.npz")["finished_stages"]) == 3 and np.load(out / "f0s7.npz")["complete"]
    rebuilt = train.build_model(tcfg, for_inference=True)
    rebuilt.set_weights(gpu_cv._weights_in_order(z))
    x = np.random.default_rng(0).random((2, 101, 101, 1), dtype=np.float32)

    def reference(path):  # a model this test saved, not the export
        return train.predict_logits(keras.saving.load_model(path, compile=False), x)

    got, want, other = (train.predict_logits(rebuilt, x), reference(finished / "model.keras"),
                        reference(tmp_path / "stage1-reference.keras"))
    np.testing.assert_allclose(got, want, atol=0.05)  # conv kernels went float16
    # and not stage 1's weights: those logits are far further off than float16's rounding
    assert np.abs(got - other).mean() > 10 * np.abs(got - want).mean()
    args = argparse.Namespace(params=str(params_path), weights=str(out), out=str(tmp_path / "folds"),
                              hardware="one test GPU", data_dir=str(synthetic24.root))
    gpu_cv.unpack(args)
    dest = tmp_path / "folds" / "s7" / "fold1-stage2"
    assert (dest / "model.keras").is_file() and (dest / "oof.npz").is_file() and not (dest / "done.json").exists()
    assert not (tmp_path / "folds" / "s7" / "fold1").exists() and (tmp_path / "folds" / "s7" / "fold0" / "model.keras").is_file()
    whole, row = json.loads((tmp_path / "folds" / "scores.json").read_text())
    assert row["partial"] == "stage 2 of 3" and row["fold"] == 1 and 0.0 <= row["val_score_tta"] <= 1.0
    assert "partial" not in whole and whole["fold"] == 0


@pytest.mark.parametrize("max_mib, n_files", [(15.0, 1), (0.004, 2), (0.0001, 5)])
def test_weights_split_into_parts_come_back_whole(gpu_cv, tmp_path, max_mib, n_files):
    """A device call returns files of up to 16 MiB: a job's arrays beyond ``max_mib`` go to
    ``.part<k>.npz`` files (about 4 KiB: 2 arrays of 2,000 bytes, then 2 more and the 40-byte one;
    below one array's size: one file each) and load back as the same arrays in the same order."""
    arrays = {f"w{i:03d}": np.full(1000, i, np.float16) for i in range(4)}
    arrays["w004"] = np.arange(10, dtype=np.float32)
    meta = {"complete": np.bool_(True), "finished_stages": np.int64(3), "planned_stages": np.int64(3)}
    paths = gpu_cv._save_job(tmp_path, 2, 7, arrays, meta, max_mib)
    expected = ["f2s7.npz"] + [f"f2s7.part{k}.npz" for k in range(1, n_files)]
    assert [p.name for p in paths] == expected == sorted(p.name for p in tmp_path.iterdir())
    back = gpu_cv._load_job(paths[0])
    assert "n_parts" not in back and int(back["finished_stages"]) == 3 and bool(back["complete"])
    got = gpu_cv._weights_in_order(back)
    assert [w.dtype for w in got] == [np.float32] * 5
    for w, a in zip(got, arrays.values()):
        np.testing.assert_array_equal(w, a.astype(np.float32))


def test_a_missing_part_is_named(gpu_cv, tmp_path):
    arrays = {f"w{i:03d}": np.zeros(1000, np.float16) for i in range(3)}
    paths = gpu_cv._save_job(tmp_path, 0, 42, arrays, {}, 0.001)
    paths[1].unlink()
    with pytest.raises(SystemExit, match=r"f0s42\.npz: its weights continue in f0s42\.part1\.npz, which is missing"):
        gpu_cv._load_job(paths[0])


def test_unpack_reads_a_job_split_into_parts(gpu_cv, synthetic24, tmp_path):
    """``unpack`` takes each job once, from its main file with the parts merged in (the part files
    are not jobs of their own), and rebuilds the exported weights exactly."""
    import argparse

    import keras

    params_path = ROOT / "params" / "smoke.yaml"
    _, tcfg, _ = gpu_cv._config(params_path, 7)
    keras.utils.set_random_seed(5)
    weights = train.build_model(tcfg, for_inference=True).get_weights()
    arrays = {f"w{i:03d}": (w.astype(np.float16) if w.ndim == 4 else w) for i, w in enumerate(weights)}
    meta = {"complete": np.bool_(False), "finished_stages": np.int64(2), "planned_stages": np.int64(3)}
    out = tmp_path / "weights"
    out.mkdir()
    paths = gpu_cv._save_job(out, 1, 7, arrays, meta, max_mib=0.002)
    assert len(paths) > 2
    args = argparse.Namespace(params=str(params_path), weights=str(out), out=str(tmp_path / "folds"),
                              hardware="one test GPU", data_dir=str(synthetic24.root))
    gpu_cv.unpack(args)
    (row,) = json.loads((tmp_path / "folds" / "scores.json").read_text())
    assert row["fold"] == 1 and row["seed"] == 7 and row["partial"] == "stage 2 of 3"
    saved = keras.saving.load_model(tmp_path / "folds" / "s7" / "fold1-stage2" / "model.keras", compile=False)
    for got, sent in zip(saved.get_weights(), arrays.values()):
        np.testing.assert_array_equal(np.asarray(got, np.float32), sent.astype(np.float32))
