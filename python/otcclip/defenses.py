"""The training strategies behind one small interface: none, roclip, safeclip, otcclip, filter.

The loop (`otcclip.train`) asks a defense two things:
- `before_epoch(ctx, epoch) -> EpochPlan`: which rows to train on this epoch,
  which caption each image is paired with, which views to encode (augmented
  images/captions), and a learning-rate factor. Matching rounds, SafeCLIP's
  safe/risky split and the like run here, on every process (each helper they
  call is distributed-aware and returns the same answer on every rank).
- `loss(ctx, plan, batch, feats) -> {name: tensor}`: the weighted loss terms of
  one step, from the features of the whole global batch (see `otcclip.losses`
  for how rows are split between processes). `after_step` sees the detached
  features afterwards (RoCLIP's caption bank).
A defense keeps what must survive a restart in `state_dict()`.

Schedules share two knobs: `warmup_epochs` W (epochs before the defense first
intervenes) and `match_every` R (its period). None = the defense's own default,
listed in DEFAULTS.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from otcclip import distributed as dist
from otcclip.heap import trim_heap
from otcclip.losses import clip_loss, ot_info_nce

if TYPE_CHECKING:
    from otcclip.data import PairTable
    from otcclip.train import TrainConfig

__all__ = [
    "DEFAULTS",
    "DEFENSES",
    "Batch",
    "Defense",
    "EpochPlan",
    "Features",
    "FilterDefense",
    "NoDefense",
    "OTCCLIPDefense",
    "RoCLIPDefense",
    "SafeCLIPDefense",
    "TrainContext",
    "make_defense",
    "schedule",
]

# Where an OTCCLIP round starts from, and what happens to the pairs it doubts.
REMATCH_FROM = ("original", "previous", "sticky")
ON_DOUBT = ("drop", "repair")
# How a round decides which pairs to doubt: the fused doubt score, or the match margin.
DOUBT = ("fused", "match")

# Each defense's schedule defaults: W (warm-up epochs) and R (period), used when
# the config leaves them at None.
DEFAULTS: dict[str, dict[str, int]] = {
    "none": {"warmup_epochs": 0, "match_every": 0},
    # RoCLIP: a 4-epoch warm-up had the best validation zero-shot of the probes after 8
    # epochs (70.0% against 46.0% for 3; TUNING.md, session 7; 1 was the earlier default)
    "roclip": {"warmup_epochs": 4, "match_every": 2},
    "safeclip": {"warmup_epochs": 1, "match_every": 1},
    "otcclip": {"warmup_epochs": 2, "match_every": 1},
    "filter": {"warmup_epochs": 2, "match_every": 0},
}


@dataclass
class TrainContext:
    """What a defense may use: the run's config, model, data and process layout."""

    config: TrainConfig
    bundle: Any
    table: PairTable
    device: torch.device
    rank: int = 0
    world: int = 1
    poisoned: np.ndarray | None = None
    manifests: list[Any] = field(default_factory=list)
    progress: bool = False
    log: Callable[[str], None] = print
    # streamed runs hold no table: the training images' side, where the data records it
    image_side: int | None = None
    # the pairs an epoch trains (len(table), or the stream's count): set by the trainer
    n_pairs: int | None = None
    # a streamed run's data (`data.loader.StreamFeed`): the pixel pass reads it whole
    stream: Any = None

    @property
    def pairs(self) -> int:
        return self.n_pairs if self.n_pairs is not None else len(self.table)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class EpochPlan:
    """One epoch's training set and how to present it.

    positions: table rows trained this epoch (the loop shuffles them);
    caption: int64 (N,) pool index (table row) of each image's caption, -1 = not trained;
    augment_images / augment_text: augment view 0 of the images / captions;
    image_views / text_views: 2 = also encode an independently augmented view 1;
    safe: bool (N,) SafeCLIP's safe set (None: every pair is safe);
    groups: int per position: batches never mix groups (None: one shuffled pool);
    lr_scale: factor on the scheduled learning rate; phase: a name for the logs;
    info: metrics of the epoch's preparation (reassignment counts, ...).
    """

    positions: np.ndarray
    caption: np.ndarray
    phase: str = "clip"
    augment_images: bool = False
    augment_text: bool = False
    image_views: int = 1
    text_views: int = 1
    safe: np.ndarray | None = None
    lr_scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)
    groups: np.ndarray | None = None
    switch_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "caption": self.caption,
            "phase": self.phase,
            "augment_images": self.augment_images,
            "augment_text": self.augment_text,
            "image_views": self.image_views,
            "text_views": self.text_views,
            "safe": self.safe,
            "lr_scale": self.lr_scale,
            "info": self.info,
            "groups": self.groups,
            "switch_step": self.switch_step,
        }

    @staticmethod
    def from_state(state: dict[str, Any]) -> EpochPlan:
        return EpochPlan(**state)


@dataclass
class Batch:
    """One global batch: its table rows, this process's rows, and pairing facts."""

    epoch: int
    step: int
    positions: np.ndarray
    rows: slice
    caption_ids: Tensor
    safe: Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.positions)


@dataclass
class Features:
    """The global batch's features (gathered over processes, with gradients).

    image[v] = (global (B, D), patch tokens (B, P, D)) of image view v;
    text[v] = (global (B, D), word tokens (B, L, D), mask (B, L)) of caption view v.
    """

    image: list[tuple[Tensor, Tensor]]
    text: list[tuple[Tensor, Tensor, Tensor]]
    logit_scale: Tensor


