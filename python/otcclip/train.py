"""The training loop: CLIP from scratch with a defense, resumable and data-parallel.

`train(config, callbacks)` builds (or reads) the data, creates the model, and
runs epochs of AdamW steps under a cosine schedule with linear warm-up. Each
epoch starts with the defense's plan (`otcclip.defenses`): which images, paired
with which captions, and how; each step encodes the views the plan asks for in
one forward pass and adds the defense's loss terms.

Reproducibility is by construction: the data order of an epoch is a pure
function of (seed, epoch) (streamed, `--stream`: of seed, epoch, rank, process and
worker counts, see `otcclip.data.loader`), augmentations of (seed, epoch, step), and the loop
saves everything else that moves (weights, optimiser, scaler, RNG states, the
plan, the defense's state, the metrics so far) in checkpoints at epoch ends and
every `checkpoint_every` steps. A resumed run therefore continues exactly where
the checkpoint left it, and ends where an uninterrupted run ends.

Under `torchrun` every process takes a contiguous slice of each global batch;
features are gathered with gradients and each process computes the loss rows
of its slice, so the update equals the single-process update on the same
global batch (up to floating-point summation order).

This module never imports `otcclip.evaluate`: per-epoch evaluation is a
callback (see `otcclip.commands.train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from otcclip import distributed as dist
from otcclip.atomic import write_text
from otcclip.augment import (
    ImageAugment,
    augment_captions,
    augment_images,
    batch_generator,
    batch_rng,
)
from otcclip.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from otcclip.defenses import (
    DEFENSES,
    Batch,
    Defense,
    EpochPlan,
    Features,
    TrainContext,
    make_defense,
)

__all__ = [
    "Callback",
    "TrainConfig",
    "TrainResult",
    "cosine_lr",
    "batch_order",
    "epoch_order",
    "load_training_data",
    "train",
]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
# TrainConfig.augment: which parts of view 0 are augmented ("auto": as the defense plans)
AUGMENT_MODES = ("auto", "off", "images", "text", "both")
_MAX_LOGIT_SCALE = math.log(100.0)

# Settings that may change between a run and its resumption (they do not change
# what is computed); every other field must match the checkpoint's.
_RESUMABLE_FIELDS = frozenset(
    {
        "out",
        "resume",
        "progress",
        "threads",
        "eval_every",
        "eval_size",
        "probe_size",
        "val_size",
        "resume_from",
        "tensorboard",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "device",
        "match_batch",
        "ot_compile",
        # how many read, not what: a streamed run checks its layout itself (StreamLayout)
        "workers",
        "prefetch",
        # where the per-pair state lives, not what it holds
        "state_on_disk",
    }
)


ROUND_EMBEDDINGS = ("model", "training")

# Settings whose default moved after runs were recorded without them (`to_dict` leaves a
# setting out at its default, or it did not exist yet): such a record trained this value.
# round_embeddings: "model" until session 18 (and before session 12 named it); it is
# recorded always since the kept rounds became the default.
_RECORDED_BEFORE_THE_DEFAULT: dict[str, Any] = {"round_embeddings": "model"}


def recorded_settings(d: dict[str, Any]) -> dict[str, Any]:
    """A recorded config (a checkpoint's, config.json) with the settings it trained at a
    since-moved default named, so that resuming or comparing it does not read today's."""
    return {**_RECORDED_BEFORE_THE_DEFAULT, **d}


# Recorded only when set (see TrainConfig.to_dict): the results table compares configs.
_OMITTED_AT_DEFAULT = frozenset(
    {
        "eval_size",
        "probe_size",
        "resume_from",
        # issue 14
        "val_size",
        "augment",
        "image_augment",
        "warmup_steps",
        "safeclip_lr_fixed",
        "safe_max",
        "safe_threshold",
        "safe_schedule",
        "safeclip_passes",
        "filter_score",
        "filter_k",
        "filter_max_share",
        # issue 16
        "stream",
        "workers",
        "prefetch",
        "match_bank",
        "state_on_disk",
        # issue 13, session 13
        "doubt_phase_template",
        "doubt_phase_scale",
    }
)


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults documented in `otcclip train --help`."""

    # data
    data: str | None = None
    scenes: int | None = None
    data_seed: int | None = None
    image_size: int | None = None
    # streaming (otcclip.data.loader): DataLoader workers per process, batches each prepares
    stream: bool = False
    workers: int = 2
    prefetch: int = 2
    # model and optimisation
    model: str = "otc-vit-tiny"
    defense: str = "none"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-6
    lr_warmup_steps: int | None = None
    grad_clip: float | None = None
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    # run directory and logging
    out: str | None = None
    resume: bool = False
    resume_from: str | None = None  # a checkpoint directory name: resume from it, not the newest
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int = 1
    # recorded so that --resume evaluates as the run did (the CLI's evaluation reads them)
    eval_size: int = 1000
    probe_size: int = 0
    val_size: int = 0
    progress: bool = True
    tensorboard: bool = False
    threads: int | None = None
    # augmentation of view 0: "auto" (the defense's own), "off", "images", "text", "both";
    # image_augment: ImageAugment overrides "name=value,..." for every augmented view
    augment: str = "auto"
    image_augment: str = ""
    # defense schedule (None: the defense's default, see defenses.DEFAULTS)
    warmup_epochs: int | None = None
    match_every: int | None = None
    # a warm-up in optimizer steps (RoCLIP, SafeCLIP, filter); overrides warmup_epochs
    warmup_steps: int | None = None
    # OTCCLIP losses
    lambda_inter: float = 0.5
    # epochs over which L_inter's weight grows from 0: the global alignment forms first
    # (at 0, one seed of the table's adaptive row never left the loss plateau; session 9)
    inter_ramp: float = 2.0
    lambda_intra: float = 0.0
    ot_negatives: int = 7
    eps: float = 0.1
    iters: int = 20
    ot_rho: float | None = None
    ot_scale: float | None = None
    inter_symmetric: bool = False
    ot_duplicate_cos: float | None = 0.95
    ot_compile: str = "auto"
    # OTCCLIP matching round
    k: int = 16
    alpha: float = 0.5
    match_eps: float | None = None
    match_iters: int | None = None
    assign: str = "argmax"
    capacity: int | None = None
    margin: float = 0.05
    fallback: str = "own"
    flag_outside_topk: bool = False
    rematch_from: str = "original"
    on_doubt: str = "drop"
    max_repair: float = 0.25
    doubt: str = "fused"
    doubt_signals: str | None = None
    # phase_pixel's template and scale (otcclip.doubt.DoubtConfig; None: its default)
    doubt_phase_template: str | None = None
    doubt_phase_scale: str | None = None
    doubt_k: int = 16
    doubt_min_share: float = 0.005
    pixel_screen: bool = True
    match_batch: int = 256
    # a round's pruning from a random bank of this many captions (None: exact top-k)
    match_bank: int | None = None
    # where a round takes the global embeddings: "training" (kept from the training pass,
    # `otcclip.matching_state`; the default since session 18) or "model" (embed every pair
    # again; the paper's rule, doubt="match", needs it)
    round_embeddings: str = "training"
    # per-pair state (kept embeddings, a stream's slots) in memory-mapped files under
    # out/matching-state/ instead of memory (`otcclip.matching_state`)
    state_on_disk: bool = False
    # RoCLIP
    bank_size: int = 4096
    # SafeCLIP
    safeclip_lr_scale: float = 0.1
    safeclip_lr_fixed: bool = False
    safe_start: float = 0.3
    safe_growth: float = 0.1
    safe_max: float = 1.0
    safe_threshold: float = 0.5
    safe_schedule: str = "share"
    safeclip_passes: str = "separate"
    # filter-then-train
    filter_score: str = "dao"
    filter_k: int = 16
    filter_max_share: float = 0.25

    def validate(self) -> None:
        """Clear errors for settings that cannot work (before anything is built)."""
        if self.defense not in DEFENSES:
            raise ValueError(
                f"unknown defense {self.defense!r}; expected one of {', '.join(DEFENSES)}"
            )
        if (self.data is None) == (self.scenes is None):
            raise ValueError(
                "give exactly one data source: data (a file or poison directory) or scenes"
            )
        if self.scenes is not None and self.scenes < 1:
            raise ValueError(f"scenes must be >= 1, got {self.scenes}")
        positive_ints = (
            "epochs",
            "batch_size",
            "keep_checkpoints",
            "log_every",
            "k",
            "iters",
            "match_batch",
            "doubt_k",
        )
        for name in positive_ints:
            if _bad_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if _bad_int(self.eval_size, 1):
            raise ValueError(f"eval_size must be an integer >= 1, got {self.eval_size!r}")
        for name in (
            "checkpoint_every",
            "eval_every",
            "probe_size",
            "val_size",
            "ot_negatives",
            "seed",
        ):
            if _bad_int(getattr(self, name), 0):
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: a contrastive loss needs negatives")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "lambda_inter", "inter_ramp", "lambda_intra", "margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.ot_compile not in ("auto", "on", "off"):
            raise ValueError(f"ot_compile must be auto, on or off, got {self.ot_compile!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.match_bank is not None and _bad_int(self.match_bank, self.k):
            raise ValueError(
                f"match_bank must be an integer >= k = {self.k} (the candidates it must hold), "
                f"got {self.match_bank!r}"
            )
        if self.round_embeddings not in ROUND_EMBEDDINGS:
            raise ValueError(
                f"round_embeddings must be one of {', '.join(ROUND_EMBEDDINGS)}, "
                f"got {self.round_embeddings!r}"
            )
        if self.state_on_disk and self.out is None:
            raise ValueError(
                "state_on_disk keeps the per-pair state in the run's folder: give out (--out DIR)"
            )
        if (
            self.defense == "otcclip"
            and self.round_embeddings == "training"
            and self.doubt != "fused"
        ):
            raise ValueError(
                "round_embeddings=training (the default) needs doubt=fused: the paper's rule "
                "doubts every pair by its OT score, which needs the model's tokens for every "
                "pair; with doubt=match give round_embeddings=model (--round-embeddings model)"
            )
        if self.threads is not None and _bad_int(self.threads, 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.ot_scale is not None and not self.ot_scale > 0:
            raise ValueError(
                f"ot_scale must be > 0 (or None: the learned logit scale), got {self.ot_scale}"
            )
        if self.ot_duplicate_cos is not None and not -1.0 <= self.ot_duplicate_cos <= 1.0:
            raise ValueError(
                "ot_duplicate_cos must be a cosine in [-1, 1] (or None), "
                f"got {self.ot_duplicate_cos}"
            )
        if not 0.0 <= self.max_repair <= 1.0:
            raise ValueError(f"max_repair must be a share in [0, 1], got {self.max_repair}")
        if self.augment not in AUGMENT_MODES:
            raise ValueError(
                f"augment must be one of {', '.join(AUGMENT_MODES)}, got {self.augment!r}"
            )
        ImageAugment.from_spec(self.image_augment)
        if self.warmup_steps is not None and _bad_int(self.warmup_steps, 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.doubt_min_share <= self.max_repair:
            raise ValueError(
                f"doubt_min_share must be in [0, max_repair={self.max_repair}], "
                f"got {self.doubt_min_share}"
            )
        self._validate_phase()
        self._validate_stream()
        if self.resume and self.out is None:
            raise ValueError("resume needs the run directory (out) to resume from")
        if self.resume_from is not None and not self.resume:
            raise ValueError("resume_from needs resume")

    def _validate_phase(self) -> None:
        from otcclip.doubt import PHASE_SCALES, PHASE_TEMPLATES

        for name, choices in (
            ("doubt_phase_template", PHASE_TEMPLATES),
            ("doubt_phase_scale", PHASE_SCALES),
        ):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")

    def _validate_stream(self) -> None:
        if _bad_int(self.workers, 0):
            raise ValueError(
                f"workers must be an integer >= 0 (0: read in the training process), "
                f"got {self.workers!r}"
            )
        if _bad_int(self.prefetch, 1):
            raise ValueError(f"prefetch must be an integer >= 1, got {self.prefetch!r}")
        if not self.stream:
            return
        cls = DEFENSES.get(self.defense)
        if cls is not None and not cls.streams:
            streaming = ", ".join(name for name, c in DEFENSES.items() if c.streams)
            raise ValueError(
                f"--stream trains with --defense {streaming} only, not {self.defense!r}, "
                "which needs random access to every pair. Use one of those, or drop "
                "--stream to read the data into memory"
            )
        if cls is not None:
            cls.check_stream(self)
        if self.data is None:
            raise ValueError(
                "--stream reads shards or parquet from --data; --scenes builds its pairs in "
                "memory: drop --stream, or write them first (otcclip poison --format shards)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as recorded; fields added after runs were recorded are left out at
        their default, so that those records still compare equal to today's configs."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in _OMITTED_AT_DEFAULT and d[f.name] == f.default:
                del d[f.name]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return TrainConfig(**recorded_settings(d))


@dataclass
class TrainResult:
    """What a run produced: the trained model, per-epoch metrics, per-step losses."""

    config: TrainConfig
    bundle: Any
    metrics: list[dict[str, Any]]
    step_losses: list[float]
    assignment: np.ndarray
    history: Any = None
    run_dir: Path | None = None


class Callback:
    """Hooks into the loop; every method is optional. Called on every process.

    `on_epoch_end` may return extra metrics (e.g. an evaluation) merged into the
    epoch's line; the main process's are the ones recorded. The loop runs
    callbacks with the random states saved and restored around them, so that a
    callback (an evaluation drawing random numbers) never changes the training.
    """

    def on_train_start(self, ctx: TrainContext) -> None:
        pass

    def on_epoch_start(
        self, ctx: TrainContext, epoch: int, info: dict[str, Any], seconds: float
    ) -> None:
        """The epoch's plan is made: `info` is what the defense reported preparing it (a
        round's report, a screen's), `seconds` what that took. Not called again when a
        resumed run continues an epoch it had planned."""

    def on_step_end(self, ctx: TrainContext, info: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, ctx: TrainContext, path: Path, info: dict[str, Any]) -> None:
        pass

    def on_epoch_end(
        self, ctx: TrainContext, epoch: int, metrics: dict[str, Any]
    ) -> dict[str, Any] | None:
        return None

    def on_train_end(self, ctx: TrainContext, result: TrainResult) -> None:
        pass


# --------------------------------------------------------------------------- data


def load_training_data(
    config: TrainConfig,
) -> tuple[Any, list[Any]]:
    """The training table and the poison manifests that describe it (if any).

    `data` is a pairs file (parquet, CSV, webdataset) or a directory from
    `otcclip poison` (train.parquet or train/ shards, and manifest.json); `scenes`
    builds that many fashion-scenes. Every check that can fail does so here, before training.
    """
    from otcclip.data import fashion_scenes, read_pairs

    manifests: list[Any] = []
    described: dict[str, Any] = {}
    options = {} if config.image_size is None else {"image_size": config.image_size}
    if config.scenes is not None:
        seed = config.seed if config.data_seed is None else config.data_seed
        size = 56 if config.image_size is None else config.image_size
        table = fashion_scenes(config.scenes, seed=seed, image_size=size)
    else:
        path = Path(str(config.data))
        if path.is_dir():
            from otcclip.attacks import MANIFEST_FILE, load_manifests

            pairs = _pairs_file(path)
            table = read_pairs(pairs, **options)
            if (path / MANIFEST_FILE).is_file():
                manifests, described = load_manifests(path)
        elif path.is_file():
            table = read_pairs(path, **options)
        else:
            raise FileNotFoundError(
                f"no training data at {str(path)!r} (a pairs file or a poison directory)"
            )
    if len(table) == 0:
        raise ValueError("the training data holds no samples")
    rows = described.get("n_rows")
    if manifests and rows is not None and int(rows) != len(table):
        raise ValueError(
            f"the poison manifest does not match the data: it describes {rows} rows, "
            f"the data has {len(table)}"
        )
    _check_manifests(table, manifests)
    return table, manifests


def load_stream(config: TrainConfig, image_size: int) -> tuple[Any, list[Any]]:
    """The streamed training data (a StreamFeed) and its poison manifests (if any).

    `data` is a shard folder, a poison directory written with `--format shards` (or
    holding train.parquet) or a parquet file; `image_size` is the model's input size.
    A manifest is checked against the data's size only: its ids would need every shard read.
    """
    from otcclip.data.loader import StreamFeed
    from otcclip.data.stream import PairStream

    path = Path(str(config.data))
    if not path.exists():
        raise FileNotFoundError(f"no training data at {str(path)!r} (shards, or a parquet file)")
    manifests: list[Any] = []
    described: dict[str, Any] = {}
    source = path
    if path.is_dir():
        from otcclip.attacks import MANIFEST_FILE, load_manifests

        source = _pairs_file(path)
        if (path / MANIFEST_FILE).is_file():
            manifests, described = load_manifests(path)
    pairs = PairStream(source, image_size=config.image_size, seed=config.seed)
    feed = StreamFeed(
        pairs,
        batch_size=config.batch_size,
        image_size=image_size,
        workers=config.workers,
        prefetch=config.prefetch,
    )
    rows = described.get("n_rows")
    if manifests and rows is not None and int(rows) != feed.n_pairs:
        raise ValueError(
            f"the poison manifest does not match the data: it describes {rows} rows, "
            f"the shards hold {feed.n_pairs}"
        )
    return feed, manifests


def _table_data(config: TrainConfig, table: Any, manifests: Sequence[Any]) -> tuple[Any, list]:
    """The in-memory table (read, or as passed in) and its manifests, checked."""
    if table is None:
        table, manifests = load_training_data(config)
    else:
        if len(table) == 0:
            raise ValueError("the training data holds no samples")
        _check_manifests(table, manifests)
    if len(table) < config.batch_size:
        raise ValueError(
            f"the data has {len(table)} samples, fewer than one batch of {config.batch_size}"
        )
    return table, list(manifests)


def _streamed_steps(feed: Any, epochs: int) -> list[int]:
    """Each epoch's steps in a streamed run (the units' sizes fix them before any read)."""
    steps = [feed.steps(e) for e in range(epochs)]
    if min(steps) == 0:
        raise ValueError(
            f"the stream of {feed.n_pairs} pairs gives some process fewer than one batch of "
            f"{feed.local_batch} in an epoch; use a smaller --batch-size or more data"
        )
    return steps


def _pairs_file(directory: Path) -> Path:
    from otcclip.data import pairs_in  # train.parquet, or train/ shards from --format shards

    return pairs_in(directory)


def _check_manifests(table: Any, manifests: Sequence[Any]) -> None:
    if not manifests:
        return
    ids = np.asarray(table.ids, dtype=np.int64)
    for m in manifests:
        touched = np.asarray(m.poisoned_ids, dtype=np.int64)
        missing = np.setdiff1d(touched, ids)
        if len(missing):
            raise ValueError(
                f"the poison manifest does not match the data: {len(missing)} of the "
                f"{len(touched)} ids its {m.attack!r} attack poisoned are not in the data "
                f"(e.g. {missing[:5].tolist()})"
            )


def poisoned_mask(table: Any, manifests: Sequence[Any]) -> np.ndarray | None:
    if not manifests:
        return None
    from otcclip.attacks import poisoned_ids

    return np.isin(np.asarray(table.ids, dtype=np.int64), poisoned_ids(manifests))


def epoch_order(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The epoch's shuffled rows: a pure function of (seed, epoch, positions)."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    return np.asarray(positions, dtype=np.int64)[rng.permutation(len(positions))]


def batch_order(
    seed: int, epoch: int, positions: np.ndarray, groups: np.ndarray | None, batch: int
) -> np.ndarray:
    """The epoch's rows in training order; with `groups`, every batch holds one group only.

    Without groups: `epoch_order`. With groups (SafeCLIP's separate safe and risky
    passes): each group is shuffled and cut into whole batches (its remainder left out),
    and the batches of all groups are then shuffled together. A pure function of its
    arguments, so a resumed epoch replays the same batches.
    """
    if groups is None:
        return epoch_order(seed, epoch, positions)
    positions = np.asarray(positions, dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != positions.shape:
        raise ValueError(f"groups {groups.shape} must match positions {positions.shape}")
    blocks = []
    for g in np.unique(groups):
        rows = epoch_order(seed, epoch * 1000 + int(g) + 1, positions[groups == g])
        whole = len(rows) // batch * batch
        blocks += list(rows[:whole].reshape(-1, batch))
    if not blocks:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), 0xB10C])
    return np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """open_clip's schedule: linear warm-up to `base`, then a cosine down to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span))) * base


