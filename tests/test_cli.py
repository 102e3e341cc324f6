"""The ``salt`` command's data check and its error handling (exit 2, one line naming the culprit)."""

from __future__ import annotations

from saltlib import cli


def test_salt_data_checks_every_file(synthetic, capsys):
    assert cli.main(["data", "--dest", str(synthetic.root)]) == 0
    out = capsys.readouterr().out
    assert f"data folder: {synthetic.root.resolve()}" in out
    empty = (~synthetic.masks.any(axis=(1, 2))).mean()
    assert f"checked {len(synthetic.ids)} training images" in out and f"({empty:.1%} empty)" in out
    assert f"{len(synthetic.test_ids)} test images" in out


def test_salt_data_names_a_corrupt_png(synthetic, capsys):
    bad = synthetic.image_path(3)
    bad.write_bytes(bad.read_bytes()[:60])
    assert cli.main(["data", "--dest", str(synthetic.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salt data: error: ") and str(bad) in err and "corrupt" in err


def test_salt_data_without_data_says_how_to_get_it(tmp_path, capsys):
    assert cli.main(["data", "--dest", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no TGS data found" in err and "data/README.md" in err and "--kaggle" in err


def test_salt_train_checks_folds_like_a_parameter(tmp_path, capsys):
    """``--folds`` goes through the parameter checks before any data is read or anything trained."""
    from saltlib.runner import PROJECT_ROOT

    smoke = str(PROJECT_ROOT / "params" / "smoke.yaml")  # n_folds: 3
    assert cli.main(["train", smoke, "--out", str(tmp_path / "m"), "--folds", "7"]) == 2
    assert "salt train: error: --set folds=[7]: parameter 'folds' has fold 7 but n_folds is 3" in capsys.readouterr().err
    assert cli.main(["train", smoke, "--out", str(tmp_path / "m"), "--folds", "0,x"]) == 2
    assert "salt train: error: --folds '0,x': expected fold numbers" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
