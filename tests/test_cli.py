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
