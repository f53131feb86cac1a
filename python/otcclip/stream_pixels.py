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

The pass runs in a process of its own (spawned, so it shares no pages with the trainer):
the detectors' working memory (the phase fit's sample of spectra alone is about 1.7 GiB)
goes back to the system when it exits, before the training's DataLoader workers fork
from the trainer. Only the evidence comes back, through a file in the pass's folder.

Under torchrun the processes of one node share one pass (`shared_pixel_evidence`): local
rank 0 runs it and leaves its evidence and slots in a folder of the run, and the node's
other processes load them from there. They wait on the file, not on a collective, so a
pass longer than torch.distributed's timeout does not break the run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from otcclip.data.errors import DataError
from otcclip.pixels import gray_u8

if TYPE_CHECKING:
    from otcclip.data.stream import PairStream
    from otcclip.doubt import DoubtConfig, PixelEvidence
    from otcclip.stream_rounds import IdSlots

__all__ = ["GreyFile", "PixelPass", "read_grey", "shared_pixel_evidence", "stream_pixel_evidence"]

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
    """The same data read whole by this process, in file order: every process reads it all.

    The copy's shared epoch is its own, from the spawn context, so that the copy can be
    handed to the pass's process (a lock made for forking cannot be).
    """
    out = copy.copy(pairs)
    out.rank, out.world_size, out.shuffle = 0, 1, False
    out._epoch = multiprocessing.get_context("spawn").Value("q", 0)
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


@dataclass
class PixelPass:
    """What a pixel pass gives back: the evidence by slot, and what the pass cost.

    peak_rss_mib: the peak resident memory of the pass's own process and of its
    DataLoader workers (None when the pass ran in the caller's process). loaded: this
    process loaded another's pass (`shared_pixel_evidence`); the cost is that pass's.
    """

    evidence: PixelEvidence
    images: int
    size: tuple[int, int]  # height, width
    read_seconds: float
    evidence_seconds: float
    peak_rss_mib: float | None = None
    worker_rss_mib: float | None = None
    loaded: bool = False

    def line(self) -> str:
        """The log line a trainer prints after the pass."""
        if self.loaded:
            return (
                f"pixel pass: the evidence of {self.images} images loaded from this node's "
                "pass (local rank 0)"
            )
        memory = ""
        if self.peak_rss_mib is not None:
            memory = f", in a process of its own (peak RSS {self.peak_rss_mib:.0f} MiB)"
        return (
            f"pixel pass: {self.images} images of {self.size[1]}x{self.size[0]} px read in "
            f"{self.read_seconds:.1f}s, evidence in {self.evidence_seconds:.1f}s{memory}"
        )

    def report(self) -> dict[str, float]:
        """Its cost, for an epoch plan's report (the keys start with `pixel_pass_`)."""
        out = {
            "pixel_pass_read_seconds": self.read_seconds,
            "pixel_pass_evidence_seconds": self.evidence_seconds,
        }
        if self.peak_rss_mib is not None:
            out["pixel_pass_peak_rss_mib"] = self.peak_rss_mib
        if self.worker_rss_mib is not None:
            out["pixel_pass_worker_rss_mib"] = self.worker_rss_mib
        out["pixel_pass_loaded"] = float(self.loaded)
        return out


def stream_pixel_evidence(
    pairs: PairStream,
    slots: IdSlots,
    config: DoubtConfig,
    *,
    workdir: str | os.PathLike[str],
    workers: int = 2,
    log: Callable[[str], None] = print,
    progress: bool = False,
    own_process: bool = True,
) -> PixelPass:
    """`doubt.pixel_evidence` of every image of a stream, by slot (see the module).

    Ids new to `slots` get theirs in the order the pass reads (one order on every
    process). The grey file lives in `workdir` until the evidence is computed.
    own_process: run the pass in a spawned process of its own (the default; see the
    module), else in this one.
    """
    if own_process:
        done = _in_own_process(pairs, slots, config, Path(workdir), workers, progress)
    else:
        done = _pass(pairs, slots, config, Path(workdir), workers, progress)
    log(done.line())
    return done


def _pass(
    pairs: PairStream,
    slots: IdSlots,
    config: DoubtConfig,
    workdir: Path,
    workers: int,
    progress: bool,
) -> PixelPass:
    """The pass itself, in this process: read the grey images to a file, then the detectors."""
    from otcclip.doubt import pixel_evidence

    start = time.perf_counter()
    path = workdir / "pixel-pass.grey"
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
    return PixelPass(
        evidence,
        images=len(grey),
        size=(grey.shape[1], grey.shape[2]),
        read_seconds=read_seconds,
        evidence_seconds=time.perf_counter() - start - read_seconds,
    )


_EVIDENCE_FILE = "pixel-evidence.npz"


def _in_own_process(
    pairs: PairStream,
    slots: IdSlots,
    config: DoubtConfig,
    workdir: Path,
    workers: int,
    progress: bool,
) -> PixelPass:
    """`_pass` in a spawned process; the evidence and the new slots come back by a file."""
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    whole = _whole(pairs)  # held until the child is done: its shared epoch must outlive the start
    process = spawn.Process(
        target=_pass_process,
        args=(
            whole,
            slots.state_dict(),
            config,
            str(workdir),
            workers,
            progress,
            torch.get_num_threads(),
            os.getpid(),
            send,
        ),
        name="otcclip-pixel-pass",
    )
    process.start()
    send.close()  # the child's end only: its exit ends the pipe
    try:
        try:
            message = receive.recv()
        except EOFError:
            message = None
        process.join()
    finally:
        if process.is_alive():  # interrupted while waiting
            process.kill()
            process.join()
        receive.close()
        del whole
    if message is None or message[0] != "done":
        raise _failure(message, process.exitcode)
    done, ids = _load_pass(workdir / _EVIDENCE_FILE)
    (workdir / _EVIDENCE_FILE).unlink()
    _adopt(slots, ids)
    return done


