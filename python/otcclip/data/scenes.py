"""fashion-scenes: Fashion-MNIST items placed on a small canvas, with captions that say where.

A caption names each item and its place ("a sneaker to the left of a handbag",
"product photo: ankle boot, top right"), so that matching image patches to caption
words carries information that one global vector blurs. Everything is drawn from a
seeded numpy Generator in a fixed order, so the same arguments give the same bytes.
Items never overlap: a scene of k items uses k places whose 28 px boxes are disjoint.
"""

from __future__ import annotations

import functools
import itertools
import os

import numpy as np

from otcclip.data.fmnist import CLASSNAMES, SYNONYMS, load_fashion_mnist, with_article
from otcclip.data.table import EvalSet, PairTable

ITEM = 28
MIN_IMAGE_SIZE = 2 * ITEM
MAX_ITEMS = 3  # a fourth item would push captions past 32 BPE tokens
TEST_ID_OFFSET = 1 << 40  # ids of test-split scenes, disjoint from training ids 0..n-1

# The 3 x 3 grid of named places, row-major.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# How a sentence says "where" (with its preposition), per place.
_PLACE_PHRASES: tuple[tuple[str, ...], ...] = (
    ("at the top left", "in the top left corner", "in the upper left"),
    ("at the top", "near the top", "at the top center"),
    ("at the top right", "in the top right corner", "in the upper right"),
    ("on the left", "at the left", "on the left side"),
    ("in the center", "in the middle", "at the center"),
    ("on the right", "at the right", "on the right side"),
    ("at the bottom left", "in the bottom left corner", "in the lower left"),
    ("at the bottom", "near the bottom", "at the bottom center"),
    ("at the bottom right", "in the bottom right corner", "in the lower right"),
)
# The bare place, for terse captions ("product photo: ankle boot, top right").
_PLACE_BARE: tuple[tuple[str, ...], ...] = (
    ("top left", "upper left"),
    ("top", "top center"),
    ("top right", "upper right"),
    ("left", "left side"),
    ("center", "middle"),
    ("right", "right side"),
    ("bottom left", "lower left"),
    ("bottom", "bottom center"),
    ("bottom right", "lower right"),
)

# Zero-shot prompt patterns; the place-free ones plus "{a} <place>" for every place.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of {a}.",
    "{a}",
    "product photo: {name}",
    "{a} on a black background",
    "there is {a}",
    "a picture of {a}",
) + tuple(f"{{a}} {phrases[0]}" for phrases in _PLACE_PHRASES)

# Test images are split once, by a constant seed, into an evaluation pool (zero-shot,
# linear probe, test scenes) and a pool reserved for targeted-poisoning targets, so that
# a target image never doubles as a zero-shot test image.
_TEST_PARTITION_SEED = 20250923
_N_TARGET_POOL = 1000
_SPLIT_CODES = {"train": 1, "test": 2, "zero_shot": 3, "probe": 4, "targets": 5, "validation": 6}


