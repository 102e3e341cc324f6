"""tools/nested_cv.py: post-processing tuned on the other folds and scored on each fold."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import load_tool


@pytest.fixture(scope="module")
def nested_cv():
    return load_tool("nested_cv")


def _case():
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


def test_gate_found_on_other_folds_and_scored_on_each(nested_cv):
    truth, logits, fold_of = _case()
    plain, chosen = nested_cv.nested(truth, logits, fold_of, [0, 10], [])
    assert plain.mean() == pytest.approx(0.5)  # every empty image gets the false block
    gated, chosen = nested_cv.nested(truth, logits, fold_of, [0, 10], [0.0, 1.0, 4.0])
    assert gated.mean() == 1.0
    assert set(chosen) == {0, 1, 2, 3} and all(c[2] == 1.0 for c in chosen.values())


def test_tune_prefers_no_gate_on_a_tie(nested_cv):
    truth, logits, _ = _case()
    logits[1::2] = -3.0  # nothing predicted on the empty images: no gate needed
    score, threshold, min_size, gate = nested_cv.tune(truth, logits, [0], [1.0])
    assert score == 1.0 and gate is None