# --------------------------------------------------------------------------- the loop


@dataclass
class _Loop:
    """The loop's moving parts (what a checkpoint must hold besides the weights)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    plan: EpochPlan | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)
    steps_done: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0  # of `seconds`: waiting for the next batch (see _fetch)
    prepare_seconds: float = 0.0
    stream: dict[str, Any] | None = None  # a streamed run's StreamLayout


def train(
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    *,
    table: Any = None,
    manifests: Sequence[Any] = (),
    epoch_rows: Callable[[int], np.ndarray] | None = None,
) -> TrainResult:
    """Train a CLIP model with the configured defense; see the module docstring.

    `table` (a PairTable) and `manifests` may be passed in directly instead of
    `config.data` / `config.scenes` (tests, notebooks). `epoch_rows(epoch)`: the table
    rows of an epoch in training order, instead of `batch_order`'s (to replay another
    order, e.g. a stream's, in memory). With `config.stream` the pairs are streamed
    (`otcclip.data.loader`), with the defenses whose `Defense.streams` is set: all of the
    built-in ones (otcclip's rounds, the filter and SafeCLIP's split read the embeddings
    the training pass kept, `otcclip.stream_rounds`; SafeCLIP with mixed passes).
    """
    if table is not None:
        config = dataclasses.replace(config, data=None, scenes=None)
        _validate_without_data(config)
    else:
        config.validate()
    rank, world = dist.rank(), dist.world_size()
    if config.batch_size % world:
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by the {world} processes"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    defense = make_defense(config)
    device = _device(config)
    precision = _precision(config, device)
    run_dir = Path(config.out) if config.out is not None else None
    checkpoint = _open_run(config, run_dir, rank)
    writer = _tensorboard(config, run_dir, rank)

    from otcclip.models import create_model

    _seed_everything(config.seed)
    bundle = create_model(config.model, seed=config.seed, device=str(device))
    if epoch_rows is not None and config.stream:
        raise ValueError("epoch_rows orders a table's rows; a stream has its own order")
    feed = None
    if config.stream:
        feed, manifests = load_stream(config, bundle.image_size)
        n_pairs, epoch_steps = feed.n_pairs, _streamed_steps(feed, config.epochs)
    else:
        table, manifests = _table_data(config, table, manifests)
        n_pairs, epoch_steps = len(table), [len(table) // config.batch_size] * config.epochs
    steps_per_epoch = epoch_steps[0]
    if checkpoint is not None:
        checkpoint.load_weights(bundle)
    model = bundle.model
    model.train()
    encoder: torch.nn.Module = _Encoder(model)
    if world > 1:
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    optimizer = _optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    total_steps = sum(epoch_steps)
    _configure_ot_compile(config, total_steps, config.batch_size // world)
    warmup = (
        config.lr_warmup_steps
        if config.lr_warmup_steps is not None
        else max(1, round(0.05 * total_steps))
    )
    ctx = TrainContext(
        config=config,
        bundle=bundle,
        table=table,
        device=device,
        rank=rank,
        world=world,
        poisoned=None if table is None else poisoned_mask(table, manifests),
        manifests=list(manifests),
        progress=config.progress and rank == 0,
        log=_logger(rank),
        image_side=None if feed is None else feed.image_side,
        n_pairs=n_pairs,
        stream=feed,
    )
    defense.setup(ctx)
    loop = _Loop()
    if checkpoint is not None:
        _restore(checkpoint, loop, defense, optimizer, scaler)
        ctx.log(
            f"resumed from {checkpoint.path} at epoch {loop.epoch + 1}, step {loop.step} "
            f"(global step {loop.global_step})"
        )
    if feed is not None:
        if checkpoint is not None:
            feed.layout.check_resume(loop.stream)
        loop.stream = feed.layout.state_dict()
    elif run_dir is not None and rank == 0:
        write_text(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    ctx.log(
        f"training {config.model} with defense {config.defense!r} on {n_pairs} pairs, "
        f"{config.epochs} epochs of {steps_per_epoch} steps (batch {config.batch_size}, "
        f"{world} process{'es' if world > 1 else ''}, {device}, "
        f"torch threads {torch.get_num_threads()})"
    )
    for cb in callbacks:
        with _isolated_rng():
            cb.on_train_start(ctx)

    epoch_bar = _bar(config.epochs, "epochs", ctx.progress, initial=loop.epoch, position=0)
    while loop.epoch < config.epochs:
        epoch = loop.epoch
        if loop.plan is None:
            model.train()
            start = time.perf_counter()
            planned = (
                defense.before_epoch(ctx, epoch)
                if feed is None
                else defense.stream_plan(ctx, epoch)
            )
            loop.plan = _with_augment(planned, config.augment)
            model.train()
            loop.prepare_seconds = time.perf_counter() - start
            loop.sums, loop.steps_done, loop.seconds, loop.step = {}, 0, 0.0, 0
            loop.data_seconds = 0.0
            for cb in callbacks:
                hook = getattr(cb, "on_epoch_start", None)  # newer than some callbacks
                if hook is not None:
                    with _isolated_rng():
                        hook(ctx, epoch, loop.plan.info, loop.prepare_seconds)
        plan = loop.plan
        order, streamed, steps = None, None, epoch_steps[epoch]
        if feed is not None:
            streamed = feed.batches(epoch, start=loop.step)
        elif epoch_rows is not None:
            order = np.asarray(epoch_rows(epoch), dtype=np.int64)
        else:
            order = batch_order(config.seed, epoch, plan.positions, plan.groups, config.batch_size)
        if order is not None:
            steps = len(order) // config.batch_size
            if steps == 0:
                raise ValueError(
                    f"epoch {epoch + 1}: only {len(order)} pairs left to train on, fewer than a "
                    "batch"
                )
        step_bar = _bar(steps, f"epoch {epoch + 1}", ctx.progress, initial=loop.step, position=1)
        while loop.step < steps:
            start = time.perf_counter()
            scheduled = cosine_lr(loop.global_step, total_steps, warmup, config.lr)
            lr = defense.step_lr(plan, epoch, loop.step, scheduled)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = slice(loop.step * config.batch_size, (loop.step + 1) * config.batch_size)
            fetched = time.perf_counter()
            batch = _fetch(
                ctx, plan, epoch, loop.step, None if order is None else order[rows], streamed
            )
            waited = time.perf_counter() - fetched
            loop.data_seconds += waited
            parts = _step(ctx, encoder, defense, plan, optimizer, scaler, precision, batch)
            elapsed = time.perf_counter() - start
            loop.seconds += elapsed
            for name, value in parts.items():
                loop.sums[name] = loop.sums.get(name, 0.0) + value
            loop.steps_done += 1
            loop.step += 1
            loop.global_step += 1
            if not math.isfinite(parts["loss"]):
                raise NonFiniteLossError(_non_finite_message(run_dir, epoch, loop, lr, parts))
            loop.step_losses.append(parts["loss"])
            info = {
                "event": "step",
                "epoch": epoch + 1,
                "step": loop.step,
                "global_step": loop.global_step,
                **parts,
                "lr": lr,
                "seconds": elapsed,
                "data_seconds": waited,
            }
            if loop.global_step % config.log_every == 0:
                loop.metrics.append(info)
                if writer is not None:
                    for name, value in parts.items():
                        writer.add_scalar(f"train/{name}", value, loop.global_step)
            step_bar.update(1)
            step_bar.set_postfix(loss=f"{parts['loss']:.4f}")
            for cb in callbacks:
                with _isolated_rng():
                    cb.on_step_end(ctx, info)
            mid_epoch = loop.step < steps
            if (
                run_dir is not None
                and mid_epoch
                and config.checkpoint_every
                and (loop.step % config.checkpoint_every == 0)
            ):
                _checkpoint(ctx, run_dir, loop, defense, optimizer, scaler, callbacks)
        step_bar.close()
        if streamed is not None:
            streamed.close()  # stops the epoch's workers (a rank may have batches left)
        metrics = _epoch_metrics(ctx, loop, plan, epoch, steps, model, optimizer)
        for cb in callbacks:
            with _isolated_rng():
                extra = cb.on_epoch_end(ctx, epoch, metrics)
            model.train()
            if extra:
                metrics.update(extra)
        dist.barrier()
        loop.metrics.append(metrics)
        if writer is not None:
            _write_scalars(writer, metrics, epoch + 1)
        ctx.log(_epoch_line(metrics))
        loop.epoch += 1
        loop.step = 0
        loop.plan = None
        if run_dir is not None:
            _checkpoint(ctx, run_dir, loop, defense, optimizer, scaler, callbacks)
        epoch_bar.update(1)
    epoch_bar.close()
    if writer is not None:
        writer.close()

    assignment = getattr(defense, "assignment", None)
    if assignment is None:  # streamed: no table rows to number
        assignment = np.arange(0 if table is None else len(table), dtype=np.int64)
    result = TrainResult(
        config=config,
        bundle=bundle,
        metrics=[m for m in loop.metrics if m.get("event") == "epoch"],
        step_losses=list(loop.step_losses),
        assignment=np.asarray(assignment, dtype=np.int64),
        history=getattr(defense, "history", None),
        run_dir=run_dir,
    )
    if run_dir is not None and rank == 0:
        from otcclip.models import save_weights

        save_weights(bundle, run_dir / WEIGHTS_FILE)
        summary = {
            "config": config.to_dict(),
            "final": result.metrics[-1] if result.metrics else {},
        }
        write_text(run_dir / SUMMARY_FILE, json.dumps(_jsonable(summary), indent=2) + "\n")
    dist.barrier()
    for cb in callbacks:
        with _isolated_rng():
            cb.on_train_end(ctx, result)
    defense.close()
    return result


class _Encoder(torch.nn.Module):
    """Every view of a step in one forward (one call: what DDP expects)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixels: list[Tensor], tokens: list[Tensor]
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor, Tensor]], Tensor]:
        from otcclip.models import encode_image_fine, encode_text_fine

        images: list[tuple[Tensor, Tensor]] = []
        texts: list[tuple[Tensor, Tensor, Tensor]] = []
        if pixels:
            sizes = [p.shape[0] for p in pixels]
            g, p = encode_image_fine(self.model, torch.cat(pixels))
            images = list(zip(g.split(sizes), p.split(sizes), strict=True))
        if tokens:
            sizes = [t.shape[0] for t in tokens]
            g, w, m = encode_text_fine(self.model, torch.cat(tokens))
            texts = list(zip(g.split(sizes), w.split(sizes), m.split(sizes), strict=True))
        return images, texts, self.model.logit_scale.exp()