def _offsets(image_size: int) -> np.ndarray:
    return np.array([0, (image_size - ITEM) // 2, image_size - ITEM])


def place_origin(position: int, image_size: int) -> tuple[int, int]:
    """(row, col) of the top-left pixel of an item at the named place."""
    off = _offsets(image_size)
    return int(off[position // 3]), int(off[position % 3])


@functools.lru_cache(maxsize=32)
def _layouts(k: int, image_size: int) -> np.ndarray:
    """All sets of k places whose item boxes do not overlap, as an int array (M, k)."""
    off = _offsets(image_size)
    ys, xs = off[np.arange(9) // 3], off[np.arange(9) % 3]
    disjoint = (np.abs(ys[:, None] - ys[None, :]) >= ITEM) | (
        np.abs(xs[:, None] - xs[None, :]) >= ITEM
    )
    combos = [
        c
        for c in itertools.combinations(range(9), k)
        if all(disjoint[a, b] for a, b in itertools.combinations(c, 2))
    ]
    if not combos:
        raise ValueError(f"{k} items do not fit without overlap on a {image_size} px canvas")
    return np.array(combos, dtype=np.int64)


def _check_size(image_size: int, max_items: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if not 1 <= max_items <= MAX_ITEMS:
        raise ValueError(f"max_items must be in 1..{MAX_ITEMS}, got {max_items}")


@functools.lru_cache(maxsize=4)
def _test_pools(root_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    _, labels = load_fashion_mnist("test", root_key)
    perm = np.random.default_rng(_TEST_PARTITION_SEED).permutation(len(labels))
    return perm[:-_N_TARGET_POOL], perm[-_N_TARGET_POOL:]


def _pool(
    split: str, root: str | os.PathLike[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and the usable indices of a pool ('train', 'test' or 'targets')."""
    source = "train" if split == "train" else "test"
    images, labels = load_fashion_mnist(source, root)
    if split == "train":
        return images, labels, np.arange(len(labels))
    eval_pool, target_pool = _test_pools(None if root is None else str(root))
    return images, labels, eval_pool if split == "test" else target_pool


def _rng(seed: int, split: str) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), _SPLIT_CODES[split]])


def _pick_of_class(
    rng: np.random.Generator, labels: np.ndarray, pool: np.ndarray, classes: np.ndarray
) -> np.ndarray:
    """One random pool index per entry of `classes`, of that class (with replacement)."""
    out = np.empty(classes.shape, dtype=np.int64)
    pool_labels = labels[pool]
    for c in range(len(CLASSNAMES)):
        where = classes == c
        count = int(where.sum())
        if count:
            members = pool[pool_labels == c]
            out[where] = members[rng.integers(0, len(members), count)]
    return out


def _compose(
    items: np.ndarray, sources: np.ndarray, places: np.ndarray, image_size: int
) -> np.ndarray:
    """Canvas (N, S, S): item sources[n, j] pasted at places[n, j] (-1 = no item)."""
    n, slots = places.shape
    canvas = np.zeros((n, image_size, image_size), dtype=np.uint8)
    for j in range(slots):
        for p in range(9):
            rows = np.flatnonzero(places[:, j] == p)
            if len(rows):
                y, x = place_origin(p, image_size)
                canvas[rows, y : y + ITEM, x : x + ITEM] = items[sources[rows, j]]
    return canvas


def _item_phrase(rng_vals: np.ndarray, c: int) -> tuple[str, str]:
    name = SYNONYMS[c][int(rng_vals[0]) % len(SYNONYMS[c])]
    return name, with_article(name)


def _caption(classes: list[int], places: list[int], draws: np.ndarray) -> str:
    """One caption from pre-drawn random integers (so captions need no Python RNG)."""
    k = len(classes)
    names, arts, ats, bares = [], [], [], []
    for j, (c, p) in enumerate(zip(classes, places, strict=True)):
        name, art = _item_phrase(draws[1 + 3 * j :], c)
        names.append(name)
        arts.append(art)
        ats.append(_PLACE_PHRASES[p][int(draws[2 + 3 * j]) % len(_PLACE_PHRASES[p])])
        bares.append(_PLACE_BARE[p][int(draws[3 + 3 * j]) % len(_PLACE_BARE[p])])
    t = int(draws[0])
    if k == 1:
        forms = (
            f"{arts[0]} {ats[0]}",
            f"a photo of {arts[0]} {ats[0]}",
            f"product photo: {names[0]}, {bares[0]}",
            f"{arts[0]} on a black background, {ats[0]}",
            f"there is {arts[0]} {ats[0]}",
            f"{ats[0]}: {arts[0]}",
            f"a picture of {arts[0]}",
        )
        return forms[t % len(forms)]
    forms_k = [
        ", ".join(f"{a} {at}" for a, at in zip(arts[:-1], ats[:-1], strict=True))
        + f" and {arts[-1]} {ats[-1]}",
        "product photo: " + "; ".join(f"{n}, {b}" for n, b in zip(names, bares, strict=True)),
        ", ".join(f"{a} ({b})" for a, b in zip(arts, bares, strict=True)),
    ]
    if k == 2:
        (ya, xa), (yb, xb) = divmod(places[0], 3), divmod(places[1], 3)
        if ya == yb:
            left, right = (0, 1) if xa < xb else (1, 0)
            forms_k += [
                f"{arts[left]} to the left of {arts[right]}",
                f"{arts[right]} to the right of {arts[left]}",
            ]
        elif xa == xb:
            upper, lower = (0, 1) if ya < yb else (1, 0)
            forms_k += [f"{arts[upper]} above {arts[lower]}", f"{arts[lower]} below {arts[upper]}"]
        else:
            forms_k.append(f"a photo of {arts[0]} {ats[0]} and {arts[1]} {ats[1]}")
    return forms_k[t % len(forms_k)]


def _captions(classes: np.ndarray, places: np.ndarray, rng: np.random.Generator) -> list[str]:
    n, slots = places.shape
    draws = rng.integers(0, 1 << 30, size=(n, 1 + 3 * slots))
    # Mention the items in a random order, so word order carries no fixed place.
    order = np.argsort(rng.random((n, slots)), axis=1)
    out = []
    for i in range(n):
        used = [j for j in order[i] if places[i, j] >= 0]
        out.append(
            _caption(
                [int(classes[i, j]) for j in used], [int(places[i, j]) for j in used], draws[i]
            )
        )
    return out


def _multi_hot(classes: np.ndarray) -> np.ndarray:
    out = np.zeros((len(classes), len(CLASSNAMES)), dtype=np.uint8)
    rows, cols = np.nonzero(classes >= 0)
    out[rows, classes[rows, cols]] = 1
    return out


def _scenes(
    n: int,
    pool_name: str,
    rng: np.random.Generator,
    image_size: int,
    n_items: np.ndarray,
    root: str | os.PathLike[str] | None,
    classes: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Images, captions and per-slot classes (N, slots; -1 = empty) of n scenes."""
    items, labels, pool = _pool(pool_name, root)
    slots = int(n_items.max()) if n else 1
    places = np.full((n, slots), -1, dtype=np.int64)
    for k in range(1, slots + 1):
        rows = np.flatnonzero(n_items == k)
        if len(rows):
            layouts = _layouts(k, image_size)
            places[rows, :k] = layouts[rng.integers(0, len(layouts), len(rows))]
    if classes is None:
        # Distinct classes within a scene: the first `slots` of a random permutation of 10.
        classes = np.argsort(rng.random((n, len(CLASSNAMES))), axis=1)[:, :slots]
    classes = np.where(places >= 0, classes, -1)
    sources = np.where(places >= 0, _pick_of_class(rng, labels, pool, np.maximum(classes, 0)), 0)
    images = _compose(items, sources, places, image_size)
    return images, _captions(classes, places, rng), classes


def fashion_scenes(
    n: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 56,
    max_items: int = 3,
    root: str | os.PathLike[str] | None = None,
    min_items: int = 1,
) -> PairTable:
    """n captioned scenes of min_items..max_items Fashion-MNIST items (uniform count).

    split 'train' draws items from Fashion-MNIST's training images (ids 0..n-1); 'test'
    from its test images (ids TEST_ID_OFFSET + 0..n-1), never from those reserved for
    targeted-poisoning targets.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_size(image_size, max_items)
    if not 1 <= min_items <= max_items:
        raise ValueError(f"min_items must be in 1..max_items={max_items}, got {min_items}")
    rng = _rng(seed, split)
    n_items = rng.integers(min_items, max_items + 1, n)
    images, captions, classes = _scenes(n, split, rng, image_size, n_items, root)
    hot = _multi_hot(classes)
    offset = 0 if split == "train" else TEST_ID_OFFSET
    return PairTable(
        ids=np.arange(n, dtype=np.int64) + offset,
        images=images,
        captions=captions,
        image_classes=hot,
        caption_classes=hot.copy(),
    )


def target_scenes(
    classes: np.ndarray | list[int],
    seed: int,
    image_size: int = 56,
    root: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-item scenes of distinct test images of the given classes, for poisoning targets.

    Drawn from the pool of test images reserved for targets (never in a zero-shot,
    probe or test-scene set). Returns images (T, S, S), places (T,) and the
    Fashion-MNIST test indices (T,) of the items.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    _check_size(image_size, 1)
    if len(classes) and (classes.min() < 0 or classes.max() >= len(CLASSNAMES)):
        raise ValueError(f"target classes must be in 0..{len(CLASSNAMES) - 1}")
    items, labels, pool = _pool("targets", root)
    rng = _rng(seed, "targets")
    order = rng.permutation(pool)
    sources = np.empty(len(classes), dtype=np.int64)
    for c in np.unique(classes):
        want = np.flatnonzero(classes == c)
        members = order[labels[order] == c]
        if len(want) > len(members):
            raise ValueError(
                f"{len(classes)} target images asked for, {len(want)} of them of class "
                f"{CLASSNAMES[c]!r}, but only {len(members)} test images of that class are "
                "reserved for targets; ask for fewer targets"
            )
        sources[want] = members[: len(want)]
    places = rng.integers(0, 9, len(classes))
    images = _compose(items, sources.reshape(-1, 1), places.reshape(-1, 1), image_size)
    return images, places, sources


def caption_for(classes: list[int], places: list[int], rng: np.random.Generator) -> str:
    """A caption for given classes at given places, in one of the scene templates.

    Attacks write their captions this way, so a poisoned caption reads like a clean one.
    """
    if len(classes) != len(places) or not 1 <= len(classes) <= MAX_ITEMS:
        raise ValueError(f"caption_for needs 1..{MAX_ITEMS} classes and as many places")
    draws = rng.integers(0, 1 << 30, size=1 + 3 * len(classes))
    return _caption([int(c) for c in classes], [int(p) for p in places], draws)


def _single_item_eval_set(
    indices: np.ndarray,
    rng: np.random.Generator,
    image_size: int,
    root: str | os.PathLike[str] | None,
) -> EvalSet:
    items, labels, _ = _pool("test", root)
    places = rng.integers(0, 9, len(indices)).reshape(-1, 1)
    images = _compose(items, indices.reshape(-1, 1), places, image_size)
    return EvalSet(
        images=images,
        labels=labels[indices],
        classnames=CLASSNAMES,
        templates=ZERO_SHOT_TEMPLATES,
        synonyms=SYNONYMS,
        ids=indices.astype(np.int64),
    )


def zero_shot_set(
    n: int = 2000, seed: int = 0, image_size: int = 56, root: str | os.PathLike[str] | None = None
) -> EvalSet:
    """n single-item scenes of distinct Fashion-MNIST test images, at random places."""
    _check_size(image_size, 1)
    _, _, pool = _pool("test", root)
    if not 1 <= n <= len(pool):
        raise ValueError(f"zero-shot set size must be in 1..{len(pool)}, got {n}")
    rng = _rng(seed, "zero_shot")
    return _single_item_eval_set(rng.permutation(pool)[:n], rng, image_size, root)


def validation_set(
    n: int = 1000,
    seed: int = 0,
    image_size: int = 56,
    exclude: np.ndarray | None = None,
    root: str | os.PathLike[str] | None = None,
) -> EvalSet:
    """n single-item scenes of test-pool images NOT in `exclude` (the zero-shot/probe sets' ids).

    For tuning: a defense's knobs are chosen by zero-shot accuracy here, so that the
    images the table reports (zero_shot_set, probe_sets) never decide a setting.
    """
    _check_size(image_size, 1)
    _, _, pool = _pool("test", root)
    if exclude is not None:
        pool = np.setdiff1d(pool, np.asarray(exclude, dtype=np.int64))
    if not 1 <= n <= len(pool):
        raise ValueError(f"validation set size must be in 1..{len(pool)}, got {n}")
    rng = _rng(seed, "validation")
    return _single_item_eval_set(rng.permutation(pool)[:n], rng, image_size, root)


def probe_sets(
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 56,
    root: str | os.PathLike[str] | None = None,
) -> tuple[EvalSet, EvalSet]:
    """Disjoint linear-probe train and test sets of single-item test-image scenes."""
    _check_size(image_size, 1)
    _, _, pool = _pool("test", root)
    if n_train < 1 or n_test < 1 or n_train + n_test > len(pool):
        raise ValueError(
            f"probe sets need n_train, n_test >= 1 and n_train + n_test <= {len(pool)}"
        )
    rng = _rng(seed, "probe")
    chosen = rng.permutation(pool)[: n_train + n_test]
    both = _single_item_eval_set(chosen, rng, image_size, root)
    return both.subset(slice(0, n_train)), both.subset(slice(n_train, None))
