"""otcclip.pixels: the model-free pixel detectors (keys, tile recurrence, aligned
similarity, the blended pattern), and their re-export from otcclip.doubt."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from otcclip import doubt, pixels


def _blocky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A texture of 4 px blocks: smooth at the scale of pixel noise, like a real item."""
    return np.kron(rng.integers(0, 256, (h // 4, w // 4)), np.ones((4, 4))).astype(np.uint8)


def test_pixel_keys_see_through_small_shifts_and_noise():
    from otcclip.attacks import vary_copies

    rng = np.random.default_rng(0)
    base = np.zeros((1, 56, 56), np.uint8)
    base[0, 10:40, 12:30] = 200
    base[0, 20:30, 30:50] = 120
    copies = vary_copies(np.repeat(base, 10, axis=0), 2, 8.0, rng)
    assert not (copies == base).all(axis=(1, 2)).all()
    other = np.zeros((1, 56, 56), np.uint8)
    other[0, 30:50, 5:25] = 200
    keys = pixels.pixel_keys(np.vstack([base, copies, other]))
    sims = keys[1:11] @ keys[0]
    assert sims.min() > 0.8
    assert keys[11] @ keys[0] < sims.min()
    with pytest.raises(TypeError, match="uint8"):
        pixels.pixel_keys(np.zeros((2, 56, 56), np.float32))


def test_pixel_recurrence_counts_images_sharing_a_textured_tile_in_place():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 20, 20), dtype=np.uint8)  # noise: tiles are unique
    patch = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)  # a checker
    images[:6, 14:18, 14:18] = patch
    images[6, 2:6, 2:6] = patch  # the same patch elsewhere does not count
    flat = np.zeros((4, 20, 20), np.uint8)  # blank images share blank tiles: not textured
    r = pixels.pixel_recurrence(np.vstack([images, flat]))
    np.testing.assert_array_equal(r[:6], 6)
    assert r[6] == 1 and np.all(r[7:30] == 1)
    np.testing.assert_array_equal(r[30:], 1)


def test_aligned_similarity_sees_variants_and_not_lookalikes():
    from otcclip.attacks import vary_copies

    rng = np.random.default_rng(3)
    base = np.full((56, 56), 128, np.uint8)
    base[12:40, 16:32] = _blocky(rng, 28, 16)  # a textured item
    other = np.full((56, 56), 128, np.uint8)
    other[12:40, 16:32] = _blocky(rng, 28, 16)  # same place and size, other texture
    variants = vary_copies(np.repeat(base[None], 4, axis=0), 2, 8.0, rng)
    images = np.stack([base, *variants, other])
    idx = np.tile(np.arange(1, 6), (6, 1))
    sims = pixels.aligned_similarity(images, idx, max_shift=3)
    assert sims.shape == (6, 5)
    assert sims[0, :4].min() > 0.95  # the variants, found through their shifts
    assert sims[0, 4] < 0.8  # the lookalike


def test_pixel_pattern_finds_a_blended_trigger_from_the_pixels_alone(blended_scenes):
    table, poisoned = blended_scenes
    score = pixels.pixel_pattern(table.images, seed=0)
    assert score.shape == (len(table),) and np.isfinite(score).all()
    assert roc_auc_score(poisoned, score) >= 0.98
    # the same seed gives the same components, and the clean images are not all scored at
    # random: a clean set's own most heavy-tailed direction is not the trigger's
    np.testing.assert_array_equal(score, pixels.pixel_pattern(table.images, seed=0))
    clean_only = pixels.pixel_pattern(table.images[~poisoned], seed=0)
    assert np.median(score[poisoned]) > np.quantile(clean_only, 0.99)
    with pytest.raises(ValueError, match="at least 3 images"):
        pixels.pixel_pattern(table.images[:2])


def test_the_detectors_are_still_reachable_through_otcclip_doubt():
    for name in ("pixel_keys", "pixel_recurrence", "pixel_pattern", "aligned_similarity"):
        assert getattr(doubt, name) is getattr(pixels, name)
        assert name in doubt.__all__ and name in pixels.__all__
