"""otcclip.rows: row-wise norms and checks by blocks, the same to the bit as the whole array's."""

from __future__ import annotations

import numpy as np
import pytest

from otcclip import rows


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(rows, "_BLOCK", 7)  # 50 rows: 8 blocks, the last partial


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_unit_rows_are_the_whole_array_s_to_the_bit(dtype):
    x = (np.random.default_rng(0).normal(size=(50, 9)) * 3).astype(dtype)
    x[4] = 0  # an all-zero row stays zero
    wide = np.asarray(x, np.float32)
    whole = wide / np.maximum(np.linalg.norm(wide, axis=1, keepdims=True), 1e-12)
    out = rows.unit_rows(x)
    assert out.dtype == np.float32 and out.flags.c_contiguous and not np.shares_memory(out, x)
    assert np.array_equal(out, whole)
    assert not out[4].any()
    picked = np.array([49, 3, 3, 20, 0, 11, 12, 13, 14])
    assert np.array_equal(rows.unit_rows(x, picked), whole[picked])
    assert rows.unit_rows(x, np.zeros(0, np.int64)).shape == (0, 9)


def test_row_norms_are_numpy_s_to_the_bit():
    x = np.random.default_rng(1).normal(size=(50, 9)).astype(np.float32)
    out = rows.row_norms(x)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.linalg.norm(x, axis=1, keepdims=True))


def test_finite_rows_find_each_row_with_a_nan_or_an_infinity():
    x = np.ones((50, 4))
    x[8, 2], x[21, 0], x[49, 3] = np.nan, np.inf, -np.inf
    assert np.flatnonzero(~rows.finite_rows(x)).tolist() == [8, 21, 49]
