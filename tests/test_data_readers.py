"""Readers and writer: round trips through parquet, CSV and webdataset; bad samples reported."""

from __future__ import annotations

import io
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otcclip.data import DataError, PairTable, read_pairs, read_pairs_report, write_pairs
from otcclip.data import readers as rd


def _table(n=6, rgb=False, classes=True, size=8):
    rng = np.random.default_rng(0)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    hot = np.eye(10, dtype=np.uint8)[np.arange(n) % 10]
    return PairTable(
        ids=np.arange(n, dtype=np.int64) * 7 + 3,
        images=rng.integers(0, 256, shape, dtype=np.uint8),
        captions=[f"caption {i} – ünïcode ✓" for i in range(n)],
        image_classes=hot if classes else None,
        caption_classes=hot[::-1].copy() if classes else None,
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_same(a: PairTable, b: PairTable, classes=True):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    if classes:
        np.testing.assert_array_equal(a.image_classes, b.image_classes)
        np.testing.assert_array_equal(a.caption_classes, b.caption_classes)


@pytest.mark.parametrize("rgb", [False, True])
def test_parquet_round_trip(tmp_path, rgb):
    t = _table(rgb=rgb)
    path = tmp_path / "pairs.parquet"
    write_pairs(t, path)
    back, report = read_pairs_report(path)
    assert report.ok and report.n_kept == len(t)
    _assert_same(t, back)
    assert pq.read_schema(path).metadata[b"otcclip.format"] == rd.FORMAT_TAG.encode()


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "pairs.parquet"
    write_pairs(_table(3), path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rd.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_pairs(_table(6), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]


def test_parquet_with_paths_and_other_columns(tmp_path):
    t = _table(4, classes=False)
    for i, im in zip(t.ids, t.images, strict=True):
        (tmp_path / f"{i}.png").write_bytes(_png(im))
    table = pa.table({"key": t.ids, "image_path": [f"{i}.png" for i in t.ids], "text": t.captions})
    pq.write_table(table, tmp_path / "mine.parquet")
    back = read_pairs(tmp_path / "mine.parquet", id_col="key")
    _assert_same(t, back, classes=False)
    with pytest.raises(DataError, match="no caption column"):
        read_pairs(tmp_path / "mine.parquet", caption_col="caption")


def _write_csv(tmp_path, t, sep="\t", header=("filepath", "title"), name="data.csv", extra=()):
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = [sep.join(header)]
    for i, im, cap in zip(t.ids, t.images, t.captions, strict=True):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(im))
        lines.append(sep.join([f"img/{i}.png", cap]))
    body = ("\n".join(lines) + "\n").encode("utf-8") + b"".join(extra)
    (tmp_path / name).write_bytes(body)
    return tmp_path / name


@pytest.mark.parametrize("sep", ["\t", ","])
def test_csv_round_trip_open_clip_layout(tmp_path, sep):
    t = _table(5, classes=False)
    path = _write_csv(tmp_path, t, sep=sep)
    back = read_pairs(path)
    assert back.ids.tolist() == list(range(5))  # no id column: the row number
    np.testing.assert_array_equal(back.images, t.images)
    assert back.captions == t.captions


def test_csv_custom_columns(tmp_path):
    t = _table(3, classes=False)
    path = _write_csv(tmp_path, t, header=("img", "cap"))
    with pytest.raises(DataError, match="no caption column 'title'"):
        read_pairs(path)
    back = read_pairs(path, path_col="img", caption_col="cap")
    assert back.captions == t.captions


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip_img2dataset_layout(tmp_path):
    t = _table(6, classes=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        samples = []
        for i in range(s * 3, s * 3 + 3):
            key = f"{int(t.ids[i]):09d}"
            samples += [
                (f"{key}.png", _png(t.images[i])),
                (f"{key}.txt", t.captions[i].encode()),
                (f"{key}.json", b'{"key": "%s"}' % key.encode()),
            ]
        _write_tar(shards / f"{s:05d}.tar", samples)
    for source in (shards, str(shards / "{00000..00001}.tar")):
        back = read_pairs(source)
        _assert_same(t, back, classes=False)
    one = read_pairs(shards / "00001.tar")
    assert one.ids.tolist() == t.ids[3:].tolist()
    with pytest.raises(FileNotFoundError, match="00002"):
        read_pairs(str(shards / "{00000..00002}.tar"))
    (shards / "00003.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="00003.tar"):
        read_pairs(shards)


def test_webdataset_jpeg_is_read(tmp_path):
    image = np.full((8, 8, 3), 120, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    _write_tar(tmp_path / "a.tar", [("abc.jpg", buffer.getvalue()), ("abc.txt", b"a grey square")])
    back = read_pairs(tmp_path / "a.tar")
    assert back.images.shape == (1, 8, 8, 3)
    assert np.abs(back.images.astype(int) - 120).max() <= 2
    assert back.ids[0] == rd._stable_id("abc") and back.ids[0] >= 0


def test_bad_samples_are_reported_by_id_never_silently_dropped(tmp_path):
    t = _table(6, classes=False)
    path = tmp_path / "x.parquet"
    images = [_png(im) for im in t.images]
    images[1] = b"not an image"
    captions = [c.encode() for c in t.captions]
    captions[2] = b""
    captions[3] = b"caf\xe9 latte"  # latin-1, not UTF-8
    captions[4] = b"   "
    pq.write_table(
        pa.table({"id": t.ids, "image": images, "caption": pa.array(captions, pa.binary())}), path
    )
    with pytest.warns(UserWarning, match=r"4 of 6 samples dropped") as caught:
        back = read_pairs(path)
    message = str(caught[0].message)
    assert "1 unreadable image (ids 10)" in message
    assert "2 empty caption (ids 17, 31)" in message
    assert "1 caption not UTF-8 (ids 24)" in message
    assert back.ids.tolist() == [3, 38]
    table, report = read_pairs_report(path)
    assert report.unreadable_images == [10] and report.empty_captions == [17, 31]
    assert report.non_utf8_captions == [24] and report.n_seen == 6 and report.n_kept == 2
    with pytest.raises(DataError, match="4 of 6 samples dropped"):
        read_pairs(path, strict=True)


def test_bad_csv_rows_are_reported(tmp_path):
    t = _table(3, classes=False)
    path = _write_csv(
        tmp_path, t, extra=[b"img/missing.png\tfine caption\n", b"img/3.png\t\xff\xfe bad\n"]
    )
    (tmp_path / "img" / "3.png").write_bytes(_png(t.images[0]))
    table, report = read_pairs_report(path)
    assert report.unreadable_images == [3] and report.non_utf8_captions == [4]
    assert len(table) == 3


def test_bad_webdataset_samples_are_reported(tmp_path):
    image = _png(np.zeros((4, 4), np.uint8))
    _write_tar(
        tmp_path / "a.tar",
        [
            ("000000001.png", image),
            ("000000001.txt", b"\xff"),
            ("000000002.txt", b"no image"),
            ("000000003.png", image),
            ("000000003.txt", b"ok"),
        ],
    )
    table, report = read_pairs_report(tmp_path / "a.tar")
    assert report.non_utf8_captions == [1] and report.unreadable_images == [2]
    assert table.ids.tolist() == [3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="strict"):
            read_pairs(tmp_path / "a.tar", strict=True)


def test_sizes_must_agree_unless_resized(tmp_path):
    samples = []
    for key, shape in (("1", (8, 8)), ("2", (12, 16)), ("3", (8, 8, 3))):
        samples += [(f"{key}.png", _png(np.full(shape, 50, np.uint8))), (f"{key}.txt", b"x")]
    _write_tar(tmp_path / "a.tar", samples)
    with pytest.raises(DataError, match="image_size"):
        read_pairs(tmp_path / "a.tar")
    table, report = read_pairs_report(tmp_path / "a.tar", image_size=6)
    assert table.images.shape == (3, 6, 6, 3)  # one RGB image makes them all RGB
    assert report.n_resized == 3
    gray = read_pairs(tmp_path / "a.tar", image_size=8, mode="L")
    assert (
        gray.images.shape == (3, 8, 8)
        and read_pairs_report(tmp_path / "a.tar", image_size=8)[1].n_resized == 1
    )


def test_duplicate_ids_and_unknown_formats_are_errors(tmp_path):
    t = _table(2, classes=False)
    pq.write_table(
        pa.table({"id": [5, 5], "image": [_png(im) for im in t.images], "caption": ["a", "b"]}),
        tmp_path / "d.parquet",
    )
    with pytest.raises(DataError, match="duplicate"):
        read_pairs(tmp_path / "d.parquet")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_pairs(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "absent.parquet")


def test_read_pair_columns_skips_images(tmp_path):
    t = _table(4)
    write_pairs(t, tmp_path / "p.parquet")
    cols = rd.read_pair_columns(
        tmp_path / "p.parquet", ["id", "caption", "image_classes", "changed"]
    )
    assert set(cols) == {"id", "caption", "image_classes"}
    np.testing.assert_array_equal(cols["id"], t.ids)
    np.testing.assert_array_equal(cols["image_classes"], t.image_classes)


def test_damaged_parquet_bytes_are_a_data_error(tmp_path):
    """Flipped bytes used to escape as OSError ("Corrupt snappy compressed data",
    "Couldn't deserialize thrift"): a traceback in `otcclip train` and `poison`."""
    from otcclip.data import DataError, fashion_scenes, read_pairs_report, write_pairs

    write_pairs(fashion_scenes(30, seed=0), tmp_path / "p.parquet")
    clean = (tmp_path / "p.parquet").read_bytes()
    errors = 0
    for seed in range(40):
        data = bytearray(clean)
        for pos in np.random.default_rng(seed).integers(4, len(data) - 4, size=8):
            data[pos] ^= 0xFF
        (tmp_path / "f.parquet").write_bytes(bytes(data))
        try:
            read_pairs_report(tmp_path / "f.parquet")
        except DataError as err:
            assert str(err) and "\n" not in str(err)
            errors += 1
    assert errors >= 10  # these seeds damage the file's structure, not only pixels