def _with_augment(plan: EpochPlan, mode: str) -> EpochPlan:
    """The plan with view 0's augmentation forced by `mode` (TrainConfig.augment).

    The control row of the table (no defense with the baselines' augmentations) and the
    baselines without image augmentation both come from here. Views > 0 stay augmented:
    they exist to be a second, different view.
    """
    if mode != "auto":
        plan.augment_images = mode in ("images", "both")
        plan.augment_text = mode in ("text", "both")
    return plan


def _table_batch(
    ctx: TrainContext, plan: EpochPlan, epoch: int, step: int, positions: np.ndarray
) -> tuple[Batch, Tensor, list[str]]:
    """A global batch of table rows: its Batch, this process's pixels, all its captions."""
    from otcclip.models import image_transform

    b = len(positions)
    local_b = b // ctx.world
    rows = slice(ctx.rank * local_b, (ctx.rank + 1) * local_b)
    caption_rows = plan.caption[positions]
    batch = Batch(
        epoch=epoch,
        step=step,
        positions=positions,
        rows=rows,
        caption_ids=torch.from_numpy(caption_rows.astype(np.int64)).to(ctx.device),
        safe=None if plan.safe is None else torch.from_numpy(plan.safe[positions]).to(ctx.device),
    )
    base = image_transform(ctx.table.images[positions[rows]], ctx.bundle.image_size)
    return batch, base, [ctx.table.captions[i] for i in caption_rows]


