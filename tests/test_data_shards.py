"""Shards out: img2dataset's layout, atomic tars, an index, and the same pairs read back."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from otcclip.data import (
    PairTable,
    fashion_scenes,
    pairs_in,
    read_pairs,
    read_shard_index,
    write_pairs,
    write_shards,
)


@pytest.fixture(scope="module")
def scenes() -> PairTable:
    return fashion_scenes(25, seed=0)


def _assert_same(a: PairTable, b: PairTable) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.image_classes, b.image_classes)
    np.testing.assert_array_equal(a.caption_classes, b.caption_classes)


def test_shards_read_back_as_the_table_written(tmp_path, scenes):
    index = write_shards(scenes, tmp_path / "s", shard_size=10)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["00000.tar", "00001.tar", "00002.tar", "shards.json"]  # no temporaries
    assert [s["n"] for s in index["shards"]] == [10, 10, 5]
    assert index["n_pairs"] == 25 and index["image_mode"] == "L"
    assert read_shard_index(tmp_path / "s") == index
    _assert_same(scenes, read_pairs(tmp_path / "s"))


def test_members_follow_img2dataset(tmp_path, scenes):
    write_shards(scenes.subset(slice(0, 2)), tmp_path)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getnames()
        meta = json.loads(tar.extractfile(members[2]).read())
    key = f"{int(scenes.ids[0]):09d}"
    assert members[:3] == [f"{key}.png", f"{key}.txt", f"{key}.json"]
    assert meta["id"] == int(scenes.ids[0]) and meta["key"] == key
    assert meta["image_classes"] == scenes.image_classes[0].tolist()


def test_colour_and_large_ids_survive(tmp_path):
    rng = np.random.default_rng(0)
    table = PairTable(
        ids=np.array([2**62 + 5, 0, 10**18 + 1], np.int64),
        images=rng.integers(0, 256, (3, 9, 9, 3), dtype=np.uint8),
        captions=["a", "b", "c"],
    )
    write_shards(table, tmp_path)
    back = read_pairs(tmp_path)
    np.testing.assert_array_equal(back.ids, table.ids)
    np.testing.assert_array_equal(back.images, table.images)
    assert back.image_classes is None


def test_refusals(tmp_path, scenes):
    write_shards(scenes, tmp_path)
    with pytest.raises(ValueError, match="already holds .tar shards"):
        write_shards(scenes, tmp_path)
    negative = PairTable(ids=[-1], images=scenes.images[:1], captions=["x"])
    with pytest.raises(ValueError, match="negative"):
        write_shards(negative, tmp_path / "n")
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(scenes, tmp_path / "z", shard_size=0)


def test_pairs_in_finds_parquet_or_shards(tmp_path, scenes):
    write_pairs(scenes, tmp_path / "p" / "train.parquet")
    assert pairs_in(tmp_path / "p") == tmp_path / "p" / "train.parquet"
    write_shards(scenes, tmp_path / "q" / "train")
    assert pairs_in(tmp_path / "q") == tmp_path / "q" / "train"
    assert pairs_in(tmp_path / "q" / "train") == tmp_path / "q" / "train"
    _assert_same(scenes, read_pairs(tmp_path / "q"))  # a poison directory reads as its pairs
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train.parquet or train/ \(.tar shards\)"):
        pairs_in(tmp_path / "e")
