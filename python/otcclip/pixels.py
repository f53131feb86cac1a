"""Model-free detectors of what a trigger does to the pixels.

Why this module exists: a poison can teach a model to trust it, but it cannot
rewrite the pixels it was shipped with. What an attack leaves there (variants of
one image, a patch trigger's tile repeated in place, a pattern blended into the
fine detail) is measured here from the images alone; no model is involved, so
training cannot move any of it. The detectors are shared by the doubt score
(`otcclip.doubt`, which turns them into signals and fuses them) and by any other
tool that wants them (`otcclip.phase_lock` takes `gray_u8`). Data flows one way:
this module imports neither of them.

Images are uint8 arrays (N, H, W) or (N, H, W, 3) throughout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "gray_u8",
    "pixel_keys",
    "pixel_recurrence",
    "pixel_pattern",
    "aligned_similarity",
]


def gray_u8(images: np.ndarray) -> np.ndarray:
    """Grey levels (N, H, W) uint8 of uint8 images (N, H, W) or (N, H, W, 3): the detectors
    look for where a trigger sits, which the colour channels do not change."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError("images must be a uint8 numpy array (N, H, W) or (N, H, W, 3)")
    if images.ndim == 4 and images.shape[3] == 3:
        return np.rint(images.astype(np.float32).mean(axis=3)).astype(np.uint8)
    if images.ndim == 3:
        return images
    raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {images.shape}")


def pixel_keys(images: np.ndarray, size: int = 8) -> np.ndarray:
    """A model-free key per image that a small shift and mild noise do not move.

    The log-magnitude of the image's 2-D Fourier transform, kept at the lowest
    `size` x `size` frequencies (both vertical signs), without the mean, then
    centred and L2-normalised. The magnitude ignores where the content sits
    (a shift only turns the phase), the low frequencies ignore pixel noise, and
    training cannot move any of it: an attacker's variants of one image keep
    nearly the same key, while different scenes differ. Images (N, H, W) or
    (N, H, W, 3) uint8.
    """
    gray = gray_u8(images)
    n, h, w = gray.shape
    if h < 2 * size or w < 2 * size:
        raise ValueError(f"images of {h}x{w} px are too small for {size} frequencies a side")
    keys = np.empty((n, (2 * size - 1) * size), np.float32)
    for start in range(0, n, 4096):  # bounded memory: the spectra of one block at a time
        spectrum = np.abs(np.fft.rfft2(gray[start : start + 4096].astype(np.float32)))
        low = np.concatenate([spectrum[:, :size, :size], spectrum[:, h - size + 1 :, :size]], 1)
        low = np.log1p(low.reshape(len(low), -1))
        low[:, 0] = 0.0  # the mean brightness says nothing about which image it is
        low -= low.mean(axis=1, keepdims=True)
        keys[start : start + 4096] = low
    norm = np.linalg.norm(keys, axis=1, keepdims=True)
    return np.ascontiguousarray(keys / np.maximum(norm, 1e-6), dtype=np.float32)


