"""Typed Python face of the Rust matching engine (`otcclip._otmatch`).

Pruning (exact top-k by inner product) and assignment (one caption per image)
run in Rust, in place on the caller's numpy buffers and without the GIL, so a
matching round over a million images costs seconds, not minutes.

Arrays are never converted silently: float32 / int64, C-contiguous numpy
arrays are read where they lie; anything else is refused with a TypeError or
ValueError that says how to convert it once (``x.astype(np.float32)``,
``np.ascontiguousarray(x)``, ``tensor.numpy()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from otcclip import _otmatch

__all__ = [
    "Assignment",
    "History",
    "assign",
    "kernel_name",
    "max_threads",
    "thread_count",
    "topk",
]


def topk(
    queries: np.ndarray, pool: np.ndarray, k: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` pool rows with the largest inner product with each query row.

    ``queries`` (N, d) and ``pool`` (M, d) are float32, C-contiguous; for
    L2-normalised rows the score is the cosine similarity. Exact, not
    approximate. Returns ``(indices int64 (N, k), scores float32 (N, k))``,
    each row sorted by score descending, ties to the lower pool index.

    ``threads=None`` shares one pool of all cores (``RAYON_NUM_THREADS``
    overrides); an int (1 to :func:`max_threads`, else ValueError) uses a
    dedicated pool of that size, kept for later calls (the two most recent
    counts are kept, so that varying counts do not pile up OS threads).
    Safe in processes forked after a call (torch DataLoader workers).
    """
    return _otmatch.topk(queries, pool, k, threads)


@dataclass(frozen=True)
class Assignment:
    """The caption chosen for every image by :func:`assign`."""

    caption: np.ndarray
    """int64 (N,): pool index per image, -1 when unassigned."""
    changed: np.ndarray
    """bool (N,): caption != own (all False when no ``own`` was given)."""
    score: np.ndarray
    """float32 (N,): score of the assigned caption; NaN when unassigned or unknown."""
    stats: dict[str, int]
    """n, changed, distinct, max_load, unassigned, kept_by_margin."""


def assign(
    candidates: np.ndarray,
    scores: np.ndarray,
    own: np.ndarray | None = None,
    own_scores: np.ndarray | None = None,
    method: str = "argmax",
    capacity: int | None = None,
    margin: float = 0.0,
    fallback: str = "own",
) -> Assignment:
    """Choose one caption per image from its candidates.

    ``candidates`` int64 (N, k) pool indices (>= 0) and ``scores`` float32
    (N, k), rows in any order. ``own`` int64 (N,) is each image's current
    caption (-1: none); ``own_scores`` float32 (N,) the score of that caption,
    needed for the margin when it is not among the candidates (``-inf``: never
    keep it; NaN is refused). Without ``own_scores`` the score is read from the
    candidates when the own caption is there, otherwise the own caption cannot
    be kept by margin.

    - ``method="argmax"``: each image takes its best candidate (ties: lower
      pool index); captions may be shared without limit.
    - ``method="capacity"``: each caption goes to at most ``capacity`` images,
      greedily in global score order (score, then image index); an image
      whose candidates are all full gets ``fallback``: ``"own"`` (its own
      caption, even beyond the capacity, or -1 without one) or ``"unassigned"``.
    - ``margin``: an image keeps its own caption when
      ``own_score >= best - margin``; with capacity such images claim their
      own caption before the greedy pass (best own score first).

    Deterministic: the same input gives the same output.
    """
    caption, changed, score, stats = _otmatch.assign(
        candidates, scores, own, own_scores, method, capacity, float(margin), fallback
    )
    return Assignment(caption=caption, changed=changed, score=score, stats=stats)


class History:
    """Per-sample assignment history across rounds, keyed by stable int64 ids.

    Tells which pairs keep changing (a poison pushed around) and which settle;
    ``to_bytes``/``from_bytes`` carry it through checkpoints. Picklable.
    """

    __slots__ = ("_inner",)

    def __init__(self) -> None:
        self._inner = _otmatch.History()

    def record(self, round: int, ids: np.ndarray, captions: np.ndarray) -> None:
        """Record that in ``round`` sample ``ids[i]`` (int64 (N,)) held ``captions[i]`` (int64).

        All or nothing: an id repeated in one call, or given a round not later
        than its last one, is refused with ValueError and nothing is recorded.
        """
        self._inner.record(int(round), ids, captions)

    def get(self, id: int) -> list[tuple[int, int]]:
        """``[(round, caption), ...]`` of sample ``id``, oldest first; [] if never recorded."""
        return self._inner.get(int(id))

    def changes(self, id: int) -> int:
        """How many times the caption of sample ``id`` differed from its previous round."""
        return self._inner.changes(int(id))

    def ids(self) -> np.ndarray:
        """The recorded sample ids, int64, ascending."""
        return self._inner.ids()

    def to_bytes(self) -> bytes:
        """A deterministic byte string (equal histories give equal bytes)."""
        return self._inner.to_bytes()

    @staticmethod
    def from_bytes(b: bytes) -> History:
        """Read what :meth:`to_bytes` wrote; ValueError on truncated or foreign bytes."""
        h = History.__new__(History)
        h._inner = _otmatch.History.from_bytes(bytes(b))
        return h

    def __len__(self) -> int:
        return len(self._inner)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, History) and self._inner == other._inner

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"History({len(self)} samples)"

    def __getstate__(self) -> bytes:
        return self.to_bytes()

    def __setstate__(self, state: Any) -> None:
        self._inner = _otmatch.History.from_bytes(state)


def kernel_name() -> str:
    """The inner product kernel topk uses on this CPU: ``"avx512"`` or ``"portable"``."""
    return _otmatch.kernel_name()


def max_threads() -> int:
    """The largest ``threads`` :func:`topk` accepts here: 4 per core, at least 8.

    The kernel is compute-bound: more threads than that only slow it down.
    """
    return _otmatch.max_threads()


def thread_count(threads: int | None = None) -> int:
    """How many threads :func:`topk` uses with ``threads``."""
    return _otmatch.thread_count(threads)
