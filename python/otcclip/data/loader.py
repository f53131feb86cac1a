"""Training batches streamed by DataLoader workers, in an order that a resumed run replays.

`otcclip train --stream` reads its pairs through a `StreamFeed`: torch DataLoader
workers read a `PairStream`'s units, decode the images, turn them into the model's
input tensors (`image_transform`, as the in-memory trainer does) and hand over whole
local batches, so that memory holds about batch x prefetch x workers pairs, not the
data set.

The order rule. An epoch's order is a pure function of (seed, epoch, rank, world
size, workers):
- the units are shuffled by (seed, epoch) and dealt out to the world_size x workers
  reading slots (`PairStream.units_for`); the pairs of a unit are shuffled by
  (seed, epoch, unit);
- each worker reads its units one after the other and cuts their pairs into local
  batches of batch_size / world_size; the remainder of its last batch is left out;
- the rank's steps take the workers' batches round robin (worker 0's first, worker
  1's first, ..., worker 0's second, ...), a worker leaving the rotation when it has
  no batch left. This is the order DataLoader returns its workers' items in;
- a global step is the ranks' local batches of that step, in rank order, and an epoch
  has as many steps as the rank with the fewest batches (the others leave the rest).
So the same data read with another worker count or world size is another order, and
a run resumes with the layout it started with (`StreamLayout.check_resume`).

Resuming at step s of an epoch: each worker skips the batches it gave to the first s
steps, at the encoded level (a unit wholly consumed is not opened, no skipped image is
decoded), and the rotation starts at the worker that gives step s; the remaining steps
are then those of the uninterrupted epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from otcclip.data.errors import DataError
from otcclip.data.shards import read_shard_index
from otcclip.data.stream import PairStream, StreamedPair


class StreamBatch(NamedTuple):
    """One rank's share of a step: ids (b,), model-ready pixels (b, 3, S, S), captions."""

    ids: Tensor
    pixels: Tensor
    captions: list[str]


@dataclass(frozen=True)
class StreamLayout:
    """What fixes a streamed epoch's order besides seed and epoch: recorded in checkpoints."""

    workers: int
    world_size: int
    units: tuple[str, ...]

    def state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "world_size": self.world_size, "units": list(self.units)}

    def check_resume(self, saved: dict[str, Any] | None) -> None:
        """Refuse to resume a run whose batches this layout would not replay; say what to pass."""
        if saved is None:
            raise DataError(
                "the checkpoint records no stream layout (the run was not streamed); "
                "resume it without --stream"
            )
        if int(saved["workers"]) != self.workers:
            raise DataError(
                f"the run streamed with {saved['workers']} reader(s) per process, this resumption "
                f"with {self.workers}: the order of its batches depends on it; resume with "
                f"--workers {saved['workers']}"
            )
        if int(saved["world_size"]) != self.world_size:
            raise DataError(
                f"the run streamed on {saved['world_size']} process(es), this resumption runs "
                f"on {self.world_size}: the order of its batches depends on it; resume with "
                f"torchrun --nproc_per_node {saved['world_size']} (or one process for 1)"
            )
        if list(saved["units"]) != list(self.units):
            raise DataError(
                f"the data changed since the checkpoint: it streamed {len(saved['units'])} "
                f"units, the data now has {len(self.units)} (or other files); resume on the "
                "same shards or parquet files"
            )


