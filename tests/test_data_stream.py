"""The streaming source: same pairs as the in-memory reader, each once, in a reproducible order."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from otcclip.data import (
    DataError,
    PairStream,
    PairTable,
    fashion_scenes,
    read_pairs,
    write_pairs,
    write_shards,
)


@pytest.fixture(scope="module")
def scenes() -> PairTable:
    return fashion_scenes(40, seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, scenes):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(scenes, folder, shard_size=5)  # 8 shards
    return folder


def _collect(stream) -> tuple[list[int], dict[int, tuple[np.ndarray, str]]]:
    order, pairs = [], {}
    for pair in stream:
        order.append(pair.id)
        pairs[pair.id] = (pair.image, pair.caption)
    return order, pairs


def _assert_matches(table: PairTable, pairs: dict) -> None:
    assert sorted(pairs) == sorted(table.ids.tolist())
    for row, i in enumerate(table.ids.tolist()):
        image, caption = pairs[i]
        np.testing.assert_array_equal(image, table.images[row])
        assert caption == table.captions[row]


def test_shards_stream_back_as_the_table_written(shards, scenes):
    order, pairs = _collect(PairStream(shards, shuffle=False))
    assert order == scenes.ids.tolist()  # unshuffled: the table's order
    _assert_matches(scenes, pairs)
    stream = PairStream(shards)
    assert stream.mode == "L" and stream.n_pairs == 40 and len(stream.units) == 8
    _assert_matches(scenes, _collect(stream)[1])


def test_two_ranks_with_two_workers_read_every_pair_once(shards, scenes):
    seen = []
    for rank in range(2):
        stream = PairStream(shards, seed=3, epoch=1, rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        seen += [int(pair.id) for pair in loader]
    assert sorted(seen) == sorted(scenes.ids.tolist())
    # the share of each (rank, worker) is fixed by the seed and epoch alone
    stream = PairStream(shards, seed=3, epoch=1, rank=1, world_size=2)
    shares = [set(stream.units_for(w, 2)) for w in range(2)]
    assert not shares[0] & shares[1]


def test_seed_and_epoch_fix_the_order(shards):
    def order(seed, epoch):
        stream = PairStream(shards, seed=seed)
        stream.set_epoch(epoch)
        return _collect(stream)[0]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 0)) == sorted(order(0, 1))


def test_set_epoch_reaches_persistent_workers(shards):
    stream = PairStream(shards, seed=5)
    loader = DataLoader(stream, batch_size=None, num_workers=1, persistent_workers=True)
    first = [int(p.id) for p in loader]
    stream.set_epoch(1)
    second = [int(p.id) for p in loader]
    assert first == _collect(PairStream(shards, seed=5))[0]
    assert second == _collect(PairStream(shards, seed=5, epoch=1))[0] != first


def test_batches_collate(shards):
    loader = DataLoader(PairStream(shards, image_size=28), batch_size=16)
    batch = next(iter(loader))
    assert tuple(batch.image.shape) == (16, 28, 28) and len(batch.caption) == 16
    assert batch.id.dtype.is_floating_point is False


def test_parquet_row_groups_stream_as_read_pairs(tmp_path, scenes):
    write_pairs(scenes, tmp_path / "a.parquet")
    bare = pq.read_table(tmp_path / "a.parquet").replace_schema_metadata(None)
    pq.write_table(bare, tmp_path / "b.parquet", row_group_size=6)
    stream = PairStream(tmp_path / "b.parquet", shuffle=False)
    assert len(stream.units) == 7 and stream.mode == "RGB"  # b.parquet lost the recorded mode
    stream = PairStream(tmp_path / "b.parquet", mode="L", rank=1, world_size=2)
    half = _collect(stream)[1]
    other = _collect(PairStream(tmp_path / "b.parquet", mode="L", rank=0, world_size=2))[1]
    assert not set(half) & set(other)
    _assert_matches(read_pairs(tmp_path / "b.parquet"), {**half, **other})
    assert PairStream(tmp_path / "a.parquet").mode == "L"  # recorded by write_pairs


def test_parquet_without_ids_numbers_rows_across_files(tmp_path, scenes):
    folder = tmp_path / "p"
    folder.mkdir()
    table = pq.read_table(_written(scenes, tmp_path)).drop_columns(["id"])
    pq.write_table(table.slice(0, 15), folder / "0.parquet", row_group_size=4)
    pq.write_table(table.slice(15), folder / "1.parquet", row_group_size=4)
    _, pairs = _collect(PairStream(folder, mode="L"))
    _assert_matches(read_pairs(folder), pairs)
    assert sorted(pairs) == list(range(40))


def _written(table: PairTable, tmp_path) -> str:
    path = tmp_path / "whole.parquet"
    write_pairs(table, path)
    return str(path)


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_corrupt_member_stops_the_stream_naming_its_id_and_shard(tmp_path, shards):
    with tarfile.open(shards / "00000.tar") as tar:
        png = tar.extractfile(tar.getnames()[0]).read()
    _tar(
        tmp_path / "00000.tar",
        [
            ("000000007.png", png),
            ("000000007.txt", b"fine"),
            ("000000008.png", png[: len(png) // 2]),
            ("000000008.txt", b"cut short"),
        ],
    )
    with pytest.raises(DataError, match=r"00000.tar: id 8: cannot decode the image"):
        _collect(PairStream(tmp_path, shuffle=False))
    _tar(tmp_path / "00000.tar", [("000000009.png", png)])
    with pytest.raises(DataError, match=r"00000.tar: id 9: no caption"):
        _collect(PairStream(tmp_path))
    _tar(tmp_path / "00000.tar", [("000000010.txt", b"no image")])
    with pytest.raises(DataError, match=r"id 10: no image"):
        _collect(PairStream(tmp_path))


def test_csv_is_not_streamed(tmp_path):
    (tmp_path / "a.csv").write_text("filepath\ttitle\n")
    with pytest.raises(ValueError, match="write_shards"):
        PairStream(tmp_path / "a.csv")
