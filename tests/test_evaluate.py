"""saltlib.evaluate: the post-processing choice and the metrics record of notebook 03, on tiny
hand-built masks with hand-computed answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saltlib import evaluate


def _masks():
    """Four 4x4 images: empty truth predicted empty (1.0), empty truth predicted salt (0.0), a 4-pixel
    square predicted exactly (1.0), the same square predicted with 2 of its pixels (IoU 0.5: 0.0)."""
    truth = np.zeros((4, 4, 4), bool)
    pred = np.zeros((4, 4, 4), bool)
    pred[1, 0, 0] = True
    truth[2, :2, :2] = pred[2, :2, :2] = True
    truth[3, :2, :2] = True
    pred[3, 0, :2] = True
    return truth, pred


def test_score_record_by_hand():
    truth, pred = _masks()
    rec = evaluate.score_record(truth, pred, fold_of=[0, 1, 0, 1], coverage_class=[0, 0, 3, 3])
    np.testing.assert_allclose(rec.pop("scores"), [1.0, 0.0, 1.0, 0.0])
    assert rec == {
        "cv_score": 0.5,
        "per_fold": {"0": 1.0, "1": 0.0},
        "per_coverage_class": {"0": {"n": 2, "score": 0.5, "predicted_empty": 0.5},
                               "3": {"n": 2, "score": 0.5, "predicted_empty": 0.0}},
        "empty_accuracy": 0.5,  # of the two empty images, one predicted empty
        "salt_recall": 1.0,  # both salt images got some salt
        "n_images": 4,
    }
    json.dumps(rec)  # what metrics.json holds


def test_score_record_without_empty_or_salt_images_says_none():
    truth, pred = _masks()
    salt_only = evaluate.score_record(truth[2:], pred[2:], [0, 0], [3, 3])
    assert salt_only["empty_accuracy"] is None and salt_only["salt_recall"] == 1.0
    empty_only = evaluate.score_record(truth[:2], pred[:2], [0, 0], [0, 0])
    assert empty_only["salt_recall"] is None and empty_only["empty_accuracy"] == 0.5


def test_choose_picks_the_better_logits_and_a_tie_keeps_the_first():
    truth, _ = _masks()
    good = np.where(truth, 3.0, -3.0)
    bad = -good
    label, sweeps = evaluate.choose(truth, {"plain": bad, "flip TTA": good}, [-1.0, 0.0, 1.0])
    assert label == "flip TTA" and sweeps["flip TTA"]["score"] == 1.0 and sweeps["plain"]["score"] < 1.0
    label, _ = evaluate.choose(truth, {"plain": good, "flip TTA": good.copy()}, [-1.0, 0.0, 1.0])
    assert label == "plain"
    with pytest.raises(ValueError, match="at least one"):
        evaluate.choose(truth, {})


def test_bundle_members_follow_done_json(tmp_path):
    for f, models in ((0, ["model.keras", "snapshot1.keras"]), (2, None)):
        (tmp_path / f"fold{f}").mkdir()
        done = {"val_score": 0.5} if models is None else {"val_score": 0.5, "models": models}
        (tmp_path / f"fold{f}" / "done.json").write_text(json.dumps(done))
    assert evaluate.bundle_members(tmp_path, [2, 0]) == [
        tmp_path / "fold2" / "model.keras", tmp_path / "fold0" / "model.keras", tmp_path / "fold0" / "snapshot1.keras"]
    with pytest.raises(FileNotFoundError, match="fold 1 is not trained"):
        evaluate.bundle_members(tmp_path, [0, 1])
