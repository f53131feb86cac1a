"""fashion-scenes on the real Fashion-MNIST: determinism, true content, captions, splits."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from otcclip.data import (
    CLASSNAMES,
    TEST_ID_OFFSET,
    classes_in_captions,
    fashion_scenes,
    load_fashion_mnist,
    probe_sets,
    zero_shot_set,
)
from otcclip.data import scenes as sc


@functools.lru_cache(maxsize=2)
def _lookup(split: str) -> dict[bytes, tuple[int, int]]:
    """Item bytes -> (index, label) of a Fashion-MNIST split."""
    images, labels = load_fashion_mnist(split)
    return {
        im.tobytes(): (i, int(lab)) for i, (im, lab) in enumerate(zip(images, labels, strict=True))
    }


def _items(image: np.ndarray, split: str) -> dict[int, tuple[int, int]]:
    """place -> (index, label) of every Fashion-MNIST item found intact at a named place."""
    lookup = _lookup(split)
    found = {}
    size = image.shape[0]
    for place in range(9):
        y, x = sc.place_origin(place, size)
        crop = image[y : y + 28, x : x + 28]
        if crop.any() and crop.tobytes() in lookup:
            found[place] = lookup[crop.tobytes()]
    return found


def test_same_seed_same_bytes_other_seed_other_scenes():
    a = fashion_scenes(200, seed=3)
    b = fashion_scenes(200, seed=3)
    c = fashion_scenes(200, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("image_size", [56, 64])
def test_scenes_show_exactly_their_classes_from_the_right_split(image_size):
    for split in ("train", "test"):
        t = fashion_scenes(150, split, seed=1, image_size=image_size)
        assert t.images.shape == (150, image_size, image_size) and t.images.dtype == np.uint8
        offset = 0 if split == "train" else TEST_ID_OFFSET
        assert t.ids.tolist() == list(range(offset, offset + 150))
        counts = t.image_classes.sum(axis=1)
        assert set(counts.tolist()) == {1, 2, 3}
        for image, hot in zip(t.images, t.image_classes, strict=True):
            found = _items(image, split)
            # Every item is intact (no overlap) and comes from this split's images.
            assert len(found) == hot.sum()
            assert sorted(label for _, label in found.values()) == np.flatnonzero(hot).tolist()


def test_captions_name_exactly_the_items_shown():
    t = fashion_scenes(400, seed=2)
    np.testing.assert_array_equal(classes_in_captions(t.captions), t.image_classes)
    np.testing.assert_array_equal(t.caption_classes, t.image_classes)
    assert len(set(t.captions)) > 300  # varied templates and synonyms


def test_single_item_captions_say_the_right_place():
    t = fashion_scenes(300, seed=5, max_items=1)
    phrases = [set(p) | set(b) for p, b in zip(sc._PLACE_PHRASES, sc._PLACE_BARE, strict=True)]
    placeless = 0
    for image, caption in zip(t.images, t.captions, strict=True):
        (place,) = _items(image, "train")
        said = {i for i, ps in enumerate(phrases) for p in ps if re.search(rf"\b{p}\b", caption)}
        if not said:
            placeless += 1
            assert caption.startswith("a picture of")
            continue
        # A place phrase may contain a shorter one ("top left" contains "top"); the
        # longest match must be the item's place.
        longest = max(
            said, key=lambda i: max(len(p) for p in phrases[i] if re.search(rf"\b{p}\b", caption))
        )
        assert longest == place, caption
    assert placeless < 100


def test_two_item_relations_are_true():
    t = fashion_scenes(400, seed=6, min_items=2, max_items=2)
    checked = 0
    for image, caption in zip(t.images, t.captions, strict=True):
        m = re.fullmatch(r"(.+) (to the left of|to the right of|above|below) (.+)", caption)
        if not m:
            continue
        first, relation, second = m.groups()
        (c1,), (c2,) = (np.flatnonzero(classes_in_captions([s])[0]) for s in (first, second))
        where = {label: place for place, (_, label) in _items(image, "train").items()}
        (r1, k1), (r2, k2) = divmod(where[c1], 3), divmod(where[c2], 3)
        expected = {
            "to the left of": k1 < k2,
            "to the right of": k1 > k2,
            "above": r1 < r2,
            "below": r1 > r2,
        }
        assert expected[relation], caption
        checked += 1
    assert checked > 30


def test_captions_fit_the_models_context():
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    t = fashion_scenes(2000, seed=7, min_items=3, max_items=3)
    longest = max(len(tok.encode(c)) for c in t.captions)
    assert longest + 2 <= 32  # + start and end tokens


def test_zero_shot_and_probe_sets_are_disjoint_test_images():
    z = zero_shot_set(300, seed=0)
    assert z.images.shape == (300, 56, 56)
    assert len(set(z.ids.tolist())) == 300
    assert z.classnames == CLASSNAMES
    for image, label, idx in zip(z.images[:50], z.labels[:50], z.ids[:50], strict=True):
        (found,) = _items(image, "test").values()
        assert found == (idx, label)
    train, test = probe_sets(200, 100, seed=0)
    assert len(train) == 200 and len(test) == 100
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    # None of them is among the images reserved for poisoning targets.
    _, reserved = sc._test_pools(None)
    for ids in (z.ids, train.ids, test.ids):
        assert not np.isin(ids, reserved).any()


def test_target_scenes_come_from_the_reserved_pool():
    images, places, sources = sc.target_scenes([0, 0, 7], seed=1)
    _, reserved = sc._test_pools(None)
    assert np.isin(sources, reserved).all() and len(set(sources.tolist())) == 3
    _, labels = load_fashion_mnist("test")
    assert labels[sources].tolist() == [0, 0, 7]
    for image, place, source in zip(images, places, sources, strict=True):
        assert _items(image, "test") == {int(place): (int(source), int(labels[source]))}


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="image_size"):
        fashion_scenes(10, image_size=40)
    with pytest.raises(ValueError, match="max_items"):
        fashion_scenes(10, max_items=4)
    with pytest.raises(ValueError, match="split"):
        fashion_scenes(10, split="val")
    with pytest.raises(ValueError, match="n_train"):
        probe_sets(9000, 1)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_scenes(10, root="/nonexistent/fmnist")
