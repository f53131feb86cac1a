"""Augmentations: deterministic, slice-consistent, and they keep what a caption says."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from otcclip.augment import (
    ImageAugment,
    TextAugment,
    augment_captions,
    augment_images,
    batch_generator,
    batch_rng,
)
from otcclip.data import classes_in_captions


def _pixels(b: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_views_other_step_other_views():
    x = _pixels()
    a = augment_images(x, batch_generator(1, 2, 3))
    b = augment_images(x, batch_generator(1, 2, 3))
    c = augment_images(x, batch_generator(1, 2, 4))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_a_process_slice_equals_the_slice_of_the_global_batch():
    x = _pixels(b=8)
    whole = augment_images(x, batch_generator(0, 0, 0))
    part = augment_images(x[4:], batch_generator(0, 0, 0), offset=4, total=8)
    assert torch.allclose(part, whole[4:], atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        augment_images(x, batch_generator(0, 0, 0), offset=4, total=8)


def test_zero_strength_is_the_identity():
    x = _pixels()
    still = ImageAugment(min_scale=1.0, max_shift=0.0, brightness=0.0, contrast=0.0, noise_std=0.0)
    assert torch.allclose(augment_images(x, batch_generator(0, 0, 0), still), x, atol=1e-5)


def test_items_stay_on_their_side():
    """No flip, no large shift: a blob on the left stays on the left, on the right, right."""
    size = 56
    x = torch.full((16, 3, size, size), -1.0)
    x[:8, :, 20:36, 2:18] = 2.0  # left item
    x[8:, :, 20:36, 38:54] = 2.0  # right item
    strong = ImageAugment(min_scale=0.9, max_shift=0.04, noise_std=0.0, brightness=0.0)
    out = augment_images(x, batch_generator(5, 0, 0), strong)
    cols = torch.arange(size, dtype=torch.float32)
    weight = (out.mean(1) > 0.5).float().sum(1)  # (B, W): bright pixels per column
    centre = (weight * cols).sum(1) / weight.sum(1)
    assert bool((centre[:8] < size / 3).all()) and bool((centre[8:] > 2 * size / 3).all())


def test_config_is_checked():
    with pytest.raises(ValueError, match="min_scale"):
        ImageAugment(min_scale=0.2)
    with pytest.raises(ValueError, match="synonym_p"):
        TextAugment(synonym_p=1.5)
    with pytest.raises(ValueError, match="pixels"):
        augment_images(torch.zeros(3, 8, 8), batch_generator(0, 0, 0))


CAPTIONS = [
    "a sneaker to the left of a handbag",
    "product photo: ankle boot, top right",
    "an ankle boot in the upper left and a pair of trousers at the bottom right",
    "a photo of a dress in the middle",
    "a t-shirt (top left), a coat (lower right)",
    "there is a bag on the right",
]

_PLACE_WORDS = {"upper": "top", "lower": "bottom", "middle": "center"}


def _places(caption: str) -> list[str]:
    words = re.findall(r"top|bottom|upper|lower|left|right|center|middle|above|below", caption)
    return [_PLACE_WORDS.get(w, w) for w in words]


def test_captions_keep_their_items_and_places():
    rng = batch_rng(0, 0, 0)
    out = augment_captions(CAPTIONS * 20, rng, TextAugment(synonym_p=0.9, article_drop_p=0.3))
    assert out != CAPTIONS * 20
    before = classes_in_captions(CAPTIONS * 20)
    after = classes_in_captions(out)
    assert np.array_equal(np.asarray(before), np.asarray(after))
    for a, b in zip(CAPTIONS * 20, out, strict=True):
        assert _places(a) == _places(b), (a, b)
        assert not re.search(r"\ban [b-df-hj-np-tv-z]", b), b
        assert not re.search(r"\ba [aeiou]", b), b


def test_caption_augmentation_is_deterministic():
    a = augment_captions(CAPTIONS, batch_rng(1, 2, 3))
    b = augment_captions(CAPTIONS, batch_rng(1, 2, 3))
    assert a == b
    unchanged = augment_captions(CAPTIONS, batch_rng(1, 2, 3), TextAugment(0.0, 0.0))
    assert unchanged == CAPTIONS
    with pytest.raises(TypeError, match="strings"):
        augment_captions([1], batch_rng(0, 0, 0))  # type: ignore[list-item]