def _streamed_batch(
    ctx: TrainContext, epoch: int, step: int, streamed: Any
) -> tuple[Batch, Tensor, list[str]]:
    """The same from this process's streamed share: ids and captions gathered over processes.

    Pair ids stand in for table rows (both unique per pair, and the losses only compare
    them), so the global batch's duplicate-caption rule is the in-memory one.
    """
    local_b = len(streamed.ids)
    ids, captions = streamed.ids.numpy(), list(streamed.captions)
    if ctx.world > 1:
        ids = dist.all_gather_concat(ids)
        captions = [c for part in dist.all_gather_object(captions) for c in part]
    batch = Batch(
        epoch=epoch,
        step=step,
        positions=ids,
        rows=slice(ctx.rank * local_b, (ctx.rank + 1) * local_b),
        caption_ids=torch.from_numpy(ids.astype(np.int64)).to(ctx.device),
    )
    return batch, streamed.pixels, captions


def _fetch(
    ctx: TrainContext,
    plan: EpochPlan,
    epoch: int,
    step: int,
    positions: np.ndarray | None,
    streamed: Iterator[Any] | None,
) -> tuple[Batch, Tensor, list[str]]:
    """A step's data, timed by the loop as its wait for data: the table rows `positions`
    gathered and transformed here, or the next StreamBatch (blocked on the DataLoader's
    workers until they have it ready)."""
    if streamed is None:
        assert positions is not None
        return _table_batch(ctx, plan, epoch, step, positions)
    return _streamed_batch(ctx, epoch, step, next(streamed))


