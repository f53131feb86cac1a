"""Fashion-MNIST files and vocabulary: IDX reading, locating the data, class names."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from otcclip.data import fmnist
from otcclip.data.fmnist import (
    CLASSNAMES,
    class_index,
    classes_in_captions,
    load_fashion_mnist,
    read_idx,
    resolve_root,
    with_article,
)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_root(tmp_path, gz: bool = True, n: int = 6):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for stem, arr in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = _idx_bytes(arr)
            if gz:
                (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (tmp_path / stem).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(array)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "a"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "b"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="promises 5"):
        read_idx(truncated)
    floats = tmp_path / "c"
    floats.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"abcd")
    with pytest.raises(ValueError, match="unsigned byte"):
        read_idx(floats)


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_a_given_folder(tmp_path, gz):
    root = _fake_root(tmp_path, gz=gz)
    images, labels = load_fashion_mnist("test", root)
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_missing_folder_names_the_package_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(fmnist.ROOT_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        resolve_root(tmp_path / "nowhere")
    assert "dataset-fashion-mnist" in str(err.value) and "--fashion-mnist" in str(err.value)


def test_missing_file_in_folder_is_named(tmp_path):
    root = _fake_root(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("test", root)


def test_environment_variable_is_used(tmp_path, monkeypatch):
    root = _fake_root(tmp_path)
    monkeypatch.setenv(fmnist.ROOT_ENV, str(root))
    assert resolve_root() == root
    monkeypatch.setenv(fmnist.ROOT_ENV, str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="OTCCLIP_FASHION_MNIST"):
        resolve_root()


def test_real_fashion_mnist_is_read():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, _ = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28)


def test_class_index_accepts_names_synonyms_and_indices():
    assert class_index("bag") == 8
    assert class_index("Handbag") == 8
    assert class_index(" ankle boot ") == 9
    assert class_index(3) == 3
    assert class_index("7") == 7
    for bad in ("pizza", 10, -1):
        with pytest.raises(ValueError):
            class_index(bad)
    with pytest.raises(TypeError):
        class_index(1.5)


def test_captions_are_parsed_by_longest_name():
    hot = classes_in_captions(
        [
            "a t-shirt next to a shirt",
            "a tee shirt on the left",
            "an ankle boot and a button-up shirt",
            "a pizza",
            "product photo: HANDBAG, top right",
        ]
    )
    names = [[CLASSNAMES[c] for c in np.flatnonzero(row)] for row in hot]
    assert names == [["t-shirt", "shirt"], ["t-shirt"], ["shirt", "ankle boot"], [], ["bag"]]


def test_articles():
    assert with_article("ankle boot") == "an ankle boot"
    assert with_article("sneaker") == "a sneaker"
    assert with_article("trousers") == "a pair of trousers"