def interleave(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(worker, batch) of each step: round robin over the workers' batch counts."""
    longest = max(counts, default=0)
    return [(w, j) for j in range(longest) for w, n in enumerate(counts) if j < n]


def resume_point(counts: Sequence[int], start: int) -> tuple[list[int], int]:
    """Batches each worker gave to the first `start` steps, and the worker of step `start`."""
    steps = interleave(counts)
    skips = [0] * len(counts)
    for worker, _ in steps[:start]:
        skips[worker] += 1
    rotate = steps[start][0] if start < len(steps) else 0
    return skips, rotate


class StreamFeed:
    """One process's streamed batches for the trainer (see the module docstring's rule).

    pairs: the PairStream (its rank and world size are this process's); every unit's
    size must be known (shards.json, parquet footers) so that all ranks agree on the
    steps of an epoch before reading. workers: DataLoader workers (0: read in this
    process, ordered as one worker); prefetch: batches each worker prepares ahead.
    """

    def __init__(
        self,
        pairs: PairStream,
        *,
        batch_size: int,
        image_size: int,
        workers: int = 2,
        prefetch: int = 2,
    ) -> None:
        unknown = [u.name for u in pairs.units if u.n is None]
        if unknown:
            raise DataError(
                f"streaming needs each shard's size, and {unknown[0]} has none recorded (no "
                "shards.json beside it): write the shards with `otcclip poison --format shards` "
                "or otcclip.data.write_shards, or train without --stream"
            )
        if batch_size % pairs.world_size:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by the {pairs.world_size} processes"
            )
        self.pairs = pairs
        self.local_batch = batch_size // pairs.world_size
        self.image_size = image_size
        self.workers = workers
        self.prefetch = prefetch
        self.readers = max(1, workers)  # workers=0 reads in this process, as one worker
        self.layout = StreamLayout(
            self.readers, pairs.world_size, tuple(u.name for u in pairs.units)
        )
        self.image_side = pairs.image_size or _recorded_side(pairs)

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.n_pairs or 0)

    def batch_counts(self, epoch: int, rank: int | None = None) -> list[int]:
        """Whole local batches each worker of a rank (this one by default) reads in an epoch."""
        counts = []
        for worker in range(self.readers):
            units = self.pairs.units_for(worker, self.readers, epoch, rank=rank)
            pairs = sum(int(self.pairs.units[u].n or 0) for u in units)
            counts.append(pairs // self.local_batch)
        return counts

    def steps(self, epoch: int) -> int:
        """The epoch's steps: those of the rank with the fewest batches (the same on all)."""
        world = self.pairs.world_size
        return min(sum(self.batch_counts(epoch, rank)) for rank in range(world))

    def batches(self, epoch: int, start: int = 0) -> Iterator[StreamBatch]:
        """This rank's batches of an epoch from step `start`, read by the DataLoader's workers."""
        skips, rotate = resume_point(self.batch_counts(epoch), start)
        source = _WorkerBatches(self, epoch, skips, rotate)
        loader = DataLoader(
            source,
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            # its own generator: creating the workers leaves the global RNG alone
            generator=torch.Generator().manual_seed(0),
        )
        for item in loader:
            if isinstance(item, DataError):
                raise DataError(str(item)) from None
            yield item

    def local_ids(self, epoch: int) -> np.ndarray:
        """(steps, local batch) ids of this rank's epoch by the order rule, without decoding.

        Reads the units' encoded samples in this process: what `batches` yields, predicted
        (tests feed the in-memory trainer this order to compare it with streaming).
        """
        per_worker = []
        for worker in range(self.readers):
            ids = [raw.id for raw, _ in self.pairs.raws(worker, self.readers, epoch)]
            whole = len(ids) // self.local_batch * self.local_batch
            per_worker.append(np.asarray(ids[:whole], dtype=np.int64).reshape(-1, self.local_batch))
        order = interleave([len(b) for b in per_worker])[: self.steps(epoch)]
        return np.stack([per_worker[w][j] for w, j in order])


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker runs: its units' pairs, decoded, in whole local batches.

    A DataError (a sample that cannot be used) is handed over as the worker's next item,
    so that the trainer raises it with its own message (id and unit), not a traceback.
    """

    def __init__(self, feed: StreamFeed, epoch: int, skips: list[int], rotate: int) -> None:
        super().__init__()
        self.feed = feed
        self.epoch = epoch
        self.skips = skips
        self.rotate = rotate

    def __iter__(self) -> Iterator[StreamBatch | DataError]:
        info = get_worker_info()
        feed = self.feed
        worker = (self.rotate + (0 if info is None else info.id)) % feed.readers
        skip = self.skips[worker] * feed.local_batch
        held: list[StreamedPair] = []
        try:
            for raw, unit in feed.pairs.raws(worker, feed.readers, self.epoch, skip=skip):
                held.append(feed.pairs.decode(raw, unit))
                if len(held) == feed.local_batch:
                    yield _collate(held, feed.image_size)
                    held = []
        except DataError as err:
            yield err


def _recorded_side(pairs: PairStream) -> int | None:
    """The images' side that write_shards recorded (None for other data: not read ahead)."""
    if pairs.kind != "webdataset":
        return None
    index = read_shard_index(Path(pairs.units[0].file).parent)
    return None if index is None else int(index["image_shape"][0])


def _collate(pairs: list[StreamedPair], image_size: int) -> StreamBatch:
    """The model's input tensors, image by image: the in-memory trainer's batch transform
    treats each image on its own, so the tensors are the same, and sizes may differ here."""
    from otcclip.models import image_transform

    pixels = torch.cat([image_transform(p.image[None], image_size) for p in pairs])
    ids = torch.tensor([p.id for p in pairs], dtype=torch.int64)
    return StreamBatch(ids, pixels, [p.caption for p in pairs])
