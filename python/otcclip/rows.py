"""Row-wise norms and checks of large (N, D) arrays, a block of rows at a time.

Why this module exists: numpy's whole-array forms hold an N x D temporary
(`np.linalg.norm(x, axis=1)` squares every element first, `np.isfinite(x)` holds a mask
of them all), and at a streamed round's scale that temporary was as large as the
embeddings themselves: the round's peak memory (issue 16). Each row's result depends on
that row alone, so computing block by block gives the same values, to the bit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["finite_rows", "row_norms", "unit_rows"]

_BLOCK = 8192  # rows per temporary


def finite_rows(x: np.ndarray) -> np.ndarray:
    """bool (N,): whether every value of each row of `x` (N, D) is finite."""
    out = np.empty(len(x), bool)
    for start in range(0, len(x), _BLOCK):
        out[start : start + _BLOCK] = np.isfinite(x[start : start + _BLOCK]).all(axis=1)
    return out


def row_norms(x: np.ndarray) -> np.ndarray:
    """(N, 1): the L2 norm of each row of `x` (N, D), in x's float type (as np.linalg.norm)."""
    out = np.empty((len(x), 1), np.result_type(x.dtype, np.float16))
    for start in range(0, len(x), _BLOCK):
        block = x[start : start + _BLOCK]
        out[start : start + _BLOCK] = np.linalg.norm(block, axis=1, keepdims=True)
    return out


def unit_rows(x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 (len(rows), D), C-contiguous: the rows `rows` of `x` (all of them if None)
    scaled to length 1 (an all-zero row stays zero), as a copy of their own.

    `x` may be float16 (a trainer's kept embeddings) or memory-mapped: only a block of
    rows is gathered and widened at a time.
    """
    count = len(x) if rows is None else len(rows)
    out = np.empty((count, x.shape[1]), np.float32)
    for start in range(0, count, _BLOCK):
        stop = min(count, start + _BLOCK)
        block = out[start:stop]
        block[:] = x[start:stop] if rows is None else x[rows[start:stop]]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return out
