"""Kaggle run-length encoding.

A mask is flattened column-major (down the first column, then the next) and written as
``"start length start length ..."`` with 1-indexed starts. An empty mask is the empty string.
"""

from __future__ import annotations

import numpy as np

SHAPE = (101, 101)


def encode(mask) -> str:
    """Encode a 2-D mask (salt where nonzero) as a Kaggle RLE string.

    Args:
        mask: array of shape ``(H, W)``; any dtype, salt where ``mask > 0`` (or True).
    Returns:
        ``"start length ..."`` with 1-indexed starts over the column-major flattening;
        ``""`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D mask, got shape {mask.shape}")
    flat = (mask > 0).flatten(order="F").astype(np.int8)
    padded = np.concatenate([[0], flat, [0]])
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed positions
    starts, ends = changes[0::2], changes[1::2]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2] = starts
    runs[1::2] = ends - starts
    return " ".join(map(str, runs))


def decode(rle, shape=SHAPE) -> np.ndarray:
    """Decode a Kaggle RLE string into a boolean mask.

    Args:
        rle: ``"start length ..."`` (1-indexed, column-major); ``""``, ``None`` or NaN mean empty.
        shape: ``(H, W)`` of the mask.
    Returns:
        bool array of ``shape``.
    Raises:
        ValueError: if the string has an odd number of values, a non-integer, a start below 1, a
            length below 1, a run past the end of the mask, or runs that overlap or are unsorted.
    """
    h, w = shape
    n = h * w
    flat = np.zeros(n, dtype=bool)
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return flat.reshape((w, h)).T
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}: {rle!r}")
    tokens = rle.split()
    if not tokens:
        return flat.reshape((w, h)).T
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)}): {_short(rle)}")
    bad = next((t for t in tokens if not _is_int(t)), None)
    if bad is not None:
        raise ValueError(f"RLE value {bad!r} is not an integer: {_short(rle)}")
    raw = [int(t) for t in tokens]
    # clip to [-1, n + 1] so huge values cannot overflow int64; every check below is unchanged by
    # the clipping, and messages quote the values as written (``raw``)
    values = np.array([min(max(v, -1), n + 1) for v in raw], dtype=np.int64)
    starts, lengths = values[0::2], values[1::2]
    if (starts < 1).any():
        raise ValueError(f"RLE start {raw[2 * int(np.argmax(starts < 1))]} is below 1: {_short(rle)}")
    if (lengths < 1).any():
        raise ValueError(
            f"RLE run length {raw[2 * int(np.argmax(lengths < 1)) + 1]} is below 1: {_short(rle)}"
        )
    ends = starts - 1 + lengths  # exclusive, 0-indexed
    if (ends > n).any():
        i = int(np.argmax(ends > n))
        raise ValueError(
            f"RLE run {raw[2 * i]} {raw[2 * i + 1]} ends past pixel {n} of a {h}x{w} mask: {_short(rle)}"
        )
    if len(starts) > 1 and (starts[1:] - 1 < ends[:-1]).any():
        i = int(np.argmax(starts[1:] - 1 < ends[:-1])) + 1
        raise ValueError(
            f"RLE runs overlap or are out of order at run {raw[2 * i]} {raw[2 * i + 1]}: {_short(rle)}"
        )
    # mark run starts +1 and ends -1, then a cumulative sum fills the runs
    delta = np.zeros(n + 1, dtype=np.int32)
    np.add.at(delta, starts - 1, 1)
    np.add.at(delta, ends, -1)
    flat = np.cumsum(delta[:-1]) > 0
    return flat.reshape((w, h)).T


def _is_int(token: str) -> bool:
    """An optional sign and ASCII digits only: Python's ``int`` would also take ``1_0`` and
    non-ASCII digits, which no RLE writer produces."""
    digits = token[1:] if token[:1] in "+-" else token
    return digits.isascii() and digits.isdigit()


def _short(s: str, limit: int = 60) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "...")
