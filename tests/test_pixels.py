"""otcclip.pixels: the model-free pixel detectors (keys, tile recurrence, aligned
similarity, the blended pattern), and their re-export from otcclip.doubt; their reading
of a grey stack kept on disk a block at a time, with the results of the whole array."""

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


class _CountingStack:
    """A GreyStack over an array, as one on disk would be: every read returns a copy, and
    the largest read is recorded; converting the whole stack at once fails."""

    def __init__(self, gray: np.ndarray) -> None:
        self._gray = gray
        self.shape = gray.shape
        self.dtype = gray.dtype
        self.ndim = gray.ndim
        self.largest_read = 0

    def __len__(self) -> int:
        return len(self._gray)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            count = len(range(*rows.indices(len(self))))
        else:
            assert isinstance(rows, np.ndarray) and rows.ndim == 1 and rows.dtype.kind in "iu"
            count = len(rows)
        self.largest_read = max(self.largest_read, count)
        return np.array(self._gray[rows])

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was read at once")


def _old_aligned_similarity(images: np.ndarray, idx: np.ndarray, max_shift: int = 3):
    """aligned_similarity before it went block by block: every spectrum at once, and the
    whole inverse FFT. The reference the bounded version must agree with."""
    import torch

    gray = torch.from_numpy(pixels.gray_u8(images).astype(np.float32))
    n, h, w = gray.shape
    blurred = pixels._box_blur3(gray)
    blurred -= blurred.mean(dim=(1, 2), keepdim=True)
    blurred /= blurred.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]
    size = (h + max_shift, w + max_shift)
    spectra = torch.fft.rfft2(blurred, s=size)
    r = max_shift
    rows_kept = list(range(r + 1)) + list(range(size[0] - r, size[0]))
    cols_kept = list(range(r + 1)) + list(range(size[1] - r, size[1]))
    cand = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    cc = torch.fft.irfft2(spectra[:, None] * spectra[cand].conj(), s=size)
    return cc[..., rows_kept, :][..., cols_kept].flatten(2).amax(dim=2).numpy()


