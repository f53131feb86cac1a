"""Per-pair doubt from signals the poison cannot rewrite, fused into one score and a budget.

Why this module exists: a matching round that doubts a pair only by how well its
image and caption agree under the model (a cross-modal score) loses its grip as
training goes on, because that agreement is exactly the link a poison trains.
Once the model has learned a target image or a trigger, the poisoned pair looks
like any other (DESIGN.md, section 8). The signals here look elsewhere:

- **density** (Huang et al., ICLR 2025): how crowded a pair's neighbourhood is in
  image space, caption space, and in plain pixel space (a thumbnail the model
  never touches). A targeted attack's copies of one image crowd together;
  k-distance, SLOF and a DAO-like score weighted by local intrinsic dimension.
- **neighbourhood consistency** (Deep k-NN, Peri et al. 2020), in both directions:
  does image i look like the images of the captions nearest its caption, and does
  caption i read like the captions of the images nearest its image? A backdoor's
  images share a caption class but not a look, so they disagree with their
  neighbours. The neighbours exclude identical captions and near-duplicate images,
  so that a poison's own copies cannot vouch for each other.
- **pixel evidence**: variants of one image (`aligned_similarity`), a patch trigger's
  tile shared in place (`pixel_recurrence`), a trigger at a fixed place in every
  poisoned image, found as frequencies whose far-out images share one phase
  (`otcclip.phase_lock`, a default since session 12), and, opt-in, a heavy-tailed
  direction of the fine detail (`pixel_pattern`). No model is involved. The pixel
  detectors live in `otcclip.pixels` (and are re-exported here); this module turns
  them into signals (`pixel_evidence`, `pixel_signals`).
- **cross-modal**: the round's own lead of a candidate over the own caption (or
  minus the image-caption cosine), kept as one signal among several.

Each signal is put on a common scale without labels (its median maps to 0 and its
own 95th percentile to 1, `tail_scale`), and the fused score is the largest of them, so
that one strong signal speaks for an attack the others miss, where an average would
dilute it. Each pair shares its verdict with its pixel copies (aligned pixel
correlation): the median fused score over itself and them, or its own if higher. The
share of pairs doubted follows the score: the pairs above a fixed cut on that common
scale (3: three times as far out as a signal's usual top 5%), held within [min_share,
max_share]; a two-component Gaussian mixture fitted without labels is the alternative
(`budget="mixture"`). The pixel signals need no model, so a trainer can apply them
before its first round too (`pixel_signals`).

Neighbours come from exact k-NN self-joins with the engine's `otmatch.topk`; the
N x N similarity matrix is never built. Nothing here reads a poison manifest or
any label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from otcclip import otmatch
from otcclip.phase_lock import MIN_IMAGES as PHASE_MIN_IMAGES
from otcclip.phase_lock import TEMPLATES as PHASE_TEMPLATES
from otcclip.phase_lock import phase_locked_patterns

# the model-free pixel detectors live in otcclip.pixels; re-exported here, where they
# were first defined, so that `doubt.pixel_keys` and the like keep working
from otcclip.pixels import (
    GreyStack,
    aligned_similarity,
    pixel_keys,
    pixel_pattern,
    pixel_recurrence,
)
from otcclip.rows import finite_rows

__all__ = [
    "FAMILIES",
    "SIGNALS",
    "DoubtConfig",
    "Doubt",
    "knn",
    "local_outlier_scores",
    "neighbour_dots",
    "PixelEvidence",
    "pixel_evidence",
    "aligned_similarity",
    "pixel_keys",
    "pixel_recurrence",
    "pixel_pattern",
    "pixel_signals",
    "robust_z",
    "tail_scale",
    "SCALE_FLOOR",
    "upper_rank",
    "fuse",
    "group_verdict",
    "mixture_threshold",
    "fixed_threshold",
    "compute_signals",
    "decide",
    "doubt_scores",
    "doubt_signals",
    "pixel_screen",
]

# signal -> family; a family can be switched off as a whole (the table's ablations)
SIGNALS: dict[str, str] = {
    "cross": "cross",
    "density_image": "density",
    "density_caption": "density",
    "density_pixel": "pixel",
    "copies_pixel": "pixel",
    "recurrence_pixel": "pixel",
    "pattern_pixel": "pixel",
    "phase_pixel": "pixel",
    "slof_image": "density",
    "dao_image": "density",
    "consistency_caption": "consistency",
    "consistency_image": "consistency",
}
FAMILIES: tuple[str, ...] = ("cross", "density", "pixel", "consistency")
BUDGETS: tuple[str, ...] = ("cut", "mixture")
PHASE_SCALES: tuple[str, ...] = ("tail", "own")


@dataclass
class DoubtConfig:
    """Knobs of the doubt score.

    k: neighbours per self-join (density's k-th neighbour, consistency's neighbourhood).
    signals: the signals fused (names of SIGNALS); the others are still computed when
        `report_all` is set, for measurement.
    duplicate_sim: pixel-key cosine from which two images count as copies of one
        another, which may not vouch for each other in the consistency signals
        (generous: leaving out a lookalike costs little).
    caption_duplicate_sim: caption-embedding cosine above which two captions count as
        identical (excluded from caption neighbourhoods).
    min_share / max_share: the doubted share stays within these, whatever the mixture says.
    group: each pair shares its verdict with its variants (`group_verdict`).
    tail: the quantile each signal's scale is read at (`tail_scale`). The poisons must
        be fewer than 1 - tail of the pairs, or they set the scale themselves and fall
        under the cut (measured: at 9% poisons the round left almost none out).
    budget: how the doubted share is set: "cut" doubts the pairs whose fused score
        passes `cut` (on the max_tail scale: that many times as far out as the
        signal's own top 5%); "mixture" fits a two-component Gaussian mixture
        (`mixture_threshold`). Either way the share stays in [min_share, max_share].
    fusion: how signals share one scale before the maximum (FUSIONS): "max_tail"
        maps each signal's own 99th percentile to 1 (`tail_scale`), "max_z" is a
        robust z, "max_rank" the empirical rank.
    thumb: low frequencies a side in the pixel key (`pixel_keys`).
    pixel_k: neighbours of the pixel density (copies of one image are few, so fewer
        than k).
    max_shift / copy_ncc: two images are variants of one another when their
        `aligned_similarity` (best over shifts up to max_shift px) reaches copy_ncc;
        they then share a verdict, and a pair's count of such copies is a signal.
    tile / tile_min_std: the block side and least pixel spread of `pixel_recurrence`.
    reach: how many neighbours past k the consistency signals look through, so that
        copies of the pair's own image (which may not vouch) cannot fill the
        neighbourhood.
    phase_template: which of `phase_pixel`'s patterns are scored along their matched
        template rather than the mean of their bins (`phase_locked_patterns`'s
        `template`: "off", "narrow", "all").
    phase_scale: "tail" rescales `phase_pixel` like every signal (`tail_scale`); "own"
        fuses it on its own scale, which already maps each pattern's median to 0 and
        95th percentile to 1 before the maximum over patterns (rescaling that maximum
        again pulled a fifth of SIG's images under the cut; TUNING.md, session 12).
        "narrow" and "own" together find 98% of SIG's poisons at the end of the warm-up
        (81.5% by default) but screen more clean pairs from the warm-up on the table's
        BadNet data, and cost its OTCCLIP row 2.2 points of zero-shot on three seeds of
        three (TUNING.md, session 13): opt-in (`otcclip train --doubt-phase-template
        narrow --doubt-phase-scale own`), not the default.
    threads: rayon threads for the self-joins (None: the engine's default).
    seed: seeds the mixture's initialisation.
    """

    k: int = 16
    signals: tuple[str, ...] = (
        "cross",
        "copies_pixel",
        "recurrence_pixel",
        "consistency_caption",
        "consistency_image",
        "phase_pixel",
    )
    duplicate_sim: float = 0.9
    caption_duplicate_sim: float = 0.999
    min_share: float = 0.005
    max_share: float = 0.25
    group: bool = True
    fusion: str = "max_tail"
    budget: str = "cut"
    cut: float = 3.0
    tail: float = 0.95
    thumb: int = 8
    pixel_k: int = 8
    reach: int = 48
    tile: int = 4
    max_shift: int = 3
    copy_ncc: float = 0.95
    tile_min_std: float = 40.0
    report_all: bool = False
    phase_template: str = "off"
    phase_scale: str = "tail"
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        self.signals = tuple(self.signals)
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown or not self.signals:
            raise ValueError(
                f"signals must be a non-empty subset of {', '.join(SIGNALS)}; got {unknown or '()'}"
            )
        for name in ("duplicate_sim", "copy_ncc", "caption_duplicate_sim"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a cosine in [-1, 1], got {value!r}")
        if not (0.0 <= self.min_share <= self.max_share <= 1.0):
            raise ValueError(
                "need 0 <= min_share <= max_share <= 1, got "
                f"min_share={self.min_share!r}, max_share={self.max_share!r}"
            )
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not (isinstance(self.cut, (int, float)) and math.isfinite(self.cut)):
            raise ValueError(f"cut must be a finite number, got {self.cut!r}")
        if not (isinstance(self.tail, (int, float)) and 0.5 < self.tail < 1.0):
            raise ValueError(f"tail must be a quantile in (0.5, 1), got {self.tail!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if isinstance(self.thumb, bool) or not isinstance(self.thumb, int) or self.thumb < 2:
            raise ValueError(f"thumb must be an int >= 2, got {self.thumb!r}")
        for name, choices in (("phase_template", PHASE_TEMPLATES), ("phase_scale", PHASE_SCALES)):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )

    def without(self, family: str) -> DoubtConfig:
        """The same config with one family of signals left out (an ablation)."""
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        kept = tuple(s for s in self.signals if SIGNALS[s] != family)
        if not kept:
            raise ValueError(f"leaving out {family!r} leaves no signal")
        return DoubtConfig(**{**self.__dict__, "signals": kept})


@dataclass
class Doubt:
    """The verdict on every pair.

    fused: the fused score (larger = more suspicious), after the group verdict;
    doubted: bool, fused above the threshold (at most max_share of the pairs);
    threshold: the cut; signals: every computed signal, raw (larger = more suspicious);
    z: the same on the common scale of the fusion; grouped: the pair has a pixel copy
    and shares its verdict; report: counts and the mixture's fit.
    """

    fused: np.ndarray
    doubted: np.ndarray
    threshold: float
    signals: dict[str, np.ndarray]
    z: dict[str, np.ndarray]
    grouped: np.ndarray
    report: dict[str, float | int | str] = field(default_factory=dict)


# --------------------------------------------------------------------------- neighbours


def knn(
    x: np.ndarray,
    k: int,
    *,
    threads: int | None = None,
    name: str = "embeddings",
    rows: slice | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by inner product: indices (N, k), similarities (N, k).

    An exact self-join with `otmatch.topk`; the row itself is left out even when an
    exact duplicate ties with it. rows: the neighbours of those rows only (a block of
    the join, the same lists as the whole join's).
    """
    x = _check_embeddings(x, name)
    n = len(x)
    start, stop, _ = (rows or slice(None)).indices(n)
    if n < 2:
        raise ValueError(f"{name}: a pool of {n} row(s) has no neighbours; need at least 2")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > n - 1:
        raise ValueError(f"k = {k} neighbours, but {name} has only {n} rows (k <= N - 1)")
    query = x if (start, stop) == (0, n) else x[start:stop]
    idx, sim = otmatch.topk(query, x, int(k) + 1, threads)
    m = stop - start
    own = idx == np.arange(start, stop)[:, None]
    # drop the row itself; where a tie pushed it out of the list, drop the last column
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(own)
    keep[np.arange(m), drop] = False
    return idx[keep].reshape(m, k), sim[keep].reshape(m, k)


def local_outlier_scores(
    embeddings: np.ndarray,
    k: int = 16,
    *,
    threads: int | None = None,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """k-distance, SLOF and DAO for each row (Huang et al., ICLR 2025), larger = sparser.

    kdist: cosine distance to the k-th nearest row. slof: kdist over the mean kdist
    of the row's neighbours (density relative to its neighbourhood). dao: the mean
    over neighbours o of (kdist(row) / kdist(o)) ** LID(o), with LID the
    maximum-likelihood local intrinsic dimension of o; it corrects SLOF for the
    local dimension, which differs between clusters of real data.
    Scores are float64. A poison's many copies sit in a crowded spot: negate these.
    """
    idx, sim = neighbours if neighbours is not None else knn(embeddings, k, threads=threads)
    dist = np.clip(1.0 - sim.astype(np.float64), 1e-9, None)
    kdist = dist[:, -1]
    slof = kdist / np.maximum(kdist[idx].mean(axis=1), 1e-12)
    lid = _lid(dist)
    ratio = np.log(kdist[:, None]) - np.log(kdist[idx])
    dao = np.exp(np.clip(lid[idx] * ratio, -50.0, 50.0)).mean(axis=1)
    return {"kdist": kdist, "slof": slof, "dao": dao}


def _lid(dist: np.ndarray) -> np.ndarray:
    """Maximum-likelihood local intrinsic dimension from sorted neighbour distances."""
    logs = np.log(dist / dist[:, -1:])[:, :-1]
    mean = logs.mean(axis=1) if logs.shape[1] else np.zeros(len(dist))
    return np.clip(-1.0 / np.minimum(mean, -1e-6), 0.0, 100.0)


# --------------------------------------------------------------------------- pixels


@dataclass
class PixelEvidence:
    """What the pixels alone say about every pair; computed once per dataset.

    keys: `pixel_keys` (N, d); neighbours: their k-NN (indices, cosines), for
    the pixel density and the copies that may not vouch for each other; aligned:
    `aligned_similarity` with each of those neighbours (N, k), which says which are
    variants of the same image (the copy count and the shared verdicts);
    recurrence: `pixel_recurrence`. None of it depends on the model, so a trainer
    computes it before the first round and reuses it.
    """

    keys: np.ndarray
    neighbours: tuple[np.ndarray, np.ndarray]
    aligned: np.ndarray
    recurrence: np.ndarray
    # `pixel_pattern`, computed only when the doubt fuses it (None otherwise)
    pattern: np.ndarray | None = None
    # `phase_lock.phase_locked_patterns`' scores, likewise only when fused
    phase: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays, so a trainer's checkpoint restores the evidence instead of
        recomputing it (a fifth of a round at 20k pairs)."""
        state = {
            "keys": self.keys,
            "neighbour_index": self.neighbours[0],
            "neighbour_sim": self.neighbours[1],
            "aligned": self.aligned,
            "recurrence": self.recurrence,
        }
        for name in ("pattern", "phase"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name)
        return state

    def subset(self, rows: np.ndarray) -> PixelEvidence:
        """The evidence of the images `rows` only, as if the others were not there for the
        verdicts: a neighbour outside `rows` can no longer be a copy (its aligned similarity
        becomes -1) or share a verdict. Per-image scores (recurrence, pattern, phase) keep
        what the whole data set says. A streamed round judges only the pairs that have
        streamed (`otcclip.stream_rounds`)."""
        rows = _subset_rows(rows, len(self))
        return _restricted(rows, len(self), {k: v[rows] for k, v in self.state_dict().items()})

    def save(self, folder: str | os.PathLike[str]) -> None:
        """One `.npy` file per array of `state_dict` in `folder` (made if missing), for
        `load`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in self.state_dict().items():
            np.save(folder / f"{name}.npy", np.ascontiguousarray(value))

    @staticmethod
    def load(folder: str | os.PathLike[str], rows: np.ndarray | None = None) -> PixelEvidence:
        """The evidence `save` wrote, memory-mapped read-only: its pages are read as the
        signals touch them, and they are the system's again once the evidence is let go
        (a streamed trainer holds it only while a round reads it).

        rows: `subset(rows)` of it, read into memory a block of rows at a time, each block
        through a mapping of its own. The subset of the mapped whole would hold every page
        the copy read as well as the copy, until the whole is let go.
        """
        folder = Path(folder)
        paths = {path.stem: path for path in sorted(folder.glob("*.npy"))}
        missing = {"keys", "neighbour_index", "neighbour_sim", "aligned", "recurrence"} - set(paths)
        if missing:
            names = ", ".join(f"{name}.npy" for name in sorted(missing))
            raise ValueError(f"pixel evidence in {folder}: {names} missing")
        state = {
            name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()
        }
        if rows is None:
            return PixelEvidence.from_state(state)
        n = len(state["keys"])
        rows = _subset_rows(rows, n)
        del state  # headers only: nothing was read
        picked = {name: _rows_by_block(path, rows) for name, path in paths.items()}
        return _restricted(rows, n, picked)

    @staticmethod
    def from_state(state: Mapping[str, np.ndarray]) -> PixelEvidence:
        keys = np.asarray(state["keys"], dtype=np.float32)
        index = np.asarray(state["neighbour_index"], dtype=np.int64)
        sim = np.asarray(state["neighbour_sim"], dtype=np.float32)
        aligned = np.asarray(state["aligned"], dtype=np.float32)
        recurrence = np.asarray(state["recurrence"], dtype=np.float64)
        n = len(keys)
        if index.shape != sim.shape or aligned.shape != index.shape or len(index) != n:
            raise ValueError("pixel evidence state: keys, neighbours and aligned disagree in shape")
        if recurrence.shape != (n,):
            raise ValueError("pixel evidence state: one recurrence count per image expected")
        optional: dict[str, np.ndarray | None] = {}
        for name in ("pattern", "phase"):
            value = state.get(name)
            if value is not None:
                value = np.asarray(value, dtype=np.float64)
                if value.shape != (n,):
                    raise ValueError(f"pixel evidence state: one {name} score per image expected")
            optional[name] = value
        return PixelEvidence(keys, (index, sim), aligned, recurrence, **optional)


def _subset_rows(rows: np.ndarray, n: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
        raise ValueError(f"rows must be a 1-D array of images in 0..{n - 1}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows must not repeat")
    return rows


def _restricted(rows: np.ndarray, n: int, picked: dict[str, np.ndarray]) -> PixelEvidence:
    """`PixelEvidence.subset`'s evidence from the arrays of `state_dict` at `rows` (of n):
    neighbours renumbered to positions in `rows`, those outside it no copy of anyone."""
    position = np.full(n, -1, np.int64)
    position[rows] = np.arange(len(rows))
    index = position[picked["neighbour_index"]]
    outside = index < 0
    picked["aligned"] = np.where(outside, np.float32(-1.0), picked["aligned"])
    picked["neighbour_index"] = np.where(outside, np.arange(len(rows))[:, None], index)
    return PixelEvidence.from_state(picked)


_READ_BLOCK = 1 << 16  # rows of a saved array mapped at once by `PixelEvidence.load(rows=)`


def _rows_by_block(path: Path, rows: np.ndarray) -> np.ndarray:
    """`np.load(path)[rows]`, with at most a block of rows' pages mapped at a time: each
    block maps the file afresh and lets the mapping go once its rows are copied."""
    head = np.load(path, mmap_mode="r", allow_pickle=False)
    out = np.empty((len(rows), *head.shape[1:]), head.dtype)
    del head
    for start in range(0, len(rows), _READ_BLOCK):
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        out[start : start + _READ_BLOCK] = mapped[rows[start : start + _READ_BLOCK]]
        del mapped
    return out


def pixel_evidence(
    images: np.ndarray | GreyStack,
    config: DoubtConfig | None = None,
    *,
    spill_dir: str | os.PathLike[str] | None = None,
) -> PixelEvidence:
    """Pixel keys, their neighbours and the tile recurrence of `images` (uint8, or a
    `pixels.GreyStack` read by blocks); the tiles' count spills under `spill_dir` (the
    system's temporary directory by default) when it outgrows memory."""
    config = config or DoubtConfig()
    keys = pixel_keys(images, config.thumb)
    if config.pixel_k > len(keys) - 1:
        raise ValueError(
            f"pixel_k = {config.pixel_k} neighbours, but only {len(keys)} images (<= N - 1)"
        )
    neighbours = knn(keys, config.pixel_k, threads=config.threads, name="pixel keys")
    aligned = aligned_similarity(images, neighbours[0], config.max_shift)
    recurrence = pixel_recurrence(images, config.tile, config.tile_min_std, spill_dir=spill_dir)
    pattern = phase = None
    if "pattern_pixel" in config.signals or config.report_all:
        pattern = pixel_pattern(images, seed=config.seed)
    if "phase_pixel" in config.signals or config.report_all:
        # a pool too small to hold a pattern's tail has none to find: every score 0
        if len(images) < PHASE_MIN_IMAGES:
            phase = np.zeros(len(images))
        else:
            phase = phase_locked_patterns(
                images, seed=config.seed, template=config.phase_template
            ).scores
    return PixelEvidence(keys, neighbours, aligned, recurrence, pattern, phase)


# --------------------------------------------------------------------------- signals


def neighbour_dots(x: np.ndarray, idx: np.ndarray, block: int = 1024, first: int = 0) -> np.ndarray:
    """(M, k): the dot product of row first + i of x with each of its neighbours' rows,
    x[idx[i, j]] (first = 0: idx holds every row's neighbours).

    A block of rows at a time: gathering every row's neighbours at once is N x k x D floats
    (3 GiB for 100,000 pixel keys at k = 64), which grew a round's memory with N.
    """
    out = np.empty(idx.shape, dtype=np.result_type(x.dtype, np.float32))
    for start in range(0, len(idx), block):
        rows = slice(start, start + block)
        own = x[first + start : first + min(len(idx), start + block)]
        out[rows] = np.einsum("nd,nkd->nk", own, x[idx[rows]])
    return out


def _consistency(
    other_space: np.ndarray,
    idx: np.ndarray,
    sim: np.ndarray,
    k: int,
    exclude_sim: float,
    exclude: np.ndarray | None,
    first: int = 0,
) -> np.ndarray:
    """-(mean cos between row i and the rows of `other_space` of i's first k vouching neighbours).

    The neighbours (idx, sim, sorted, possibly more than k) come from the anchor
    space; those closer than `exclude_sim` there (identical captions), or flagged by
    `exclude` (copies of the same image), do not vouch, and the next ones stand in.
    A row left with no neighbour scores 0.
    """
    keep = sim < exclude_sim
    if exclude is not None:
        keep &= ~exclude
    keep &= np.cumsum(keep, axis=1) <= k
    agree = neighbour_dots(other_space, idx, first=first)
    count = keep.sum(axis=1)
    mean = np.where(count > 0, (agree * keep).sum(axis=1) / np.maximum(count, 1), 0.0)
    return -mean.astype(np.float64)


def _copies(
    idx: np.ndarray, keys: np.ndarray | None, threshold: float, first: int = 0
) -> np.ndarray | None:
    """Which neighbours (N, k) are pixel copies of the row (thumbnail cosine >= threshold)."""
    if keys is None:
        return None
    return neighbour_dots(keys, idx, first=first) >= threshold


def compute_signals(
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    config: DoubtConfig,
    *,
    pixels: PixelEvidence | None = None,
    lead: np.ndarray | None = None,
    wanted: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Every wanted signal, larger = more suspicious.

    image_emb / caption_emb: (N, D) L2-normalised global embeddings of each pair's
    image and own caption; pixels: `pixel_evidence` of the images (None: no pixel
    signals, and copies judged by near-identical image embeddings); lead: the
    round's cross-modal lead of the best candidate over the own caption (None:
    minus the pair's cosine).
    """
    image_emb = _check_embeddings(image_emb, "image embeddings")
    caption_emb = _check_embeddings(caption_emb, "caption embeddings")
    n = len(image_emb)
    if len(caption_emb) != n:
        raise ValueError(f"{n} image embeddings but {len(caption_emb)} caption embeddings")
    if lead is not None:
        lead = np.asarray(lead, dtype=np.float64)
        if lead.shape != (n,) or not np.isfinite(lead).all():
            raise ValueError(f"lead must be {n} finite numbers, one per pair")
    if pixels is not None and len(pixels) != n:
        raise ValueError(f"pixel evidence for {len(pixels)} images, but {n} pairs")
    keys = None if pixels is None else pixels.keys
    wanted = tuple(SIGNALS) if wanted is None else tuple(wanted)
    if pixels is None:
        wanted = tuple(s for s in wanted if SIGNALS[s] != "pixel")
    k = config.k
    out: dict[str, np.ndarray] = {}
    if k > n - 1:
        raise ValueError(f"k = {k} neighbours, but only {n} pairs (k <= N - 1)")
    reach = min(n - 1, k + config.reach)
    density = {"density_image", "slof_image", "dao_image", "density_caption"} & set(wanted)
    if "cross" in wanted:
        own = np.einsum("nd,nd->n", image_emb, caption_emb).astype(np.float64)
        out["cross"] = lead if lead is not None else -own
    if density:
        # the density signals read every row's neighbours' own k-distances: whole joins
        out.update(_density_signals(image_emb, caption_emb, config, density, reach))
    if pixels is not None:
        out.update(pixel_signals(pixels, config, wanted))
    spaces = {
        "consistency_caption": (caption_emb, image_emb, config.caption_duplicate_sim),
        "consistency_image": (image_emb, caption_emb, 2.0),
    }
    for signal, (anchor, other, exclude_sim) in spaces.items():
        if signal in wanted:
            out[signal] = _consistency_by_block(
                anchor, other, image_emb, keys, reach, k, exclude_sim, config, signal
            )
    return out


_JOIN_BLOCK = 8192  # rows of a self-join held at once by the consistency signals


def _consistency_by_block(
    anchor: np.ndarray,
    other: np.ndarray,
    image_emb: np.ndarray,
    keys: np.ndarray | None,
    reach: int,
    k: int,
    exclude_sim: float,
    config: DoubtConfig,
    signal: str,
) -> np.ndarray:
    """`_consistency` over the anchor space's self-join, a block of rows at a time.

    Each row reads only its own neighbour lists, so no list of all N rows is held: the
    wide lists (k + reach neighbours, two spaces) were the largest per-pair memory of a
    round (1.5 KiB a pair) and are now a block's.
    """
    n = len(anchor)
    out = np.empty(n, np.float64)
    for start in range(0, n, _JOIN_BLOCK):
        rows = slice(start, min(n, start + _JOIN_BLOCK))
        idx, sim = knn(anchor, reach, threads=config.threads, name=signal, rows=rows)
        copies = _copies(idx, keys, config.duplicate_sim, first=start)
        if copies is None and signal == "consistency_caption":
            # no pixels: images near-identical in embedding count as copies
            copies = neighbour_dots(image_emb, idx, first=start) >= 0.99
        out[rows] = _consistency(other, idx, sim, k, exclude_sim, copies, first=start)
    return out


def _density_signals(
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    config: DoubtConfig,
    wanted: set[str],
    reach: int,
) -> dict[str, np.ndarray]:
    """The density family (k-distance, SLOF, DAO) from whole self-joins."""
    k = config.k
    out: dict[str, np.ndarray] = {}
    if {"density_image", "slof_image", "dao_image"} & wanted:
        nn = knn(image_emb, k, threads=config.threads, name="image embeddings")
        scores = local_outlier_scores(image_emb, k, neighbours=nn)
        out["density_image"] = -scores["kdist"]
        out["slof_image"] = -np.log(scores["slof"])
        out["dao_image"] = -np.log(scores["dao"])
    if "density_caption" in wanted:
        nn = knn(caption_emb, k, threads=config.threads, name="caption embeddings")
        out["density_caption"] = -local_outlier_scores(caption_emb, k, neighbours=nn)["kdist"]
    return out


def pixel_signals(
    pixels: PixelEvidence, config: DoubtConfig, wanted: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The wanted signals of the pixel family: they need no model, so they can speak
    before training starts (the trainer's screen of the warm-up)."""
    wanted = tuple(SIGNALS) if wanted is None else tuple(wanted)
    out: dict[str, np.ndarray] = {}
    if "density_pixel" in wanted:
        scores = local_outlier_scores(pixels.keys, config.pixel_k, neighbours=pixels.neighbours)
        out["density_pixel"] = -scores["kdist"]
    if "copies_pixel" in wanted:
        out["copies_pixel"] = (pixels.aligned >= config.copy_ncc).sum(axis=1).astype(np.float64)
    if "recurrence_pixel" in wanted:
        out["recurrence_pixel"] = np.log(pixels.recurrence)
    for name, values in (("pattern_pixel", pixels.pattern), ("phase_pixel", pixels.phase)):
        if name not in wanted:
            continue
        if values is not None:
            out[name] = values
        elif name in config.signals:  # fused, but not computed: never silently
            raise ValueError(
                f"{name} is fused but the pixel evidence has no {name.split('_')[0]} scores: "
                "compute it with pixel_evidence(images, config) for this config"
            )
    return out


# --------------------------------------------------------------------------- fusion


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD): a scale every signal shares, untouched by a few outliers.

    A constant signal (MAD 0) falls back to the standard deviation, then to zeros.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError("robust_z needs a non-empty 1-D array")
    if not np.isfinite(x).all():
        raise ValueError("robust_z: the signal has NaN or infinite values")
    med = np.median(x)
    scale = 1.4826 * np.median(np.abs(x - med))
    if scale <= 1e-12:
        scale = x.std()
    if scale <= 1e-12:
        return np.zeros_like(x)
    return (x - med) / scale


# The least scale of a count signal: one copy for the copy count, half a unit of the log
# count for the tile recurrence (a cut of 3 then needs 4.5 images sharing a tile in
# place). Where the usual top 5% sit at zero, falling back to the spread made a single
# clean pixel copy "three times unusual" (9 of 192 clean scenes screened); at 20k pairs
# the floors change no verdict of the development data (TUNING.md, session 8).
SCALE_FLOOR: dict[str, float] = {"copies_pixel": 1.0, "recurrence_pixel": 0.5}


def tail_scale(values: np.ndarray, tail: float = 0.95, floor: float = 0.0) -> np.ndarray:
    """(x - median) / (q_tail - median): each signal's own upper tail is mapped to 1.

    Signals differ in the shape of their tails, not only in their spread: a robust z
    lets a heavy-tailed signal's clean pairs outshout a light-tailed signal's poisons.
    Scaled by its own tail quantile, a signal says "3" only for pairs three times as
    far out as the usual top 5% of its own distribution. The quantile must lie below
    the poisons: at 0.99 a poison share over 1% set the scale itself and mapped the
    poisons to 1 (measured, TUNING.md); 0.95 holds while poisons are under 5%.
    A constant-ish signal (quantile at the median) falls back to the standard deviation,
    unless `floor` (a count's unit) is set: the scale is then never below it.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError("tail_scale needs a non-empty 1-D array")
    if not np.isfinite(x).all():
        raise ValueError("tail_scale: the signal has NaN or infinite values")
    med, top = np.quantile(x, [0.5, tail])
    scale = max(top - med, floor)
    if scale <= 1e-12:
        scale = x.std()
    if scale <= 1e-12:
        return np.zeros_like(x)
    return (x - med) / scale


def upper_rank(values: np.ndarray) -> np.ndarray:
    """The share of pairs scoring at most this one (ties share the upper rank), in (0, 1]."""
    x = np.asarray(values, dtype=np.float64)
    order = np.sort(x)
    return np.searchsorted(order, x, side="right") / len(x)


FUSIONS: tuple[str, ...] = ("max_tail", "max_z", "max_rank")
_SCALES = {"max_tail": tail_scale, "max_z": robust_z, "max_rank": upper_rank}


def fuse(z: Mapping[str, np.ndarray], signals: Sequence[str]) -> np.ndarray:
    """The largest scaled signal over the chosen signals: one strong signal is enough.

    A mean of ranks dilutes the one signal that sees a given attack (DESIGN.md,
    section 8: 22-28% of the poisons caught per round); the maximum lets it speak.
    """
    missing = [s for s in signals if s not in z]
    if missing:
        raise ValueError(f"fuse: signals {missing} were not computed")
    if not signals:
        raise ValueError("fuse: no signal to fuse")
    return np.max(np.stack([z[s] for s in signals]), axis=0)


def group_verdict(
    scores: np.ndarray, idx: np.ndarray, sim: np.ndarray, threshold: float
) -> np.ndarray:
    """Each pair gets the larger of its own score and the median over itself and its variants
    (similarity >= threshold).

    A poison's copies then rise together: a verdict cannot keep some copies of a target
    and leave out the rest. The own score is a floor, so clean look-alikes cannot talk a
    pair down: a BadNet image whose clean scene recurs elsewhere in the data fell under
    the cut through the median alone (1-2.5% of the BadNet pairs; TUNING.md, session 8).
    Only direct neighbours count, not chains of them: transitive groups would join
    unrelated lookalikes into groups of hundreds.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if idx.shape != sim.shape or len(idx) != len(scores):
        raise ValueError("group_verdict: one row of neighbours per score")
    values = np.where(sim >= threshold, scores[idx], np.nan)
    stacked = np.concatenate([scores[:, None], values], axis=1)
    return np.maximum(scores, np.nanmedian(stacked, axis=1))


def mixture_threshold(
    scores: np.ndarray, min_share: float = 0.0, max_share: float = 1.0, seed: int = 0
) -> float:
    """The cut above which pairs are doubted, fitted without labels.

    A two-component Gaussian mixture over the scores; the cut is the lowest score
    from which the upper component (the larger mean) is the more likely one. The
    doubted share is then held within [min_share, max_share] by moving the cut to
    the matching quantile. A sample too small or too uniform for a mixture falls
    back to the max_share quantile.
    """
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(x):
        raise ValueError("mixture_threshold needs at least one score")
    if not np.isfinite(x).all():
        raise ValueError("mixture_threshold: scores have NaN or infinite values")
    if not (0.0 <= min_share <= max_share <= 1.0):
        raise ValueError(f"need 0 <= min_share <= max_share <= 1, got {min_share}, {max_share}")
    cut = _mixture_cut(x, seed)
    if cut is None:
        cut = _quantile_cut(x, max_share)
    share = float((x > cut).mean())
    if share > max_share:
        cut = _quantile_cut(x, max_share)
    elif share < min_share:
        count = int(math.ceil(min_share * len(x)))
        cut = float(np.nextafter(np.sort(x)[len(x) - count], -np.inf))  # ties: all above
    return float(cut)


def fixed_threshold(
    scores: np.ndarray, cut: float, min_share: float = 0.0, max_share: float = 1.0
) -> float:
    """`cut`, moved only as far as needed to doubt a share within [min_share, max_share]."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(x) or not np.isfinite(x).all():
        raise ValueError("fixed_threshold needs finite scores")
    share = float((x > cut).mean())
    if share > max_share:
        return _quantile_cut(x, max_share)
    if share < min_share:
        count = int(math.ceil(min_share * len(x)))
        return float(np.nextafter(np.sort(x)[len(x) - count], -np.inf))
    return float(cut)


def _quantile_cut(x: np.ndarray, share: float) -> float:
    """A cut with at most `share` of x strictly above it (ties stay below)."""
    n = len(x)
    count = int(math.floor(share * n))
    if count <= 0:
        return float(x.max())
    ordered = np.sort(x)
    return float(ordered[n - count - 1]) if count < n else float(ordered[0] - 1.0)


def _mixture_cut(x: np.ndarray, seed: int) -> float | None:
    from sklearn.mixture import GaussianMixture

    if len(x) < 10 or x.std() <= 1e-12:
        return None
    gm = GaussianMixture(2, random_state=seed, n_init=1, reg_covar=1e-6)
    gm.fit(x[:, None])
    upper = int(np.argmax(gm.means_.ravel()))
    ordered = np.sort(x)
    post = gm.predict_proba(ordered[:, None])[:, upper]
    above_median = ordered >= np.median(x)
    likely = np.flatnonzero((post > 0.5) & above_median)
    if not len(likely):
        return None
    first = likely[0]
    return float(ordered[first - 1]) if first > 0 else float(ordered[0] - 1.0)


# --------------------------------------------------------------------------- the verdict


def doubt_scores(
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    config: DoubtConfig | None = None,
    *,
    images: np.ndarray | None = None,
    pixels: PixelEvidence | None = None,
    lead: np.ndarray | None = None,
) -> Doubt:
    """Score every pair, fuse, share verdicts within near-duplicate groups, and cut.

    image_emb / caption_emb: (N, D) float32 L2-normalised embeddings of each pair's
    image and its own caption; images: the pixels (uint8), for the pixel signals
    and shared verdicts, or `pixels` already computed from them (`pixel_evidence`;
    neither: no pixel signals, no shared verdicts); lead: the round's cross-modal
    lead (see `compute_signals`).
    """
    config = config or DoubtConfig()
    if pixels is None and images is not None:
        pixels = pixel_evidence(images, config)
    signals = doubt_signals(image_emb, caption_emb, config, pixels=pixels, lead=lead)
    return decide(signals, pixels, config)


def doubt_signals(
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    config: DoubtConfig,
    *,
    pixels: PixelEvidence | None = None,
    lead: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The signals `doubt_scores` fuses (every signal with `report_all`): its first half.

    Apart so that a caller can let go of the embeddings before `decide`, whose
    temporaries would otherwise add to theirs (a streamed round's peak memory).
    """
    if pixels is not None and len(pixels) != len(image_emb):
        raise ValueError(f"{len(pixels)} images for {len(image_emb)} image embeddings")
    wanted = tuple(SIGNALS) if config.report_all else config.signals
    return compute_signals(image_emb, caption_emb, config, pixels=pixels, lead=lead, wanted=wanted)


def pixel_screen(pixels: PixelEvidence, config: DoubtConfig) -> Doubt:
    """The pairs the pixel signals alone doubt: OTCCLIP's warm-up screen.

    Those signals need no model, so the trainer leaves these pairs out of the warm-up
    (`pixel_screen`) rather than let it learn a target's copies or a patch first. The
    fusion, cut and cap are a round's, over `config`'s pixel signals, with no least share:
    data without copies or patches loses nothing. No pixel signal: nothing is doubted.
    """
    wanted = tuple(s for s in config.signals if SIGNALS[s] == "pixel")
    if not wanted:
        n = len(pixels)
        none = np.zeros(n, dtype=bool)
        return Doubt(np.zeros(n), none, math.inf, {}, {}, none.copy(), {"doubted": 0})
    return decide(
        pixel_signals(pixels, config, wanted),
        pixels,
        replace(config, signals=wanted, min_share=0.0),
    )


def decide(
    signals: Mapping[str, np.ndarray],
    pixels: PixelEvidence | None,
    config: DoubtConfig,
) -> Doubt:
    """Scale, fuse, share verdicts among pixel copies, and cut: the cheap half of the verdict.

    Apart from `compute_signals` so that a benchmark can try fusions on one set of signals.
    """
    if config.fusion == "max_tail":
        z = {
            name: (
                np.asarray(values, dtype=np.float64)
                if name == "phase_pixel" and config.phase_scale == "own"
                else tail_scale(values, config.tail, SCALE_FLOOR.get(name, 0.0))
            )
            for name, values in signals.items()
        }
    else:
        z = {name: _SCALES[config.fusion](values) for name, values in signals.items()}
    used = [s for s in config.signals if s in z]
    if not used:
        raise ValueError(
            f"none of the signals {config.signals} can be computed without images; "
            "pass images= or choose other signals"
        )
    fused = fuse(z, used)
    if config.group and pixels is not None:
        fused = group_verdict(fused, pixels.neighbours[0], pixels.aligned, config.copy_ncc)
    if config.budget == "mixture":
        cut = mixture_threshold(fused, config.min_share, config.max_share, config.seed)
    else:
        cut = fixed_threshold(fused, config.cut, config.min_share, config.max_share)
    doubted = fused > cut
    grouped = (
        np.zeros(len(fused), bool)
        if pixels is None
        else (pixels.aligned >= config.copy_ncc).any(axis=1)
    )
    report: dict[str, float | int | str] = {
        "doubted": int(doubted.sum()),
        "doubted_share": float(doubted.mean()),
        "threshold": float(cut),
        "grouped_pairs": int(grouped.sum()),
        "signals": ",".join(used),
    }
    return Doubt(fused, doubted, cut, dict(signals), z, grouped, report)


def _check_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    finite = finite_rows(x)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} hold NaN or infinite values (rows {bad[:5].tolist()}); "
            "check the model's outputs"
        )
    return np.ascontiguousarray(x, dtype=np.float32)
