"""Model-free detectors of what a trigger does to the pixels.

Why this module exists: a poison can teach a model to trust it, but it cannot
rewrite the pixels it was shipped with. What an attack leaves there (variants of
one image, a patch trigger's tile repeated in place, a pattern blended into the
fine detail) is measured here from the images alone; no model is involved, so
training cannot move any of it. The detectors are shared by the doubt score
(`otcclip.doubt`, which turns them into signals and fuses them) and by any other
tool that wants them (`otcclip.phase_lock` takes `gray_u8`). Data flows one way:
this module imports neither of them.

Images are uint8 arrays (N, H, W) or (N, H, W, 3) throughout, or a `GreyStack`: grey
images kept elsewhere (on disk) and read a block of rows at a time, so that the
detectors' memory is bounded by a block and not by the number of images.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "GreyStack",
    "gray_u8",
    "pixel_keys",
    "pixel_recurrence",
    "pixel_pattern",
    "aligned_similarity",
]


class GreyStack(Protocol):
    """Grey images (N, H, W) uint8 that are too many to hold in memory (kept on disk).

    The detectors read them only a block at a time: `stack[rows]`, rows a slice or a
    1-D int array (any order, repeats allowed), returns a fresh uint8 array (k, H, W).
    """

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def ndim(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray: ...


def gray_u8(images: np.ndarray | GreyStack) -> np.ndarray | GreyStack:
    """Grey levels (N, H, W) uint8 of uint8 images (N, H, W) or (N, H, W, 3): the detectors
    look for where a trigger sits, which the colour channels do not change. A `GreyStack`
    is already grey and comes back as is, so that nothing reads all of it at once."""
    if _is_grey_stack(images):
        return images
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(
            "images must be a uint8 numpy array (N, H, W) or (N, H, W, 3) or a GreyStack"
        )
    if images.ndim == 4 and images.shape[3] == 3:
        return np.rint(images.astype(np.float32).mean(axis=3)).astype(np.uint8)
    if images.ndim == 3:
        return images
    raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {images.shape}")


def _is_grey_stack(images: object) -> bool:
    """Duck typing rather than isinstance: a stack on disk need not derive from anything."""
    return (
        not isinstance(images, np.ndarray)
        and getattr(images, "ndim", None) == 3
        and getattr(images, "dtype", None) == np.uint8
        and hasattr(images, "__getitem__")
    )


def pixel_keys(images: np.ndarray | GreyStack, size: int = 8) -> np.ndarray:
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
    images: np.ndarray | GreyStack,
    tile: int = 4,
    min_std: float = 40.0,
    block: int = 1024,
    *,
    memory: int = 256 << 20,
    spill_dir: str | os.PathLike | None = None,
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
    (N, H, W, 3) uint8, or a `GreyStack`.

    Every textured tile is a (key, owner) pair, some 400 an image: too many to count
    at once for hundreds of thousands of images. When they would take more than
    `memory` bytes (estimated from the first block), they are spilled by key into
    partitions under `spill_dir` (a temporary directory, removed after) and counted
    one partition at a time; counting one takes a few times `memory`. A key includes
    its tile's position, so equal keys share a partition and the counts are exact.
    """
    gray = gray_u8(images)
    n, h, w = gray.shape
    if h < tile or w < tile:
        raise ValueError(f"images of {h}x{w} px are smaller than the {tile} px tile")
    best = np.ones(n, np.float64)
    pairs = (
        _tile_keys(gray[start : start + block], tile, min_std, start)
        for start in range(0, n, block)
    )
    first = next(pairs, None)
    if first is None:
        return best
    owner_type = np.dtype(np.uint32 if n < 2**32 else np.int64)
    per_image = len(first[0]) / min(block, n)
    parts = _partition_count(per_image * n * (8 + owner_type.itemsize), memory)
    pairs = itertools.chain([first], pairs)
    if parts == 1:
        keys, owners = zip(*pairs, strict=True)
        _count_shared(best, np.concatenate(keys), np.concatenate(owners))
        return best
    with tempfile.TemporaryDirectory(prefix="pixel-recurrence-", dir=spill_dir) as tmp:
        for key, owner in pairs:
            _spill(tmp, parts, key, owner.astype(owner_type))
        for part in range(parts):
            _count_shared(best, *_read_partition(tmp, part, owner_type))
    return best