def _old_pixel_recurrence(images: np.ndarray, tile: int = 4, min_std: float = 40.0):
    """pixel_recurrence before it could spill: every tile's key counted at once."""
    gray = pixels.gray_u8(images)
    n, h, w = gray.shape
    rows, ys, xs = np.nonzero(pixels._tile_std(gray, tile) >= min_std)
    tiles = np.zeros((len(rows), -(-tile * tile // 8) * 8), np.uint8)
    for j, (dy, dx) in enumerate((dy, dx) for dy in range(tile) for dx in range(tile)):
        tiles[:, j] = gray[rows, ys + dy, xs + dx]
    words = tiles.view(np.uint64)
    key = np.full(len(rows), np.uint64(1469598103934665603))
    for j in range(words.shape[1]):
        key = (key ^ words[:, j]) * np.uint64(1099511628211)
    key ^= (ys * w + xs).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    best = np.ones(n, np.float64)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    np.maximum.at(best, rows, counts[inverse].astype(np.float64))
    return best


def _patched_images(seed: int = 0) -> np.ndarray:
    """Noise with two patches recurring in place (6 and 3 images), one elsewhere, and
    blank images: counts of 6, 3 and 1 to get exactly right."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (36, 20, 20), dtype=np.uint8)
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    images[:6, 14:18, 14:18] = checker
    images[6:9, 1:6, 3:8] = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    images[9, 2:6, 2:6] = checker
    images[30:] = 0
    return images


@pytest.mark.parametrize(("h", "w", "max_shift"), [(56, 56, 3), (20, 22, 3), (17, 24, 2)])
def test_aligned_similarity_block_by_block_matches_all_spectra_at_once(h, w, max_shift):
    from otcclip.attacks import vary_copies

    rng = np.random.default_rng(h * w)
    noise = rng.integers(0, 256, (20, h, w), dtype=np.uint8)
    item = np.full((h, w), 128, np.uint8)
    item[4 : 4 + 8, 4 : 4 + 12] = _blocky(rng, 8, 12)
    variants = vary_copies(np.repeat(item[None], 7, axis=0), 2, 8.0, rng)
    images = np.concatenate([noise, item[None], variants, np.full((2, h, w), 90, np.uint8)])
    idx = rng.integers(0, len(images), (len(images), 5))  # repeats, and sometimes itself
    idx[20:28] = np.arange(20, 25)  # the item with its variants
    sims = pixels.aligned_similarity(images, idx, max_shift=max_shift, block=7)
    assert sims.dtype == np.float32 and sims.shape == idx.shape
    np.testing.assert_allclose(sims, _old_aligned_similarity(images, idx, max_shift), atol=1e-5)
    assert sims[20, 1:].min() > 0.9  # the variants are still seen


def test_pixel_recurrence_spilled_to_disk_counts_exactly_and_cleans_up(tmp_path, monkeypatch):
    images = _patched_images()
    spilled_into: list[int] = []
    spill = pixels._spill

    def counting_spill(directory, parts, key, owner):
        spilled_into.append(parts)
        spill(directory, parts, key, owner)

    monkeypatch.setattr(pixels, "_spill", counting_spill)
    in_memory = pixels.pixel_recurrence(images, block=5, spill_dir=tmp_path)
    assert spilled_into == []
    spilled = pixels.pixel_recurrence(images, block=5, memory=1 << 12, spill_dir=tmp_path)
    assert len(spilled_into) == 8 and min(spilled_into) > 1  # every block went to disk
    np.testing.assert_array_equal(spilled, in_memory)
    np.testing.assert_array_equal(spilled, _old_pixel_recurrence(images))
    np.testing.assert_array_equal(spilled[:9], [6] * 6 + [3] * 3)
    np.testing.assert_array_equal(spilled[9:], 1)
    assert list(tmp_path.iterdir()) == []  # the partitions went with their directory


def test_gray_u8_passes_a_grey_stack_through_and_refuses_other_objects():
    stack = _CountingStack(np.zeros((3, 8, 8), np.uint8))
    assert pixels.gray_u8(stack) is stack and stack.largest_read == 0
    with pytest.raises(TypeError, match="uint8"):
        pixels.gray_u8(_CountingStack(np.zeros((3, 8, 8), np.float32)))
    with pytest.raises(TypeError, match="uint8"):
        pixels.gray_u8([[[0]]])


def test_the_detectors_read_a_grey_stack_one_block_at_a_time(tmp_path):
    images = _patched_images(1)
    images[10:20] = np.kron(images[10:20, :5, :5], np.ones((4, 4), np.uint8))  # smooth scenes
    idx = np.random.default_rng(0).integers(0, len(images), (len(images), 3))

    def on_stack(detector, *args, **kwargs):
        stack = _CountingStack(images)
        return detector(stack, *args, **kwargs), stack.largest_read

    keys, _ = on_stack(pixels.pixel_keys, 4)  # its blocks are larger than these images
    np.testing.assert_array_equal(keys, pixels.pixel_keys(images, 4))
    aligned, largest = on_stack(pixels.aligned_similarity, idx, block=4)
    np.testing.assert_array_equal(aligned, pixels.aligned_similarity(images, idx, block=4))
    assert largest <= 4 * (1 + idx.shape[1])  # a block and its candidates
    for memory in (256 << 20, 1 << 12):  # in memory, then spilled to disk
        recurrence, largest = on_stack(
            pixels.pixel_recurrence, block=4, memory=memory, spill_dir=tmp_path
        )
        np.testing.assert_array_equal(recurrence, pixels.pixel_recurrence(images))
        assert largest <= 4
    pattern, _ = on_stack(pixels.pixel_pattern, components=4, fit_rows=16)
    np.testing.assert_array_equal(pattern, pixels.pixel_pattern(images, 4, fit_rows=16))