def _save_pass(path: Path, done: PixelPass, slot_ids: np.ndarray) -> None:
    """A pass's evidence, slots and cost in one .npz (no pickle), written atomically."""
    arrays = {f"evidence.{k}": v for k, v in done.evidence.state_dict().items()}
    info = {f.name: getattr(done, f.name) for f in dataclasses.fields(done) if f.name != "evidence"}
    meta = np.frombuffer(json.dumps(info).encode(), np.uint8)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, slot_ids=slot_ids, info=meta, **arrays)
    os.replace(partial, path)


def _load_pass(path: Path) -> tuple[PixelPass, np.ndarray]:
    """What `_save_pass` wrote: the pass, and the ids in slot order."""
    from otcclip.doubt import PixelEvidence

    with np.load(path, allow_pickle=False) as saved:
        state = {k[len("evidence.") :]: saved[k] for k in saved.files if k.startswith("evidence.")}
        ids = saved["slot_ids"]
        info = json.loads(saved["info"].tobytes().decode())
    info["size"] = tuple(info["size"])
    return PixelPass(PixelEvidence.from_state(state), **info), ids


def _adopt(slots: IdSlots, ids: np.ndarray) -> None:
    """Give `slots` the slots another process assigned (ids in slot order)."""
    if not np.array_equal(ids[: len(slots)], slots.ids[: len(slots)]):
        raise RuntimeError("the pixel pass's slots disagree with this process's")
    slots.assign(ids[len(slots) :])


_SHARED_FILE = "pixel-pass.npz"
_FAILED_FILE = "failed.txt"


def shared_pixel_evidence(
    pairs: PairStream,
    slots: IdSlots,
    config: DoubtConfig,
    *,
    folder: str | os.PathLike[str],
    leader: bool,
    followers: int,
    workers: int = 2,
    log: Callable[[str], None] = print,
    progress: bool = False,
    poll_seconds: float = 0.5,
) -> PixelPass:
    """One pass for the processes that share `folder` (a node's; see the module).

    The leader runs `stream_pixel_evidence` and leaves the evidence and slots in `folder`;
    the `followers` others wait for them and load them (the last one removes the folder).
    A failed pass leaves its message there, and the followers raise it too.
    """
    folder = Path(folder)
    if leader:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            done = stream_pixel_evidence(
                pairs, slots, config, workdir=folder / "work", workers=workers, log=log,
                progress=progress,
            )  # fmt: skip
        except BaseException as err:
            (folder / _FAILED_FILE).write_text(f"{type(err).__name__}: {err}")
            raise
        if followers:
            _save_pass(folder / _SHARED_FILE, done, slots.ids[: len(slots)])
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return done
    path = folder / _SHARED_FILE
    while not path.exists():
        failed = folder / _FAILED_FILE
        if failed.exists():
            raise RuntimeError(
                f"the pixel pass of this node's local rank 0 failed: {failed.read_text()}"
            )
        time.sleep(poll_seconds)
    done, ids = _load_pass(path)
    _adopt(slots, ids)
    (folder / f"loaded-{os.getpid()}").touch()
    if len(list(folder.glob("loaded-*"))) >= followers:  # the last to load cleans up
        shutil.rmtree(folder, ignore_errors=True)
    done = dataclasses.replace(done, loaded=True)
    log(done.line())
    return done


# errors the pass raises for its input: raised again as they were, without the traceback
_INPUT_ERRORS: dict[str, type[Exception]] = {
    "DataError": DataError,
    "ValueError": ValueError,
    "FileNotFoundError": FileNotFoundError,
    "OSError": OSError,
    "MemoryError": MemoryError,
}


def _failure(message: Any, exitcode: int | None) -> Exception:
    """The error to raise here for a pass that failed in its process."""
    if message is None:
        how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else "died"
        return RuntimeError(
            f"the pixel pass's process {how} (exit code {exitcode}) before it finished "
            "(if the system ran out of memory, the run needs more for the pixel detectors)"
        )
    _, kind, text, trace = message
    if kind in _INPUT_ERRORS:
        return _INPUT_ERRORS[kind](text)
    return RuntimeError(f"the pixel pass failed in its process: {kind}: {text}\n{trace}")


def _pass_process(
    pairs: PairStream,
    slots_state: dict[str, Any],
    config: DoubtConfig,
    workdir: str,
    workers: int,
    progress: bool,
    threads: int,
    parent: int,
    send: Any,
) -> None:
    """The spawned process's body: the pass, its evidence saved, its cost sent back."""
    from otcclip.stream_rounds import IdSlots

    _die_with_parent(parent)
    try:
        import torch

        torch.set_num_threads(threads)
        slots = IdSlots.from_state(slots_state)
        done = _pass(pairs, slots, config, Path(workdir), workers, progress)
        done = dataclasses.replace(
            done,
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            worker_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        )
        _save_pass(Path(workdir) / _EVIDENCE_FILE, done, slots.ids[: len(slots)])
        send.send(("done",))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the trainer
        send.send(("failed", type(err).__name__, str(err), traceback.format_exc()))
        sys.exit(1)
    finally:
        send.close()


def _die_with_parent(parent: int) -> None:
    """Linux: end this process if the trainer dies (a SIGKILLed run leaves no pass behind)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent is already gone
        os._exit(1)
