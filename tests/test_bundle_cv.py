"""tools/bundle_cv.py: a bundle re-scored on its held-out folds from its own files (the smoke run's
two fold models, bundled together)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import load_tool
from saltlib import data, evaluate, metric, params, predict, runner, ship, train

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def split(smoke_ok):
    ds = data.load_train(smoke_ok.data_dir, limit=48)
    return ds, data.kfold(ds, 3, 42)


def _bundle(smoke_ok, dest, layout: bool, split=None):
    """Folds 0 and 1 of the smoke run in one bundle, with the run's post-processing and params.yaml;
    ``layout``: with the per-fold members and held-out digests notebook 03 now records."""
    run = smoke_ok.run_dir
    post = json.loads((run / "postprocess.json").read_text())
    meta = {"folds": [0, 1], "n_folds": 3, "seed": 42, "limit": 48, "cv_score": 0.5}
    paths = [run / "models" / f"fold{f}" / "model.keras" for f in (0, 1)]
    if layout:
        ds, fold_of = split
        paths, extra = evaluate.bundle_layout(run / "models", [0, 1], ds.ids, fold_of)
        meta.update(extra)
    predict.write_bundle(dest, paths, post["threshold"], post["min_size"], post["tta"], peak_gate=post["peak_gate"],
                         meta=meta)
    shutil.copy(run / "params.yaml", dest / "params.yaml")
    return dest


@pytest.fixture(scope="module")
def old_bundle(smoke_ok, tmp_path_factory):
    return _bundle(smoke_ok, tmp_path_factory.mktemp("bundle_cv") / "old", layout=False)


@pytest.fixture(scope="module")
def new_bundle(smoke_ok, split, tmp_path_factory):
    return _bundle(smoke_ok, tmp_path_factory.mktemp("bundle_cv") / "new", layout=True, split=split)


def test_logits_are_the_runs_out_of_fold_logits(smoke_ok, old_bundle, split):
    """Each fold's images through that fold's model only: the logits train_fold saved in oof.npz."""
    tool = load_tool("bundle_cv")
    bundle = predict.load_bundle(old_bundle)
    members, matched = evaluate.fold_members(bundle.meta, len(bundle.models))
    assert members == {0: [0], 1: [1]} and matched.startswith("matched by count")
    ds, fold_of = split
    oof = tool.oof_logits(bundle, ds, fold_of, members)
    saved = train.load_oof(smoke_ok.run_dir / "models", ds, fold_of, [0, 1])
    np.testing.assert_array_equal(oof["idx"], saved["idx"])
    np.testing.assert_array_equal(oof["fold"], saved["fold"])
    np.testing.assert_allclose(oof["plain"], saved["logits"], atol=0.02, rtol=0.002)  # oof.npz is float16
    np.testing.assert_allclose(oof["flip TTA"], saved["logits_tta"], atol=0.02, rtol=0.002)
    # the TTA here (plain pass reused) equals train.predict_logits' own, on fold 0's 16 images
    x0 = ds.images[oof["idx"][:16]]
    np.testing.assert_allclose(oof["flip TTA"][:16], train.predict_logits(bundle.models[0], x0, tta=True), atol=1e-5)


@pytest.mark.parametrize("no_gates", [False, True])
def test_main_prints_the_three_scores(smoke_ok, new_bundle, split, capsys, no_gates):
    tool = load_tool("bundle_cv")
    result = tool.main([str(new_bundle), "--data-dir", str(smoke_ok.data_dir)] + (["--no-gates"] if no_gates else []))
    out = capsys.readouterr().out
    assert "models as bundle.json records them; held-out ids match bundle.json" in out
    # the same numbers from the tool's logits, computed here with the library
    bundle = predict.load_bundle(new_bundle)
    ds, fold_of = split
    oof = tool.oof_logits(bundle, ds, fold_of, {0: [0], 1: [1]})
    truth = ds.masks[oof["idx"]]
    shipped = metric.image_scores(truth, predict.postprocess(oof["flip TTA" if bundle.tta else "plain"],
                                                              bundle.threshold, bundle.min_size, bundle.peak_gate))
    assert result["n_images"] == 32 and result["shipped"] == pytest.approx(shipped.mean())
    assert result["per_fold"] == pytest.approx({0: shipped[:16].mean(), 1: shipped[16:].mean()})
    assert result["untuned"] == pytest.approx(metric.competition_score(truth, oof["plain"] > 0))
    gates = [] if no_gates else [0.0, 1.0]  # smoke.yaml's peak_gates
    nested, _ = evaluate.nested(truth, {"plain": oof["plain"], "flip TTA": oof["flip TTA"]}, oof["fold"],
                                min_sizes=[0, 10, 50], peak_gates=gates)
    assert result["nested"] == pytest.approx(nested.mean())
    assert f"as shipped: CV {result['shipped']:.4f}" in out
    assert "bundle.json records 0.5000 over folds [0, 1], from the training-time logits" in out
    assert result["card_folds"] == [0, 1]
    assert f"nested over the 2 folds (TTA or not, cut-off, size{'' if no_gates else ', gate'} chosen on the others): " \
           f"{result['nested']:.4f}" in out


def test_a_changed_split_is_refused(new_bundle, split, tmp_path):
    bundle = predict.load_bundle(new_bundle)
    ds, fold_of = split
    assert evaluate.check_held_out(bundle.meta, ds.ids, fold_of, [0, 1], bundle.path) == "held-out ids match bundle.json"
    with pytest.raises(ValueError, match="fold 1's held-out images differ from those bundle.json records"):
        evaluate.check_held_out(bundle.meta, ds.ids, (fold_of + 1) % 3, [1], bundle.path)


def test_the_bundles_record_their_members(old_bundle, new_bundle):
    """What fold_members reads from bundles as notebook 03 writes them (its cases: tests/test_evaluate.py)."""
    old = predict.load_bundle(old_bundle)
    with pytest.raises(ValueError, match=r"2 model\(s\) for folds \[0, 1\] with 2 member\(s\) each"):
        evaluate.fold_members(old.meta, len(old.models), [1], old.path)  # a snapshot per fold would need four models
    new = predict.load_bundle(new_bundle)
    assert evaluate.fold_members(new.meta, len(new.models), [1], new.path) == (
        {0: [0], 1: [1]}, "as bundle.json records them")  # the record wins over the snapshots


def test_write_records_the_result_in_the_bundle(smoke_ok, new_bundle, tmp_path):
    """``--write``: bundle_cv.json holds the returned result and the card gains the section made from it."""
    tool = load_tool("bundle_cv")
    dest = shutil.copytree(new_bundle, tmp_path / "b")
    (dest / "MODEL_CARD.md").write_text("# Model card: b\n\n## Score\n\n## Post-processing (bundle.json)\n\n- cut-off\n")
    args = [str(dest), "--data-dir", str(smoke_ok.data_dir), "--write"]
    result = tool.main(args)
    recorded = json.loads((dest / "bundle_cv.json").read_text())
    assert recorded["shipped"] == pytest.approx(result["shipped"]) and recorded["nested"] == pytest.approx(result["nested"])
    assert recorded["command"] == "python tools/bundle_cv.py " + " ".join(args) and recorded["folds"] == [0, 1]
    assert recorded["nested_gates"] and recorded["nested_no_gates"] is not None  # smoke.yaml's grid has gates
    card = (dest / "MODEL_CARD.md").read_text()
    assert ship.check_section(recorded) in card and card.index(ship.CHECK_END) < card.index("## Post-processing")
    lost = recorded["score_lost"]  # where the score is lost as shipped: adds up to 1 - score
    assert lost == result["score_lost"]  # in order, through the JSON file
    assert sum(row["n"] for row in lost) == recorded["n_images"]
    assert sum(row["lost"] for row in lost) == pytest.approx(1 - recorded["shipped"], abs=1e-9)
    assert "\n".join(f"| {row['outcome']} | {row['n']} | {row['lost']:.4f} |" for row in lost) in card
    older = {k: v for k, v in recorded.items() if k != "score_lost"}  # a check recorded before 2026-11-27
    assert "Where the score is lost" not in ship.check_section(older)
    predict.load_bundle(dest)  # the bundle still loads (its models' digests are unchanged)


def test_write_refuses_a_bundle_without_a_card_before_scoring(new_bundle, tmp_path, monkeypatch):
    tool = load_tool("bundle_cv")
    dest = shutil.copytree(new_bundle, tmp_path / "b")  # no MODEL_CARD.md
    monkeypatch.setattr(tool.predict, "load_bundle", lambda *a: pytest.fail("scored before checking the card"))
    with pytest.raises(FileNotFoundError, match="MODEL_CARD.md is missing"):
        tool.main([str(dest), "--write"])
    assert not (dest / "bundle_cv.json").exists()


# tools/fold_from_bundle.py: a bundle's fold model made a fold folder again (here the smoke run's fold 1)


@pytest.mark.parametrize("card, fold, expected", [
    ("- fold 0: 2720 training images, 90 epochs in 1.76 h (38.6 images/s)\n"
     "- fold 1: 2720 training images, 90 epochs in 1.84 h (37.0 images/s)\n", 1,
     {"n_train": 2720, "epochs": 90, "seconds": 1.84 * 3600}),
    ("- fold 2: 32 training images, 3 epochs in 1.5 min (1.1 images/s)\n", 2, {"n_train": 32, "epochs": 3, "seconds": 90.0}),
    ("- fold 0: 2720 training images, 90 epochs in 1.76 h\n", 1, None),  # no line for fold 1
    ("fold 1: 2720 training images, 90 epochs in 1.84 h\n", 1, None),  # not a card's list item
])
def test_card_training_reads_the_cards_training_line(card, fold, expected):
    got = load_tool("fold_from_bundle").card_training(card, fold)
    assert got == (pytest.approx(expected) if expected else None)


def test_fold_from_bundle_rebuilds_the_fold_folder(smoke_ok, new_bundle, split, tmp_path, capsys):
    tool = load_tool("fold_from_bundle")
    run_fold = smoke_ok.run_dir / "models" / "fold1"
    bundle = shutil.copytree(new_bundle, tmp_path / "b")
    out = tmp_path / "run" / "models"
    # a bundle whose card states no training time, and no --seconds: refused before anything is written
    with pytest.raises(SystemExit, match=r"MODEL_CARD.md: no training line for fold 1; give its training time"):
        tool.main([str(bundle), "--fold", "1", "--out", str(out), "--data-dir", str(smoke_ok.data_dir)])
    (bundle / "MODEL_CARD.md").write_text("## Training\n\n- fold 1: 32 training images, 3 epochs in 1.5 min (1 images/s)\n")
    dest = tool.main([str(bundle), "--fold", "1", "--out", str(out), "--data-dir", str(smoke_ok.data_dir)])
    assert dest == out / "fold1" and sorted(p.name for p in out.iterdir()) == ["fold1"]  # no partial folder left
    assert (dest / "model.keras").read_bytes() == (bundle / "model1.keras").read_bytes()
    for name in ("recipe.json", "split.json"):  # what the smoke run's own fold folder records
        assert json.loads((dest / name).read_text()) == json.loads((run_fold / name).read_text()), name
    ds, fold_of = split
    mine, theirs = (train.load_oof(d, ds, fold_of, [1]) for d in (out, smoke_ok.run_dir / "models"))
    np.testing.assert_array_equal(mine["idx"], theirs["idx"])
    np.testing.assert_allclose(mine["logits_tta"], theirs["logits_tta"], atol=0.02, rtol=0.002)
    done, ran = (json.loads((d / "done.json").read_text()) for d in (dest, run_fold))
    truth = ds.masks[mine["idx"]]
    assert done["val_score_tta"] == pytest.approx(metric.competition_score(truth, mine["logits_tta"] > 0))
    assert done["val_score"] == pytest.approx(ran["val_score"], abs=0.02)  # the same file, scored again here
    assert (done["epochs"], done["seconds"], done["n_train"], done["n_val"]) == (3, 90.0, ran["n_train"], ran["n_val"])
    assert done["restored_from"]["model"] == "model1.keras" and done["restored_from"]["held_out"] == \
        "held-out ids match bundle.json"
    assert "val_score" in capsys.readouterr().out
    # training the fold again with the bundle's recipe takes it as finished, without a NOTE
    summary = train.train_fold(ds, fold_of, 1, params.load(bundle / "params.yaml"), out)
    out_text = capsys.readouterr().out
    assert summary == done and "already trained" in out_text and "NOTE" not in out_text
    assert done["restored_from"]["commit"] == runner.git_info()["commit"]  # where the bundle can be found again
    assert f"model file from the bundle `{bundle}` at git {done['restored_from']['commit'][:7]}**" in \
        ship._restored_sentence(done["restored_from"])
    # never overwritten
    with pytest.raises(SystemExit, match="fold1 exists; it is not overwritten"):
        tool.main([str(bundle), "--fold", "1", "--out", str(out), "--data-dir", str(smoke_ok.data_dir), "--seconds", "5"])
    with pytest.raises(SystemExit, match=r"no model of fold 2 \(its folds: \[0, 1\]\)"):
        tool.main([str(bundle), "--fold", "2", "--out", str(out), "--data-dir", str(smoke_ok.data_dir), "--seconds", "5"])
