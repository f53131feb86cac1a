"""Each pair's global embeddings as the training pass last saw them, for the next round.

Why this module exists: a matching round that embeds every image and caption again costs
as much as a good part of an epoch (issue 16: half of a round was re-embedding), yet the
training step has just computed the same global embeddings, one batch at a time. Kept per
pair, they are stale by at most one epoch, as RoCLIP's caption bank is, and the round can
prune and doubt from them with no embedding pass of its own (`matching.match_embeddings`).

Only the pairs the last epoch did not train (a pair left out by the doubt, or screened
out of the warm-up) are re-embedded at the round, in eval mode, and so are the captions
no trained image carried. Embeddings are kept in float16 (N x D each, as issue 16 sizes
the state) and stamped with the epoch that wrote them. Rows are the trainer's table rows.

What changes against a round that embeds everything again (`round_embeddings="model"`):
the embeddings of one round come from the model at different steps of the last epoch
(and from view 0 of the training step, augmented when L_intra augments it), and the
cross-modal doubt signal is the global-cosine lead, since the fine-grained OT needs tokens
the training pass does not keep; with `on_doubt="repair"` only the doubted pairs are
scored by OT, to pick their new caption.

At web scale the state is large (3M pairs of ViT-B-32: 6 GiB), so it may live in
memory-mapped files instead (`directory`, the trainer's `--state-on-disk`): the operating
system then pages it in and out as the rounds and the training pass touch it, and it no
longer counts against the process's own memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from otcclip.rows import unit_rows

__all__ = ["NEVER", "MatchingState"]

NEVER = np.iinfo(np.int32).min  # the stamp of a row nothing has written yet


class MatchingState:
    """Per-pair global image and caption embeddings, float16, with the epoch of each write.

    image[i] / caption[i]: pair i's image and own caption, L2-normalised; image_epoch[i] /
    caption_epoch[i]: the epoch whose model wrote it (its training pass, or the round after
    it; -1: the model before training), NEVER if nothing has. directory: keep the four
    arrays in memory-mapped .npy files there (created anew, so a state starts empty).
    """

    def __init__(self, n: int, dim: int, directory: str | os.PathLike[str] | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.directory = None if directory is None else Path(directory)
        self.image = self._array("image", (n, dim), np.float16, 0)
        self.caption = self._array("caption", (n, dim), np.float16, 0)
        self.image_epoch = self._array("image_epoch", (n,), np.int32, NEVER)
        self.caption_epoch = self._array("caption_epoch", (n,), np.int32, NEVER)

    def _array(self, name: str, shape: tuple[int, ...], dtype: Any, fill: int) -> np.ndarray:
        if self.directory is None:
            return np.full(shape, fill, dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(self.directory / f"{name}.npy", "w+", dtype, shape)
        if fill:
            out[:] = fill  # a new file reads zeros
        return out

    def __len__(self) -> int:
        return len(self.image)

    @property
    def dim(self) -> int:
        return self.image.shape[1]

    def write_images(self, rows: np.ndarray, embeddings: np.ndarray, epoch: int) -> None:
        """Store the images of table rows `rows` (any norm; normalised here)."""
        self._write(self.image, self.image_epoch, rows, embeddings, epoch, "image")

    def write_captions(self, rows: np.ndarray, embeddings: np.ndarray, epoch: int) -> None:
        """Store the captions of table rows `rows` (any norm; normalised here)."""
        self._write(self.caption, self.caption_epoch, rows, embeddings, epoch, "caption")

    def stale_images(self, epoch: int) -> np.ndarray:
        """Rows whose image no model of epoch `epoch` - 1 or later wrote (to embed at the
        round that opens `epoch`; at epoch 0, the rows never written)."""
        return np.flatnonzero(self.image_epoch < epoch - 1)

    def stale_captions(self, epoch: int) -> np.ndarray:
        """Rows whose caption was not written in `epoch` - 1 or later."""
        return np.flatnonzero(self.caption_epoch < epoch - 1)

    def embeddings(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images, captions), float32 (N, D) each (or of `rows` only), rows of length 1
        (a row never written is all zeros: write or refresh it first)."""
        pick = None if rows is None else np.asarray(rows, np.int64)
        at = slice(None) if pick is None else pick
        never = (self.image_epoch[at] == NEVER) | (self.caption_epoch[at] == NEVER)
        unwritten = np.arange(len(self))[at][never]
        if len(unwritten):
            raise ValueError(
                f"{len(unwritten)} rows were never written (first: {unwritten[:5].tolist()}); "
                "refresh the stale rows before the round"
            )
        return unit_rows(self.image, pick), unit_rows(self.caption, pick)

    def state_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "caption": self.caption,
            "image_epoch": self.image_epoch,
            "caption_epoch": self.caption_epoch,
        }

    def flush(self) -> None:
        """Write the memory-mapped arrays' changes to their files (no-op in memory)."""
        for array in (self.image, self.caption, self.image_epoch, self.caption_epoch):
            if isinstance(array, np.memmap):
                array.flush()

    @classmethod
    def from_state(
        cls, state: dict[str, Any], directory: str | os.PathLike[str] | None = None
    ) -> MatchingState:
        """The state `state_dict` wrote, checked: equal shapes, float16, one stamp per row;
        in memory-mapped files in `directory` when given."""
        image = np.asarray(state["image"])
        caption = np.asarray(state["caption"])
        if image.ndim != 2 or image.shape != caption.shape or len(image) < 1:
            raise ValueError(
                f"matching state: image {image.shape} and caption {caption.shape} "
                "embeddings must be (N, D) of one shape"
            )
        out = cls(len(image), image.shape[1], directory)
        out.image[:] = image
        out.caption[:] = caption
        for name in ("image_epoch", "caption_epoch"):
            stamps = np.asarray(state[name])
            if stamps.shape != (len(image),):
                raise ValueError(f"matching state: {name} holds {stamps.shape}, not one per row")
            getattr(out, name)[:] = stamps
        return out

    def _write(
        self,
        store: np.ndarray,
        stamps: np.ndarray,
        rows: np.ndarray,
        embeddings: np.ndarray,
        epoch: int,
        name: str,
    ) -> None:
        rows = np.asarray(rows, np.int64)
        emb = np.asarray(embeddings, np.float32)
        if rows.ndim != 1 or emb.shape != (len(rows), self.dim):
            raise ValueError(
                f"{name} embeddings {emb.shape} for {rows.shape} rows; want ({len(rows)}, "
                f"{self.dim})"
            )
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < -1:
            raise ValueError(f"epoch must be an int >= -1, got {epoch!r}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"{name} rows must lie in [0, {len(self)}), got {rows.min()}..")
        store[rows] = unit_rows(emb).astype(np.float16)
        stamps[rows] = epoch
