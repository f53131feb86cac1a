"""otcclip.stream_pixels: the grey file reads back what was written, and a stream's pixel
evidence by slot is the in-memory evidence of the same images, whether the pass runs in a
process of its own (the default) or in the caller's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from otcclip.data import DataError, PairTable, write_shards
from otcclip.data.stream import PairStream
from otcclip.doubt import DoubtConfig, pixel_evidence
from otcclip.stream_pixels import (
    GreyFile,
    read_grey,
    shared_pixel_evidence,
    stream_pixel_evidence,
)
from otcclip.stream_rounds import IdSlots


def _copies_and_patches(n: int = 200, side: int = 16) -> PairTable:
    """Noise images; 6 copies of one image and 6 with one 4x4 patch in place."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (n, side, side), dtype=np.uint8)
    images[10:16] = images[10]
    images[100:106, 2:6, 2:6] = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)  # ids are not rows
    return PairTable(ids=ids, images=images, captions=[f"caption {i}" for i in range(n)])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, PairTable]:
    table = _copies_and_patches()
    folder = tmp_path_factory.mktemp("data") / "shards"
    write_shards(table, folder, shard_size=48)
    return folder, table


def test_a_grey_file_reads_back_rows_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 5, 7), dtype=np.uint8)
    grey = GreyFile(tmp_path / "g", 10, 5, 7)
    grey.write(0, images[:4])
    grey.write(4, images[4:])
    assert grey.shape == (10, 5, 7) and len(grey) == 10
    assert np.array_equal(grey[2:9], images[2:9])
    assert np.array_equal(grey[::3], images[::3])
    rows = np.array([9, 0, 3, 3, 4, 5, 1])
    assert np.array_equal(grey[rows], images[rows])
    with pytest.raises(IndexError, match="rows outside"):
        grey[np.array([10])]
    with pytest.raises(ValueError, match="do not fit"):
        grey.write(8, images[:3])
    grey.close()


@pytest.mark.parametrize(("workers", "own_process"), [(0, False), (2, False), (2, True)])
def test_the_stream_evidence_by_slot_is_the_in_memory_evidence(
    tmp_path, shards, workers, own_process
):
    folder, table = shards
    config = DoubtConfig(threads=1)
    slots = IdSlots(len(table))
    slots.assign(table.ids[[150, 3]])  # slots given before the pass are kept
    logged: list[str] = []
    done = stream_pixel_evidence(
        PairStream(folder),
        slots,
        config,
        workdir=tmp_path,
        workers=workers,
        log=logged.append,
        own_process=own_process,
    )
    streamed = done.evidence
    assert list(tmp_path.iterdir()) == []  # the grey file and the evidence file are gone
    assert logged == [done.line()] and "pixel pass: 200 images of 16x16 px" in logged[0]
    assert done.images == 200 and done.size == (16, 16)
    assert (done.peak_rss_mib is not None) == own_process
    assert ("pixel_pass_peak_rss_mib" in done.report()) == own_process
    assert list(slots.ids[:2]) == list(table.ids[[150, 3]]) and len(slots) == len(table)
    memory = pixel_evidence(table.images, config)
    row = {int(i): r for r, i in enumerate(table.ids)}
    rows = np.array([row[int(i)] for i in slots.ids[: len(slots)]])
    assert sorted(rows.tolist()) == list(range(len(table)))
    np.testing.assert_allclose(streamed.keys, memory.keys[rows], atol=1e-6)
    assert np.array_equal(streamed.recurrence, memory.recurrence[rows])
    np.testing.assert_allclose(streamed.phase, memory.phase[rows], atol=1e-6)
    # the same neighbours by id, with the same aligned similarity
    by_id = slots.ids[streamed.neighbours[0]]
    assert np.array_equal(by_id, table.ids[memory.neighbours[0][rows]])
    np.testing.assert_allclose(streamed.aligned, memory.aligned[rows], atol=1e-5)


def test_every_process_reads_the_whole_stream(tmp_path, shards):
    """A rank's own share is not enough: the pass reads every unit on every rank."""
    folder, table = shards
    slots = IdSlots(len(table))
    grey = read_grey(PairStream(folder, rank=1, world_size=2), slots, tmp_path / "g", workers=0)
    assert len(grey) == len(table) == len(slots)
    assert sorted(slots.ids.tolist()) == sorted(table.ids.tolist())
    grey.close()


def _two_sizes(tmp_path: Path) -> PairStream:
    """The second shard of 16 px data replaced by one of 20 px images with the same ids."""
    write_shards(_copies_and_patches(20, side=16), tmp_path / "a", shard_size=10)
    write_shards(_copies_and_patches(20, side=20), tmp_path / "b", shard_size=10)
    (tmp_path / "b" / "00001.tar").replace(tmp_path / "a" / "00001.tar")
    return PairStream(tmp_path / "a")


def test_images_of_two_sizes_are_refused_naming_an_id(tmp_path):
    with pytest.raises(DataError, match=r"id 101\d: image of 20x20 px.*pass --image-size"):
        read_grey(_two_sizes(tmp_path), IdSlots(40), tmp_path / "g", workers=0)
    assert not (tmp_path / "g").exists()


def test_the_pass_process_s_input_errors_come_back_as_they_were(tmp_path):
    """An error about the data, raised in the pass's process, is the caller's DataError with
    its message (not a traceback from another process), and leaves nothing behind."""
    slots = IdSlots(40)
    with pytest.raises(DataError, match=r"id 101\d: image of 20x20 px.*pass --image-size"):
        stream_pixel_evidence(
            _two_sizes(tmp_path), slots, DoubtConfig(threads=1), workdir=tmp_path / "w", workers=0
        )
    assert len(slots) == 0  # the caller's slots are untouched
    assert list((tmp_path / "w").iterdir()) == []


def test_a_node_s_processes_share_one_pass(tmp_path, shards):
    """The leader's pass, left in the folder, is what a follower loads: the same evidence
    and the same slots; the last follower removes the folder. A failed pass's message
    reaches the followers."""
    folder, table = shards
    config = DoubtConfig(threads=1)
    shared = tmp_path / "node"
    lead_slots, follow_slots = IdSlots(len(table)), IdSlots(len(table))
    common = {"folder": shared, "followers": 1, "workers": 0, "log": lambda line: None}
    lead = shared_pixel_evidence(PairStream(folder), lead_slots, config, leader=True, **common)
    logged: list[str] = []
    follow = shared_pixel_evidence(
        PairStream(folder), follow_slots, config, leader=False, **{**common, "log": logged.append}
    )
    assert not lead.loaded and follow.loaded and "loaded from this node's pass" in logged[0]
    assert follow.report()["pixel_pass_loaded"] == 1.0
    assert np.array_equal(lead_slots.ids, follow_slots.ids) and len(follow_slots) == len(table)
    for name, value in lead.evidence.state_dict().items():
        assert np.array_equal(value, follow.evidence.state_dict()[name]), name
    assert not shared.exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "failed.txt").write_text("DataError: id 7: cannot decode")
    with pytest.raises(RuntimeError, match="local rank 0 failed: DataError: id 7"):
        shared_pixel_evidence(
            PairStream(folder), IdSlots(len(table)), config, leader=False,
            **{**common, "folder": broken},
        )  # fmt: skip
