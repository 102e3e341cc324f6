"""tools/nested_cv.py, end to end on a tiny finished run (stub oof.npz files on synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_tool


@pytest.mark.parametrize("folds,over,groups", [([0, 1, 2], "the 3 folds", 3), ([1], "4 parts of fold 1", 4)])
def test_nested_cv_prints_each_groups_choice(synthetic, tmp_path, capsys, folds, over, groups):
    """Perfect plain logits and inverted TTA logits: every group, tuned on the others, picks plain and
    scores 1. A one-fold run (4 images here) is nested over parts of its fold."""
    from saltlib import data, io, params

    tool = load_tool("nested_cv")
    run = tmp_path / "run"
    io.write_text(run / "params.yaml", f"data_dir: {synthetic.root}\nn_folds: 3\nfolds: {folds}\nmin_sizes: [0, 10]\n")
    cfg = params.load(run / "params.yaml")
    ds = data.load_train(synthetic.root)
    fold_of = data.kfold(ds, 3, cfg["seed"])
    for f in folds:
        idx = np.flatnonzero(fold_of == f)
        perfect = np.where(ds.masks[idx], 4.0, -4.0).astype(np.float32)
        (run / "models" / f"fold{f}").mkdir(parents=True)
        np.savez(run / "models" / f"fold{f}" / "oof.npz", ids=np.array(ds.ids)[idx], logits=perfect,
                 logits_tta=-perfect)
    tool.main([str(run)])
    out = capsys.readouterr().out
    assert f"nested over {over}, choosing among: plain, flip TTA" in out
    assert out.count("nested CV 1.0000") == 2  # with and without the gate in the grid
    assert out.count("with plain, cut-off") == 2 * groups and "flip TTA, cut-off" not in out
