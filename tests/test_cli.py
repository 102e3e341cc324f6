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


def test_salt_data_reads_every_test_image(synthetic, tmp_path, capsys):
    """A corrupt or wrong-size test PNG would fail notebook 04 after the training: named here."""
    import shutil

    from PIL import Image

    root = shutil.copytree(synthetic.root, tmp_path / "d")
    bad = root / "test" / "images" / f"{synthetic.test_ids[1]}.png"
    bad.write_bytes(bad.read_bytes()[:60])
    assert cli.main(["data", "--dest", str(root)]) == 2
    assert str(bad) in capsys.readouterr().err
    shutil.copy(synthetic.root / "test" / "images" / bad.name, bad)
    Image.new("L", (64, 64)).save(root / "test" / "images" / "small.png")
    assert cli.main(["data", "--dest", str(root)]) == 2
    assert "small.png is 64x64, expected 101x101" in capsys.readouterr().err
    (root / "test" / "images" / "small.png").unlink()
    shutil.rmtree(root / "test")
    assert cli.main(["data", "--dest", str(root)]) == 0
    assert f"no test images ({root / 'test' / 'images'} is not a folder)" in capsys.readouterr().out


def test_salt_data_without_data_says_how_to_get_it(tmp_path, capsys):
    assert cli.main(["data", "--dest", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no TGS data found" in err and "data/README.md" in err and "--kaggle" in err


def test_salt_train_checks_folds_like_a_parameter(tmp_path, capsys):
    """``--folds`` goes through the parameter checks before any data is read or anything trained."""
    from saltlib.runner import PROJECT_ROOT

    smoke = str(PROJECT_ROOT / "params" / "smoke.yaml")  # n_folds: 3
    assert cli.main(["train", smoke, "--out", str(tmp_path / "m"), "--folds", "7"]) == 2
    assert "salt train: error: --folds 7: parameter 'folds' has fold 7 but n_folds is 3" in capsys.readouterr().err
    assert cli.main(["train", smoke, "--out", str(tmp_path / "m"), "--folds", "0,x"]) == 2
    assert "salt train: error: --folds '0,x': expected fold numbers" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_salt_predict_names_a_model_that_does_not_convert(tmp_path, monkeypatch, capsys):
    """A TensorFlow Lite conversion failure is one line naming the model, not a traceback."""
    from saltlib import litert, predict

    def fail(*args, **kwargs):
        raise litert.ConversionError("cannot convert model 'ensemble' to TensorFlow Lite: ValueError: op X")

    monkeypatch.setattr(predict, "predict_folder", fail)
    argv = ["predict", "--model", str(tmp_path / "b"), "--images", str(tmp_path), "--out", str(tmp_path / "s.csv"),
            "--runtime", "tflite"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == ("salt predict: error: cannot convert model 'ensemble' to TensorFlow Lite: "
                                       "ValueError: op X\n")