def _step(
    ctx: TrainContext,
    encoder: torch.nn.Module,
    defense: Defense,
    plan: EpochPlan,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    precision: torch.dtype,
    fetched: tuple[Batch, Tensor, list[str]],
) -> dict[str, float]:
    """One optimizer step on a fetched global batch (`_fetch`): its Batch, this process's
    pixels and the captions."""
    config, bundle = ctx.config, ctx.bundle
    batch, base, texts = fetched
    epoch, step = batch.epoch, batch.step
    b, rows = batch.size, batch.rows
    base = base.to(ctx.device)
    image_aug = ImageAugment.from_spec(config.image_augment)
    pixels = []
    for view in range(plan.image_views):
        if view > 0 or plan.augment_images:
            gen = batch_generator(config.seed, epoch, step, view)
            pixels.append(augment_images(base, gen, image_aug, offset=rows.start, total=b))
        else:
            pixels.append(base)
    token_views = []
    for view in range(plan.text_views):
        if view > 0 or plan.augment_text:
            views = augment_captions(texts, batch_rng(config.seed, epoch, step, 10 + view))
        else:
            views = texts
        token_views.append(bundle.tokenizer(views[rows]).to(ctx.device))

    autocast = (
        torch.autocast("cuda", dtype=precision)
        if precision != torch.float32
        else contextlib.nullcontext()
    )
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        images, text_out, logit_scale = encoder(pixels, token_views)
        feats = _gather_features(images, text_out, logit_scale, ctx.world)
        parts = defense.loss(ctx, plan, batch, feats)
        total = sum(parts.values(), torch.zeros((), device=ctx.device))
        if ctx.world > 1:
            # every gathered feature reaches the loss, so every process runs the
            # same collectives in backward and DDP sees every parameter used
            total = total + 0.0 * _touch(feats)
    loss = total * ctx.world
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(bundle.model.parameters(), config.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():
        bundle.model.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
    detached = Features(
        image=[tuple(t.detach() for t in v) for v in feats.image],  # type: ignore[misc]
        text=[tuple(t.detach() for t in v) for v in feats.text],  # type: ignore[misc]
        logit_scale=feats.logit_scale.detach(),
    )
    defense.after_step(ctx, plan, batch, detached)
    names = sorted(parts)
    values = torch.stack([total.detach().float()] + [parts[n].detach().float() for n in names])
    if ctx.world > 1:
        torch.distributed.all_reduce(values)
    values = values.cpu().tolist()
    out = {"loss": values[0]}
    out.update({n: v for n, v in zip(names, values[1:], strict=True)})
    out["logit_scale"] = float(feats.logit_scale.detach())
    return out


def _gather_features(
    images: list[tuple[Tensor, Tensor]],
    texts: list[tuple[Tensor, Tensor, Tensor]],
    logit_scale: Tensor,
    world: int,
) -> Features:
    """The global batch's features; rows of other processes carry their gradients back."""
    gathered_images = [(_gather(g, world), _gather(p, world)) for g, p in images]
    gathered_texts = []
    for g, w, m in texts:
        mask = _gather_mask(m.bool(), world)
        width = _token_width(mask)
        gathered_texts.append((_gather(g, world), _gather(w, world)[:, :width], mask[:, :width]))
    return Features(image=gathered_images, text=gathered_texts, logit_scale=logit_scale)


_WIDTH_STEP = 8


def _token_width(mask: Tensor) -> int:
    """Word-token columns the OT losses need: the longest caption, rounded up to 8.

    Trimming the padding saves transport work; rounding keeps the number of distinct
    shapes small, so that a compiled Sinkhorn loop is not recompiled for every batch.
    """
    longest = int(mask.any(dim=0).nonzero().max().item()) + 1 if mask.any() else 1
    return min(mask.shape[1], -(-longest // _WIDTH_STEP) * _WIDTH_STEP)


def _gather(t: Tensor, world: int) -> Tensor:
    if world == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(t.contiguous()), dim=0)


def _gather_mask(m: Tensor, world: int) -> Tensor:
    if world == 1:
        return m
    wire = m.to(torch.uint8).contiguous()
    out = [torch.empty_like(wire) for _ in range(world)]
    torch.distributed.all_gather(out, wire)
    return torch.cat(out, dim=0).bool()


def _touch(feats: Features) -> Tensor:
    total = feats.logit_scale.float()
    for view in feats.image:
        for t in view:
            total = total + t.float().sum()
    for g, w, _ in feats.text:
        total = total + g.float().sum() + w.float().sum()
    return total


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, 1-d tensors and the logit scale (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": config.weight_decay},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps
    )


# --------------------------------------------------------------------------- run dir, checkpoints


def _open_run(config: TrainConfig, run_dir: Path | None, rank: int) -> Checkpoint | None:
    """The checkpoint to resume from (or None), after every check that can fail."""
    if run_dir is None:
        return None
    if not config.resume:
        if (
            rank == 0
            and run_dir.exists()
            and ((run_dir / WEIGHTS_FILE).exists() or load_checkpoint(run_dir) is not None)
        ):
            raise ValueError(
                f"{run_dir} already holds a training run; resume it (--resume) "
                "or choose another output directory"
            )
        dist.barrier()
        return None
    checkpoint = load_checkpoint(run_dir, config.resume_from)
    if checkpoint is None:
        raise CheckpointError(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}")
    saved = TrainConfig.from_dict(checkpoint.state["config"])
    if checkpoint.model_name != config.model:
        raise CheckpointError(
            f"the checkpoint in {run_dir} holds model {checkpoint.model_name!r}, "
            f"not {config.model!r}"
        )
    differ = [
        f"{f.name} ({getattr(saved, f.name)!r} there, {getattr(config, f.name)!r} now)"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if differ:
        raise CheckpointError(
            f"cannot resume {run_dir} with different settings: " + "; ".join(differ)
        )
    return checkpoint


def _checkpoint(
    ctx: TrainContext,
    run_dir: Path,
    loop: _Loop,
    defense: Defense,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    callbacks: Sequence[Callback],
) -> None:
    path: Path | None = None
    if ctx.is_main:
        state = {
            "config": ctx.config.to_dict(),
            "epoch": loop.epoch,
            "step": loop.step,
            "global_step": loop.global_step,
            "plan": None if loop.plan is None else loop.plan.state_dict(),
            "defense": defense.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": capture_rng(),
            "metrics": _jsonable(loop.metrics),
            "step_losses": list(loop.step_losses),
            "sums": dict(loop.sums),
            "steps_done": loop.steps_done,
            "seconds": loop.seconds,
            "data_seconds": loop.data_seconds,
            "prepare_seconds": loop.prepare_seconds,
        }
        if loop.stream is not None:
            state["stream"] = loop.stream
        _write_metrics(run_dir, loop.metrics)
        path = save_checkpoint(
            run_dir,
            ctx.bundle,
            state,
            global_step=loop.global_step,
            keep=ctx.config.keep_checkpoints,
        )
    dist.barrier()
    info = {"epoch": loop.epoch, "step": loop.step, "global_step": loop.global_step}
    for cb in callbacks:
        with _isolated_rng():
            cb.on_checkpoint(ctx, path if path is not None else run_dir, info)


def _restore(
    checkpoint: Checkpoint,
    loop: _Loop,
    defense: Defense,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
) -> None:
    s = checkpoint.state
    loop.epoch, loop.step, loop.global_step = int(s["epoch"]), int(s["step"]), int(s["global_step"])
    loop.plan = None if s["plan"] is None else EpochPlan.from_state(s["plan"])
    defense.load_state_dict(s["defense"])
    optimizer.load_state_dict(s["optimizer"])
    if scaler is not None and s["scaler"] is not None:
        scaler.load_state_dict(s["scaler"])
    restore_rng(s["rng"])
    loop.metrics = list(s["metrics"])
    loop.step_losses = [float(x) for x in s["step_losses"]]
    loop.sums = {k: float(v) for k, v in s["sums"].items()}
    loop.steps_done = int(s["steps_done"])
    loop.seconds = float(s["seconds"])
    loop.data_seconds = float(s.get("data_seconds", 0.0))  # checkpoints before it: none
    loop.prepare_seconds = float(s["prepare_seconds"])
    loop.stream = s.get("stream")


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite: training stops, nothing of the broken model is saved."""


def _non_finite_message(
    run_dir: Path | None, epoch: int, loop: Any, lr: float, parts: dict[str, float]
) -> str:
    """Where the loss broke, what is kept, and what to change (the lr is the usual cause).

    Called once the broken step is counted: `loop.step` is its 1-based number.
    """
    from otcclip.checkpoint import latest_checkpoint_path

    last = None if run_dir is None else latest_checkpoint_path(run_dir)
    kept = (
        f"the last good checkpoint {last} is kept"
        if last is not None
        else "no checkpoint had been written; nothing was saved"
    )
    bad = ", ".join(f"{k} {v}" for k, v in sorted(parts.items()) if not math.isfinite(v))
    return (
        f"the loss is not finite ({bad}) at epoch {epoch + 1}, step {loop.step} "
        f"(lr {lr:.3g}): training stopped and {kept}; lower --lr or set --grad-clip"
    )


def _write_metrics(run_dir: Path, metrics: list[dict[str, Any]]) -> None:
    # allow_nan=False: a NaN that slipped through would make the file invalid JSON.
    lines = "".join(json.dumps(_jsonable(m), allow_nan=False) + "\n" for m in metrics)
    write_text(run_dir / METRICS_FILE, lines)


# --------------------------------------------------------------------------- metrics and logs


def _epoch_metrics(
    ctx: TrainContext,
    loop: _Loop,
    plan: EpochPlan,
    epoch: int,
    steps: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    means = {k: v / max(1, loop.steps_done) for k, v in loop.sums.items()}
    return _jsonable(
        {
            "event": "epoch",
            "epoch": epoch + 1,
            "phase": plan.phase,
            "steps": steps,
            # streamed: the plan holds no rows; the pairs trained
            "pairs": steps * ctx.config.batch_size if ctx.table is None else len(plan.positions),
            **means,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": loop.seconds,
            "data_seconds": loop.data_seconds,
            "data_wait_share": loop.data_seconds / loop.seconds if loop.seconds > 0 else 0.0,
            "prepare_seconds": loop.prepare_seconds,
            "defense": plan.info,
        }
    )


def _epoch_line(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']}", m.get("phase", ""), f"loss {m.get('loss', float('nan')):.4f}"]
    parts.append(f"{m['seconds']:.1f}s (+{m['prepare_seconds']:.1f}s preparing)")
    if "data_wait_share" in m:
        parts.append(f"waiting on data {100 * m['data_wait_share']:.0f}%")
    defense = m.get("defense") or {}
    if defense.get("sitting_out"):  # OTCCLIP's on_doubt="drop", or unassigned images
        parts.append(f"left out {defense['sitting_out']}")
    elif "changed" in defense:
        parts.append(f"re-paired {defense['changed']}")
    ev = m.get("eval") or {}
    for key in ("zero_shot_top1", "targeted_asr", "backdoor_asr"):
        if isinstance(ev.get(key), (int, float)):
            parts.append(f"{key} {ev[key]:.3f}")
    return " | ".join(p for p in parts if p)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN / inf
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _tensorboard(config: TrainConfig, run_dir: Path | None, rank: int) -> Any:
    if not config.tensorboard or rank != 0:
        return None
    if run_dir is None:
        raise ValueError("tensorboard logging needs an output directory")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "tensorboard logging needs the tensorboard package (pip install tensorboard)"
        ) from exc
    return SummaryWriter(str(run_dir / "tensorboard"))


def _write_scalars(writer: Any, metrics: dict[str, Any], epoch: int, prefix: str = "epoch") -> None:
    for key, value in metrics.items():
        if isinstance(value, dict):
            _write_scalars(writer, value, epoch, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{prefix}/{key}", value, epoch)


def _logger(rank: int) -> Any:
    def log(message: str) -> None:
        if rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    return log


def _bar(total: int, desc: str, enabled: bool, *, initial: int = 0, position: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not enabled,
        position=position,
        leave=position == 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------- environment


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            return _check_cuda_index(torch.device("cuda", dist.local_rank()))
        return torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank())
    return _check_cuda_index(device)


def _check_cuda_index(device: torch.device) -> torch.device:
    """One GPU per process: more processes on a node than GPUs is a setup error, said so."""
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"this process wants {device}, but the node has {count} CUDA device(s): start "
                f"at most {count} process(es) per node, or train on the CPU (--device cpu)"
            )
    return device


def _precision(config: TrainConfig, device: torch.device) -> torch.dtype:
    """Mixed precision on CUDA only: bf16 where supported, else fp16 with a grad scaler."""
    if config.precision == "fp32":
        return torch.float32
    if device.type != "cuda":
        if config.precision != "auto":
            raise ValueError(
                f"precision {config.precision!r} needs a CUDA device (the CPU trains in fp32)"
            )
        return torch.float32
    if config.precision == "fp16":
        return torch.float16
    if config.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# Compiling the Sinkhorn loop costs seconds (tens on a cold cache) and then runs the OT
# losses about 3x faster on the CPU: worth it from about this much OT work in a run.
_COMPILE_PAYS_OFF = 20_000_000  # pair-iterations


def _configure_ot_compile(config: TrainConfig, total_steps: int, local_batch: int) -> None:
    """Switch `otcclip.ot` to compiled Sinkhorn for runs long enough to pay for it.

    Process-wide (the matching round's scoring then compiles too). "auto" leaves
    short runs (tests, smoke runs) to the OT module's own rule.
    """
    if config.defense != "otcclip":
        return
    terms = (config.lambda_inter > 0) * (1 + config.inter_symmetric) + 2 * (config.lambda_intra > 0)
    if terms == 0:
        return
    mode = config.ot_compile
    if mode == "auto":
        work = total_steps * local_batch * (1 + config.ot_negatives) * config.iters * terms
        if work < _COMPILE_PAYS_OFF:
            return
        mode = "on"
    from otcclip import ot

    ot.set_compile(mode)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def _validate_without_data(config: TrainConfig) -> None:
    probe = dataclasses.replace(config, scenes=1)
    probe.validate()


def _bad_int(value: Any, minimum: int) -> bool:
    return not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum
