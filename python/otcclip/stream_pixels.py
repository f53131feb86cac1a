"""The pixel evidence of a stream: every image read once, kept on disk as grey levels.

Why this module exists: the pixel signals (copies of one image, a patch recurring in
place, a pattern locked in phase: `otcclip.pixels`, `otcclip.phase_lock`) are what a
poison cannot rewrite, and the only signals that catch a patch backdoor. They compare
every image with the others, which a stream that holds one batch cannot do as it
trains. They need no model, though, so a streamed OTCCLIP run reads every image once
before its first epoch (`stream_pixel_evidence`):

- DataLoader workers decode the images and turn them to grey levels; the main process
  gives each pair id its slot (`stream_rounds.IdSlots`) and writes the grey image at
  that slot of a file on disk (`GreyFile`, N x H x W bytes);
- the detectors then read that file by blocks (`pixels.GreyStack`), so memory holds a
  block of images, their neighbours' keys and the N x d evidence, never the images;
- the file is deleted once the evidence exists. The evidence (`doubt.PixelEvidence`,
  about 600 bytes a pair) is kept in the run's state and its checkpoints, so a resumed
  run does not read the images again.

Every process reads the whole data set for it (its DataLoader workers split the units),
so every process holds the same slots and the same evidence without exchanging images.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from otcclip.data.errors import DataError
from otcclip.pixels import gray_u8

if TYPE_CHECKING:
    from otcclip.data.stream import PairStream
    from otcclip.doubt import DoubtConfig, PixelEvidence
    from otcclip.stream_rounds import IdSlots

__all__ = ["GreyFile", "read_grey", "stream_pixel_evidence"]

_BATCH = 256  # images a worker hands over at once


class GreyFile:
    """Grey images (N, H, W) uint8 in a file, read and written by rows with pread / pwrite.

    Not memory-mapped: pages of a mapping count in the process's resident memory once
    read, and the detectors read every row, so a mapping would grow with N.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | os.PathLike[str], n: int, height: int, width: int) -> None:
        if n < 0 or height < 1 or width < 1:
            raise ValueError(f"a grey file needs n >= 0 and a size, got {n}x{height}x{width}")
        self.path = Path(path)
        self.shape = (int(n), int(height), int(width))
        self._row = height * width
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, n * self._row)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, first: int, grey: np.ndarray) -> None:
        """Rows first, first + 1, ... get `grey` (k, H, W) uint8."""
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        if grey.shape[1:] != self.shape[1:] or first < 0 or first + len(grey) > len(self):
            raise ValueError(
                f"rows {first}..{first + len(grey)} of shape {grey.shape[1:]} do not fit a "
                f"grey file of {self.shape}"
            )
        os.pwrite(self._fd, grey.tobytes(), first * self._row)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._run(start, max(0, stop - start))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError("a grey file is indexed by a slice or a 1-D array of rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        unique, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(unique), *self.shape[1:]), np.uint8)
        # consecutive rows are read in one call
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for part in np.split(np.arange(len(unique)), breaks):
            if len(part):
                out[part[0] : part[-1] + 1] = self._run(int(unique[part[0]]), len(part))
        return out[inverse]

    def _run(self, start: int, count: int) -> np.ndarray:
        size = count * self._row
        data = os.pread(self._fd, size, start * self._row)
        if len(data) != size:
            raise OSError(f"{self.path}: short read of rows {start}..{start + count}")
        return np.frombuffer(data, np.uint8).reshape(count, *self.shape[1:]).copy()


class _GreyBatches(IterableDataset):
    """What each DataLoader worker runs: its units' pairs decoded to grey, in batches of ids."""

    def __init__(self, pairs: PairStream) -> None:
        super().__init__()
        self.pairs = pairs

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray] | DataError]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        ids: list[int] = []
        grey: list[np.ndarray] = []
        try:
            for raw, unit in self.pairs.raws(worker, workers, epoch=0):
                pair = self.pairs.decode(raw, unit)
                image = gray_u8(pair.image[None])[0]
                if grey and image.shape != grey[0].shape:
                    raise _size_error(f"{unit.name}: id {pair.id}", image.shape, grey[0].shape)
                ids.append(pair.id)
                grey.append(image)
                if len(ids) == _BATCH:
                    yield np.asarray(ids, np.int64), np.stack(grey)
                    ids, grey = [], []
            if ids:
                yield np.asarray(ids, np.int64), np.stack(grey)
        except DataError as err:
            yield err


def _size_error(where: str, got: tuple[int, ...], others: tuple[int, ...]) -> DataError:
    return DataError(
        f"{where}: image of {got[1]}x{got[0]} px, others of {others[1]}x{others[0]}: the "
        "pixel signals compare images of one size; pass --image-size to fit them all"
    )


def _whole(pairs: PairStream) -> PairStream:
    """The same data read whole by this process, in file order: every process reads it all."""
    out = copy.copy(pairs)
    out.rank, out.world_size, out.shuffle = 0, 1, False
    return out


def read_grey(
    pairs: PairStream,
    slots: IdSlots,
    path: str | os.PathLike[str],
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> GreyFile:
    """Every image of `pairs` in grey at its id's slot (given in the order read) of a file."""
    stream = _whole(pairs)
    n = int(stream.n_pairs or 0)
    if n < 1:
        raise DataError("the pixel pass needs each unit's size (shards.json, parquet footers)")
    loader = DataLoader(
        _GreyBatches(stream),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    grey_file: GreyFile | None = None
    try:
        for item in loader:
            if isinstance(item, DataError):
                raise DataError(str(item)) from None
            ids, grey = item
            if grey_file is None:
                grey_file = GreyFile(path, n, *grey.shape[1:])
            elif grey.shape[1:] != grey_file.shape[1:]:  # another worker's size
                raise _size_error(f"id {int(ids[0])}", grey.shape[1:], grey_file.shape[1:])
            at = slots.assign(ids)
            for part in np.split(np.arange(len(at)), np.flatnonzero(np.diff(at) != 1) + 1):
                grey_file.write(int(at[part[0]]), grey[part])
            if progress is not None:
                progress(len(ids))
    except BaseException:
        if grey_file is not None:
            grey_file.close()
            grey_file.path.unlink(missing_ok=True)
        raise
    if grey_file is None:
        raise DataError("the stream holds no pairs")
    if len(slots) != n:
        grey_file.shape = (len(slots), *grey_file.shape[1:])  # repeated ids share a slot
    return grey_file


def stream_pixel_evidence(
    pairs: PairStream,
    slots: IdSlots,
    config: DoubtConfig,
    *,
    workdir: str | os.PathLike[str],
    workers: int = 2,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> PixelEvidence:
    """`doubt.pixel_evidence` of every image of a stream, by slot (see the module).

    Ids new to `slots` get theirs in the order the pass reads (one order on every
    process). The grey file lives in `workdir` until the evidence is computed.
    """
    from otcclip.doubt import pixel_evidence

    start = time.perf_counter()
    path = Path(workdir) / "pixel-pass.grey"
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=pairs.n_pairs, desc="pixel pass", unit="img", leave=False)
    try:
        grey = read_grey(
            pairs, slots, path, workers=workers, progress=None if bar is None else bar.update
        )
    finally:
        if bar is not None:
            bar.close()
    read_seconds = time.perf_counter() - start
    try:
        evidence = pixel_evidence(grey, config, spill_dir=workdir)
    finally:
        grey.close()
        path.unlink(missing_ok=True)
    log(
        f"pixel pass: {len(grey)} images of {grey.shape[2]}x{grey.shape[1]} px read in "
        f"{read_seconds:.1f}s, evidence in {time.perf_counter() - start - read_seconds:.1f}s"
    )
    return evidence