class Defense:
    """Plain CLIP on the original pairs; the base of the other strategies."""

    name = "none"
    # whether it can train from a stream, which holds no table (`stream_plan`)
    streams = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self._directory: Path | None = None  # `_state_dir`
        self.streamed: Any = None  # stream_rounds.StreamedRounds, on a stream
        resolved = schedule(self.name, config)
        self.warmup_epochs = resolved["warmup_epochs"]
        self.match_every = resolved["match_every"]

    def setup(self, ctx: TrainContext) -> None:
        """Called once before training (and before `load_state_dict` on resume)."""

    def _state_dir(self, ctx: TrainContext) -> Path | None:
        """Where per-pair state lives in memory-mapped files (`--state-on-disk`: in the run's
        folder, one per process), else None: in memory. Kept for `load_state_dict`."""
        c = self.config
        self._directory = (
            Path(c.out) / "matching-state" / f"rank{ctx.rank}"
            if c.state_on_disk and c.out is not None
            else None
        )
        return self._directory

    def _open_stream_state(self, ctx: TrainContext) -> None:
        """A streamed defense's per-pair state, by slot (`stream_rounds.StreamedRounds`)."""
        from otcclip.stream_rounds import StreamedRounds

        self.streamed = StreamedRounds(ctx.pairs, int(ctx.bundle.embed_dim), self._state_dir(ctx))

    def _restore_stream_state(self, state: dict[str, Any]) -> None:
        """The saved stream state, in memory or mapped anew in `_state_dir`."""
        from otcclip.stream_rounds import StreamedRounds

        self.streamed = None  # the mapping it replaces goes before the files are made anew
        self.streamed = StreamedRounds.from_state(state, self._directory)

    def _keep_batch(self, batch: Batch, feats: Features) -> None:
        """Keep a trained batch's global image and caption embeddings by slot: the
        gathered batch's, so every process keeps the same state."""
        image = feats.image[0][0].float().cpu().numpy()
        text = feats.text[0][0].float().cpu().numpy()
        self.streamed.write(batch.positions, image, text, batch.epoch)

    def before_epoch(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        n = len(ctx.table)
        return EpochPlan(
            positions=np.arange(n, dtype=np.int64), caption=np.arange(n, dtype=np.int64)
        )

    @classmethod
    def check_stream(cls, config: TrainConfig) -> None:
        """Refuse, with how to fix it, settings this defense cannot honour on a stream."""

    def stream_plan(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        """The epoch's plan when the pairs are streamed: the stream decides which pairs, in
        what order, so the plan holds no rows; only its phase and augmentation count."""
        if not self.streams:
            raise ValueError(f"defense {self.name!r} needs every pair in memory; it cannot stream")
        return EpochPlan(positions=np.zeros(0, dtype=np.int64), caption=np.zeros(0, dtype=np.int64))

    def loss(
        self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features
    ) -> dict[str, Tensor]:
        img, txt = feats.image[0][0], feats.text[0][0]
        return {
            "clip": clip_loss(img, txt, feats.logit_scale, rows=batch.rows, ids=batch.caption_ids)
        }

    def after_step(self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features) -> None:
        """Sees the step's features, detached (e.g. to update a bank)."""

    def step_lr(self, plan: EpochPlan, epoch: int, step: int, scheduled: float) -> float:
        """The learning rate of one step, given the schedule's (SafeCLIP's low-lr phase)."""
        return scheduled * plan.lr_scale

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Let go of what the run keeps outside its memory; the trainer calls it when training
        has ended (a run that raised leaves it to the garbage collector)."""

    def intervenes(self, epoch: int) -> bool:
        """Whether epoch (0-based) is one of the defense's rounds: e >= W, every R epochs."""
        r = self.match_every
        return r > 0 and epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % r == 0


class NoDefense(Defense):
    name = "none"
    streams = True


class OTCCLIPDefense(Defense):
    """OTCCLIP (our reading of Zhang et al., EMNLP 2025): OT caption re-matching + OT losses.

    Loss on the current pairs (i, pi(i)):
        L = L_CLIP + lambda_inter * L_inter + lambda_intra * L_intra
    L_inter: OT-InfoNCE between patch tokens and word tokens, over each image's
    positive and its m hardest in-batch negatives by global similarity, trained
    from the first epoch (the first probe found the OT score useless for
    matching unless the tokens are trained for it). L_intra (off by default,
    weight 0, since it costs a second image forward): OT-InfoNCE between two
    augmented views of each image, and between each caption and an augmented copy.

    Re-matching: after W warm-up epochs, every R epochs, `matching.match_round`
    scores every image against pool captions by S = alpha*cos + (1-alpha)*s_OT.
    Which pairs it doubts (`doubt`):
    - "fused" (default): the fused score of `otcclip.doubt`, which adds to the
      round's cross-modal lead signals the poison cannot rewrite (pixel
      density, neighbourhood consistency in both directions); a label-free
      two-component mixture sets the share, between `doubt_min_share` and
      `max_repair`. The cross-modal score alone fades as the model learns the
      poison (DESIGN.md, section 8).
    - "match" (the paper's rule): the pairs whose own caption a candidate beats
      by more than `margin` (with `flag_outside_topk`, also every image whose
      own caption is not among its k nearest), at most `max_repair` of the
      images, those whose own caption trails most (without the budget each
      round doubts more clean pairs as the model learns the previous rounds'
      choices; TUNING.md).
    With the fused doubt, the warm-up is screened too (`pixel_screen`): the
    pairs the pixel signals alone doubt (a target's copies, a patch trigger)
    sit it out, since those signals need no model and what the warm-up learns
    the later cross-modal scores stop doubting.
    A doubted pair sits the epoch out (`on_doubt="drop"`, default) or is
    re-paired with its best candidate (`"repair"`, the paper's re-assignment):
    at our scale a re-paired clean pair almost never gets a caption of its true
    content, so re-pairing adds label noise that leaving out does not
    (TUNING.md, session 4). A round starts from the ORIGINAL captions
    (`rematch_from="original"`, default: the probe saw clean pairs drift from
    their true captions when each round started from the previous one), from
    the previous assignment ("previous"), or from the original caption until a
    round doubts the pair and from its latest pairing after that ("sticky": a
    poison caught once cannot come back when the model later learns its
    copies; with "drop", a pair left out once stays out). Images left
    unassigned (capacity with fallback "unassigned") sit the epoch out.
    """

    name = "otcclip"
    # with round_embeddings="training" and on_doubt="drop" (`check_stream`,
    # `otcclip.stream_rounds`)
    streams = True

    @classmethod
    def check_stream(cls, config: TrainConfig) -> None:
        if config.round_embeddings != "training":
            raise ValueError(
                "--stream with --defense otcclip needs --round-embeddings training: a stream "
                "cannot embed every pair again for a round, so the round reads the "
                "embeddings the training pass kept"
            )
        if config.on_doubt != "drop":
            raise ValueError(
                "--stream with --defense otcclip needs --on-doubt drop: re-pairing needs the "
                "chosen caption's pair at hand, which a stream does not hold"
            )
        if schedule(cls.name, config)["warmup_epochs"] < 1:
            raise ValueError(
                "--stream with --defense otcclip needs --warmup-epochs >= 1: a streamed round "
                "judges the pairs from the embeddings training kept, so one epoch must have "
                "streamed them first"
            )

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.rematch_from not in REMATCH_FROM:
            raise ValueError(
                f"rematch_from must be one of {', '.join(REMATCH_FROM)}, "
                f"got {config.rematch_from!r}"
            )
        if config.on_doubt not in ON_DOUBT:
            raise ValueError(
                f"on_doubt must be one of {', '.join(ON_DOUBT)}, got {config.on_doubt!r}"
            )
        if config.doubt not in DOUBT:
            raise ValueError(f"doubt must be one of {', '.join(DOUBT)}, got {config.doubt!r}")
        self.match_config()  # a bad matching knob fails now, not after the warm-up
        if config.doubt == "fused":
            self.doubt_config()
        self.assignment: np.ndarray | None = None
        self.doubted: np.ndarray | None = None  # re-paired or dropped by some round
        self.history: Any = None
        self.rounds = 0
        self.pixels: Any = None  # doubt.PixelEvidence, computed once, kept in the state
        # a stream's evidence waits on disk between rounds (`_spill`): its folder, and the
        # process's rank that names it
        self._evidence_dir: Any = None  # tempfile.TemporaryDirectory
        self._rank = 0
        self.pixel_pass: dict[str, float] = {}  # a stream's pass: its cost, for the report
        self.screened: np.ndarray | None = None  # left out of the warm-up by the pixels
        # round_embeddings=training: the training pass's embeddings per pair
        self.kept: Any = None  # matching_state.MatchingState

    def setup(self, ctx: TrainContext) -> None:
        from otcclip.otmatch import History

        n = ctx.pairs
        if self.config.k > n:
            raise ValueError(f"k = {self.config.k} candidates, but the data has only {n} captions")
        if ctx.table is None:
            self._open_stream_state(ctx)
            self.screened = None
            self._rank = ctx.rank
            return
        self.assignment = np.arange(n, dtype=np.int64)
        self.doubted = np.zeros(n, dtype=bool)
        self.history = History()
        self.history.record(0, ctx.table.ids, ctx.table.ids)
        self.rounds = 0
        self.screened = None
        if self.config.round_embeddings == "training":
            from otcclip.matching_state import MatchingState

            self.kept = MatchingState(n, int(ctx.bundle.embed_dim), self._state_dir(ctx))

    def match_config(self, round_index: int = 0) -> Any:
        """The matching knobs of a round; a bank (`match_bank`) is drawn anew each round."""
        from otcclip.matching import MatchConfig

        c = self.config
        return MatchConfig(
            k=c.k,
            alpha=c.alpha,
            eps=c.match_eps if c.match_eps is not None else c.eps,
            iters=c.match_iters if c.match_iters is not None else c.iters,
            rho=c.ot_rho,
            method=c.assign,
            capacity=c.capacity,
            margin=c.margin,
            max_changed=c.max_repair,
            fallback=c.fallback,
            flag_outside_topk=c.flag_outside_topk,
            image_batch=c.match_batch,
            text_batch=c.match_batch,
            threads=c.threads,
            bank=c.match_bank,
            seed=c.seed + round_index,
        )

    def before_epoch(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        assert self.assignment is not None, "setup() first"
        info = self._prepare(ctx, epoch)
        positions = np.flatnonzero(self.assignment >= 0).astype(np.int64)
        return self._plan(positions, self.assignment.copy(), info)

    def stream_plan(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        assert self.streamed is not None, "setup() on a stream first"
        info = self._prepare(ctx, epoch)
        none = np.zeros(0, dtype=np.int64)  # a stream's plan names no rows
        return self._plan(none, none, info)

    def _prepare(self, ctx: TrainContext, epoch: int) -> dict[str, Any]:
        """What comes before an epoch: a round when one is due, else the warm-up's screen
        once (with a pixel signal fused), else nothing; returns its report."""
        if self.intervenes(epoch):
            # the epoch's freed autograd and batch buffers go back to the system first: the
            # round's large arrays are mapped afresh and could not reuse them (otcclip.heap)
            trim_heap()
            if self.streamed is None:
                return self._round(ctx, epoch)
            report = self._stream_round(ctx, epoch)
        elif self.rounds == 0 and self.screened is None and self.screens():
            report = self._screen(ctx)
        else:
            return {}
        if self._evidence_dir is not None:  # the training that follows never reads it
            self.pixels = None
        return report

    def _plan(self, positions: np.ndarray, caption: np.ndarray, info: dict) -> EpochPlan:
        intra = self.config.lambda_intra > 0
        return EpochPlan(
            positions=positions,
            caption=caption,
            phase="matched" if self.rounds else "warmup",
            augment_images=intra,
            image_views=2 if intra else 1,
            text_views=2 if intra else 1,
            info=info,
        )

    def _stream_round(self, ctx: TrainContext, epoch: int) -> dict[str, Any]:
        """A round on a stream (`otcclip.stream_rounds`): the pairs streamed so far, judged
        from their kept embeddings by slot; the doubted sit out until the next round."""
        import time

        from otcclip.attacks import poisoned_ids
        from otcclip.doubt import PixelEvidence

        assert self.streamed is not None
        c, s = self.config, self.streamed
        start = time.perf_counter()
        slots = s.judged()
        if len(slots) <= c.k:
            raise ValueError(
                f"epoch {epoch + 1}: only {len(slots)} pairs streamed so far, too few for a "
                f"round with k = {c.k}"
            )
        poisoned = np.isin(s.slots.ids[slots], poisoned_ids(ctx.manifests))
        pixels = None
        if c.doubt == "fused":
            pixels = self.pixel_evidence(ctx)
            if len(slots) != len(pixels):  # pairs no epoch has streamed yet wait
                # read from disk, not subset from the mapped whole: that would hold every
                # page the copy read as well as the copy, at the round's peak
                self.pixels = pixels = None
                pixels = PixelEvidence.load(self._evidence_dir.name, rows=slots)
        report, judged = self._stream_match(slots, pixels)
        if c.doubt == "fused":
            signals, seconds = judged
            doubted_now, doubt_report = self._fused_doubt(
                ctx, signals, seconds, pixels=pixels, poisoned=poisoned if ctx.manifests else None
            )
        else:
            doubted_now, doubt_report = judged, {}
        s.apply(slots, doubted_now, sticky=c.rematch_from == "sticky")
        self.rounds += 1
        report.update({k: v for k, v in doubt_report.items() if _is_number(v)})
        report["round"] = self.rounds
        report["judged"] = int(len(slots))
        report["oldest_embedding_epoch"] = s.oldest(slots)
        report["sitting_out"] = int(s.left_out.sum())
        report["doubted_ever"] = int(s.doubted.sum())
        if ctx.manifests:
            report["left_out_poisoned"] = int((doubted_now & poisoned).sum())
            report["left_out_clean"] = int((doubted_now & ~poisoned).sum())
        report["seconds_by_stage"]["round"] = time.perf_counter() - start
        return report

    def _stream_match(self, slots: np.ndarray, pixels: Any) -> tuple[dict[str, Any], Any]:
        """A streamed round's matching of `slots` (each its own caption's row), and what
        the verdict reads from it: with the fused doubt, its signals and their seconds;
        with the match doubt, the pairs whose own caption lost.

        Apart from `_stream_round` so that the round's float32 embeddings and candidate
        lists are gone before the verdict, and the candidate lists (N x k) before the
        signals' self-joins: each step's temporaries then come on top of less.
        """
        import dataclasses
        import time

        from otcclip.doubt import doubt_signals
        from otcclip.matching import match_embeddings

        assert self.streamed is not None
        own = np.arange(len(slots), dtype=np.int64)
        config = dataclasses.replace(self.match_config(self.rounds), alpha=1.0)
        result = match_embeddings(*self.streamed.kept.embeddings(slots), own, config)
        report = {k: v for k, v in result.report.items() if _is_number(v)}
        report["seconds_by_stage"] = dict(result.report.get("seconds", {}))
        if self.config.doubt != "fused":
            return report, np.asarray(result.caption) != own
        lead, image_emb = _lead(result), result.image_embeddings
        caption_emb = result.pool_embeddings  # each pair's own caption: own is 0..N-1
        del result
        start = time.perf_counter()
        signals = doubt_signals(
            image_emb, caption_emb, self.doubt_config(), pixels=pixels, lead=lead
        )
        return report, (signals, time.perf_counter() - start)

    def _round(self, ctx: TrainContext, epoch: int) -> dict[str, Any]:
        import time

        from otcclip.doubt import doubt_signals

        assert self.assignment is not None and self.doubted is not None, "setup() first"
        c = self.config
        table = ctx.table
        n = len(table)
        original = np.arange(n, dtype=np.int64)
        own = original
        if c.rematch_from == "previous":
            own = np.where(self.assignment >= 0, self.assignment, original)
        elif c.rematch_from == "sticky":
            own = np.where(self.doubted & (self.assignment >= 0), self.assignment, original)
        if self.kept is not None:
            result = self._match_kept(ctx, own, epoch)
        else:
            result = self._match_model(ctx, own)
        caption = np.asarray(result.caption, dtype=np.int64).copy()
        doubted_now = caption != own
        doubt_report: dict[str, Any] = {}
        if c.doubt == "fused":
            pixels = self.pixel_evidence(ctx)
            start = time.perf_counter()
            signals = doubt_signals(
                result.image_embeddings,
                np.ascontiguousarray(result.pool_embeddings[own]),
                self.doubt_config(),
                pixels=pixels,
                lead=_lead(result),
            )
            doubted_now, doubt_report = self._fused_doubt(
                ctx, signals, time.perf_counter() - start, pixels=pixels
            )
            best = np.asarray(result.best, dtype=np.int64)
            if self.kept is not None and c.on_doubt == "repair":
                best = self._rescore(ctx, own, doubted_now, best, result)
            caption = np.where(doubted_now, best, own)
        if c.on_doubt == "drop":
            caption = np.where(doubted_now, -1, own)
            if c.rematch_from == "sticky":
                caption[self.doubted] = -1
        self.doubted |= doubted_now
        self.assignment = caption
        self.rounds += 1
        assigned = self.assignment >= 0
        caption_ids = np.where(assigned, table.ids[np.maximum(self.assignment, 0)], -1)
        self.history.record(self.rounds, table.ids, caption_ids.astype(np.int64))
        report = {k: v for k, v in result.report.items() if _is_number(v)}
        report["round"] = self.rounds
        report["changed_from_original"] = int((self.assignment != original).sum())
        report["sitting_out"] = int((self.assignment < 0).sum())
        report["doubted_ever"] = int(self.doubted.sum())
        report.update(_off_original_by_attack(ctx, self.assignment != original))
        report.update({k: v for k, v in doubt_report.items() if _is_number(v)})
        report.update(_applied(ctx, doubted_now, self.assignment))
        report["seconds_by_stage"] = result.report.get("seconds", {})
        return report

    def _match_model(self, ctx: TrainContext, own: np.ndarray) -> Any:
        """The round with every pair embedded again by the model (`match_round`)."""
        from otcclip.matching import match_round

        table = ctx.table
        with_classes = table.image_classes is not None and table.caption_classes is not None
        return match_round(
            ctx.bundle,
            table.images,
            table.captions,
            own,
            self.match_config(self.rounds),
            poisoned=ctx.poisoned,
            image_classes=table.image_classes if with_classes else None,
            caption_classes=table.caption_classes if with_classes else None,
            progress=ctx.progress,
        )

    def _match_kept(self, ctx: TrainContext, own: np.ndarray, epoch: int) -> Any:
        """The round from the training pass's embeddings (`round_embeddings="training"`).

        The pairs the last epoch did not train are embedded now, in eval mode, and
        stamped as the last epoch's; then the pruning and the cosine lead come from the
        kept embeddings (`match_embeddings`), with no pass over the data of its own.
        """
        import dataclasses
        import time

        from otcclip.matching import match_embeddings
        from otcclip.models import embed_images, embed_texts

        assert self.kept is not None
        table, c = ctx.table, self.config
        start = time.perf_counter()
        images = self.kept.stale_images(epoch)
        if len(images):
            emb = embed_images(ctx.bundle, table.images[images], batch_size=c.match_batch)
            self.kept.write_images(images, emb, epoch - 1)
        captions = self.kept.stale_captions(epoch)
        if len(captions):
            texts = [table.captions[i] for i in captions]
            emb = embed_texts(ctx.bundle, texts, batch_size=c.match_batch)
            self.kept.write_captions(captions, emb, epoch - 1)
        refresh = time.perf_counter() - start
        image_emb, caption_emb = self.kept.embeddings()
        config = dataclasses.replace(self.match_config(self.rounds), alpha=1.0)
        result = match_embeddings(image_emb, caption_emb, own, config)
        result.report["seconds"] = {"refresh": refresh, **result.report.get("seconds", {})}
        result.report["refreshed_images"] = int(len(images))
        result.report["refreshed_captions"] = int(len(captions))
        return result

    def _rescore(
        self,
        ctx: TrainContext,
        own: np.ndarray,
        doubted: np.ndarray,
        best: np.ndarray,
        result: Any,
    ) -> np.ndarray:
        """The doubted pairs' best candidate by the full score (OT included), computed
        for those pairs only: their images and their candidates' tokens, nothing else."""
        import dataclasses

        from otcclip.matching import match_round

        rows = np.flatnonzero(doubted)
        config = self.match_config(self.rounds)
        if not len(rows) or config.alpha >= 1:
            return best
        sub = match_round(
            ctx.bundle,
            ctx.table.images[rows],
            ctx.table.captions,
            own[rows],
            dataclasses.replace(config, cache_tokens=False),
            pool_embeddings=result.pool_embeddings,
        )
        out = best.copy()
        out[rows] = np.asarray(sub.best, dtype=np.int64)
        result.report["seconds"]["rescore"] = float(sum(sub.report["seconds"].values()))
        return out

    def doubt_config(self) -> Any:
        from otcclip.doubt import DoubtConfig

        c = self.config
        options: dict[str, Any] = {
            "k": c.doubt_k,
            "max_share": c.max_repair,
            "min_share": min(c.doubt_min_share, c.max_repair),
            "threads": c.threads,
            "seed": c.seed,
        }
        if c.doubt_signals:
            options["signals"] = tuple(s.strip() for s in c.doubt_signals.split(",") if s.strip())
        if c.doubt_phase_template is not None:
            options["phase_template"] = c.doubt_phase_template
        if c.doubt_phase_scale is not None:
            options["phase_scale"] = c.doubt_phase_scale
        return DoubtConfig(**options)

    def screens(self) -> bool:
        """Whether the warm-up is screened: fused doubt with a pixel signal, `pixel_screen` on."""
        return self.config.pixel_screen and self.reads_pixels()

    def pixel_evidence(self, ctx: TrainContext) -> Any:
        """The pixels' evidence (`doubt.pixel_evidence`): computed once per run, then kept."""
        if self.pixels is not None:
            return self.pixels
        if self.streamed is None:
            from otcclip.doubt import pixel_evidence

            self.pixels = pixel_evidence(ctx.table.images, self.doubt_config())
            return self.pixels
        if self._evidence_dir is None:
            done = self._stream_pixel_pass(ctx)
            self.pixel_pass = done.report()
            self._spill(done.evidence)
        from otcclip.doubt import PixelEvidence

        self.pixels = PixelEvidence.load(self._evidence_dir.name)
        return self.pixels

    def _spill(self, evidence: Any) -> None:
        """Keep a stream's pixel evidence on disk, in a folder of this process, mapped only
        while the screen or a round reads it (`pixel_evidence`; `_prepare` lets go).

        Training never reads the evidence, yet held in memory it was the largest per-pair
        state of a streamed trainer (about 650 bytes a pair, the kept embeddings 256 at
        D = 64), and training's peak is the trainer's. The folder sits in the run's folder
        (or the system's temporary one), named like the pass's folders, so that one left by
        a killed process goes as theirs do.
        """
        import tempfile

        parent = Path(self.config.out or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        _remove_orphan_passes(parent)
        self._evidence_dir = tempfile.TemporaryDirectory(
            dir=parent, prefix=f".pixel-pass-rank{self._rank}-{os.getpid()}-evidence-"
        )
        evidence.save(self._evidence_dir.name)

    def _stream_pixel_pass(self, ctx: TrainContext) -> Any:
        """A stream's pixel evidence, by slot: every image read once (`otcclip.stream_pixels`).

        The pass runs in a process of its own, so its working memory is the system's
        again before the training's DataLoader workers fork. The grey images wait on disk
        in the run's folder (or a temporary one) until the evidence exists (what a pass
        killed midway left there goes when the next begins). Under torchrun with --out,
        the processes of a node share one pass (`stream_pixels.shared_pixel_evidence`);
        without --out each computes its own. All hold the same evidence and slots.
        """
        import shutil
        import tempfile

        from otcclip.stream_pixels import stream_pixel_evidence

        assert self.streamed is not None and ctx.stream is not None, "a stream's setup() first"
        c = self.config
        ctx.log(
            "pixel pass: reading every image once for the pixel signals "
            f"({', '.join(s for s in self.doubt_config().signals if s.endswith('_pixel'))})"
        )
        if ctx.world > 1 and c.out is not None:
            return self._node_pixel_pass(ctx)
        prefix = f".pixel-pass-rank{ctx.rank}-"
        if c.out is not None:
            Path(c.out).mkdir(parents=True, exist_ok=True)
            for stale in Path(c.out).glob(prefix + "*"):  # a pass killed before it ended
                shutil.rmtree(stale, ignore_errors=True)
        else:  # the system's temporary folder: only the passes of processes now gone
            _remove_orphan_passes(Path(tempfile.gettempdir()))
        prefix += f"{os.getpid()}-"
        with tempfile.TemporaryDirectory(dir=c.out, prefix=prefix) as workdir:
            return stream_pixel_evidence(
                ctx.stream.pairs,
                self.streamed.slots,
                self.doubt_config(),
                workdir=workdir,
                workers=c.workers,
                log=ctx.log,
                progress=ctx.progress,
            )

    def _node_pixel_pass(self, ctx: TrainContext) -> Any:
        """One pass per node, in a folder of the run named for this run and node."""
        import shutil
        import socket
        import uuid

        from otcclip.stream_pixels import shared_pixel_evidence

        c = self.config
        assert c.out is not None and self.streamed is not None and ctx.stream is not None
        run = dist.broadcast_object(uuid.uuid4().hex)  # this run's, the same on every rank
        out = Path(c.out)
        leader = dist.local_rank() == 0
        if leader:
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob(".pixel-pass-*"):  # passes killed before they ended
                if run not in stale.name:
                    shutil.rmtree(stale, ignore_errors=True)
        return shared_pixel_evidence(
            ctx.stream.pairs,
            self.streamed.slots,
            self.doubt_config(),
            folder=out / f".pixel-pass-{run}-{socket.gethostname()}",
            leader=leader,
            followers=dist.local_world_size() - 1,
            workers=c.workers,
            log=ctx.log,
            progress=ctx.progress,
        )

    def reads_pixels(self) -> bool:
        """Whether the fused doubt fuses a pixel signal (the warm-up can then be screened)."""
        from otcclip.doubt import SIGNALS

        c = self.config
        return c.doubt == "fused" and any(
            SIGNALS[s] == "pixel" for s in self.doubt_config().signals
        )

    def _screen(self, ctx: TrainContext) -> dict[str, Any]:
        """Leave out of the warm-up the pairs the pixel signals alone doubt.

        The pixel signals need no model, so there is no reason to let the warm-up
        learn a target's copies or a patch trigger first and unlearn them later:
        what the warm-up learns, the later rounds' cross-modal scores stop doubting
        (DESIGN.md, section 8). The first round judges every pair afresh with every
        signal. The fusion, cut and cap are the round's, over the pixel signals, with
        no least share: data without copies or patches loses nothing to the screen.
        On a stream the screen is by slot, after the pixel pass, and the screened pairs
        stream past masked out of the losses.
        """
        import time

        from otcclip.doubt import pixel_screen

        start = time.perf_counter()
        doubted = pixel_screen(self.pixel_evidence(ctx), self.doubt_config()).doubted
        if self.streamed is None:
            assert self.assignment is not None and self.doubted is not None, "setup() first"
            self.screened = doubted.copy()
            self.doubted |= self.screened
            self.assignment = np.where(self.screened, -1, self.assignment)
            poisoned = ctx.poisoned
        else:
            from otcclip.attacks import poisoned_ids

            s = self.streamed
            self.screened = np.zeros(len(s.left_out), bool)
            self.screened[: len(doubted)] = doubted
            s.doubted |= self.screened
            s.left_out |= self.screened
            poisoned = None  # by slot, from the manifest, for the report only
            if ctx.manifests:
                poisoned = np.isin(s.slots.ids[: len(doubted)], poisoned_ids(ctx.manifests))
        report: dict[str, Any] = {
            "screened": int(doubted.sum()),
            "screen_seconds": time.perf_counter() - start,
            **self.pixel_pass,
        }
        if poisoned is not None:
            hit = int((doubted & poisoned).sum())
            report["screen_precision"] = _share(hit, int(doubted.sum()))
            report["screen_recall"] = _share(hit, int(poisoned.sum()))
        return report

    def _fused_doubt(
        self,
        ctx: TrainContext,
        signals: dict[str, np.ndarray],
        signal_seconds: float,
        *,
        pixels: Any = None,
        poisoned: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Which pairs the fused doubt score leaves out (`otcclip.doubt.decide`), and its
        report.

        signals: `doubt.doubt_signals` of the round (`signal_seconds` to compute). The
        round's cross-modal lead (`_lead`: best candidate over the own caption) is one
        of them; the others read the embeddings the round already computed (each image's
        and its own caption's, row by row) and the pixels' evidence (`pixels`, by the
        round's rows: its copies share verdicts and do not vouch for each other even
        where no pixel signal is fused), so the doubt adds no embedding pass. The poison
        mask, where known, only feeds the report (`poisoned`, by the round's rows: a
        stream's slots).
        """
        import time

        from otcclip.doubt import decide

        if poisoned is None:  # a stream holds no table rows: its round passes its own
            poisoned = ctx.poisoned
        start = time.perf_counter()
        verdict = decide(signals, pixels, self.doubt_config())
        report: dict[str, Any] = {f"doubt_{k}": v for k, v in verdict.report.items()}
        report["doubt_seconds"] = signal_seconds + time.perf_counter() - start
        if poisoned is not None:
            hit = verdict.doubted & poisoned
            report["doubt_precision"] = _share(int(hit.sum()), int(verdict.doubted.sum()))
            report["doubt_recall"] = _share(int(hit.sum()), int(poisoned.sum()))
        return verdict.doubted, report

    def loss(
        self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features
    ) -> dict[str, Tensor]:
        c = self.config
        (ig, ip), (tg, tw, tm) = feats.image[0], feats.text[0]
        valid = None  # on a stream, the pairs a round left out stream past, masked out
        if self.streamed is not None:
            valid = torch.from_numpy(self.streamed.trains(batch.positions)).to(ig.device)
        parts = {
            "clip": clip_loss(
                ig, tg, feats.logit_scale, rows=batch.rows, valid=valid, ids=batch.caption_ids
            )
        }
        scale = feats.logit_scale if c.ot_scale is None else c.ot_scale
        ot = {
            "negatives": c.ot_negatives,
            "eps": c.eps,
            "iters": c.iters,
            "rho": c.ot_rho,
            "rows": batch.rows,
            "valid": valid,
            "duplicate_cos": c.ot_duplicate_cos,
        }
        if c.lambda_inter > 0:
            epoch_rows = len(plan.positions) if self.streamed is None else ctx.pairs
            parts["inter"] = self.inter_weight(batch, epoch_rows) * ot_info_nce(
                ip,
                tw,
                ig,
                tg,
                scale,
                y_mask=tm,
                ids=batch.caption_ids,
                symmetric=c.inter_symmetric,
                **ot,
            )
        if c.lambda_intra > 0:
            (jg, jp), (ug, uw, um) = feats.image[1], feats.text[1]
            image_term = ot_info_nce(ip, jp, ig, jg, scale, **ot)
            text_term = ot_info_nce(
                tw, uw, tg, ug, scale, x_mask=tm, y_mask=um, ids=batch.caption_ids, **ot
            )
            parts["intra"] = c.lambda_intra * 0.5 * (image_term + text_term)
        return parts

    def inter_weight(self, batch: Batch, epoch_rows: int) -> float:
        """lambda_inter, ramped linearly over the first `inter_ramp` epochs (by step).

        With full weight from the first step, L_inter can settle on a patch-word solution
        that the pooled embeddings never share, and training collapses (TUNING.md).
        """
        c = self.config
        if c.inter_ramp <= 0:
            return c.lambda_inter
        steps = max(1, epoch_rows // c.batch_size)
        progress = batch.epoch + batch.step / steps  # epochs done (epoch is 0-based)
        return c.lambda_inter * min(1.0, progress / c.inter_ramp)

    def after_step(self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features) -> None:
        """Keep the step's global embeddings for the next round (round_embeddings=training).

        The features are the global batch's (gathered), so every process keeps the same
        state. The caption written is the one trained, at its own row (a re-paired
        image's caption is another pair's own caption).
        """
        if self.streamed is not None:  # a stream trains each pair with its own caption
            self._keep_batch(batch, feats)
            return
        if self.kept is None:
            return
        image = feats.image[0][0].float().cpu().numpy()
        text = feats.text[0][0].float().cpu().numpy()
        self.kept.write_images(batch.positions, image, batch.epoch)
        self.kept.write_captions(plan.caption[batch.positions], text, batch.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "assignment": self.assignment,
            "doubted": self.doubted,
            "history": self.history.to_bytes() if self.history is not None else b"",
            "rounds": self.rounds,
            "screened": self.screened,
            "pixels": self._pixels_state(),
            "kept": None if self.kept is None else self.kept.state_dict(),
            "streamed": None if self.streamed is None else self.streamed.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from otcclip.otmatch import History

        if state.get("streamed") is not None:
            self._restore_stream_state(state["streamed"])
            self.rounds = int(state["rounds"])
            self._load_pixels(state)
            return
        self.assignment = np.asarray(state["assignment"], dtype=np.int64)
        original = np.arange(len(self.assignment), dtype=np.int64)
        # checkpoints from before `doubted` was kept: what differs from the original
        doubted = state.get("doubted")
        self.doubted = (
            self.assignment != original
            if doubted is None
            else np.asarray(doubted, dtype=bool).copy()
        )
        self.history = History.from_bytes(bytes(state["history"]))
        self.rounds = int(state["rounds"])
        self._load_pixels(state)
        kept = state.get("kept")
        if kept is not None:
            from otcclip.matching_state import MatchingState

            directory, self.kept = self._directory, None
            self.kept = MatchingState.from_state(kept, directory)

    def close(self) -> None:
        if self._evidence_dir is not None:  # the last checkpoint holds the evidence
            self.pixels = None
            self._evidence_dir.cleanup()
            self._evidence_dir = None

    def _pixels_state(self) -> dict[str, np.ndarray] | None:
        if self.pixels is not None:
            return self.pixels.state_dict()
        if self._evidence_dir is not None:  # on disk between rounds
            from otcclip.doubt import PixelEvidence

            return PixelEvidence.load(self._evidence_dir.name).state_dict()
        return None

    def _load_pixels(self, state: dict[str, Any]) -> None:
        screened = state.get("screened")
        self.screened = None if screened is None else np.asarray(screened, dtype=bool).copy()
        pixels = state.get("pixels")
        if pixels is not None:
            from otcclip.doubt import PixelEvidence

            self.pixels = PixelEvidence.from_state(pixels)
            if self.streamed is not None:  # on disk until the next round reads it
                self._spill(self.pixels)
                self.pixels = None


def steps_per_epoch(ctx: TrainContext) -> int:
    """Optimizer steps of an epoch that trains every row (the warm-up's unit)."""
    return max(1, ctx.pairs // ctx.config.batch_size)


def warmup_steps(defense: Defense, ctx: TrainContext) -> int:
    """The warm-up in optimizer steps: `warmup_steps` when set, else W whole epochs.

    Steps, not epochs, because what a warm-up must buy (a model that already ranks
    captions by content) takes a number of updates, whatever the data's size; the
    references' warm-ups are 1-5 epochs of CC3M (thousands of steps), ours a few hundred.
    """
    given = defense.config.warmup_steps
    return int(given) if given is not None else defense.warmup_epochs * steps_per_epoch(ctx)


class RoCLIPDefense(Defense):
    """RoCLIP (Yang et al., NeurIPS 2023), following its public code's mechanism.

    A FIFO bank holds the global embeddings of the most recent `bank_size`
    captions (detached, from the batches just trained). After a warm-up of plain
    CLIP (`warmup_steps`, else W epochs; it may end mid-epoch), in every R-th
    epoch from the one where the warm-up ends (defaults W=4, R=2: the paper's
    "every other epoch"; W=4 had the best validation zero-shot after 8 epochs,
    TUNING.md session 7) each image is paired with its nearest
    bank caption by global cosine (`otmatch.topk`, k=1) and the CLIP loss runs on
    (image, nearest caption); the caption side then carries no gradient, as in the
    reference code. Other epochs train plain CLIP.
    Augmentation: the reference augments images and captions in every epoch
    (`cross_aug`); here `augment="auto"` augments the captions only (`--augment
    both` is the reference's): at our 8-epoch budget the image augmentation alone
    holds plain CLIP near 20% zero-shot for two epochs and at 33% after three,
    against 66% without it, and a lighter one did no better (TUNING.md, session 7).
    Deviations: the bank is refreshed at every step of every epoch (the reference
    refreshes it only in matching epochs, so its first matching steps search stale
    or random entries); augmentations are the position-preserving ones of
    `otcclip.augment` instead of EDA and flips; the bank (4,096 of 20k captions,
    20%) is a larger share of the data than the reference's 131k of CC3M's 3M (4%),
    because a bank of 4% (800) holds few captions of each item/place combination.
    Two images whose nearest caption is the same bank entry stay each other's
    negatives, as in the reference code: masking them lets a collapse onto one
    entry drive the loss to zero (measured: zero-shot at chance, loss 0.0 by the
    third matching epoch).
    """

    name = "roclip"
    streams = True  # its bank fills from the batches just trained

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {config.bank_size}")
        self.bank: np.ndarray | None = None
        self.count = 0
        self.cursor = 0

    def before_epoch(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        return self._schedule(super().before_epoch(ctx, epoch), ctx, epoch)

    def stream_plan(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        # the bank fills from the batches just trained, so a stream serves it as well
        return self._schedule(super().stream_plan(ctx, epoch), ctx, epoch)

    def _schedule(self, plan: EpochPlan, ctx: TrainContext, epoch: int) -> EpochPlan:
        plan.augment_images = False  # the reference's image augmentation: `--augment both`
        plan.augment_text = True
        per_epoch = steps_per_epoch(ctx)
        start = warmup_steps(self, ctx)
        first = start // per_epoch  # the epoch in which the warm-up ends
        r = self.match_every
        matching = r > 0 and epoch >= first and (epoch - first) % r == 0
        plan.phase = "nearest" if matching else "clip"
        plan.switch_step = max(0, start - epoch * per_epoch) if matching else None
        plan.info = {"bank_fill": int(self.count)}
        return plan

    def loss(
        self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features
    ) -> dict[str, Tensor]:
        img, txt = feats.image[0][0], feats.text[0][0]
        warming = batch.step < (plan.switch_step or 0)
        if plan.phase != "nearest" or warming or self.count == 0:
            return {
                "clip": clip_loss(
                    img, txt, feats.logit_scale, rows=batch.rows, ids=batch.caption_ids
                )
            }
        from otcclip.otmatch import topk

        assert self.bank is not None
        pool = self.bank[: self.count]
        query = np.ascontiguousarray(F.normalize(img.detach().float(), dim=-1).cpu().numpy())
        index, _ = topk(query, pool, 1, self.config.threads)
        nearest = torch.from_numpy(pool[index[:, 0]]).to(img.device)
        return {"nearest": clip_loss(img, nearest, feats.logit_scale, rows=batch.rows)}

    def after_step(self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features) -> None:
        txt = F.normalize(feats.text[0][0].detach().float(), dim=-1).cpu().numpy()
        size = min(self.config.bank_size, ctx.pairs)
        if self.bank is None:
            self.bank = np.zeros((size, txt.shape[1]), dtype=np.float32)
        rows = txt[-size:]
        slots = (self.cursor + np.arange(len(rows))) % size
        self.bank[slots] = rows
        self.cursor = int((self.cursor + len(rows)) % size)
        self.count = min(size, self.count + len(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "count": self.count, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bank = state.get("bank")
        self.bank = None if bank is None else np.asarray(bank, dtype=np.float32).copy()
        self.count = int(state["count"])
        self.cursor = int(state["cursor"])


SAFE_SCHEDULES = ("share", "reference")
SAFE_PASSES = ("mixed", "separate")


class SafeCLIPDefense(Defense):
    """SafeCLIP (Yang, Gao and Mirzasoleiman, ICML 2024), its mechanism at our scale.

    1. Unimodal warm-up (`warmup_steps`, else W epochs; default 1 epoch):
       image-image and text-text contrastive losses on two augmented views
       (CleanCLIP-style in-modal InfoNCE with the model's logit scale); no
       image-caption term.
    2. About one epoch of CLIP on all pairs at a low learning rate: from the end of
       the warm-up to the nearest epoch boundary one epoch later (so between half
       an epoch and 1.5 epochs); `safeclip_lr_scale` times the scheduled rate, or,
       with `safeclip_lr_fixed`, times the base rate (the reference: a fixed 1%).
    3. Every later epoch: the cosine of every image with its caption, a
       2-component Gaussian mixture (sklearn) on these cosines, and the safe set:
       - schedule "share" (default): the top `safe_start + safe_growth * m` of the
         data (m = mixed epochs so far, capped at `safe_max`) by posterior, among
         the pairs whose posterior of the high-mean component is >= `safe_threshold`;
       - schedule "reference" (the reference code's): the first mixed epoch keeps
         the pairs with posterior >= `safe_threshold` (the reference: 0.9); later
         epochs the top (that share + `safe_growth` * m) by posterior then cosine,
         capped at `safe_max` (the reference: 1% per epoch up to 85%).
       CLIP loss on safe pairs, the unimodal losses on risky ones. With
       `safeclip_passes="separate"` (default, the reference's) a batch holds safe
       rows only or risky rows only, so the CLIP loss has a full batch of
       negatives (each group's last partial batch is left out of the epoch); with
       "mixed" both share each batch and the CLIP loss only has the batch's safe
       rows as negatives (4.5 points lower val zero-shot, TUNING.md session 7).
    The results table runs the reference's schedule scaled to 8 epochs with two knobs
    chosen by validation zero-shot after all 8 epochs (TUNING.md, session 9): the first
    split keeps posterior >= 0.5 (the reference: 0.9, which starves the CLIP loss at
    our budget: 56.0% val against 62.3%) and the share grows 10% per epoch (the
    reference's 1% per epoch over 32 scales to 4%). The CLI's defaults deviate from the
    reference's schedule further: a warm-up of 1 epoch of 8
    (the reference: 5 of 32, `--warmup-steps 99` here); the low-lr phase at 0.1x the
    schedule's rate (the reference: a fixed 1% of the base rate,
    `--safeclip-lr-fixed --safeclip-lr-scale 0.01`); the "share" schedule from 30%,
    +10% per epoch, among pairs of posterior >= 0.5 (the reference's: `--safe-schedule
    reference --safe-threshold 0.9 --safe-growth 0.04 --safe-max 0.85`, whose first
    split trusts 14% of our pairs). Other deviations that remain: the paper's slow
    update of similarities and its nearest-neighbour text pool are omitted;
    augmentations are those of `otcclip.augment`, and the first view (the one the
    CLIP loss sees) is not augmented unless `--augment images` (the reference
    augments it: at our budget that stalls CLIP, TUNING.md session 7); the second
    view of the unimodal losses is always augmented.
    On a stream (`--stream`, with `--safeclip-passes mixed`: a stream cannot batch the safe
    and the risky pairs apart) the split reads the cosines of the global embeddings the
    training pass kept by slot (`otcclip.stream_rounds`: at most one epoch old, taken in
    training mode) instead of embedding every pair again; a pair not streamed yet is risky.
    """

    name = "safeclip"
    streams = True  # with mixed passes; its split reads the embeddings training kept

    @classmethod
    def check_stream(cls, config: TrainConfig) -> None:
        if config.safeclip_passes != "mixed":
            raise ValueError(
                "--stream with --defense safeclip needs --safeclip-passes mixed: its "
                "separate passes batch the safe and the risky pairs apart, which needs "
                "random access to every pair; a stream decides its own batches"
            )

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        for name in ("safe_start", "safe_growth", "safeclip_lr_scale", "safe_threshold"):
            value = getattr(config, name)
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < config.safe_max <= 1.0:
            raise ValueError(f"safe_max must be in (0, 1], got {config.safe_max}")
        if config.safe_schedule not in SAFE_SCHEDULES:
            raise ValueError(
                f"safe_schedule must be one of {', '.join(SAFE_SCHEDULES)}, "
                f"got {config.safe_schedule!r}"
            )
        if config.safeclip_passes not in SAFE_PASSES:
            raise ValueError(
                f"safeclip_passes must be one of {', '.join(SAFE_PASSES)}, "
                f"got {config.safeclip_passes!r}"
            )
        self.first_share: float | None = None  # the first split's share ("reference")
        self.splits = 0
        self.safe: np.ndarray | None = None  # on a stream: the last split, by slot

    def setup(self, ctx: TrainContext) -> None:
        if ctx.table is None:
            self._open_stream_state(ctx)

    def phases(self, ctx: TrainContext) -> tuple[int, int, int]:
        """(steps per epoch, warm-up steps, first mixed epoch)."""
        per_epoch = steps_per_epoch(ctx)
        warm = warmup_steps(self, ctx)
        # the low-lr phase: one epoch, ending at the nearest epoch boundary
        mixed_from = (warm + per_epoch + per_epoch // 2) // per_epoch
        return per_epoch, warm, mixed_from

    def before_epoch(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        return self._schedule(super().before_epoch(ctx, epoch), ctx, epoch)

    def stream_plan(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        assert self.streamed is not None, "setup() on a stream first"
        return self._schedule(super().stream_plan(ctx, epoch), ctx, epoch)

    def _schedule(self, plan: EpochPlan, ctx: TrainContext, epoch: int) -> EpochPlan:
        plan.augment_images = False  # view 1 (the unimodal losses') is always augmented
        per_epoch, warm, mixed_from = self.phases(ctx)
        if epoch >= mixed_from:
            safe, info = self._split(ctx, epoch - mixed_from, epoch)
            plan.phase, plan.image_views, plan.text_views = "mixed", 2, 2
            plan.info = info
            if self.streamed is None:
                plan.safe = safe
            else:  # by slot: the loss looks each batch's pairs up
                self.safe = safe
            if self.config.safeclip_passes == "separate":
                plan.groups = (~safe).astype(np.int64)  # 0: safe batches, 1: risky batches
        elif (epoch + 1) * per_epoch <= warm:
            plan.phase, plan.image_views, plan.text_views = "unimodal", 2, 2
        else:
            switch = max(0, warm - epoch * per_epoch)
            plan.lr_scale = self.config.safeclip_lr_scale
            if switch:
                plan.phase, plan.image_views, plan.text_views = "unimodal+clip_low_lr", 2, 2
                plan.switch_step = switch
            else:
                plan.phase = "clip_low_lr"
        return plan

    def step_lr(self, plan: EpochPlan, epoch: int, step: int, scheduled: float) -> float:
        if not self._low_lr_step(plan, step):
            return scheduled
        base = self.config.lr if self.config.safeclip_lr_fixed else scheduled
        return base * self.config.safeclip_lr_scale

    @staticmethod
    def _low_lr_step(plan: EpochPlan, step: int) -> bool:
        if plan.phase == "clip_low_lr":
            return True
        return plan.phase == "unimodal+clip_low_lr" and step >= (plan.switch_step or 0)

    def _split(
        self, ctx: TrainContext, mixed: int, epoch: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The safe pairs of the `mixed`-th split (by row, or by slot on a stream)."""
        if self.streamed is not None:
            return self._stream_split(ctx, mixed, epoch)
        from otcclip.matching import MatchConfig, match_round

        table = ctx.table
        own = np.arange(len(table), dtype=np.int64)
        config = MatchConfig(
            k=1,
            alpha=1.0,
            image_batch=self.config.match_batch,
            text_batch=self.config.match_batch,
            threads=self.config.threads,
        )
        cos = match_round(
            ctx.bundle, table.images, table.captions, own, config, progress=ctx.progress
        )
        safe, info = self._fit(
            ctx, np.asarray(cos.own_global_score, dtype=np.float64), mixed, epoch
        )
        if ctx.poisoned is not None:
            info.update(self._poison_report(safe, ctx.poisoned))
        return safe, info

    def _stream_split(
        self, ctx: TrainContext, mixed: int, epoch: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The split from the kept embeddings of the pairs streamed so far, by slot."""
        from otcclip.attacks import poisoned_ids

        s = self.streamed
        slots = s.judged()
        if len(slots) < 2:
            raise ValueError(f"only {len(slots)} pairs streamed before SafeCLIP's first split")
        image, caption = s.kept.embeddings(slots)
        cos = np.einsum("nd,nd->n", image, caption, dtype=np.float64)
        judged, info = self._fit(ctx, cos, mixed, epoch)
        safe = np.zeros(len(s.left_out), bool)
        safe[slots] = judged
        info["judged"] = int(len(slots))
        if ctx.manifests:
            poisoned = np.isin(s.slots.ids[slots], poisoned_ids(ctx.manifests))
            info.update(self._poison_report(judged, poisoned))
        return safe, info

    def _fit(
        self, ctx: TrainContext, cos: np.ndarray, mixed: int, epoch: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The mixture over the own-pair cosines and the safe set it gives (see the class)."""
        from sklearn.mixture import GaussianMixture

        n = len(cos)
        safe = np.zeros(n, dtype=bool)
        share = 0.0
        if ctx.is_main:
            gmm = GaussianMixture(n_components=2, random_state=self.config.seed + epoch)
            gmm.fit(cos.reshape(-1, 1))
            clean = int(np.argmax(gmm.means_.ravel()))
            posterior = gmm.predict_proba(cos.reshape(-1, 1))[:, clean]
            order = np.lexsort((-cos, -posterior))  # by posterior, then cosine
            limit, share = self._safe_count(posterior, mixed)
            safe[order[:limit]] = True
        safe, share = dist.broadcast_object((safe, share))
        if self.config.safe_schedule == "reference" and self.first_share is None:
            self.first_share = float(share)
        self.splits += 1
        return safe, {"safe_share_target": share, "safe": int(safe.sum())}

    @staticmethod
    def _poison_report(safe: np.ndarray, poisoned: np.ndarray) -> dict[str, Any]:
        """Where the poisons fell (the manifest feeds the report only)."""
        return {
            "poison_in_safe": int((safe & poisoned).sum()),
            "poison_risky_share": _share(int((~safe & poisoned).sum()), int(poisoned.sum())),
        }

    def _safe_count(self, posterior: np.ndarray, mixed: int) -> tuple[int, float]:
        """How many pairs (top by posterior) are safe in the `mixed`-th split, and the share."""
        c = self.config
        n = len(posterior)
        confident = int((posterior >= c.safe_threshold).sum())
        if c.safe_schedule == "share":
            share = min(c.safe_max, c.safe_start + c.safe_growth * mixed)
            return min(int(math.floor(share * n)), confident), share
        if mixed == 0 or self.first_share is None:
            share = min(c.safe_max, confident / n)
            return int(math.floor(share * n)), share
        share = min(c.safe_max, self.first_share + c.safe_growth * mixed)
        return int(math.floor(share * n)), share

    def loss(
        self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features
    ) -> dict[str, Tensor]:
        if self._low_lr_step(plan, batch.step):
            return super().loss(ctx, plan, batch, feats)
        (ig, _), (jg, _) = feats.image[0], feats.image[1]
        (tg, _, _), (ug, _, _) = feats.text[0], feats.text[1]
        safe = batch.safe
        if self.streamed is not None and plan.phase == "mixed":
            safe = torch.from_numpy(self._safe_of(batch.positions)).to(ig.device)
        risky = None if safe is None else ~safe
        scale = feats.logit_scale
        parts = {
            "image_image": clip_loss(ig, jg, scale, rows=batch.rows, valid=risky),
            "text_text": clip_loss(
                tg, ug, scale, rows=batch.rows, valid=risky, ids=batch.caption_ids
            ),
        }
        if plan.phase == "mixed":
            parts["clip"] = clip_loss(
                ig, tg, scale, rows=batch.rows, valid=safe, ids=batch.caption_ids
            )
        return parts

    def _safe_of(self, ids: np.ndarray) -> np.ndarray:
        """Whether the stream's pairs `ids` are safe in the last split (unseen: risky)."""
        assert self.streamed is not None and self.safe is not None
        slots = self.streamed.slots.find(ids)
        out = np.zeros(len(slots), bool)
        seen = slots >= 0
        out[seen] = self.safe[slots[seen]]
        return out

    def after_step(self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features) -> None:
        """On a stream, keep the step's global embeddings for the next split."""
        if self.streamed is not None:
            self._keep_batch(batch, feats)

    def state_dict(self) -> dict[str, Any]:
        return {
            "first_share": self.first_share,
            "splits": self.splits,
            "streamed": None if self.streamed is None else self.streamed.state_dict(),
            "safe": self.safe,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        first = state.get("first_share")
        self.first_share = None if first is None else float(first)
        self.splits = int(state.get("splits", 0))
        if state.get("streamed") is not None:
            self._restore_stream_state(state["streamed"])
        safe = state.get("safe")
        self.safe = None if safe is None else np.asarray(safe, dtype=bool).copy()


FILTER_SCORES = ("kdist", "slof", "dao")


class FilterDefense(Defense):
    """Filter-then-train: what a user would try first (after Huang et al., ICLR 2025).

    Plain CLIP for the warm-up (W epochs, default 2; `warmup_steps` is rounded up to
    the next epoch boundary, where the filter runs), then once: embed every training
    image with the model, score each by a local-outlier detector on those embeddings
    (`filter_score`: k-distance, SLOF or DAO over the k = `filter_k` nearest images,
    `otcclip.doubt.local_outlier_scores`; larger = sparser neighbourhood, which
    Huang et al. found marks backdoor samples in CLIP's space), and drop the pairs
    above a cut fitted without labels: `otcclip.doubt.mixture_threshold`, a
    two-component Gaussian mixture over the scores, the cut where the upper
    component becomes the more likely one, at most `filter_max_share` of the data.
    Training then continues on the kept pairs, plain CLIP, to the end. Nothing here
    reads the poison manifest (the share of poisons dropped is reported only).
    Deviation: Huang et al. score a pre-trained CLIP's embeddings of the whole set;
    here the only model is the one being trained, so the warm-up stands in for it.
    On a stream (`--stream`) there is no pass over the images between epochs: the
    filter scores the image embeddings the training pass kept by slot
    (`otcclip.stream_rounds`, as OTCCLIP's streamed rounds do: at most one epoch old,
    taken in training mode), and the dropped pairs stream past, masked out of the loss.
    """

    name = "filter"
    streams = True  # on a stream it scores the embeddings the training pass kept

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.filter_score not in FILTER_SCORES:
            raise ValueError(
                f"filter_score must be one of {', '.join(FILTER_SCORES)}, "
                f"got {config.filter_score!r}"
            )
        if not 0.0 <= config.filter_max_share < 1.0:
            raise ValueError(f"filter_max_share must be in [0, 1), got {config.filter_max_share}")
        if _bad_count(config.filter_k):
            raise ValueError(f"filter_k must be an integer >= 1, got {config.filter_k!r}")
        self.kept: np.ndarray | None = None  # None until the filter has run

    def setup(self, ctx: TrainContext) -> None:
        if ctx.table is None:
            self._open_stream_state(ctx)

    def filter_epoch(self, ctx: TrainContext) -> int:
        """The epoch at whose start the filter runs (the warm-up rounded up to an epoch)."""
        if self.config.warmup_steps is None:
            return self.warmup_epochs
        per_epoch = steps_per_epoch(ctx)
        return -(-int(self.config.warmup_steps) // per_epoch)

    def before_epoch(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        info: dict[str, Any] = {}
        if self.kept is None and epoch >= self.filter_epoch(ctx):
            info = self._filter(ctx)
        n = len(ctx.table)
        kept = np.ones(n, dtype=bool) if self.kept is None else self.kept
        caption = np.where(kept, np.arange(n, dtype=np.int64), -1)
        return EpochPlan(
            positions=np.flatnonzero(kept).astype(np.int64),
            caption=caption,
            phase="warmup" if self.kept is None else "filtered",
            info=info,
        )

    def stream_plan(self, ctx: TrainContext, epoch: int) -> EpochPlan:
        assert self.streamed is not None, "setup() on a stream first"
        plan = super().stream_plan(ctx, epoch)
        if self.kept is None and epoch >= self.filter_epoch(ctx):
            plan.info = self._stream_filter(ctx)
        plan.phase = "warmup" if self.kept is None else "filtered"
        return plan

    def _filter(self, ctx: TrainContext) -> dict[str, Any]:
        from otcclip.models import embed_images

        c = self.config
        n = len(ctx.table)
        kept = np.ones(n, dtype=bool)
        cut = float("nan")
        if ctx.is_main:
            emb = embed_images(ctx.bundle, ctx.table.images, batch_size=c.match_batch)
            assert isinstance(emb, np.ndarray)
            kept, cut = self._cut(emb)
        kept, cut = dist.broadcast_object((kept, cut))
        self.kept = kept
        info = self._report(~kept, cut)
        info.update(_off_original_by_attack(ctx, ~kept))
        if ctx.poisoned is not None:
            info.update(self._poison_report(~kept, ctx.poisoned))
        return info

    def _stream_filter(self, ctx: TrainContext) -> dict[str, Any]:
        """The filter on a stream: the pairs streamed so far, scored from the image
        embeddings the training pass kept (the same on every process, which kept the
        gathered batches); the dropped sit out for the rest of the run."""
        from otcclip.attacks import poisoned_ids

        s = self.streamed
        slots = s.judged()
        if len(slots) <= self.config.filter_k:
            raise ValueError(
                f"only {len(slots)} pairs streamed before the filter, too few for its "
                f"k = {self.config.filter_k} neighbours"
            )
        kept, cut = self._cut(s.kept.embeddings(slots)[0])
        s.apply(slots, ~kept, sticky=True)
        self.kept = ~s.doubted
        info = self._report(~kept, cut)
        info["judged"] = int(len(slots))
        if ctx.manifests:
            poisoned = np.isin(s.slots.ids[slots], poisoned_ids(ctx.manifests))
            info.update(self._poison_report(~kept, poisoned))
        return info

    def _cut(self, embeddings: np.ndarray) -> tuple[np.ndarray, float]:
        """Which images the filter keeps (score at most the cut), and the cut."""
        from otcclip.doubt import local_outlier_scores, mixture_threshold

        c = self.config
        scores = local_outlier_scores(embeddings, c.filter_k, threads=c.threads)[c.filter_score]
        cut = mixture_threshold(scores, max_share=c.filter_max_share)
        return scores <= cut, float(cut)

    @staticmethod
    def _report(dropped: np.ndarray, cut: float) -> dict[str, Any]:
        return {
            "round": 1,  # the table reads its last round's figures
            "filter_cut": cut,
            "dropped": int(dropped.sum()),
            "dropped_share": float(dropped.mean()) if len(dropped) else 0.0,
            "sitting_out": int(dropped.sum()),
        }

    @staticmethod
    def _poison_report(dropped: np.ndarray, poisoned: np.ndarray) -> dict[str, Any]:
        """What the filter dropped of the poisons (the manifest feeds the report only)."""
        hit = int((dropped & poisoned).sum())
        precision = _share(hit, int(dropped.sum()))
        return {
            "dropped_precision": precision,
            "changed_precision": precision,  # the table's column
            "poison_dropped_share": _share(hit, int(poisoned.sum())),
        }

    def loss(
        self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features
    ) -> dict[str, Tensor]:
        if self.streamed is None:
            return super().loss(ctx, plan, batch, feats)
        img, txt = feats.image[0][0], feats.text[0][0]
        valid = torch.from_numpy(self.streamed.trains(batch.positions)).to(img.device)
        return {
            "clip": clip_loss(
                img, txt, feats.logit_scale, rows=batch.rows, valid=valid, ids=batch.caption_ids
            )
        }

    def after_step(self, ctx: TrainContext, plan: EpochPlan, batch: Batch, feats: Features) -> None:
        """On a stream, keep the step's global embeddings for the filter (none once it ran)."""
        if self.streamed is not None and self.kept is None:
            self._keep_batch(batch, feats)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "streamed": None if self.streamed is None else self.streamed.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state.get("kept")
        self.kept = None if kept is None else np.asarray(kept, dtype=bool).copy()
        if state.get("streamed") is not None:
            self._restore_stream_state(state["streamed"])


def _lead(result: Any) -> np.ndarray:
    """A round's cross-modal lead per image: its best candidate's score over its own
    caption's (0 where either is missing), the doubt's cross-modal signal."""
    return np.nan_to_num(
        np.asarray(result.best_score, np.float64) - np.asarray(result.own_score, np.float64),
        nan=0.0,
        posinf=0.0,
        neginf=0.0,
    )


def _remove_orphan_passes(folder: Path) -> None:
    """Remove the pixel passes' folders in `folder` whose process is gone (a pass killed
    before it ended leaves its grey file there: 1.2 GiB at 400,000 images of 56 px)."""
    import shutil

    for stale in folder.glob(".pixel-pass-rank*-*-*"):
        try:
            pid = int(stale.name.split("-")[3])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours to judge: another user's, or another name


def _bad_count(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1


DEFENSES: dict[str, type[Defense]] = {
    "none": NoDefense,
    "roclip": RoCLIPDefense,
    "safeclip": SafeCLIPDefense,
    "otcclip": OTCCLIPDefense,
    "filter": FilterDefense,
}


def _applied(ctx: TrainContext, doubted: np.ndarray, caption: np.ndarray) -> dict[str, float]:
    """What a round did, as trained on: doubted pairs and the captions the epoch uses.

    The match's own report describes its re-pairing, which under the fused doubt or
    `on_doubt="drop"` is not what the epoch trains on. These override it: `changed`
    counts doubted pairs; precision, poison broken and clean kept come from the poison
    mask (reporting only; no decision reads it); clean true content counts a left-out
    pair as not holding a caption of its true content.
    """
    out: dict[str, float] = {"changed": int(doubted.sum())}
    poisoned = ctx.poisoned
    if poisoned is not None:
        clean = ~poisoned
        out["changed_precision"] = _share(int((doubted & poisoned).sum()), int(doubted.sum()))
        out["poison_broken"] = _share(int((doubted & poisoned).sum()), int(poisoned.sum()))
        out["clean_kept"] = _share(int((~doubted & clean).sum()), int(clean.sum()))
    table = ctx.table
    if table.image_classes is not None and table.caption_classes is not None:
        clean = np.ones(len(caption), bool) if poisoned is None else ~poisoned
        held = caption >= 0
        true = np.zeros(len(caption), bool)
        rows = np.flatnonzero(held)
        true[rows] = (table.caption_classes[caption[rows]] == table.image_classes[rows]).all(1)
        out["clean_true_content"] = _share(int(true[clean].sum()), int(clean.sum()))
    return out


def _off_original_by_attack(ctx: TrainContext, off: np.ndarray) -> dict[str, float]:
    """Per attack, the share of its poisoned pairs not trained on their original caption.

    The round's own `poison_broken` counts changes against the round's starting
    captions; this counts against the data, which is what an attack needs.
    """
    ids = np.asarray(ctx.table.ids, dtype=np.int64)
    rows: dict[str, np.ndarray] = {}
    for m in ctx.manifests:
        hit = np.isin(ids, np.asarray(m.poisoned_ids, dtype=np.int64))
        rows[m.attack] = rows[m.attack] | hit if m.attack in rows else hit
    return {
        f"off_original_{attack}": _share(int(off[hit].sum()), int(hit.sum()))
        for attack, hit in rows.items()
    }


def make_defense(config: TrainConfig) -> Defense:
    """The defense `config.defense` names (a clear error for an unknown name)."""
    try:
        cls = DEFENSES[config.defense]
    except KeyError:
        raise ValueError(
            f"unknown defense {config.defense!r}; expected one of {', '.join(DEFENSES)}"
        ) from None
    return cls(config)


def schedule(defense: str, config: TrainConfig) -> dict[str, int]:
    """W and R of `defense` under `config`: its settings, else the defense's DEFAULTS."""
    defaults = DEFAULTS[defense]
    return {name: _pick(getattr(config, name), default) for name, default in defaults.items()}


def _pick(value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"schedule knobs must be integers >= 0, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _share(part: int, whole: int) -> float:
    return float(part) / whole if whole else float("nan")
