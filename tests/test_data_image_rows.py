"""The images file of a matching round: ids, own captions, decoded pixels, columns carried on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from otcclip.data import DataError
from otcclip.data.image_rows import image_rows


def _png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_pairs_table_pairs_each_image_with_its_own_id():
    table = pa.table(
        {
            "id": pa.array([5, 9], pa.int64()),
            "image": pa.array([_png(10), _png(20)], pa.binary()),
            "caption": ["a", "b"],
            "url": ["u5", "u9"],
        }
    )
    rows = image_rows(table, Path("p.parquet"), 8)
    assert rows.ids.tolist() == [5, 9] and rows.own_ids.tolist() == [5, 9]
    assert rows.own_from_pairs and rows.column == "image"
    assert rows.pixels.shape == (2, 8, 8) and rows.pixels[1].min() == 20
    assert list(rows.extras) == ["url"]


def test_paths_and_caption_ids(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(7))
    table = pa.table({"image_id": [1], "image_path": ["a.png"], "caption_id": [40]})
    rows = image_rows(table, tmp_path / "images.parquet", 12)
    assert rows.own_ids.tolist() == [40] and not rows.own_from_pairs
    assert rows.values.to_pylist() == [str((tmp_path / "a.png").resolve())]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"id": [1], "caption": ["x"]}, "needs an id"),
        ({"id": [1, 1], "image": [b"", b""], "caption_id": [1, 2]}, "repeats ids"),
        ({"id": [1, 2], "image": [_png(1), b"bad"], "caption": ["x", "y"]}, r"ids \[2\]"),
    ],
)
def test_problems_name_the_file(columns, message):
    with pytest.raises(DataError, match=message):
        image_rows(pa.table(columns), Path("images.parquet"), 8)
