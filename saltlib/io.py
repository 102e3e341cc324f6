"""Crash-safe file writing: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so libraries that pick a format by
    extension (Keras ``.keras``, ``.weights.h5``) still work. On error the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # let the writer create it (some writers refuse an existing file)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):  # on disk before the rename, so a power cut cannot leave an empty file
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)



@contextlib.contextmanager
def atomic_dir(dest, hint: str = ""):
    """Yield a new hidden folder beside ``dest`` to fill; rename it to ``dest`` if the block succeeds.

    A failure (or an interruption) removes the folder, so no half-written ``dest`` is ever seen;
    listings skip the hidden name (``.<name>.partial-<hex>``) meanwhile. ``dest`` is never
    overwritten: if it exists when the block ends, :class:`FileExistsError` names it (followed by
    ``hint`` in brackets, e.g. what to do instead) and the new folder is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()  # the usual mode (mkdtemp's 0700 would outlive the rename)
    try:
        yield tmp
        if dest.exists():
            raise FileExistsError(f"{dest} exists; it is not overwritten" + (f" ({hint})" if hint else ""))
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path):
    """The JSON value stored in ``path``."""
    return json.loads(Path(path).read_text())