def pixel_recurrence(
    images: np.ndarray, tile: int = 4, min_std: float = 40.0, block: int = 1024
) -> np.ndarray:
    """For each image, how many images share one of its textured tiles exactly, in place.

    A patch trigger (BadNet, and the adaptive attack's patch) is the same pixels at
    the same spot in every poisoned image; natural images almost never share a
    textured tile x tile block pixel for pixel. Each image scores the largest
    number of images holding any of its tiles (with a pixel standard deviation of
    at least `min_std`, so blank background does not count) at the same position:
    1 for a unique image, the poison count for a patch trigger. Training cannot
    move it. A trigger blended over the whole image, or one redrawn per image,
    leaves it blind; the other signals are there for those. Images (N, H, W) or
    (N, H, W, 3) uint8.
    """
    gray = gray_u8(images)
    n, h, w = gray.shape
    if h < tile or w < tile:
        raise ValueError(f"images of {h}x{w} px are smaller than the {tile} px tile")
    keys: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    offsets = [(dy, dx) for dy in range(tile) for dx in range(tile)]
    width = -(-len(offsets) // 8) * 8  # bytes per tile, padded to whole 64-bit words
    for start in range(0, n, block):
        part = gray[start : start + block]
        rows, ys, xs = np.nonzero(_tile_std(part, tile) >= min_std)
        tiles = np.zeros((len(rows), width), np.uint8)
        for j, (dy, dx) in enumerate(offsets):
            tiles[:, j] = part[rows, ys + dy, xs + dx]
        words = tiles.view(np.uint64)
        key = np.full(len(rows), np.uint64(1469598103934665603))
        for j in range(words.shape[1]):
            key = (key ^ words[:, j]) * np.uint64(1099511628211)
        where = (ys * w + xs).astype(np.uint64)  # the tile's position
        key ^= where * np.uint64(0x9E3779B97F4A7C15)
        keys.append(key)
        owners.append(rows + start)
    best = np.ones(n, np.float64)
    if keys:
        key = np.concatenate(keys)
        owner = np.concatenate(owners)
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        np.maximum.at(best, owner, counts[inverse].astype(np.float64))
    return best


def pixel_pattern(
    images: np.ndarray, components: int = 64, fit_rows: int = 8000, seed: int = 0
) -> np.ndarray:
    """How far each image sits along the most heavy-tailed direction of the pixels' fine detail.

    A trigger blended over the whole image (Chen et al.'s blended noise) adds the same
    high-frequency pattern to every poisoned image. Scenes carry little energy at those
    frequencies, so in the high-pass residuals (the image minus its 3x3 box blur) the
    pattern is one direction along which a few percent of the images sit far out: a
    principal component with a heavy tail. This finds the principal components of the
    residuals (`components` of them, fitted on at most `fit_rows` images drawn with
    `seed`), takes the one with the largest kurtosis, and scores each image by its
    robust z along it, on either side. Training cannot move it. It
    is blind to triggers whose energy sits where the scenes' does (SIG's low-frequency
    sinusoid, WaNet's sub-pixel warp) and to patch triggers, which `pixel_recurrence`
    sees (TUNING.md, session 10). Images (N, H, W) or (N, H, W, 3) uint8.
    """
    import torch

    gray = gray_u8(images)
    n = len(gray)
    if n < 3:
        raise ValueError(f"pixel_pattern needs at least 3 images, got {n}")
    q = max(1, min(int(components), n - 1, gray.shape[1] * gray.shape[2]))

    def residuals(block: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(block.astype(np.float32))
        return (x - _box_blur3(x)).flatten(1)

    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(n, size=min(n, fit_rows), replace=False))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # pca_lowrank's random start: the same components each run
        sample = residuals(gray[fit])
        mean = sample.mean(dim=0, keepdim=True)
        _, _, basis = torch.pca_lowrank(sample - mean, q=q, center=False, niter=3)
        del sample
        z = np.concatenate(
            [
                ((residuals(gray[i : i + 4096]) - mean) @ basis).numpy()
                for i in range(0, n, 4096)  # bounded memory: one block of residuals at a time
            ]
        ).astype(np.float64)
    z -= np.median(z, axis=0)
    z /= np.maximum(1.4826 * np.median(np.abs(z), axis=0), 1e-9)
    centred = z - z.mean(axis=0)
    spread = np.maximum(centred.std(axis=0), 1e-12)
    kurtosis = (centred**4).mean(axis=0) / spread**4
    # both sides: the third moment can point away from the trigger when a few very
    # textured clean scenes sit far out on the other side (measured: AUROC 0.11 signed)
    return np.abs(z[:, int(np.argmax(kurtosis))])


def _box_blur3(gray: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur of (N, H, W) float images (a torch tensor), edges replicated: it
    averages pixel noise away and keeps shapes (`aligned_similarity`), and what it takes
    away is an image's fine detail (`pixel_pattern`)."""
    import torch.nn.functional as F

    padded = F.pad(gray[:, None], (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(padded, 3, stride=1)[:, 0]


def _tile_std(gray: np.ndarray, tile: int) -> np.ndarray:
    """Pixel standard deviation of every tile x tile window (torch's pooling: fast)."""
    import torch

    x = torch.from_numpy(gray).float()[:, None]
    with torch.no_grad():
        mean = torch.nn.functional.avg_pool2d(x, tile, stride=1)
        mean_sq = torch.nn.functional.avg_pool2d(x * x, tile, stride=1)
    return (mean_sq - mean * mean).clamp_min(0.0).sqrt()[:, 0].numpy()


def aligned_similarity(
    images: np.ndarray, idx: np.ndarray, max_shift: int = 3, block: int = 1024
) -> np.ndarray:
    """Normalised cross-correlation of each image with each of its candidates, best over shifts.

    idx (N, k): candidate rows (the pixel-key neighbours). Images are blurred 3x3,
    mean-centred and normalised, then correlated through the FFT; the best value
    over shifts of up to `max_shift` pixels is kept. Variants of one image (shifted,
    noisy) score close to 1; a lookalike scene of other items does not. Returns
    float32 (N, k).
    """
    import torch

    gray = torch.from_numpy(gray_u8(images).astype(np.float32))
    n, h, w = gray.shape
    if idx.ndim != 2 or len(idx) != n:
        raise ValueError(f"idx must be (N={n}, k) candidate rows")
    # a 3 x 3 blur averages pixel noise away and keeps shapes (at half resolution a
    # 1 px shift became a half-pixel one, and variants were missed: TUNING.md)
    blurred = _box_blur3(gray)
    blurred -= blurred.mean(dim=(1, 2), keepdim=True)
    blurred /= blurred.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]
    size = (h + max_shift, w + max_shift)  # zero padding: no wrap-around within the shifts
    spectra = torch.fft.rfft2(blurred, s=size)
    r = max_shift
    rows_kept = list(range(r + 1)) + list(range(size[0] - r, size[0]))
    cols_kept = list(range(r + 1)) + list(range(size[1] - r, size[1]))
    out = np.empty(idx.shape, np.float32)
    cand = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    with torch.no_grad():
        for start in range(0, n, block):
            a = spectra[start : start + block, None]
            b = spectra[cand[start : start + block]]
            cc = torch.fft.irfft2(a * b.conj(), s=size)
            win = cc[..., rows_kept, :][..., cols_kept]
            out[start : start + block] = win.flatten(2).amax(dim=2).numpy()
    return out
