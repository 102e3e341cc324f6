"""tools/bundle_cv.py: a bundle re-scored on its held-out folds from its own files (the smoke run's
two fold models, bundled together)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import _smoke
from conftest import load_tool
from saltlib import data, predict, train

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def smoke_ok(tmp_path_factory, real_data):
    run = _smoke.get(tmp_path_factory, real_data)
    if run.returncode != 0:
        pytest.fail(run.describe())
    return run


@pytest.fixture(scope="module")
def two_fold_bundle(smoke_ok, tmp_path_factory):
    """Folds 0 and 1 of the smoke run in one bundle, with the run's post-processing and params.yaml."""
    run = smoke_ok.run_dir
    post = json.loads((run / "postprocess.json").read_text())
    dest = tmp_path_factory.mktemp("bundle_cv") / "two"
    predict.write_bundle(dest, [run / "models" / f"fold{f}" / "model.keras" for f in (0, 1)], post["threshold"],
                         post["min_size"], post["tta"], peak_gate=post["peak_gate"],
                         meta={"folds": [0, 1], "n_folds": 3, "seed": 42, "limit": 48, "cv_score": 0.5})
    shutil.copy(run / "params.yaml", dest / "params.yaml")
    return dest


def test_logits_are_the_runs_out_of_fold_logits(smoke_ok, two_fold_bundle):
    """Each fold's images through that fold's model only: the logits train_fold saved in oof.npz."""
    tool = load_tool("bundle_cv")
    bundle = predict.load_bundle(two_fold_bundle)
    members = tool.fold_members(bundle, [])
    assert members == {0: [0], 1: [1]}
    ds = data.load_train(smoke_ok.data_dir, limit=48)
    fold_of = data.kfold(ds, 3, 42)
    oof = tool.oof_logits(bundle, ds, fold_of, members)
    saved = train.load_oof(smoke_ok.run_dir / "models", ds, fold_of, [0, 1])
    np.testing.assert_array_equal(oof["idx"], saved["idx"])
    np.testing.assert_array_equal(oof["fold"], saved["fold"])
    np.testing.assert_allclose(oof["plain"], saved["logits"], atol=0.02, rtol=0.002)  # oof.npz is float16
    np.testing.assert_allclose(oof["flip TTA"], saved["logits_tta"], atol=0.02, rtol=0.002)


def test_main_prints_the_three_scores(smoke_ok, two_fold_bundle, capsys):
    tool = load_tool("bundle_cv")
    result = tool.main([str(two_fold_bundle), "--data-dir", str(smoke_ok.data_dir)])
    out = capsys.readouterr().out
    metrics = json.loads((smoke_ok.run_dir / "metrics.json").read_text())
    assert result["n_images"] == 32 and set(result["per_fold"]) == {0, 1}
    # the run scored the same images with the same models and settings (from float16 logits)
    assert result["shipped"] == pytest.approx(metrics["cv_score"], abs=1 / 32)
    assert result["untuned"] == pytest.approx(metrics["cv_score_untuned"], abs=1 / 32)
    assert result["nested"] == pytest.approx(metrics["cv_score_nested"], abs=1 / 32)
    assert np.mean(list(result["per_fold"].values())) == pytest.approx(result["shipped"])  # 16 images each
    assert f"as shipped: CV {result['shipped']:.4f}" in out and "bundle.json records 0.5000" in out
    assert f"nested over the 2 folds (post-processing chosen on the others): {result['nested']:.4f}" in out


def test_models_must_match_the_folds(two_fold_bundle, tmp_path):
    tool = load_tool("bundle_cv")
    bundle = predict.load_bundle(two_fold_bundle)
    with pytest.raises(ValueError, match=r"2 model\(s\) for folds \[0, 1\] with 2 member\(s\) each"):
        tool.fold_members(bundle, [1])  # a snapshot per fold would need four models
    bundle.meta = {k: v for k, v in bundle.meta.items() if k != "folds"}
    with pytest.raises(ValueError, match="no meta.folds"):
        tool.fold_members(bundle, [])
