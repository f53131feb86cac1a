"""OTCCLIP's matching rounds on a stream: doubt by pair id, from what training kept.

Why this module exists: a streamed run (`otcclip train --stream`) holds no table. A round
can neither embed every pair again nor look at every image's pixels, and pairs come by
id in an order the shards decide. So it judges the pairs from the global embeddings that
the training pass kept (`matching_state.MatchingState`), in slots given to ids as they
first arrive (`IdSlots`), and a doubted pair sits out by id.

What differs from the in-memory round:
- The pixel evidence comes from a pass of its own before the first epoch
  (`otcclip.stream_pixels`): every image read once, kept on disk as grey levels while
  the detectors read it by blocks. The pass gives every pair its slot, in the order it
  reads; the warm-up's screen and every round read the evidence by slot.
- A doubted pair still streams past. Its features are computed with the batch and kept
  (so no pair goes stale), but it is masked out of the losses. The batch then holds
  fewer pairs that train, instead of the in-memory path's full batches of kept pairs.
- A pair that no epoch has streamed yet (a partial batch at the end of a worker's
  share) is not judged until one has. Every other pair is judged from its latest
  embeddings, stale by at most the epochs since it last streamed.
- Only `on_doubt="drop"`: re-pairing needs the chosen caption's pair at hand.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from otcclip.matching_state import NEVER, MatchingState

__all__ = ["IdSlots", "StreamedRounds"]


class IdSlots:
    """Slots 0, 1, ... given to pair ids in the order they first come.

    A stream's ids are any non-negative integers, known only as they arrive (a shard
    index records counts, not every id), so the state's rows are slots, not ids.

    The ids are looked up in a sorted copy (`np.searchsorted`), not a dict: 24 bytes a
    pair instead of about 120 for a dict of Python ints, which at web scale was a good
    part of what a streamed trainer holds per pair (issue 16), and a batch is looked up
    whole instead of one id at a time.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.ids = np.full(capacity, -1, np.int64)
        self.count = 0
        self._sorted = np.zeros(0, np.int64)  # the ids given a slot, ascending
        self._sorted_slot = np.zeros(0, np.int64)  # the slot of each

    def __len__(self) -> int:
        return self.count

    def assign(self, ids: np.ndarray) -> np.ndarray:
        """The slots of `ids`, giving new ids the next free slots (in the order they come)."""
        ids = np.asarray(ids, np.int64)
        slots = self.find(ids)
        new = slots < 0
        if not new.any():
            return slots
        fresh, first = np.unique(ids[new], return_index=True)
        arrival = np.argsort(first)  # the new ids in the order they first come
        if self.count + len(fresh) > len(self.ids):
            pair_id = int(fresh[arrival[len(self.ids) - self.count]])
            raise ValueError(
                f"id {pair_id} is new, but all {len(self.ids)} slots are taken: the "
                "stream holds more distinct ids than the pairs its index counts"
            )
        given = np.empty(len(fresh), np.int64)
        given[arrival] = np.arange(self.count, self.count + len(fresh), dtype=np.int64)
        self.ids[given] = fresh
        self.count += len(fresh)
        at = np.searchsorted(self._sorted, fresh)
        self._sorted = np.insert(self._sorted, at, fresh)
        self._sorted_slot = np.insert(self._sorted_slot, at, given)
        slots[new] = given[np.searchsorted(fresh, ids[new])]
        return slots

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The slots of `ids`, -1 for an id not seen yet."""
        ids = np.asarray(ids, np.int64)
        out = np.full(len(ids), -1, np.int64)
        if not len(self._sorted) or not len(ids):
            return out
        at = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        seen = self._sorted[at] == ids
        out[seen] = self._sorted_slot[at[seen]]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ids": self.ids[: self.count].copy(), "capacity": len(self.ids)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IdSlots:
        ids = np.asarray(state["ids"], np.int64)
        out = cls(int(state["capacity"]))
        if ids.ndim != 1 or len(ids) > len(out.ids) or len(np.unique(ids)) != len(ids):
            raise ValueError("stream slots: the saved ids are not distinct or exceed capacity")
        out.assign(ids)
        return out


class StreamedRounds:
    """What a streamed OTCCLIP run keeps between rounds, by slot.

    kept: the global embeddings the training pass wrote; left_out: the pairs the last
    round doubted (masked out of the losses until the next round); doubted: every pair
    some round doubted (with `sticky`, those stay out).
    """

    def __init__(
        self, capacity: int, dim: int, directory: str | os.PathLike[str] | None = None
    ) -> None:
        self.slots = IdSlots(capacity)
        self.kept = MatchingState(capacity, dim, directory)  # memory-mapped there, if given
        self.left_out = np.zeros(capacity, bool)
        self.doubted = np.zeros(capacity, bool)

    def write(self, ids: np.ndarray, image: np.ndarray, caption: np.ndarray, epoch: int) -> None:
        """Keep a trained batch's global embeddings (pair ids, their images and captions)."""
        slots = self.slots.assign(ids)
        self.kept.write_images(slots, image, epoch)
        self.kept.write_captions(slots, caption, epoch)

    def trains(self, ids: np.ndarray) -> np.ndarray:
        """Which of the pairs `ids` the losses may use: bool, False for a pair left out."""
        slots = self.slots.find(ids)
        out = np.ones(len(slots), bool)
        seen = slots >= 0
        out[seen] = ~self.left_out[slots[seen]]
        return out

    def judged(self) -> np.ndarray:
        """The slots a round can judge: both embeddings written by some epoch."""
        n = len(self.slots)
        written = (self.kept.image_epoch[:n] != NEVER) & (self.kept.caption_epoch[:n] != NEVER)
        return np.flatnonzero(written)

    def oldest(self, slots: np.ndarray) -> int:
        """The oldest epoch that wrote an embedding of `slots` (how stale a round reads)."""
        if not len(slots):
            return NEVER
        return int(min(self.kept.image_epoch[slots].min(), self.kept.caption_epoch[slots].min()))

    def apply(self, slots: np.ndarray, doubted_now: np.ndarray, sticky: bool) -> None:
        """A round's verdict on `slots`: the doubted sit out until the next round (and for
        good with `sticky`)."""
        self.doubted[slots] |= doubted_now
        self.left_out[:] = self.doubted if sticky else False
        self.left_out[slots] |= doubted_now

    def state_dict(self) -> dict[str, Any]:
        return {
            "slots": self.slots.state_dict(),
            "kept": self.kept.state_dict(),
            "left_out": self.left_out,
            "doubted": self.doubted,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], directory: str | os.PathLike[str] | None = None
    ) -> StreamedRounds:
        kept = MatchingState.from_state(state["kept"], directory)
        out = cls.__new__(cls)
        out.kept = kept
        out.left_out = np.zeros(len(kept), bool)
        out.doubted = np.zeros(len(kept), bool)
        out.slots = IdSlots.from_state(state["slots"])
        for name in ("left_out", "doubted"):
            value = np.asarray(state[name], bool)
            if value.shape != (len(kept),):
                raise ValueError(f"stream state: {name} holds {value.shape}, not one per slot")
            getattr(out, name)[:] = value
        return out
