"""saltlib.evaluate: the post-processing choice and the metrics record of notebook 03, on tiny
hand-built masks with hand-computed answers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from saltlib import evaluate, metric


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


def _outcomes():
    """Six 4x4 images, one per kind of outcome: empty predicted empty (score 1), empty with one
    false pixel (0), a 4-pixel square missed (0), the square with 2 of its pixels (IoU 0.5: 0),
    with 3 of them (IoU 0.75: 0.5), and predicted exactly (1)."""
    truth = np.zeros((6, 4, 4), bool)
    pred = np.zeros((6, 4, 4), bool)
    pred[1, 3, 3] = True
    truth[2:, :2, :2] = True
    pred[3, 0, :2] = True
    pred[4, :2, :2] = True
    pred[4, 1, 1] = False
    pred[5, :2, :2] = True
    return truth, pred


def test_score_lost_by_hand():
    truth, pred = _outcomes()
    lost = {row.pop("outcome"): row for row in evaluate.score_lost(truth, pred)}
    assert list(lost) == [
        "no salt, none predicted", "no salt, salt predicted", "salt, none predicted", "salt, IoU <= 0.5",
        "salt, IoU 0.5-0.7", "salt, IoU 0.7-0.9", "salt, IoU 0.9-0.95", "salt, IoU > 0.95",
    ]
    n = {k: v["n"] for k, v in lost.items()}
    assert n == {"no salt, none predicted": 1, "no salt, salt predicted": 1, "salt, none predicted": 1,
                 "salt, IoU <= 0.5": 1, "salt, IoU 0.5-0.7": 0, "salt, IoU 0.7-0.9": 1,
                 "salt, IoU 0.9-0.95": 0, "salt, IoU > 0.95": 1}
    got = {k: v["lost"] for k, v in lost.items()}
    want = {"no salt, salt predicted": 1 / 6, "salt, none predicted": 1 / 6, "salt, IoU <= 0.5": 1 / 6,
            "salt, IoU 0.7-0.9": 0.5 / 6}  # the IoU-0.75 image scores 0.5: it loses half a point
    assert got == pytest.approx({k: want.get(k, 0.0) for k in got}, abs=1e-12)
    assert lost["salt, IoU 0.7-0.9"]["share"] == pytest.approx(1 / 6)
    rows = evaluate.score_lost(truth, pred)
    assert json.loads(json.dumps(rows, sort_keys=True)) == rows  # metrics.json keeps it, in order


@pytest.mark.parametrize("seed", range(3))
def test_score_lost_adds_up_to_the_score(seed):
    """Every image in exactly one kind; the losses add up to 1 - score."""
    rng = np.random.default_rng(seed)
    truth = rng.random((40, 8, 8)) < rng.uniform(0, 0.6, (40, 1, 1))
    pred = np.where(rng.random((40, 1, 1)) < 0.8, truth ^ (rng.random((40, 8, 8)) < 0.1), rng.random((40, 8, 8)) < 0.3)
    truth[:8] = False
    pred[:4] = False
    lost = {row.pop("outcome"): row for row in evaluate.score_lost(truth, pred)}
    assert sum(v["n"] for v in lost.values()) == 40
    assert sum(v["share"] for v in lost.values()) == pytest.approx(1.0)
    assert sum(v["lost"] for v in lost.values()) == pytest.approx(1 - metric.competition_score(truth, pred), abs=1e-12)
    assert lost["no salt, none predicted"]["lost"] == 0.0 and lost["salt, IoU > 0.95"]["lost"] == 0.0


def test_score_lost_of_no_images():
    assert evaluate.score_lost(np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4), bool)) == []


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
    ids, split = np.array(["c", "a", "b", "d"]), np.array([0, 2, 0, 1])
    paths, layout = evaluate.bundle_layout(tmp_path, [2, 0], ids, split)
    assert paths == evaluate.bundle_members(tmp_path, [2, 0])
    assert layout["members"] == {"2": [0], "0": [1, 2]}
    assert layout["val_ids_sha256"] == {"2": hashlib.sha256(b"a").hexdigest(), "0": hashlib.sha256(b"b\nc").hexdigest()}
    # fold_members reads the layout back: fold 0's own final model is model 1, its snapshot model 2
    assert evaluate.fold_members({"folds": [2, 0], **layout}, len(paths)) == (
        {0: [1, 2], 2: [0]}, "as bundle.json records them")


@pytest.mark.parametrize(
    "meta, n_models, snapshots, members",
    [
        ({"folds": [0, 1]}, 2, (), {0: [0], 1: [1]}),  # no record: one model per fold, in fold order
        ({"folds": [2, 0]}, 2, (), {0: [1], 2: [0]}),
        ({"folds": [0, 1]}, 4, (30,), {0: [0, 1], 1: [2, 3]}),  # final model then the snapshot, fold by fold
        ({"folds": [0, 1]}, 4, (30, 30), {0: [0, 1], 1: [2, 3]}),  # a repeated snapshot epoch is one model
        ({"folds": [0, 1], "members": {"1": [0], "0": [1, 2]}}, 3, (30,), {0: [1, 2], 1: [0]}),  # the record wins
    ],
)
def test_fold_members(meta, n_models, snapshots, members):
    assert evaluate.fold_members(meta, n_models, snapshots)[0] == members


@pytest.mark.parametrize(
    "meta, n_models, snapshots, message",
    [
        ({}, 2, (), "b: bundle.json has no meta.folds"),
        ({"folds": [0, 1]}, 4, (), r"b: 4 model\(s\) for folds \[0, 1\] with 1 member\(s\) each .* no meta.members"),
        ({"folds": [0, 1]}, 2, (30,), r"2 model\(s\) for folds \[0, 1\] with 2 member\(s\) each"),
        ({"folds": [0, 1], "members": {"0": [0], "1": [0]}}, 2, (), "does not list each of the 2 model"),  # 1 unused
        ({"folds": [0, 1], "members": {"0": [0, 1]}}, 2, (), "does not list each of the 2 model"),  # fold 1 missing
        ({"folds": [0], "members": {"0": [0]}}, 2, (), "does not list each of the 2 model"),  # model 1 nobody's
    ],
)
def test_fold_members_refuses(meta, n_models, snapshots, message):
    with pytest.raises(ValueError, match=message):
        evaluate.fold_members(meta, n_models, snapshots, where="b")


def _gate_case():
    """4 folds x 4 images: two with salt (a 20x20 block at logit 0.5 peaking at 3.0) and two empty
    ones with the same block predicted, peaking at 0.5 only. No cut-off or size tells them apart;
    a gate between 0.5 and 3.0 does."""
    n = 16
    truth = np.zeros((n, 101, 101), bool)
    logits = np.full((n, 101, 101), -3.0, np.float32)
    for k in range(n):
        logits[k, 30:50, 30:50] = 0.5
        if k % 2 == 0:
            truth[k, 30:50, 30:50] = True
            logits[k, 40, 40] = 3.0
    return truth, logits, np.repeat(np.arange(4), 4)


def test_nested_finds_the_gate_on_the_other_folds():
    truth, logits, fold_of = _gate_case()
    plain, _ = evaluate.nested(truth, {"plain": logits}, fold_of, min_sizes=[0, 10])
    np.testing.assert_array_equal(plain, np.tile([1.0, 0.0], 8))  # every empty image gets the false block
    gated, chosen = evaluate.nested(truth, {"plain": logits}, fold_of, min_sizes=[0, 10], peak_gates=[0.0, 1.0, 4.0])
    assert gated.mean() == 1.0
    assert set(chosen) == {0, 1, 2, 3} and all(c["peak_gate"] == 1.0 and c["label"] == "plain" for c in chosen.values())


def test_nested_prefers_no_gate_on_a_tie():
    truth, logits, fold_of = _gate_case()
    logits[1::2] = -3.0  # nothing predicted on the empty images: no gate needed
    scores, chosen = evaluate.nested(truth, {"plain": logits}, fold_of, peak_gates=[1.0])
    assert scores.mean() == 1.0 and all(c["peak_gate"] is None for c in chosen.values())


def test_nested_exposes_a_choice_that_only_fits_the_images_it_was_made_on():
    """Fold 0's images are right under "plain" and wrong under "flip TTA", fold 1's the other way
    round. Choosing on all four images scores 0.5 (either kind is right on half); nested, each
    fold gets the kind that fits the *other* fold and every image scores 0."""
    truth = np.zeros((4, 101, 101), bool)
    truth[:, 10:20, 10:20] = True  # salt everywhere: predicting nothing scores 0 too
    right = np.where(truth, 3.0, -3.0).astype(np.float32)
    plain = np.concatenate([right[:2], -right[2:]])
    tta = -plain
    fold_of = np.array([0, 0, 1, 1])
    label, sweeps = evaluate.choose(truth, {"plain": plain, "flip TTA": tta})
    assert sweeps[label]["score"] == 0.5
    scores, chosen = evaluate.nested(truth, {"plain": plain, "flip TTA": tta}, fold_of)
    np.testing.assert_array_equal(scores, 0.0)
    assert chosen[0]["label"] == "flip TTA" and chosen[1]["label"] == "plain"


def test_nested_needs_two_folds():
    truth, logits, _ = _gate_case()
    with pytest.raises(ValueError, match=r"at least two folds, got \[3\]"):
        evaluate.nested(truth, {"plain": logits}, np.full(len(truth), 3))


def test_nesting_groups_are_the_folds_or_parts_of_one_fold():
    classes = np.array([0] * 10 + [3] * 10)
    folds = np.repeat([2, 4], 10)
    groups, words = evaluate.nesting_groups(folds, classes)
    assert groups is folds or np.array_equal(groups, folds)
    assert words == "the 2 folds"
    groups, words = evaluate.nesting_groups(np.full(20, 3), classes, seed=1)
    assert words == "5 parts of fold 3"
    assert np.bincount(groups).tolist() == [4] * 5
    for c in (0, 3):  # stratified: each part holds two images of each class
        assert np.bincount(groups[classes == c]).tolist() == [2] * 5
    np.testing.assert_array_equal(groups, evaluate.nesting_groups(np.full(20, 3), classes, seed=1)[0])
    assert evaluate.nesting_groups(np.zeros(3), np.zeros(3))[1] == "3 parts of fold 0"
    with pytest.raises(ValueError, match="at least two images"):
        evaluate.nesting_groups(np.zeros(1), np.zeros(1))


def test_nested_names_non_finite_logits_by_their_input_index():
    from saltlib import predict

    truth, logits, fold_of = _gate_case()  # image 13 sits in fold 3
    logits[13, 0, 0] = np.inf
    with pytest.raises(predict.NonFiniteLogitsError, match="first at index 13") as e:
        evaluate.nested(truth, {"plain": logits}, fold_of)
    assert e.value.indices == [13]
