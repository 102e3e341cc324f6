"""tools/park_fold.py and resuming from the last stage's weights alone: an unfinished fold parked
at a stage boundary, put back in another model folder, finishes as one that kept every file.
Tiny models (4 base filters, depth 2) on 24 synthetic images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import keras

from conftest import load_tool  # noqa: E402
from saltlib import data, train  # noqa: E402
from saltlib.predict import _sha256  # noqa: E402

pytestmark = pytest.mark.slow

THREE = {
    "base_filters": 4,
    "depth": 2,
    "blocks_per_level": 1,
    "dropout": 0.1,
    "mixed_precision": False,
    "batch_size": 4,
    "stages": [{"loss": "bce", "epochs": 1, "lr": 0.01}, {"loss": "bce", "epochs": 1, "lr": 0.005},
               {"loss": "lovasz", "epochs": 1, "lr": 0.002}],
    "flip": True,
    "val_every": 1,
    "seed": 3,
}


@pytest.fixture(scope="module")
def dataset(synthetic24):
    ds = data.load_train(synthetic24.root)
    return ds, data.kfold(ds, 3, 42)


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    ds, folds = dataset
    out = tmp_path_factory.mktemp("ref") / "models"
    train.train_fold(ds, folds, 1, THREE, out, verbose=0)
    return out / "fold1"


def _stopped_after_stage2(finished, where):
    """``where/fold1`` as a fold stopped during stage 3: stage 3's weights, the model, OOF logits
    and done.json gone, a stage-3 backup folder left (history.csv still has stage 3's row)."""
    fold = where / "fold1"
    shutil.copytree(finished, fold)
    for name in ("done.json", "model.keras", "oof.npz", "stage3.weights.h5"):
        (fold / name).unlink()
    (fold / "backup3").mkdir()
    return fold


def _weights(fold_dir):
    m = keras.saving.load_model(fold_dir / "model.keras", compile=False)
    return [np.asarray(w) for w in m.get_weights()]


def test_park_carries_the_last_stage_and_records(finished, tmp_path, capsys):
    tool = load_tool("park_fold")
    fold = _stopped_after_stage2(finished, tmp_path / "run")
    parked = tool.park(fold, tmp_path / "checkpoints" / "run")
    assert parked == tmp_path / "checkpoints" / "run" / "fold1"
    assert sorted(p.name for p in parked.iterdir()) == [
        "history.csv", "park.json", "recipe.json", "split.json", "stage2.weights.h5", "timing.json"]
    record = json.loads((parked / "park.json").read_text())
    assert (record["fold"], record["stage"], record["stages"]) == (1, 2, 3)
    assert (record["epochs_done"], record["epochs_total"]) == (2, 3)
    # the time when stage 2's weights were saved, not the stopped fold's total (stage 3 ran since)
    timing = json.loads((fold / "timing.json").read_text())
    assert sorted(timing["stage_end"]) == ["1", "2", "3"]
    assert 0 < timing["stage_end"]["1"] < timing["stage_end"]["2"] < timing["seconds"]
    assert record["seconds"] == timing["stage_end"]["2"]
    assert json.loads((parked / "timing.json").read_text()) == {
        "seconds": timing["stage_end"]["2"], "stage_end": {k: timing["stage_end"][k] for k in ("1", "2")}}
    assert record["files"] == {n: _sha256(parked / n) for n in record["files"]}
    # the weights as saved, without the optimizer state that no stage reads
    import h5py

    with h5py.File(fold / "stage2.weights.h5", "r") as a, h5py.File(parked / "stage2.weights.h5", "r") as b:
        assert "optimizer" in a and "optimizer" not in b and set(b) == set(a) - {"optimizer"}
        names = []
        a["layers"].visit(lambda n: names.append(n) if isinstance(a["layers"][n], h5py.Dataset) else None)
        assert names
        for n in names:
            np.testing.assert_array_equal(a["layers"][n][()], b["layers"][n][()])
    assert (parked / "stage2.weights.h5").stat().st_size < (fold / "stage2.weights.h5").stat().st_size
    assert pd.read_csv(fold / "history.csv")["stage"].tolist() == [1, 2, 3]
    assert pd.read_csv(parked / "history.csv")["stage"].tolist() == [1, 2]  # stage 3's row is not carried
    out = capsys.readouterr().out
    assert "parked fold 1 at stage 2 of 3 (2 of 3 epochs)" in out and "not carried: backup3" in out
    assert not [p for p in parked.parent.iterdir() if p.name.startswith(".")]  # no hidden folder left


def test_park_carries_a_timing_file_without_stage_ends_as_it_is(finished, tmp_path, capsys):
    """timing.json written before it recorded ``stage_end`` (only ``seconds``, updated when a
    stage's fit ended): parked unchanged, with a note that a stage is in progress."""
    tool = load_tool("park_fold")
    fold = _stopped_after_stage2(finished, tmp_path / "run")
    (fold / "timing.json").write_text('{"seconds": 123.5}')
    parked = tool.park(fold, tmp_path / "checkpoints")
    assert json.loads((parked / "timing.json").read_text()) == {"seconds": 123.5}
    assert json.loads((parked / "park.json").read_text())["seconds"] == 123.5
    assert "has no stage_end for stage 2; its seconds (123.5) may include time of the stage in progress" in \
        capsys.readouterr().out


def test_unparked_fold_finishes_as_one_that_kept_every_stage(finished, dataset, tmp_path):
    """The parked fold (stage 2's weights only) and the stopped fold itself (stages 1 and 2) both
    train stage 3 alone, from the same weights and data stream: the same model, bit for bit here."""
    ds, folds = dataset
    tool = load_tool("park_fold")
    kept = _stopped_after_stage2(finished, tmp_path / "kept")
    parked = tool.park(kept, tmp_path / "checkpoints")
    shutil.rmtree(kept / "backup3")
    back = tool.unpark(parked, tmp_path / "elsewhere" / "models")
    assert back == tmp_path / "elsewhere" / "models" / "fold1" and not (back / "stage1.weights.h5").exists()
    assert json.loads((back / "parked.json").read_text()) == json.loads((parked / "park.json").read_text())
    a = train.train_fold(ds, folds, 1, THREE, back.parent, verbose=0)
    b = train.train_fold(ds, folds, 1, THREE, kept.parent, verbose=0)
    assert pd.read_csv(back / "history.csv")[["stage", "epoch"]].values.tolist() == [[1, 1], [2, 1], [3, 1]]
    assert a["epochs"] == b["epochs"] == 3 and a["seconds"] >= json.loads((parked / "park.json").read_text())["seconds"]
    for x, y in zip(_weights(back), _weights(kept)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert a["val_score"] == b["val_score"]


def test_finished_fold_parks_whole_and_comes_back_finished(finished, dataset, tmp_path, capsys):
    """A finished fold that does not ship: its model, out-of-fold logits, done.json and records go,
    byte for byte, no stage weights; unparked, salt train skips it and its scores read as before."""
    ds, folds = dataset
    tool = load_tool("park_fold")
    parked = tool.park(finished, tmp_path / "checkpoints")
    assert sorted(p.name for p in parked.iterdir()) == [
        "done.json", "history.csv", "model.keras", "oof.npz", "park.json", "recipe.json", "split.json", "timing.json"]
    record = json.loads((parked / "park.json").read_text())
    assert record["finished"] is True and (record["stage"], record["stages"]) == (3, 3)
    assert (record["epochs_done"], record["epochs_total"]) == (3, 3)
    done = json.loads((finished / "done.json").read_text())
    assert record["seconds"] == done["seconds"]
    for n in record["files"]:
        assert record["files"][n] == _sha256(parked / n) == _sha256(finished / n), n
    assert "parked finished fold 1 (3 epochs; model.keras and oof.npz)" in capsys.readouterr().out
    back = tool.unpark(parked, tmp_path / "elsewhere" / "models")
    assert "finished fold 1 back in" in capsys.readouterr().out
    again = train.train_fold(ds, folds, 1, THREE, back.parent, verbose=0)  # skipped: done.json is there
    assert again["val_score"] == done["val_score"] and not (back / "stage1.weights.h5").exists()
    a = train.load_oof(back.parent, ds, folds, [1])
    b = train.load_oof(finished.parent, ds, folds, [1])
    np.testing.assert_array_equal(a["idx"], b["idx"])
    np.testing.assert_array_equal(a["logits_tta"], b["logits_tta"])


def test_park_and_unpark_refusals(finished, tmp_path):
    tool = load_tool("park_fold")
    for kwargs in ({"in_progress": True}, {"also_stages": [1]}):
        with pytest.raises(SystemExit, match="the fold is finished.*without --in-progress or --also-stages"):
            tool.park(finished, tmp_path / "c", **kwargs)
    no_oof = tmp_path / "done" / "fold1"
    shutil.copytree(finished, no_oof)
    (no_oof / "oof.npz").unlink()
    with pytest.raises(SystemExit, match="fold1: no oof.npz"):
        tool.park(no_oof, tmp_path / "c")
    fresh = tmp_path / "run" / "fold1"
    fresh.mkdir(parents=True)
    for name in ("recipe.json", "split.json"):
        shutil.copy2(finished / name, fresh / name)
    with pytest.raises(SystemExit, match="no stage has finished"):
        tool.park(fresh, tmp_path / "c")
    with pytest.raises(SystemExit, match="named fold<k>"):
        tool.park(tmp_path / "run", tmp_path / "c")
    stopped = _stopped_after_stage2(finished, tmp_path / "s")
    with pytest.raises(SystemExit, match="no stage3.weights.h5"):
        tool.park(stopped, tmp_path / "c", also_stages=[3])
    parked = tool.park(stopped, tmp_path / "c", also_stages=[1])
    assert (parked / "stage1.weights.h5").is_file()
    with pytest.raises(SystemExit, match="fold1 exists"):
        tool.park(stopped, tmp_path / "c")
    with pytest.raises(SystemExit, match="fold1 exists"):
        tool.unpark(parked, stopped.parent)
    with open(parked / "stage2.weights.h5", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit, match="stage2.weights.h5: its SHA-256 differs"):
        tool.unpark(parked, tmp_path / "other")
    assert not (tmp_path / "other").exists() or not list((tmp_path / "other").iterdir())


def test_snapshot_of_a_stage_not_kept_is_named(finished, dataset, tmp_path):
    ds, folds = dataset
    fold = _stopped_after_stage2(finished, tmp_path / "run")
    (fold / "stage1.weights.h5").unlink()
    with pytest.raises(ValueError, match="snapshots \\[1\\] need stage1.weights.h5"):
        train.train_fold(ds, folds, 1, {**THREE, "snapshots": [1]}, fold.parent, verbose=0)


#: THREE with a two-epoch last stage and no dropout: a resume that carries Adam's state and the
#: data stream trains that stage's second epoch exactly as an uninterrupted run does
FOUR = {**THREE, "dropout": 0.0,
        "stages": THREE["stages"][:2] + [{"loss": "lovasz", "epochs": 2, "lr": 0.002}]}


def _stopped_during_stage3_epoch2(dataset, out, monkeypatch):
    """Train fold 1 of FOUR into ``out`` and stop it (KeyboardInterrupt, as Ctrl-C does) at the end
    of stage 3's second epoch, before its checkpoint: ``backup3/`` then holds epoch 1."""
    ds, folds = dataset
    real, calls = train.metric.competition_score, []

    def score(*args, **kwargs):  # ValScore's, once per epoch: stage 1, stage 2, stage 3 epoch 1, epoch 2
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train.metric, "competition_score", score)
    with pytest.raises(KeyboardInterrupt):
        train.train_fold(ds, folds, 1, FOUR, out, verbose=0)
    monkeypatch.setattr(train.metric, "competition_score", real)
    return out / "fold1"


def test_park_in_progress_carries_the_epoch_checkpoint_and_resumes_there(dataset, tmp_path, monkeypatch, capsys):
    import h5py

    ds, folds = dataset
    tool = load_tool("park_fold")
    stopped = _stopped_during_stage3_epoch2(dataset, tmp_path / "run", monkeypatch)
    meta = json.loads((stopped / "backup3" / "training_metadata.json").read_text())
    assert meta["epoch"] == 1 and (stopped / "backup3" / meta["weights"]).is_file()
    capsys.readouterr()

    parked = tool.park(stopped, tmp_path / "checkpoints", in_progress=True)
    record = json.loads((parked / "park.json").read_text())
    assert (record["stage"], record["in_progress"]) == (2, {"stage": 3, "epoch": 1, "epochs": 2})
    assert (record["epochs_done"], record["epochs_total"]) == (3, 4)
    assert sorted(record["files"]) == sorted([
        "recipe.json", "split.json", "timing.json", "history.csv", "stage2.weights.h5",
        "backup3/training_metadata.json", f"backup3/{meta['weights']}"])
    assert record["files"] == {n: _sha256(parked / n) for n in record["files"]}
    # the epoch checkpoint keeps Adam's moments and step (the stage goes on with them)
    with h5py.File(parked / "backup3" / meta["weights"], "r") as f:
        assert "optimizer" in f
    assert _sha256(parked / "backup3" / meta["weights"]) == _sha256(stopped / "backup3" / meta["weights"])
    assert pd.read_csv(parked / "history.csv")[["stage", "epoch"]].values.tolist() == [[1, 1], [2, 1], [3, 1]]
    timing = json.loads((stopped / "timing.json").read_text())
    assert json.loads((parked / "timing.json").read_text()) == timing and record["seconds"] == timing["seconds"]
    assert "parked fold 1 at epoch 1 of 2 of stage 3 of 3 (3 of 4 epochs)" in capsys.readouterr().out

    back = tool.unpark(parked, tmp_path / "elsewhere" / "models")
    assert "after epoch 1 of 2 of stage 3 of 3 (3 of 4 epochs)" in capsys.readouterr().out
    before = pd.read_csv(back / "history.csv")
    resumed = train.train_fold(ds, folds, 1, FOUR, back.parent, verbose=0)
    whole = train.train_fold(ds, folds, 1, FOUR, tmp_path / "whole", verbose=0)
    h = pd.read_csv(back / "history.csv")
    assert h[["stage", "epoch"]].values.tolist() == [[1, 1], [2, 1], [3, 1], [3, 2]]
    assert h["time"].iloc[2] == before["time"].iloc[2]  # stage 3's first epoch was not trained again
    assert not (back / "backup3").exists() and resumed["seconds"] > record["seconds"]
    # stage 3's second epoch and the model are those of the run that never stopped
    h_whole = pd.read_csv(tmp_path / "whole" / "fold1" / "history.csv")
    np.testing.assert_allclose(h["loss"], h_whole["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h["lr"], h_whole["lr"], rtol=1e-6)
    for x, y in zip(_weights(back), _weights(tmp_path / "whole" / "fold1")):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert resumed["val_score"] == whole["val_score"]


def test_park_in_progress_refusals(dataset, finished, tmp_path, monkeypatch):
    tool = load_tool("park_fold")
    stopped = _stopped_during_stage3_epoch2(dataset, tmp_path / "run", monkeypatch)
    meta = json.loads((stopped / "backup3" / "training_metadata.json").read_text())
    weights = stopped / "backup3" / meta["weights"]
    weights.rename(weights.with_suffix(".moved"))
    with pytest.raises(SystemExit, match=f"{meta['weights']}: missing \\(the counter training_metadata.json"):
        tool.park(stopped, tmp_path / "c", in_progress=True)
    weights.with_suffix(".moved").rename(weights)
    (stopped / "backup2").mkdir()  # a stale folder beside the stage in progress
    with pytest.raises(SystemExit, match="carries the checkpoint of stage 3 \\(backup3/\\).*found backup2, backup3"):
        tool.park(stopped, tmp_path / "c", in_progress=True)
    # a fold whose first stage is in progress: nothing finished, the flag carries it
    fresh = tmp_path / "fresh" / "fold1"
    fresh.mkdir(parents=True)
    for name in ("recipe.json", "split.json"):
        shutil.copy2(finished / name, fresh / name)
    shutil.copytree(stopped / "backup3", fresh / "backup1")
    with pytest.raises(SystemExit, match="nothing to park yet \\(park the stage in progress with --in-progress\\)"):
        tool.park(fresh, tmp_path / "c")
    parked = tool.park(fresh, tmp_path / "c", in_progress=True)
    record = json.loads((parked / "park.json").read_text())
    assert (record["stage"], record["in_progress"]["stage"], record["epochs_done"]) == (0, 1, 1)
    assert not [n for n in record["files"] if n.startswith("stage")]
    assert not (tmp_path / "c" / "fold1" / "stage0.weights.h5").exists()
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]
