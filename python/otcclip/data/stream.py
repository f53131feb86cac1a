"""Pairs streamed from shards or parquet row groups, for data too large to hold in memory.

A `PairStream` is a torch IterableDataset. Its units are whole tar shards
(img2dataset's layout) or single parquet row groups; each epoch shuffles the units
by seed and epoch, and every torch.distributed rank and DataLoader worker takes its
own share of them, so each pair comes once per epoch and the order is reproducible.
Only the unit being read is held (its encoded bytes, when shuffling within it), so
memory does not grow with the data set.

Ids, captions and pixels are those `read_pairs` gives for the same data (the same
id rules, the same decoder). A sample that cannot be used stops the stream with a
DataError naming its id and file: a stream cannot report at the end of an epoch
what it skipped, and dropping pairs silently would change what is trained on.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from otcclip.data.errors import DataError
from otcclip.data.images import check_options, read_image
from otcclip.data.readers import IMAGE_MODE_KEY
from otcclip.data.shards import read_shard_index
from otcclip.data.sources import (
    RawPair,
    decode_caption,
    guess_format,
    parquet_columns,
    parquet_files,
    parquet_raws,
    shard_raws,
    shard_urls,
)


class StreamedPair(NamedTuple):
    """One pair as the stream yields it; DataLoader's default collate batches each field."""

    id: int
    image: np.ndarray
    caption: str


@dataclass(frozen=True)
class StreamUnit:
    """What one worker reads whole: a tar shard, or one row group of a parquet file.

    `first_id` is the id of a parquet row group's first row when the file has no id
    column (ids are then positions in the whole data set, as read_pairs numbers them).
    """

    file: str
    row_group: int | None = None
    first_id: int = 0
    n: int | None = None

    @property
    def name(self) -> str:
        return self.file if self.row_group is None else f"{self.file} (row group {self.row_group})"


