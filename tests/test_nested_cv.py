"""tools/nested_cv.py, end to end on a tiny finished run (stub oof.npz files on synthetic data)."""

from __future__ import annotations

import numpy as np

from conftest import load_tool


def test_nested_cv_prints_each_folds_choice(synthetic, tmp_path, capsys):
    from saltlib import data, io, params

    tool = load_tool("nested_cv")
    run = tmp_path / "run"
    io.write_text(run / "params.yaml", f"data_dir: {synthetic.root}\nn_folds: 3\nfolds: [0, 1, 2]\nmin_sizes: [0, 10]\n")
    cfg = params.load(run / "params.yaml")
    ds = data.load_train(synthetic.root)
    fold_of = data.kfold(ds, 3, cfg["seed"])
    for f in range(3):
        idx = np.flatnonzero(fold_of == f)
        perfect = np.where(ds.masks[idx], 4.0, -4.0).astype(np.float32)
        (run / "models" / f"fold{f}").mkdir(parents=True)
        np.savez(run / "models" / f"fold{f}" / "oof.npz", ids=np.array(ds.ids)[idx], logits=perfect,
                 logits_tta=-perfect)
    tool.main([str(run)])
    out = capsys.readouterr().out
    assert "choosing among: plain, flip TTA" in out
    assert out.count("nested CV 1.0000") == 2  # perfect plain logits, chosen on every fold
    assert out.count("with plain, cut-off") == 6 and "flip TTA, cut-off" not in out
