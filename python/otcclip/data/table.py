"""The in-memory shapes data travels in: PairTable (training pairs), EvalSet (labelled tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PairTable:
    """Image-caption pairs with stable int64 ids.

    The ids survive shuffling, subsetting, poisoning and re-assignment, so that a
    manifest or a matching output can name a sample without relying on row order.
    `image_classes` / `caption_classes` are known for fashion-scenes only (None
    otherwise); they tell what an image shows and what its caption says.
    """

    ids: np.ndarray
    images: np.ndarray
    captions: list[str]
    image_classes: np.ndarray | None = None
    caption_classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids)
        if self.ids.ndim != 1 or not np.issubdtype(self.ids.dtype, np.integer):
            raise TypeError(
                f"ids must be a 1-D integer array, got {self.ids.dtype} {self.ids.shape}"
            )
        self.ids = self.ids.astype(np.int64, copy=False)
        n = len(self.ids)
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise TypeError("images must be a uint8 numpy array (N,H,W) or (N,H,W,3)")
        if not (self.images.ndim == 3 or (self.images.ndim == 4 and self.images.shape[3] == 3)):
            raise ValueError(f"images must be (N,H,W) or (N,H,W,3), got {self.images.shape}")
        if len(self.images) != n:
            raise ValueError(f"{len(self.images)} images for {n} ids")
        if not isinstance(self.captions, list):
            self.captions = list(self.captions)
        if len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} captions for {n} ids")
        bad = [i for i, c in enumerate(self.captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be str; rows {bad[:5]} are not")
        for name in ("image_classes", "caption_classes"):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value)
            if value.ndim != 2 or len(value) != n:
                raise ValueError(f"{name} must be (N, C) with N={n}, got {value.shape}")
            setattr(self, name, value.astype(np.uint8, copy=False))
        if (self.image_classes is None) != (self.caption_classes is None):
            raise ValueError("image_classes and caption_classes go together (both or neither)")
        if n and len(np.unique(self.ids)) != n:
            raise ValueError("ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def has_classes(self) -> bool:
        return self.image_classes is not None

    def subset(self, idx: Sequence[int] | np.ndarray | slice) -> PairTable:
        """Rows by position (integer indices, a boolean mask or a slice), ids kept."""
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
        else:
            rows = np.asarray(idx)
            if rows.dtype == bool:
                if rows.shape != (len(self),):
                    raise ValueError(f"boolean mask of shape {rows.shape}; expected ({len(self)},)")
                rows = np.flatnonzero(rows)
            elif rows.size == 0:
                rows = rows.astype(np.int64)
            elif not np.issubdtype(rows.dtype, np.integer):
                raise TypeError(f"subset takes integer indices or a boolean mask, got {rows.dtype}")
        return PairTable(
            ids=self.ids[rows],
            images=self.images[rows],
            captions=[self.captions[i] for i in rows],
            image_classes=None if self.image_classes is None else self.image_classes[rows],
            caption_classes=None if self.caption_classes is None else self.caption_classes[rows],
        )

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of the given ids (a ValueError names any id not in the table)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self) == 0:
            if len(ids):
                raise ValueError(f"{len(ids)} ids not in the (empty) table")
            return np.zeros(0, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(self) - 1)
        found = sorted_ids[pos] == ids
        if not found.all():
            missing = ids[~found]
            raise ValueError(f"{len(missing)} ids not in the table, e.g. {missing[:5].tolist()}")
        rows = order[pos]
        return rows

    @staticmethod
    def concat(tables: Sequence[PairTable]) -> PairTable:
        """One table from several with the same image shape (ids must stay unique)."""
        if not tables:
            raise ValueError("concat needs at least one table")
        shapes = {t.image_shape for t in tables}
        if len(shapes) != 1:
            raise ValueError(f"cannot concat tables of image shapes {sorted(shapes)}")
        with_classes = {t.has_classes for t in tables}
        if len(with_classes) != 1:
            raise ValueError("cannot concat tables with and without class annotations")
        classes = with_classes.pop()
        return PairTable(
            ids=np.concatenate([t.ids for t in tables]),
            images=np.concatenate([t.images for t in tables]),
            captions=[c for t in tables for c in t.captions],
            image_classes=np.concatenate([t.image_classes for t in tables]) if classes else None,
            caption_classes=np.concatenate([t.caption_classes for t in tables])
            if classes
            else None,
        )


@dataclass
class EvalSet:
    """A labelled test set with its zero-shot vocabulary.

    `templates` are prompt patterns with `{a}` (the noun with its article, 'an ankle
    boot') and/or `{name}` (the bare noun); `synonyms[c]` are the names of class c that
    the prompt ensemble averages over (class names only when None).
    """

    images: np.ndarray
    labels: np.ndarray
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] | None = None
    ids: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels).astype(np.int64, copy=False)
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise TypeError("EvalSet images must be a uint8 numpy array")
        if len(self.images) != len(self.labels) or self.labels.ndim != 1:
            raise ValueError(f"{len(self.images)} images for labels of shape {self.labels.shape}")
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.classnames)
        ):
            raise ValueError(f"labels must be in 0..{len(self.classnames) - 1}")
        if self.synonyms is not None and len(self.synonyms) != len(self.classnames):
            raise ValueError("synonyms must list names for every class")
        if not self.templates:
            raise ValueError("an EvalSet needs at least one prompt template")

    def __len__(self) -> int:
        return len(self.labels)

    def class_prompts(self) -> list[list[str]]:
        """Every prompt of every class: names (with synonyms) x templates."""
        from otcclip.data.fmnist import with_article

        names = self.synonyms if self.synonyms is not None else tuple((c,) for c in self.classnames)
        return [
            [
                t.format(a=with_article(name), name=name)
                for name in class_names
                for t in self.templates
            ]
            for class_names in names
        ]

    def subset(self, idx: np.ndarray | slice) -> EvalSet:
        return EvalSet(
            images=self.images[idx],
            labels=self.labels[idx],
            classnames=self.classnames,
            templates=self.templates,
            synonyms=self.synonyms,
            ids=None if self.ids is None else self.ids[idx],
        )
