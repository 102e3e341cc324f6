"""saltlib.io.atomic_dir: a folder appears whole or not at all, and never replaces one."""

from __future__ import annotations

import pytest

from saltlib import io


def test_atomic_dir_renames_a_filled_folder(tmp_path):
    dest = tmp_path / "sub" / "bundle"
    with io.atomic_dir(dest) as tmp:
        assert tmp.is_dir() and tmp.parent == dest.parent and tmp.name.startswith(".bundle.partial-")
        assert not dest.exists()  # nothing at the destination while it is filled
        (tmp / "a.txt").write_text("x")
    assert (dest / "a.txt").read_text() == "x"
    assert [p.name for p in dest.parent.iterdir()] == ["bundle"]  # no hidden folder left


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_dir(dest) as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_never_replaces_an_existing_folder(tmp_path):
    dest = tmp_path / "bundle"
    with pytest.raises(FileExistsError, match=r"bundle exists; it is not overwritten \(pick another --name\)"):
        with io.atomic_dir(dest, "pick another --name") as tmp:
            (tmp / "new.txt").write_text("new")
            dest.mkdir()  # made meanwhile, by another process say
            (dest / "old.txt").write_text("old")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