class PairStream(IterableDataset):
    """(id, image, caption) from shards or parquet, split across ranks and DataLoader workers.

    source: a .tar, a folder of .tar shards, a brace pattern ('{00000..00099}.tar'), a
    parquet file or a folder of them. image_size: fit every image to S x S (shorter
    side, centre crop), else keep its size. mode: 'L' or 'RGB'; 'auto' takes the mode
    the writer recorded (write_shards, write_pairs), else RGB as open_clip does, since
    a stream cannot look at every image first. rank / world_size default to
    torch.distributed's when it is initialised (read here, in the main process).
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        image_size: int | None = None,
        mode: str = "auto",
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        fmt: str | None = None,
        caption_col: str | None = None,
        image_col: str | None = None,
        path_col: str | None = None,
        id_col: str | None = None,
        image_root: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        check_options(image_size, mode)
        self.source = str(source)
        self.kind = fmt or guess_format(source)
        if self.kind not in ("webdataset", "parquet"):
            raise ValueError(
                f"streaming reads webdataset shards or parquet, not {self.kind!r}; "
                "read CSV data with read_pairs, or write it as shards first (write_shards)"
            )
        self.image_size = image_size
        self.shuffle = shuffle
        self.seed = int(seed)
        # Shared with DataLoader workers (as open_clip's SharedEpoch), so that set_epoch
        # reaches persistent workers too, not only the main process's copy.
        self._epoch = multiprocessing.Value("q", int(epoch))
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self._columns = (caption_col, image_col, path_col, id_col)
        path = Path(self.source)
        self._root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
        if self.kind == "webdataset":
            self.units, recorded = _shard_units(self.source)
        else:
            self.units, recorded = _parquet_units(path)
        self.mode = mode if mode != "auto" else (recorded or "RGB")

    @property
    def n_pairs(self) -> int | None:
        """Pairs in the whole data set, when the units' sizes are recorded (else None)."""
        sizes = [u.n for u in self.units]
        return None if any(n is None for n in sizes) else sum(sizes)  # type: ignore[misc]

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (as with DistributedSampler): it reshuffles the order."""
        self._epoch.value = int(epoch)

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """Positions in `units` in an epoch's order (the same on every rank and worker)."""
        order = np.arange(len(self.units))
        if self.shuffle:
            seed = [self.seed, self.epoch if epoch is None else epoch]
            order = np.random.default_rng(seed).permutation(order)
        return order.tolist()

    def units_for(
        self, worker: int = 0, n_workers: int = 1, epoch: int | None = None, rank: int | None = None
    ) -> list[int]:
        """The units (positions) a rank's `worker` reads in an epoch: every total-th one.

        `rank` defaults to this stream's own; another's tells how much that rank reads.
        """
        total = self.world_size * n_workers
        slot = (self.rank if rank is None else rank) * n_workers + worker
        return self.epoch_order(epoch)[slot::total]

    def __iter__(self) -> Iterator[StreamedPair]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch  # once: a set_epoch during the pass changes the next one
        for raw, unit in self.raws(worker, n_workers, epoch):
            yield self.decode(raw, unit)

    def raws(
        self, worker: int = 0, n_workers: int = 1, epoch: int | None = None, skip: int = 0
    ) -> Iterator[tuple[RawPair, StreamUnit]]:
        """A worker's samples undecoded, in the order `__iter__` yields them, after `skip`.

        Skipped samples are never decoded, and a unit whose recorded size lies wholly
        within the skip is not even opened (a resumed epoch passes its consumed part).
        """
        epoch = self.epoch if epoch is None else epoch
        for position in self.units_for(worker, n_workers, epoch):
            unit = self.units[position]
            if unit.n is not None and skip >= unit.n:
                skip -= unit.n
                continue
            raws: Sequence[RawPair] | Iterator[RawPair] = self._raws(unit)
            if self.shuffle:  # within the unit too; only its encoded bytes are held
                raws = list(raws)
                rng = np.random.default_rng([self.seed, epoch, position])
                raws = [raws[i] for i in rng.permutation(len(raws))]
            for raw in raws:
                if skip:
                    skip -= 1
                    continue
                yield raw, unit

    def _raws(self, unit: StreamUnit) -> Iterator[RawPair]:
        if unit.row_group is None:
            return shard_raws(unit.file)
        return iter(_row_group_raws(unit, self._columns, self._root))

    def decode(self, raw: RawPair, unit: StreamUnit) -> StreamedPair:
        """One sample decoded as the stream yields it; a DataError names its id and unit."""
        where = f"{unit.name}: id {raw.id}"
        caption = decode_caption(raw.caption)
        if caption is None:
            raise DataError(f"{where}: the caption is not UTF-8; fix or drop this sample")
        if not caption:
            raise DataError(f"{where}: no caption (empty, or no .txt member); add one or drop it")
        image = read_image(raw.image, self.image_size, self.mode, name=where)
        return StreamedPair(int(raw.id), image, caption)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    from otcclip import distributed as dist

    rank = dist.rank() if rank is None else int(rank)
    world = dist.world_size() if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}: need 0 <= rank < world_size")
    return rank, world


def _shard_units(source: str) -> tuple[list[StreamUnit], str | None]:
    """One unit per shard; sizes and the image mode from shards.json when write_shards wrote it."""
    urls = shard_urls(source)
    folders = {str(Path(u).parent) for u in urls}
    index = read_shard_index(folders.pop()) if len(folders) == 1 else None
    sizes = {}
    if index is not None:
        folder = Path(urls[0]).parent
        sizes = {str(folder / s["file"]): int(s["n"]) for s in index.get("shards", [])}
    units = [StreamUnit(u, n=sizes.get(u)) for u in urls]
    return units, None if index is None else index.get("image_mode")


def _parquet_units(path: Path) -> tuple[list[StreamUnit], str | None]:
    """One unit per row group, from the files' footers only; ids run on across files."""
    units: list[StreamUnit] = []
    mode = None
    offset = 0
    for number, file in enumerate(parquet_files(path)):
        meta = _parquet_file(file).metadata
        if number == 0 and meta.metadata:
            recorded = meta.metadata.get(IMAGE_MODE_KEY.encode())
            mode = recorded.decode() if recorded else None
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(StreamUnit(str(file), group, offset, rows))
            offset += rows
    return units, mode


def _parquet_file(file: Path | str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        raise DataError(f"{file}: not a readable parquet file ({err})") from None


def _row_group_raws(unit: StreamUnit, wanted: tuple[str | None, ...], root: Path) -> list[RawPair]:
    file = Path(unit.file)
    handle = _parquet_file(file)
    columns = parquet_columns(handle.schema_arrow.names, file, *wanted)
    try:
        table = handle.read_row_group(unit.row_group, columns=columns.names)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        raise DataError(f"{unit.name}: not readable ({err})") from None
    return parquet_raws(table, columns, unit.first_id, file, root)
