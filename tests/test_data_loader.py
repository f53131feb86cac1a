"""Streamed training batches: the documented order, what DataLoader's workers really give,
exact resumption, disjoint ranks, and errors that say what to do."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from otcclip.data import DataError, PairTable, fashion_scenes, write_shards
from otcclip.data.loader import StreamFeed, StreamLayout, interleave, resume_point
from otcclip.data.stream import PairStream

IMAGE_SIZE = 28
# three workers on a two-core test machine: torch's advice, not a problem here
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def scenes() -> PairTable:
    return fashion_scenes(44, seed=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, scenes):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(scenes, folder, shard_size=6)  # 8 shards: seven of 6 pairs, one of 2
    return folder


def _feed(source, workers: int = 2, rank: int = 0, world: int = 1, batch: int = 4) -> StreamFeed:
    pairs = PairStream(source, seed=5, rank=rank, world_size=world)
    return StreamFeed(pairs, batch_size=batch, image_size=IMAGE_SIZE, workers=workers)


def _ids(batches) -> list[list[int]]:
    return [b.ids.tolist() for b in batches]


def test_steps_take_the_workers_batches_round_robin():
    assert interleave([2, 3, 1]) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (1, 2)]
    assert interleave([0, 2]) == [(1, 0), (1, 1)]
    # step 4 is worker 1's second batch: workers 0 and 2 gave two batches and one, 1 gave one
    assert resume_point([2, 3, 1], 4) == ([2, 1, 1], 1)
    assert resume_point([2, 3, 1], 0) == ([0, 0, 0], 0)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_the_dataloader_gives_the_order_the_rule_predicts(shards, workers):
    feed = _feed(shards, workers)
    counts = feed.batch_counts(1)
    assert len(set(counts)) > 1 or workers == 0  # uneven workers: the rotation matters
    got = _ids(feed.batches(1))
    assert got[: feed.steps(1)] == feed.local_ids(1).tolist()
    assert len(got) == sum(counts) == feed.steps(1)  # one rank: every whole batch is a step
    assert got != _ids(feed.batches(2))  # another epoch, another order


def test_batches_hold_model_ready_pixels_of_the_pairs_named(shards, scenes):
    from otcclip.models import image_transform

    batch = next(_feed(shards).batches(0))
    rows = [int(np.flatnonzero(scenes.ids == i)[0]) for i in batch.ids.tolist()]
    assert batch.pixels.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = image_transform(scenes.images[rows], IMAGE_SIZE)
    assert np.array_equal(batch.pixels.numpy(), expected.numpy())
    assert batch.captions == [scenes.captions[r] for r in rows]


@pytest.mark.parametrize("start", [1, 4, 7, 9])
def test_a_resumed_epoch_continues_with_the_uninterrupted_batches(shards, start):
    feed = _feed(shards, workers=3)
    whole = _ids(feed.batches(3))
    assert _ids(feed.batches(3, start=start)) == whole[start:]


def test_resuming_does_not_decode_the_consumed_pairs(tmp_path, scenes):
    """A broken image the first steps consumed is never decoded again by a resumed epoch."""
    folder = tmp_path / "shards"
    write_shards(scenes, folder, shard_size=6)
    feed = _feed(folder, workers=0)
    first = feed.local_ids(0)[0].tolist()
    _break_image(folder, first[0])
    with pytest.raises(DataError, match=f"id {first[0]}"):
        next(feed.batches(0))
    assert _ids(feed.batches(0, start=1)) == feed.local_ids(0)[1:].tolist()


def test_two_ranks_read_disjoint_units_covering_the_epoch(shards, scenes):
    """One process and two differ by design (the units are dealt to world x workers
    slots); what two must do is share the epoch: disjoint units, every pair in a whole
    batch once, the same number of steps on both ranks."""
    feeds = [_feed(shards, workers=2, rank=r, world=2, batch=4) for r in range(2)]
    units = [
        {u for w in range(2) for u in f.pairs.units_for(w, 2, epoch=1, rank=r)}
        for r, f in enumerate(feeds)
    ]
    assert not units[0] & units[1] and units[0] | units[1] == set(range(8))
    seen = [np.concatenate(_ids(f.batches(1))) for f in feeds]
    assert feeds[0].steps(1) == feeds[1].steps(1) == min(len(s) // 2 for s in seen)
    both = np.concatenate(seen)
    assert len(np.unique(both)) == len(both)
    assert set(both.tolist()) <= set(scenes.ids.tolist())
    # only the remainders of the workers' last batches (under 2 of 2 pairs each) are left out
    assert len(both) > len(scenes) - 2 * 2 * 2


def test_a_corrupt_member_stops_the_batches_naming_its_id(tmp_path, scenes):
    folder = tmp_path / "shards"
    write_shards(scenes, folder, shard_size=6)
    bad = int(scenes.ids[9])
    _break_image(folder, bad)
    with pytest.raises(DataError, match=rf"id {bad}\b") as caught:
        list(_feed(folder, workers=2).batches(0))
    assert "Traceback" not in str(caught.value)  # the worker's error, not its stack


def test_shards_without_sizes_are_refused_with_the_fix(tmp_path, shards):
    folder = tmp_path / "bare"
    folder.mkdir()
    for tar in sorted(shards.glob("*.tar")):
        (folder / tar.name).write_bytes(tar.read_bytes())
    with pytest.raises(DataError, match="shards.json.*--format shards"):
        _feed(folder)


def test_a_resume_with_another_layout_says_what_to_pass():
    layout = StreamLayout(2, 1, ("a.tar", "b.tar"))
    layout.check_resume(layout.state_dict())
    with pytest.raises(DataError, match="--workers 3"):
        layout.check_resume(StreamLayout(3, 1, ("a.tar", "b.tar")).state_dict())
    with pytest.raises(DataError, match="--nproc_per_node 2"):
        layout.check_resume(StreamLayout(2, 2, ("a.tar", "b.tar")).state_dict())
    with pytest.raises(DataError, match="the data changed"):
        layout.check_resume(StreamLayout(2, 1, ("a.tar",)).state_dict())
    with pytest.raises(DataError, match="without --stream"):
        layout.check_resume(None)


def _break_image(folder, pair_id: int) -> None:
    """Rewrite the shard holding `pair_id` with garbage in place of its PNG."""
    key = f"{pair_id:09d}.png"
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if key not in {m.name for m, _ in members}:
            continue
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for member, data in members:
                if member.name == key:
                    data = b"not a png"
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        return
    raise AssertionError(f"no member {key}")