def _tile_keys(
    part: np.ndarray, tile: int, min_std: float, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit key (pixels and position) and owner row of each textured tile of a block."""
    w = part.shape[2]
    rows, ys, xs = np.nonzero(_tile_std(part, tile) >= min_std)
    offsets = [(dy, dx) for dy in range(tile) for dx in range(tile)]
    width = -(-len(offsets) // 8) * 8  # bytes per tile, padded to whole 64-bit words
    tiles = np.zeros((len(rows), width), np.uint8)
    for j, (dy, dx) in enumerate(offsets):
        tiles[:, j] = part[rows, ys + dy, xs + dx]
    words = tiles.view(np.uint64)
    key = np.full(len(rows), np.uint64(1469598103934665603))
    for j in range(words.shape[1]):
        key = (key ^ words[:, j]) * np.uint64(1099511628211)
    where = (ys * w + xs).astype(np.uint64)  # the tile's position
    key ^= where * np.uint64(0x9E3779B97F4A7C15)
    return key, rows + start


def _partition_count(total_bytes: float, memory: int, most: int = 1024) -> int:
    """A power of two (the key's top bits pick the partition), capped so that a tiny
    `memory` cannot open thousands of files per block."""
    parts = 1
    while parts < most and total_bytes > parts * memory:
        parts *= 2
    return parts


def _spill(directory: str, parts: int, key: np.ndarray, owner: np.ndarray) -> None:
    """Append a block's pairs to the files of their partitions (keys' top bits)."""
    part = (key >> np.uint64(64 - parts.bit_length() + 1)).astype(np.uint16)
    order = np.argsort(part, kind="stable")  # a radix sort for 16-bit keys: cheap
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    for p in np.flatnonzero(np.diff(bounds)):
        chosen = order[bounds[p] : bounds[p + 1]]
        for name, values in (("key", key), ("owner", owner)):
            with open(os.path.join(directory, f"{p}.{name}"), "ab") as f:
                values[chosen].tofile(f)


def _read_partition(
    directory: str, part: int, owner_type: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """One partition's spilled pairs; none when no key fell into it."""
    path = os.path.join(directory, f"{part}.key")
    if not os.path.exists(path):
        return np.empty(0, np.uint64), np.empty(0, owner_type)
    owners = np.fromfile(os.path.join(directory, f"{part}.owner"), owner_type)
    return np.fromfile(path, np.uint64), owners


def _count_shared(best: np.ndarray, key: np.ndarray, owner: np.ndarray) -> None:
    """Raise each owner's score to the number of its tiles' holders (equal keys)."""
    if len(key) == 0:
        return
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    np.maximum.at(best, owner, counts[inverse].astype(np.float64))


def pixel_pattern(
    images: np.ndarray | GreyStack, components: int = 64, fit_rows: int = 8000, seed: int = 0
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
    images: np.ndarray | GreyStack, idx: np.ndarray, max_shift: int = 3, block: int = 1024
) -> np.ndarray:
    """Normalised cross-correlation of each image with each of its candidates, best over shifts.

    idx (N, k): candidate rows (the pixel-key neighbours). Images are blurred 3x3,
    mean-centred and normalised, then correlated through their spectra (FFT); the best
    value over shifts of up to `max_shift` pixels is kept. Variants of one image (shifted,
    noisy) score close to 1; a lookalike scene of other items does not. Returns
    float32 (N, k).

    The spectra of all N images would not fit in memory for hundreds of thousands of
    them, so each block of `block` rows reads its own rows and their candidates
    (one read of at most `block` * (k + 1) rows) and takes only their spectra.
    """
    import torch

    gray = gray_u8(images)
    n, h, w = gray.shape
    if idx.ndim != 2 or len(idx) != n:
        raise ValueError(f"idx must be (N={n}, k) candidate rows")
    # zero padding: no wrap-around within the shifts; any larger size gives the same
    # correlations there, and one of small prime factors is the FFT's fast case
    size = (_smooth_size(h + max_shift), _smooth_size(w + max_shift))
    down, across = _shift_basis(size, max_shift)
    out = np.empty(idx.shape, np.float32)
    idx = np.asarray(idx, np.int64)
    with torch.no_grad():
        for start in range(0, n, block):
            stop = min(n, start + block)
            wanted = np.concatenate([np.arange(start, stop), idx[start:stop].ravel()])
            rows, where = np.unique(wanted, return_inverse=True)
            spectra = _unit_spectra(gray[rows], size)
            where = torch.from_numpy(where.reshape(-1))
            cross = spectra[where[stop - start :].view(stop - start, -1)]
            cross.mul_(spectra[where[: stop - start], None].conj())
            shifted = ((cross @ across).transpose(-1, -2) @ down.T).real
            out[start:stop] = shifted.flatten(2).amax(dim=2).numpy()
    return out


def _shift_basis(size: tuple[int, int], max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse real 2-D DFT at shifts of at most `max_shift` only, as two matrices:
    `(spectrum @ across).mT @ down.T` is `irfft2(spectrum, size)` at those (2r+1)^2
    shifts (transposed). Two small matrix products cost a fraction of a whole inverse FFT, of which
    all but those few values were thrown away."""
    import torch

    shifts = torch.arange(-max_shift, max_shift + 1, dtype=torch.float64)
    u = torch.arange(size[0], dtype=torch.float64)
    v = torch.arange(size[1] // 2 + 1, dtype=torch.float64)
    down = torch.exp(2j * torch.pi * torch.outer(shifts, u) / size[0])
    weight = torch.full_like(v, 2.0)  # a half spectrum: each column stands for its mirror too
    weight[0] = 1.0
    if size[1] % 2 == 0:
        weight[-1] = 1.0  # the Nyquist column is its own mirror
    across = weight[:, None] * torch.exp(2j * torch.pi * torch.outer(v, shifts) / size[1])
    return down.to(torch.complex64), (across / (size[0] * size[1])).to(torch.complex64)


def _smooth_size(least: int) -> int:
    """The smallest length of at least `least` with no prime factor above 5 (a prime such
    as 59, for 56 px images shifted by 3, made the FFT twice as slow)."""
    size = least
    while True:
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def _unit_spectra(gray: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Spectra (zero-padded to `size`) of the blurred, mean-centred, unit-norm images, so
    that a product of two is their normalised cross-correlation at every shift."""
    import torch

    # a 3 x 3 blur averages pixel noise away and keeps shapes (at half resolution a
    # 1 px shift became a half-pixel one, and variants were missed: TUNING.md)
    blurred = _box_blur3(torch.from_numpy(gray.astype(np.float32)))
    blurred -= blurred.mean(dim=(1, 2), keepdim=True)
    blurred /= blurred.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None]
    return torch.fft.rfft2(blurred, s=size)
