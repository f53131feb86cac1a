"""The matching round: re-pair images with captions by a global + optimal-transport score.

One round (DESIGN.md, section 2):
1. embed the pool captions (global embedding, word tokens, mask) and the images
   (global embedding, patch tokens) with the model, in batches;
2. prune: the k pool captions nearest to each image by global cosine (`otmatch.topk`);
3. score each image against its k candidates *and its own caption* by
   S = alpha * cos + (1 - alpha) * s_OT, where s_OT = 1 - D_OT between the
   image's patch tokens and the caption's word tokens (`otcclip.ot`);
4. assign (`otmatch.assign`): argmax or capacity, with a keep-own margin.

The own caption is scored even when the pruning left it out, so the margin
compares like with like: an image keeps its caption unless a candidate beats it
by more than the margin, whatever the global ranking said.

Memory stays bounded by streaming the images: each batch is embedded, pruned
and scored before the next, so patch tokens never exist for the whole set. The
pool's word tokens are either cached once in float16 on the CPU (trimmed to the
longest real caption) or recomputed per scoring batch for just the candidates
(`cache_tokens=False`, for pools too large to cache).

Under torch.distributed every rank embeds its shard of the pool and of the
images; the pool's features are gathered, and so are the per-image candidates
and scores, so that the assignment (which for `capacity` needs the global view)
runs identically on every rank and every rank returns the full result. Shards
are aligned to the batch sizes, so each rank runs exactly the batches a single
process would: the pairing equals the single-process one.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from otcclip import distributed as dist
from otcclip import otmatch
from otcclip.heap import trim_heap
from otcclip.models import encode_image_fine, encode_text_fine, image_transform
from otcclip.ot import ot_similarity_candidates
from otcclip.rows import finite_rows, row_norms

__all__ = [
    "MatchConfig",
    "MatchResult",
    "PoolFeatures",
    "CaptionBank",
    "match_round",
    "match_image_batches",
    "match_embeddings",
    "embed_pool",
    "score_candidates",
]

_METHODS = ("argmax", "capacity")
# batches between returns of freed heap memory to the OS (see otcclip.heap)
_TRIM_EVERY = 16
_FALLBACKS = ("own", "unassigned")


@dataclass
class MatchConfig:
    """Knobs of one matching round.

    k: candidates per image kept by the global-cosine pruning.
    alpha: weight of the global cosine in S (1 = global only, OT skipped).
    eps, iters, tol, rho: Sinkhorn settings (rho: unbalanced OT, KL marginal weight).
    method, capacity, fallback: assignment (see `otmatch.assign`).
    margin: an image keeps its own caption unless a candidate beats it by more than this.
    max_changed: the most images a round re-pairs, as a share: those whose own caption
        trails its best candidate most (1: no budget).
    flag_outside_topk: an image whose own caption is not among its k candidates is
        treated as suspicious and re-paired whatever its score (the margin cannot keep it).
    image_batch / text_batch: embedding batch sizes; also the unit the distributed
        shards align to. score_batch: image-caption pairs per Sinkhorn batch (memory bound).
    cache_tokens: keep the pool's word tokens in float16 on the CPU (True) or
        recompute the candidates' tokens per scoring batch (False: for huge pools).
    threads: rayon threads for the pruning (None: the engine's default).
    bank: approximate pruning for pools too large for the exact top-k (O(N x M)): the k
        candidates come from a bank of this many pool captions drawn at random with
        `seed` (O(N x bank)); the own caption is scored anyway. None: the exact top-k
        over the whole pool. README (Benchmarks) says where the two cross over.
    seed: seeds the bank; the exact round draws no random numbers.
    """

    k: int = 16
    alpha: float = 0.5
    eps: float = 0.05
    iters: int = 50
    tol: float | None = None
    rho: float | None = None
    method: str = "argmax"
    capacity: int | None = None
    margin: float = 0.0
    max_changed: float = 1.0
    fallback: str = "own"
    flag_outside_topk: bool = False
    image_batch: int = 256
    text_batch: int = 512
    score_batch: int = 4096
    cache_tokens: bool = True
    threads: int | None = None
    bank: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1)
        if self.bank is not None:
            _check_int("bank", self.bank, self.k)
            if self.flag_outside_topk:
                raise ValueError(
                    "flag_outside_topk needs the exact top-k: with a bank, most own captions "
                    "fall outside the candidates by chance; drop one of the two"
                )
        _check_int("iters", self.iters, 1)
        _check_int("image_batch", self.image_batch, 1)
        _check_int("text_batch", self.text_batch, 1)
        _check_int("score_batch", self.score_batch, 1)
        _check_int("seed", self.seed, 0)
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if self.tol is not None and not (self.tol > 0):
            raise ValueError(f"tol must be positive or None, got {self.tol!r}")
        if self.rho is not None and not (math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be positive or None (balanced OT), got {self.rho!r}")
        if not (isinstance(self.margin, (int, float)) and self.margin >= 0):
            raise ValueError(f"margin must be a number >= 0, got {self.margin!r}")
        if not (isinstance(self.max_changed, (int, float)) and 0.0 <= self.max_changed <= 1.0):
            raise ValueError(f"max_changed must be a share in [0, 1], got {self.max_changed!r}")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.fallback not in _FALLBACKS:
            raise ValueError(f"fallback must be one of {_FALLBACKS}, got {self.fallback!r}")
        if self.method == "capacity":
            if self.capacity is None:
                raise ValueError("method 'capacity' needs capacity (captions used at most c times)")
            _check_int("capacity", self.capacity, 1)
        elif self.capacity is not None:
            raise ValueError("capacity is only meaningful with method 'capacity'")
        if self.threads is not None:
            _check_int("threads", self.threads, 1)


@dataclass
class MatchResult:
    """The new pairing and how it was reached; every array has one row per image.

    caption: pool index of the assigned caption (-1: unassigned);
    changed: caption differs from the own one (all False without own captions);
    global_score / ot_score / score: cos, s_OT and S of the assigned caption
        (ot_score is NaN when alpha = 1: the OT was skipped);
    own_*: the same three for the own caption (NaN without own captions);
    best / best_score: the top candidate by S and its score;
    suspicious: own caption beaten by more than the margin (or outside the top-k
        with `flag_outside_topk`): what `--flag-only` reports;
    candidates / candidate_scores: the k pruned pool indices and their S;
    stats: the engine's assignment statistics; report: counts, shares, timings;
    image_embeddings / pool_embeddings: the normalised global embeddings the round
        computed (float32 (N, D) and (M, D)), for the doubt signals to reuse
        without a second embedding pass.
    """

    caption: np.ndarray
    changed: np.ndarray
    global_score: np.ndarray
    ot_score: np.ndarray
    score: np.ndarray
    own_global_score: np.ndarray
    own_ot_score: np.ndarray
    own_score: np.ndarray
    best: np.ndarray
    best_score: np.ndarray
    suspicious: np.ndarray
    candidates: np.ndarray
    candidate_scores: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    image_embeddings: np.ndarray | None = None
    pool_embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.caption)


@dataclass
class PoolFeatures:
    """A caption pool as the round needs it.

    embeddings: float32 (M, D), L2-normalised, C-contiguous (what the pruning reads);
    tokens: float16 (M, L, D) L2-normalised word tokens, L trimmed to the longest
        caption; mask: bool (M, L), True on real tokens. Both None when the tokens
        are recomputed per batch instead of cached.
    """

    embeddings: np.ndarray
    tokens: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.embeddings, self.tokens, self.mask) if a is not None)


class CaptionBank:
    """A FIFO bank of the most recent captions (RoCLIP's pool), by stable caption id.

    Pass `bank.captions` as the pool of `match_round`; pool indices map back to
    ids through `bank.ids`. Adding an id already in the bank refreshes its text
    and moves it to the newest end.
    """

    def __init__(self, capacity: int) -> None:
        _check_int("capacity", capacity, 1)
        self.capacity = capacity
        self._items: dict[int, str] = {}
        self._order: deque[int] = deque()

    def add(self, ids: np.ndarray | Sequence[int], captions: Sequence[str]) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(captions):
            raise ValueError(f"CaptionBank.add: {len(ids)} ids for {len(captions)} captions")
        for i, text in zip(ids.tolist(), captions, strict=True):
            if not isinstance(text, str):
                raise TypeError(f"CaptionBank.add: caption of id {i} is {type(text).__name__}")
            if i in self._items:
                self._order.remove(i)
            self._items[i] = text
            self._order.append(i)
        while len(self._order) > self.capacity:
            del self._items[self._order.popleft()]

    @property
    def ids(self) -> np.ndarray:
        return np.fromiter(self._order, dtype=np.int64, count=len(self._order))

    @property
    def captions(self) -> list[str]:
        return [self._items[i] for i in self._order]

    def __len__(self) -> int:
        return len(self._order)


# --------------------------------------------------------------------------- the round


def match_round(
    bundle: Any,
    images: np.ndarray,
    captions: Sequence[str],
    own: np.ndarray | None,
    config: MatchConfig | None = None,
    *,
    poisoned: np.ndarray | None = None,
    image_classes: np.ndarray | None = None,
    caption_classes: np.ndarray | None = None,
    pool_embeddings: np.ndarray | None = None,
    pool: PoolFeatures | None = None,
    progress: bool = False,
    distributed: bool | None = None,
) -> MatchResult:
    """Re-pair `images` with captions of the pool `captions`.

    own: each image's current caption as a pool index (int64 (N,); -1 for an
    image whose caption is not in the pool, e.g. a FIFO bank), or None when no
    image has one (no margin, `changed` all False).
    poisoned: bool (N,), which pairs are known poisoned: adds poison-broken and
    clean-kept shares to the report. image_classes (N, C) / caption_classes
    (M, C) multi-hots: adds the share of clean pairs holding a caption of their
    true content (same class set), before and after.
    pool_embeddings: precomputed (M, D) caption embeddings used for the pruning
    and the cosine term instead of the model's (normalised here). pool: features
    already computed by `embed_pool` (reused across calls, e.g. by a trainer).
    distributed: None = use torch.distributed when a group of more than one
    process is up; False = run locally even then.
    """
    config = config or MatchConfig()
    timer = _Timer()
    model = bundle.model
    device = _model_device(model)
    use_dist = _use_distributed(distributed)
    captions = _check_captions(captions)
    images = _check_images(images)
    n, m = len(images), len(captions)
    if config.k > m:
        raise ValueError(f"k = {config.k} is larger than the pool ({m} captions)")
    own = _check_index_array("own", own, n, m)
    poisoned = _check_mask("poisoned", poisoned, n)
    _check_classes(image_classes, caption_classes, n, m)
    embed_dim = getattr(bundle, "embed_dim", None)

    with _eval_mode(model), torch.no_grad():
        if pool is None:
            with timer("embed_pool"):
                pool = embed_pool(
                    bundle,
                    captions,
                    batch_size=config.text_batch,
                    tokens=config.cache_tokens and config.alpha < 1,
                    embeddings=pool_embeddings,
                    progress=progress,
                    distributed=use_dist,
                )
        else:
            _check_pool(pool, m, embed_dim, needs_tokens=config.cache_tokens and config.alpha < 1)
        source = _token_source(bundle, captions, pool, config, device, timer)
        bank = _bank(pool, config)

        lo, hi = dist.shard_range(n, align=config.image_batch) if use_dist else (0, n)
        local = _score_images(
            bundle,
            images[lo:hi],
            None if own is None else own[lo:hi],
            pool,
            source,
            config,
            device,
            timer,
            progress and dist.is_main(),
            bank,
        )
    if use_dist:
        local = {key: dist.all_gather_concat(value) for key, value in local.items()}
    return _finish(local, own, pool, config, timer, (poisoned, image_classes, caption_classes), m)


def match_image_batches(
    bundle: Any,
    image_batches: Iterable[np.ndarray],
    captions: Sequence[str],
    own: np.ndarray | None,
    config: MatchConfig | None = None,
    *,
    pool_embeddings: np.ndarray | None = None,
    image_classes: np.ndarray | None = None,
    caption_classes: np.ndarray | None = None,
) -> MatchResult:
    """`match_round` with the images handed over batch by batch, never all held at once.

    For pairs read from shards (a PairStream that does not shuffle): the i-th image
    over the batches, in order, is row i of `own` and of the result. Batches of
    `config.image_batch` images (the last one may be shorter) are match_round's own
    batches, so the pairing is the one match_round gives on the same images in one
    array. Memory holds the pool's features and, per image, its scores and global
    embedding, not the images. One process (no torch.distributed sharding); the report
    has no poison shares. pool_embeddings, image_classes, caption_classes: as in
    match_round (the classes, one row per image over all batches, are checked once the
    batches are counted).
    """
    config = config or MatchConfig()
    timer = _Timer()
    model = bundle.model
    device = _model_device(model)
    captions = _check_captions(captions)
    m = len(captions)
    if config.k > m:
        raise ValueError(f"k = {config.k} is larger than the pool ({m} captions)")
    if own is not None:
        own = _check_index_array("own", own, len(own), m)
    parts: list[dict[str, np.ndarray]] = []
    done = 0
    with _eval_mode(model), torch.no_grad():
        with timer("embed_pool"):
            tokens = config.cache_tokens and config.alpha < 1
            pool = embed_pool(
                bundle,
                captions,
                batch_size=config.text_batch,
                tokens=tokens,
                embeddings=pool_embeddings,
            )
        source = _token_source(bundle, captions, pool, config, device, timer)
        bank = _bank(pool, config)
        for images in image_batches:
            images = _check_images(images)
            mine = None if own is None else own[done : done + len(images)]
            if mine is not None and len(mine) < len(images):
                raise ValueError(f"more images than the {len(own)} own captions")
            parts.append(
                _score_images(
                    bundle, images, mine, pool, source, config, device, timer, False, bank
                )
            )
            done += len(images)
    if not parts:
        raise ValueError("no images to match")
    if own is not None and done != len(own):
        raise ValueError(f"{done} images for {len(own)} own captions; give one per image")
    _check_classes(image_classes, caption_classes, done, m)
    local = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return _finish(local, own, pool, config, timer, (None, image_classes, caption_classes), m)


def match_embeddings(
    image_embeddings: np.ndarray,
    pool_embeddings: np.ndarray,
    own: np.ndarray | None,
    config: MatchConfig | None = None,
) -> MatchResult:
    """A round from global embeddings already at hand: the top-k pruning and the
    assignment by cosine alone (the round at alpha = 1), with no model and no OT.

    Why: a trainer that keeps each pair's embeddings from its own forward passes
    (`otcclip.matching_state`) needs no embedding pass of its own for the round, and a
    user with embeddings from elsewhere needs no model. image_embeddings (N, D) and
    pool_embeddings (M, D), float, finite, any norm (normalised here; rows already
    float32 and of length 1 are used as they are, so the result's embeddings may share
    their memory); own: as in match_round. The fine-grained OT needs the model's tokens:
    score the pairs that need it with `match_round` (config.alpha < 1 is refused here).
    """
    config = config or MatchConfig(alpha=1.0)
    if config.alpha < 1:
        raise ValueError(
            f"match_embeddings scores by cosine alone (alpha = 1), got alpha = {config.alpha}; "
            "the OT term needs the model's tokens: use match_round"
        )
    timer = _Timer()
    images = _unit_float_rows("image_embeddings", image_embeddings)
    pool = PoolFeatures(_unit_float_rows("pool_embeddings", pool_embeddings))
    n, m = len(images), len(pool)
    if images.shape[1] != pool.embeddings.shape[1]:
        raise ValueError(
            f"image embeddings are {images.shape[1]} wide, pool embeddings "
            f"{pool.embeddings.shape[1]}: they must come from one model"
        )
    if config.k > m:
        raise ValueError(f"k = {config.k} is larger than the pool ({m} captions)")
    own = _check_index_array("own", own, n, m)
    bank = _bank(pool, config)
    k = config.k
    with timer("prune"):
        searched = pool.embeddings if bank is None else bank[1]
        cand, sim = otmatch.topk(images, searched, k, config.threads)
        if bank is not None:
            cand = bank[0][cand]
    cos = np.empty((n, k + (own is not None)), np.float32)
    cos[:, :k] = sim
    del sim
    if own is not None:
        mine = np.maximum(own, 0)
        cos[:, k] = np.einsum("nd,nd->n", images, pool.embeddings[mine])
        cos[own < 0, k] = np.nan
    local = {
        "candidates": np.asarray(cand, np.int64),
        "cos": cos,
        "ot": np.broadcast_to(np.float32(np.nan), cos.shape),  # no OT: a view, no memory
        "embeddings": images,
    }
    return _finish(local, own, pool, config, timer, (None, None, None), m)


def _unit_float_rows(name: str, x: np.ndarray) -> np.ndarray:
    """float32 (N, D), C-contiguous, rows of length 1; a clear error for anything else.

    Rows already float32, contiguous and of length 1 (to 1e-6) come back as they are,
    not copied: a trainer's kept embeddings are (`matching_state`), and a round's peak
    memory held both them and a copy (512 bytes a pair at D = 64)."""
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a 2-D float numpy array (N, D)")
    if not len(x) or not x.shape[1]:
        raise ValueError(f"{name} is empty: {x.shape}")
    x = np.asarray(x, np.float32)
    bad = np.flatnonzero(~finite_rows(x))
    if len(bad):
        raise ValueError(f"{name} has NaN or infinite values in rows {bad[:5].tolist()}")
    norm = row_norms(x)
    if (norm == 0).any():
        raise ValueError(f"{name} has all-zero rows {np.flatnonzero(norm[:, 0] == 0)[:5].tolist()}")
    if x.flags.c_contiguous and bool((np.abs(norm - 1) <= 1e-6).all()):
        return x
    return np.ascontiguousarray(x / norm)


def _finish(
    local: dict[str, np.ndarray],
    own: np.ndarray | None,
    pool: PoolFeatures,
    config: MatchConfig,
    timer: _Timer,
    labels: tuple[Any, Any, Any],
    m: int,
) -> MatchResult:
    """Assign from the scored images and write the round's report (both round entry points)."""
    with timer("assign"):
        result = _assign(local, own, config)
    result.image_embeddings = local["embeddings"]
    result.pool_embeddings = pool.embeddings
    result.report = _report(result, own, *labels, config, m)
    if "embed_candidates" in timer.seconds:  # ran inside the scoring: count it once
        timer.seconds["score"] -= timer.seconds["embed_candidates"]
    result.report["seconds"] = timer.seconds
    result.report["pool_bytes"] = pool.nbytes
    result.report["pruned_against"] = min(config.bank or m, m)
    return result


def _bank(pool: PoolFeatures, config: MatchConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """The approximate pruning's bank: sorted pool rows drawn with the round's seed, and
    their embeddings, contiguous for the engine (None: exact pruning over the pool)."""
    m = len(pool.embeddings)
    if config.bank is None or config.bank >= m:
        return None
    rows = np.sort(np.random.default_rng(config.seed).choice(m, size=config.bank, replace=False))
    return rows, np.ascontiguousarray(pool.embeddings[rows])


def _token_source(
    bundle: Any,
    captions: Sequence[str],
    pool: PoolFeatures,
    config: MatchConfig,
    device: torch.device,
    timer: _Timer,
) -> _TokenSource:
    """Where the scoring takes the candidates' word tokens: none (alpha = 1), the pool's
    float16 cache, or the model again per scoring batch."""
    if config.alpha >= 1:
        return _NoTokens()
    if pool.tokens is not None and pool.mask is not None:
        return _CachedTokens(pool.tokens, pool.mask, device)
    return _RecomputedTokens(bundle, captions, config.text_batch, device, timer)


def embed_pool(
    bundle: Any,
    captions: Sequence[str],
    *,
    batch_size: int = 512,
    tokens: bool = True,
    embeddings: np.ndarray | None = None,
    progress: bool = False,
    distributed: bool | None = None,
) -> PoolFeatures:
    """The pool's normalised global embeddings and (with `tokens`) float16 word tokens.

    `embeddings` given: they are checked, normalised and used instead of the
    model's, and the model runs only if tokens are wanted. Under
    torch.distributed each rank encodes its shard and the results are gathered.
    """
    captions = _check_captions(captions)
    m = len(captions)
    embed_dim = getattr(bundle, "embed_dim", None)
    pre = None if embeddings is None else _normalised_embeddings(embeddings, m, embed_dim)
    if pre is not None and not tokens:
        return PoolFeatures(pre)
    use_dist = _use_distributed(distributed)
    lo, hi = dist.shard_range(m, align=batch_size) if use_dist else (0, m)
    model = bundle.model
    device = _model_device(model)
    glob: np.ndarray | None = None
    tok: np.ndarray | None = None
    msk: np.ndarray | None = None
    width = 0
    bar = _progress(hi - lo, "embed captions", progress and dist.is_main())
    with _eval_mode(model), torch.no_grad():
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            g, t, mk = _encode_texts(bundle, captions[start:stop], device)
            at = slice(start - lo, stop - lo)
            if glob is None:
                # zero-filled: the OS commits a page only when it is written, so rows
                # padded to the context length cost about their real tokens' size
                glob = np.zeros((hi - lo, g.shape[1]), np.float32)
                if tokens:
                    tok = np.zeros((hi - lo, t.shape[1], t.shape[2]), np.float16)
                    msk = np.zeros((hi - lo, t.shape[1]), np.bool_)
            glob[at] = g.cpu().numpy()
            if tok is not None and msk is not None:
                w = _width(mk)
                tok[at, :w] = t[:, :w].to(torch.float16).cpu().numpy()
                msk[at] = mk.cpu().numpy()
                width = max(width, w)
            bar.update(stop - start)
            if ((start - lo) // batch_size + 1) % _TRIM_EVERY == 0:
                trim_heap()
    bar.close()
    if glob is None:  # this rank holds no captions
        dim = embed_dim or 0
        glob = np.zeros((0, dim), np.float32)
        if tokens:
            tok, msk = np.zeros((0, 1, dim), np.float16), np.zeros((0, 1), np.bool_)
    emb = pre if pre is not None else _gather(glob, use_dist)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if tok is None or msk is None:
        return PoolFeatures(emb)
    if use_dist:
        width = int(dist.all_reduce_scalar(width, "max"))
        tok = _gather(_fit_width(tok, width), use_dist)
        msk = _gather(_fit_width(msk, width), use_dist)
    else:  # views: no copy
        tok, msk = tok[:, :width], msk[:, :width]
    trim_heap()
    empty = np.flatnonzero(~msk.any(axis=1)) if msk.size else np.arange(len(msk))
    if len(empty):
        raise ValueError(
            f"{len(empty)} pool captions have no word tokens (e.g. pool rows "
            f"{empty[:5].tolist()}); every caption needs at least one word"
        )
    return PoolFeatures(emb, tok, msk)


def score_candidates(
    img_tokens: np.ndarray | torch.Tensor,
    txt_tokens: np.ndarray | torch.Tensor,
    txt_mask: np.ndarray | torch.Tensor,
    candidates: np.ndarray,
    config: MatchConfig | None = None,
) -> np.ndarray:
    """s_OT (N, k) of each image's patch tokens against its candidates' word tokens.

    img_tokens (N, P, D); txt_tokens (M, L, D) with txt_mask (M, L) for the pool;
    candidates int64 (N, k) pool indices (-1 gives NaN). Tokens need not be
    normalised. Runs in batches of `config.score_batch` pairs on the device of
    `img_tokens`.
    """
    config = config or MatchConfig()
    img = torch.as_tensor(img_tokens)
    if img.ndim != 3:
        raise ValueError(f"img_tokens must be (N, P, D), got shape {tuple(img.shape)}")
    txt = torch.as_tensor(txt_tokens)
    mask = torch.as_tensor(txt_mask)
    if txt.ndim != 3 or mask.shape != txt.shape[:2]:
        raise ValueError(
            f"txt_tokens must be (M, L, D) with txt_mask (M, L), got {tuple(txt.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if txt.shape[2] != img.shape[2]:
        raise ValueError(f"token widths differ: images D={img.shape[2]}, captions D={txt.shape[2]}")
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[0] != img.shape[0] or not np.issubdtype(cand.dtype, np.integer):
        raise ValueError(f"candidates must be integer (N={img.shape[0]}, k), got {cand.shape}")
    if cand.size and (cand.max() >= txt.shape[0] or cand.min() < -1):
        raise ValueError(f"candidates must be pool indices in [0, {txt.shape[0]}) or -1")
    missing = cand < 0
    safe = np.where(missing, 0, cand).astype(np.int64)
    source = _CachedTokens(txt, mask.to(torch.bool), img.device)
    img = img.float()
    out = _score_block(img, safe, source, config)
    out[missing] = np.nan
    return out


# --------------------------------------------------------------------------- internals


class _TokenSource(Protocol):
    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class _NoTokens:
    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("no word tokens: alpha = 1 skips the OT score")


class _CachedTokens:
    """Word tokens held in memory (float16 on the CPU); rows move to the device per batch."""

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor,
        device: torch.device,
    ) -> None:
        self.tokens = torch.as_tensor(tokens)
        self.mask = torch.as_tensor(mask)
        self.device = device

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(rows)
        return self.tokens[idx].to(self.device, torch.float32), self.mask[idx].to(self.device)


class _RecomputedTokens:
    """Word tokens encoded on demand, for just the captions a scoring batch needs."""

    def __init__(
        self,
        bundle: Any,
        captions: Sequence[str],
        batch_size: int,
        device: torch.device,
        timer: _Timer,
    ) -> None:
        self.bundle = bundle
        self.captions = captions
        self.batch_size = batch_size
        self.device = device
        self.timer = timer

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        toks, masks = [], []
        with self.timer("embed_candidates"):
            for s in range(0, len(rows), self.batch_size):
                chunk = [self.captions[i] for i in rows[s : s + self.batch_size].tolist()]
                _, t, mk = _encode_texts(self.bundle, chunk, self.device)
                toks.append(t)
                masks.append(mk)
        tok, mask = torch.cat(toks), torch.cat(masks)
        # widths rounded up to a multiple of 8: few distinct shapes, few recompilations
        # of the (shape-specialised) compiled Sinkhorn
        width = min(-(-_width(mask) // 8) * 8, mask.shape[1])
        return tok[:, :width], mask[:, :width]


def _score_images(
    bundle: Any,
    images: np.ndarray,
    own: np.ndarray | None,
    pool: PoolFeatures,
    source: _TokenSource,
    config: MatchConfig,
    device: torch.device,
    timer: _Timer,
    progress: bool,
    bank: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Embed, prune (against the whole pool, or `bank`'s rows) and score this process's
    images, one batch at a time.

    Returns, per image: the k candidates, cos / s_OT for the candidates plus
    (last column, when own is given) the own caption, and the global embedding.
    """
    n, k = len(images), config.k
    cols = k + (own is not None)
    cand = np.empty((n, k), np.int64)
    emb = np.empty((n, pool.embeddings.shape[1]), np.float32)
    cos = np.empty((n, cols), np.float32)
    ots = np.full((n, cols), np.nan, np.float32)
    bar = _progress(n, "match images", progress)
    for start in range(0, n, config.image_batch):
        stop = min(start + config.image_batch, n)
        with timer("embed_images"):
            pixels = image_transform(images[start:stop], bundle.image_size).to(device)
            g, patches = encode_image_fine(bundle.model, pixels)
            g = F.normalize(g.float(), dim=-1).cpu().numpy()
            patches = patches.float()
        emb[start:stop] = g
        with timer("prune"):
            searched = pool.embeddings if bank is None else bank[1]
            idx, sim = otmatch.topk(np.ascontiguousarray(g), searched, k, config.threads)
            if bank is not None:
                idx = bank[0][idx]  # bank rows -> pool rows
        cand[start:stop] = idx
        cos[start:stop, :k] = sim
        columns = idx
        if own is not None:
            mine = np.maximum(own[start:stop], 0)  # -1 (no own caption): a stand-in, NaN below
            cos[start:stop, k] = np.einsum("nd,nd->n", g, pool.embeddings[mine])
            columns = np.concatenate([idx, mine[:, None]], axis=1)
        if config.alpha < 1:
            with timer("score"):
                ots[start:stop] = _score_block(patches, columns, source, config)
        if own is not None:
            none = own[start:stop] < 0
            cos[start:stop, k][none] = np.nan
            ots[start:stop, k][none] = np.nan
        bar.update(stop - start)
        if (start // config.image_batch + 1) % _TRIM_EVERY == 0:
            trim_heap()
    bar.close()
    return {"candidates": cand, "cos": cos, "ot": ots, "embeddings": emb}


def _score_block(
    patches: torch.Tensor, columns: np.ndarray, source: _TokenSource, config: MatchConfig
) -> np.ndarray:
    """s_OT of images (n, P, D) against the pool rows `columns` (n, c), in bounded batches.

    Each batch holds about `score_batch` pairs; the captions it needs are fetched
    once each, and every image's costs against all its candidates are one matrix
    product (`ot_similarity_candidates`).
    """
    n, c = columns.shape
    out = np.empty((n, c), np.float32)
    step = max(1, config.score_batch // max(c, 1))
    for s in range(0, n, step):
        block = columns[s : s + step]
        rows, inverse = np.unique(block, return_inverse=True)
        tok, mask = source.fetch(rows)
        cand = torch.from_numpy(inverse.reshape(block.shape).astype(np.int64)).to(tok.device)
        sim = ot_similarity_candidates(
            patches[s : s + len(block)],
            tok,
            cand,
            None,
            mask,
            eps=config.eps,
            iters=config.iters,
            tol=config.tol,
            rho=config.rho,
        )
        out[s : s + len(block)] = sim.float().cpu().numpy()
    return out


def _assign(
    local: dict[str, np.ndarray], own: np.ndarray | None, config: MatchConfig
) -> MatchResult:
    cand, cos, ots = local["candidates"], local["cos"], local["ot"]
    n, k = cand.shape
    alpha = float(config.alpha)
    total = cos if alpha >= 1 else (alpha * cos + (1.0 - alpha) * ots).astype(np.float32)
    rows = np.arange(n)
    cand_total = np.ascontiguousarray(total[:, :k])
    nan = np.full(n, np.nan, np.float32)
    has_own = np.zeros(n, bool) if own is None else own >= 0
    if own is not None:
        own_cos, own_ot, own_total = cos[:, k].copy(), ots[:, k].copy(), total[:, k].copy()
        # the own caption among the candidates: take its candidate column, so that
        # the same pair never carries two (float-noise) different scores
        hit = cand == own[:, None]
        inside = hit.any(axis=1)
        col = hit.argmax(axis=1)
        own_cos[inside] = cos[rows, col][inside]
        own_ot[inside] = ots[rows, col][inside]
        own_total[inside] = total[rows, col][inside]
    else:
        own_cos = own_ot = own_total = nan
        inside = np.zeros(n, bool)
    best_col = cand_total.argmax(axis=1) if k else np.zeros(n, np.int64)
    best = cand[rows, best_col]
    best_score = cand_total[rows, best_col]
    if own is not None:
        suspicious = has_own & (own_total < best_score - np.float32(config.margin))
        if config.flag_outside_topk:
            suspicious |= has_own & ~inside
        # -inf: the engine never keeps that own caption (no caption, or distrusted)
        assign_own_scores = np.where(has_own, own_total, -np.inf).astype(np.float32)
        if config.flag_outside_topk:
            assign_own_scores[~inside] = -np.inf
    else:
        suspicious = np.zeros(n, bool)
        assign_own_scores = None
    a = otmatch.assign(
        cand,
        cand_total,
        own=own,
        own_scores=assign_own_scores,
        method=config.method,
        capacity=config.capacity,
        margin=float(config.margin),
        fallback=config.fallback,
    )
    caption = np.asarray(a.caption, dtype=np.int64)
    hit = cand == caption[:, None]
    found = hit.any(axis=1)
    col = hit.argmax(axis=1)

    def pick(values: np.ndarray, own_values: np.ndarray) -> np.ndarray:
        out = np.where(found, values[rows, col], np.nan).astype(np.float32)
        if own is not None:
            kept = ~found & has_own & (caption == own)
            out[kept] = own_values[kept]
        return out

    changed = np.asarray(a.changed, dtype=bool) if own is not None else np.zeros(n, bool)
    if own is not None and config.max_changed < 1.0:
        lead = np.where(has_own, best_score - own_total, np.inf)
        caption, changed = _within_budget(caption, changed, own, lead, config.max_changed)
    return MatchResult(
        caption=caption,
        changed=changed,
        global_score=pick(cos[:, :k], own_cos),
        ot_score=pick(ots[:, :k], own_ot),
        score=pick(cand_total, own_total),
        own_global_score=own_cos.astype(np.float32),
        own_ot_score=own_ot.astype(np.float32),
        own_score=own_total.astype(np.float32),
        best=best,
        best_score=best_score.astype(np.float32),
        suspicious=suspicious,
        candidates=cand,
        candidate_scores=cand_total,
        stats=dict(a.stats),
    )


def _within_budget(
    caption: np.ndarray, changed: np.ndarray, own: np.ndarray, lead: np.ndarray, share: float
) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most `share` of the images re-paired: those whose own caption trails most.

    A weak model's re-pairings are mostly wrong, and training on them teaches the
    next round the same mistakes; a budget bounds that drift to the pairs the
    score doubts most. Images without an own caption are always kept re-paired.
    The order is stable (ties go to the lower row), so a round stays deterministic.
    """
    limit = int(math.floor(share * len(caption)))
    rows = np.flatnonzero(changed)
    if len(rows) <= limit:
        return caption, changed
    order = rows[np.argsort(-lead[rows], kind="stable")]
    back = order[limit:]
    caption, changed = caption.copy(), changed.copy()
    caption[back] = own[back]
    changed[back] = False
    return caption, changed


def _report(
    result: MatchResult,
    own: np.ndarray | None,
    poisoned: np.ndarray | None,
    image_classes: np.ndarray | None,
    caption_classes: np.ndarray | None,
    config: MatchConfig,
    pool_size: int,
) -> dict[str, Any]:
    n = len(result)
    changed = int(result.changed.sum())
    report: dict[str, Any] = {
        "images": n,
        "pool": pool_size,
        "k": config.k,
        "changed": changed,
        "changed_share": _share(changed, n),
        "suspicious": int(result.suspicious.sum()),
        "unassigned": int((result.caption < 0).sum()),
        "distinct": int(len(np.unique(result.caption[result.caption >= 0]))),
    }
    if own is not None:
        outside = (own >= 0) & ~(result.candidates == own[:, None]).any(axis=1)
        report["own_outside_topk"] = int(outside.sum())
    if poisoned is not None:
        clean = ~poisoned
        report["poisoned"] = int(poisoned.sum())
        report["poison_broken"] = _share(int(result.changed[poisoned].sum()), int(poisoned.sum()))
        report["clean_kept"] = _share(int((~result.changed[clean]).sum()), int(clean.sum()))
        report["changed_precision"] = _share(int(result.changed[poisoned].sum()), changed)
    if image_classes is not None and caption_classes is not None:
        clean = np.ones(n, bool) if poisoned is None else ~poisoned
        after = _true_content(result.caption, image_classes, caption_classes)
        report["clean_true_content"] = _share(int(after[clean].sum()), int(clean.sum()))
        if own is not None:
            before = _true_content(own, image_classes, caption_classes)
            report["clean_true_content_before"] = _share(int(before[clean].sum()), int(clean.sum()))
    return report


def _true_content(
    caption: np.ndarray, image_classes: np.ndarray, caption_classes: np.ndarray
) -> np.ndarray:
    """Whether each image's caption names exactly the classes the image shows."""
    assigned = caption >= 0
    out = np.zeros(len(caption), bool)
    rows = np.flatnonzero(assigned)
    out[rows] = (caption_classes[caption[rows]] == image_classes[rows]).all(axis=1)
    return out


def _share(part: int, whole: int) -> float:
    return float(part) / whole if whole else float("nan")


def _encode_texts(
    bundle: Any, captions: Sequence[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised global (B, D) float32, word tokens (B, L, D) and mask (B, L) bool."""
    tokens = bundle.tokenizer(list(captions)).to(device)
    g, t, mask = encode_text_fine(bundle.model, tokens)
    return F.normalize(g.float(), dim=-1), F.normalize(t.float(), dim=-1), mask.to(torch.bool)


def _width(mask: torch.Tensor | np.ndarray) -> int:
    """Token positions up to the last real token of any row (at least 1)."""
    cols = torch.as_tensor(mask).any(dim=0).nonzero()
    return int(cols.max().item()) + 1 if len(cols) else 1


def _fit_width(array: np.ndarray, width: int) -> np.ndarray:
    """Cut or zero-pad axis 1 to `width`, contiguous (what a gather sends)."""
    if array.shape[1] >= width:
        return np.ascontiguousarray(array[:, :width])
    out = np.zeros((array.shape[0], width, *array.shape[2:]), array.dtype)
    out[:, : array.shape[1]] = array
    return out


def _gather(array: np.ndarray, use_dist: bool) -> np.ndarray:
    return dist.all_gather_concat(array) if use_dist else array


def _use_distributed(flag: bool | None) -> bool:
    available = dist.is_initialized() and dist.world_size() > 1
    return available if flag is None else (flag and available)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give every submodule back the mode it was in.

    A trainer calls the round mid-training, possibly with parts frozen in eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Timer:
    """Wall-clock seconds per stage, summed over batches."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- input checks


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_captions(captions: Sequence[str]) -> Sequence[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
    if len(captions) == 0:
        raise ValueError("the caption pool is empty")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(
            f"{len(bad)} pool captions are empty or not text (e.g. pool rows {bad[:5]})"
        )
    return captions


def _check_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError("images must be a uint8 numpy array (N, H, W) or (N, H, W, 3)")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {images.shape}")
    if len(images) == 0:
        raise ValueError("no images to match")
    return images


def _check_index_array(name: str, value: np.ndarray | None, n: int, m: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be integer pool indices of shape ({n},), got {arr.dtype} {arr.shape}"
        )
    if n and (arr.min() < -1 or arr.max() >= m):
        raise ValueError(
            f"{name} must index the pool: values in [0, {m}) or -1 for none, got "
            f"[{arr.min()}, {arr.max()}]"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_mask(name: str, value: np.ndarray | None, n: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1)")
        arr = arr.astype(bool)
    return arr


def _check_classes(
    image_classes: np.ndarray | None, caption_classes: np.ndarray | None, n: int, m: int
) -> None:
    if (image_classes is None) != (caption_classes is None):
        raise ValueError("image_classes and caption_classes go together (both or neither)")
    if image_classes is None or caption_classes is None:
        return
    ic, cc = np.asarray(image_classes), np.asarray(caption_classes)
    if ic.ndim != 2 or len(ic) != n:
        raise ValueError(f"image_classes must be (N={n}, C), got {ic.shape}")
    if cc.ndim != 2 or len(cc) != m or cc.shape[1] != ic.shape[1]:
        raise ValueError(f"caption_classes must be (M={m}, C={ic.shape[1]}), got {cc.shape}")


def _normalised_embeddings(emb: np.ndarray, m: int, embed_dim: int | None) -> np.ndarray:
    arr = np.asarray(emb)
    if arr.ndim != 2 or len(arr) != m:
        raise ValueError(f"pool embeddings must be (M={m}, D), got {arr.shape}")
    if embed_dim is not None and arr.shape[1] != embed_dim:
        raise ValueError(
            f"pool embeddings are {arr.shape[1]} wide but the model embeds in {embed_dim} "
            "dimensions: they come from another model"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("pool embeddings contain NaN or inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(
            f"pool embeddings have zero rows (e.g. {np.flatnonzero(norms[:, 0] == 0)[:5].tolist()})"
        )
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def _check_pool(pool: PoolFeatures, m: int, embed_dim: int | None, needs_tokens: bool) -> None:
    if len(pool) != m:
        raise ValueError(f"pool features hold {len(pool)} captions, the pool has {m}")
    if embed_dim is not None and pool.embeddings.shape[1] != embed_dim:
        raise ValueError(
            f"pool features are {pool.embeddings.shape[1]} wide, the model {embed_dim}"
        )
    if pool.embeddings.dtype != np.float32 or not pool.embeddings.flags.c_contiguous:
        raise TypeError("pool embeddings must be float32, C-contiguous (use embed_pool)")
    if needs_tokens and (pool.tokens is None) != (pool.mask is None):
        raise ValueError("pool tokens and mask go together")
