"""The one image decoder: sizes, modes, the CLIP fit, and errors that name the sample."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from otcclip.data import DataError, read_image, read_images
from otcclip.data.images import fit, open_image


def _encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_bytes_and_paths_decode_to_the_same_pixels(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    data = _encoded(array)
    (tmp_path / "a.png").write_bytes(data)
    np.testing.assert_array_equal(read_image(data), array)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), array)
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), array)


def test_fit_keeps_the_aspect_ratio_then_crops_the_centre():
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # the centre third
    out = read_image(_encoded(wide), size=10)
    assert out.shape == (10, 10)
    assert out.min() >= 250  # only the centre survives the crop
    assert fit(Image.fromarray(wide), 5).size == (5, 5)


def test_modes():
    gray = np.full((6, 6), 90, np.uint8)
    assert read_image(_encoded(gray)).shape == (6, 6)
    rgb = read_image(_encoded(gray), mode="RGB")
    assert rgb.shape == (6, 6, 3) and (rgb == 90).all()
    colour = np.zeros((6, 6, 3), np.uint8)
    assert read_image(_encoded(colour), mode="L").shape == (6, 6)
    with pytest.raises(ValueError, match="mode"):
        read_image(_encoded(gray), mode="CMYK")


def test_truncated_bytes_name_the_sample():
    data = _encoded(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="shard 7: id 42: cannot decode"):
        read_image(data[: len(data) // 2], name="shard 7: id 42")
    with pytest.raises(DataError, match="id 3: no image"):
        open_image(None, name="id 3")


def test_read_images_is_all_or_nothing_and_lists_every_bad_id():
    good = _encoded(np.zeros((8, 8), np.uint8))
    colour = _encoded(np.zeros((4, 8, 3), np.uint8))
    out = read_images([good, colour], [1, 2], 8, "f.parquet")
    assert out.shape == (2, 8, 8, 3)  # colour when any is colour
    assert read_images([good, good], [1, 2], 8, "f").shape == (2, 8, 8)
    with pytest.raises(DataError, match=r"f.parquet: 2 of 3 images cannot be read \(ids \[5, 6\]"):
        read_images([good, b"junk", None], [4, 5, 6], 8, "f.parquet")
