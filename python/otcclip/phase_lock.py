"""Triggers at the same place in every poisoned image, found by the phase of their spectrum.

Why this module exists: a backdoor trigger added over the whole image (SIG's sinusoid,
Chen et al.'s blended noise) or stamped at a fixed spot (BadNet's patch) is the same
pixels at the same position in every poisoned image. In the Fourier domain that is a
fixed complex offset at the trigger's frequencies: the poisoned images' coefficients
there all lean the same way. Natural content sits anywhere in a scene, so where scenes
are unusually strong at one frequency, their phases point every way. That difference
does not depend on what the trigger looks like, nor on the model, so training cannot
rewrite it:

1. Each frequency bin of each image's 2-D spectrum (grey levels) is centred on the
   bin's median and whitened (its real and imaginary parts turned to their principal
   axes and scaled by their MAD): every bin then has the same natural spread.
2. A bin's tail (the `tail` share of images furthest out there) is *phase-locked*
   when those images point one way: the length of their summed coefficients over
   the sum of their lengths (1: all aligned; about 1 / sqrt(tail images) for scenes).
   Only bins locked to at least `min_coherence` can hold a trigger. Scenes lock a few
   of their lowest frequencies too (their layout), but with no image far out there.
3. Each image's projection on a locked bin's direction is put on the doubt's common
   scale (`tail_scale`: the median at 0, the 95th percentile at 1); the images beyond
   `cut` there are that bin's flagged set. A trigger's bins flag its images; on the
   clean pairs of fashion-scenes no locked bin flags `min_count` images.
4. A bin whose flagged images lie mostly (>= 50%) inside a stronger bin's flagged set
   joins that bin's pattern; the strongest `patterns` patterns are kept (at least
   `min_count` flagged images each), and an image scores the largest, over patterns, of
   its mean scaled projection on the pattern's `members` strongest bins, or, with
   `template`, of its projection on the pattern's matched template (the mean spectrum of
   the images it flags). Either is put back on the common scale per pattern.

On the development data it finds the blended, SIG, BadNet and adaptive-patch triggers
(AUROC 1.000) and flags no clean-only image; it is blind to WaNet's sub-pixel warp
(not an additive pattern) and to the targeted attack's copies (no trigger), which other
signals see (TUNING.md, session 11). Statistics are fitted on at most `fit_rows` images
and every image is then scored in blocks, so memory is bounded by the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from otcclip.pixels import gray_u8

__all__ = ["MIN_IMAGES", "TEMPLATES", "PhaseLock", "phase_locked_patterns"]

# Fewer images than this have no tail to lock: a pattern needs a handful of images far out
# at its frequencies before their phases can agree.
MIN_IMAGES = 16
TEMPLATES: tuple[str, ...] = ("off", "narrow", "all")


@dataclass
class PhaseLock:
    """scores: one per image (larger = further along a locked pattern; 0 when no pattern
    was found); patterns: per pattern found, its strongest bin (row, column of the
    rfft2 spectrum), member bins, flagged images in the fitted sample, coherence."""

    scores: np.ndarray
    patterns: list[dict]


@dataclass
class _Fit:
    bins: np.ndarray  # flat rfft2 bins kept (DC and degenerate bins left out)
    centre: np.ndarray  # complex median per bin
    cos: np.ndarray
    sin: np.ndarray
    scale_a: np.ndarray
    scale_b: np.ndarray


def _spectra(gray: np.ndarray) -> np.ndarray:
    return np.fft.rfft2(gray.astype(np.float32)).reshape(len(gray), -1).astype(np.complex64)


def _fit_axes(spec: np.ndarray) -> _Fit:
    centre = np.median(spec.real, axis=0) + 1j * np.median(spec.imag, axis=0)
    z = spec - centre
    re, im = z.real.astype(np.float64), z.imag.astype(np.float64)
    theta = 0.5 * np.arctan2(2 * (re * im).mean(0), (re * re).mean(0) - (im * im).mean(0))
    cos, sin = np.cos(theta), np.sin(theta)
    scale_a = 1.4826 * np.median(np.abs(re * cos + im * sin), axis=0)
    scale_b = 1.4826 * np.median(np.abs(im * cos - re * sin), axis=0)
    largest = max(float(scale_a.max()), float(scale_b.max()), 1e-12)
    # DC says nothing about a pattern; bins that are real by symmetry (or empty) have
    # no phase to lock
    keep = (scale_a > 1e-4 * largest) & (scale_b > 1e-4 * largest)
    keep[0] = False
    bins = np.flatnonzero(keep)
    return _Fit(bins, centre[bins], cos[bins], sin[bins], scale_a[bins], scale_b[bins])


def _whiten(spec: np.ndarray, fit: _Fit) -> np.ndarray:
    z = spec[:, fit.bins] - fit.centre
    a = (z.real * fit.cos + z.imag * fit.sin) / fit.scale_a
    b = (z.imag * fit.cos - z.real * fit.sin) / fit.scale_b
    return (a + 1j * b).astype(np.complex64)


def phase_locked_patterns(
    images: np.ndarray,
    *,
    tail: float = 0.01,
    min_coherence: float = 0.5,
    cut: float = 3.0,
    patterns: int = 8,
    members: int = 32,
    min_count: int = 8,
    fit_rows: int = 20000,
    seed: int = 0,
    block: int = 4096,
    template: str = "off",
    template_z: float = 4.0,
) -> PhaseLock:
    """Score each image by how far it sits along a phase-locked pattern (see the module).

    images: (N, H, W) or (N, H, W, 3) uint8.
    template: which patterns are scored along their matched template instead of the
        mean of their member bins (TEMPLATES): "off" none, "narrow" those that lock fewer
        than `members` bins, "all" every one. The template is the mean whitened spectrum
        of the sample images the pattern flags, less the mean of all, over every bin
        where that difference is significant (|t| sqrt(flagged) >= `template_z`). A
        trigger that locks one bin (SIG's sinusoid) leaves weaker harmonics the template
        adds; one that locks many (a patch) has strong bins enough, and summing hundreds
        of weak ones adds the scenes' spread (TUNING.md, session 12).
    """
    gray = gray_u8(images)
    n = len(gray)
    if n < MIN_IMAGES:
        raise ValueError(f"phase-locked patterns need at least {MIN_IMAGES} images, got {n}")
    if not 0.0 < tail < 0.5:
        raise ValueError(f"tail must be a share in (0, 0.5), got {tail!r}")
    if not 0.0 < min_coherence <= 1.0:
        raise ValueError(f"min_coherence must be in (0, 1], got {min_coherence!r}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template_z <= 0:
        raise ValueError(f"template_z must be > 0, got {template_z!r}")
    if patterns < 1 or members < 1 or min_count < 1 or fit_rows < MIN_IMAGES:
        raise ValueError("patterns, members and min_count must be >= 1 and fit_rows >= MIN_IMAGES")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, fit_rows), replace=False))
    spec = _spectra(gray[sample])
    fit = _fit_axes(spec)
    z: np.ndarray | None = _whiten(spec, fit)
    del spec
    m = min(len(z) - 1, max(8, int(tail * len(z))))
    far = np.argpartition(-np.abs(z), m, axis=0)[:m]
    tails = np.take_along_axis(z, far, axis=0)
    pull = tails.sum(axis=0)
    coherence = np.abs(pull) / np.maximum(np.abs(tails).sum(axis=0), 1e-12)
    direction = np.conj(pull / np.maximum(np.abs(pull), 1e-12))
    locked = np.flatnonzero(coherence >= min_coherence)
    if not len(locked):
        return PhaseLock(np.zeros(n), [])
    proj = (z[:, locked] * direction[locked]).real.astype(np.float64)
    if template == "off":
        z = None  # only a template reads the whitened sample again: free it now
    median = np.median(proj, axis=0)
    spread = np.maximum(np.quantile(proj, 0.95, axis=0) - median, 1e-12)
    flagged = (proj - median) / spread > cut
    count = flagged.sum(axis=0)
    chosen: list[_Pattern] = []
    found: list[dict] = []
    free = np.ones(len(locked), bool)
    for j in np.argsort(-count, kind="stable"):
        if len(chosen) >= patterns or count[j] < min_count:
            break
        if not free[j]:
            continue
        inter = (flagged & flagged[:, j : j + 1]).sum(axis=0)
        group = np.flatnonzero(free & (count >= min_count) & (inter >= 0.5 * count))
        free[group] = False
        group = group[np.argsort(-count[group], kind="stable")][:members]
        # a pattern's own scale: averaging its bins narrows the scenes' spread, so its
        # mean is put back on the common scale (median 0, 95th percentile 1)
        cols = locked[group]
        pattern: _Pattern = _BinMean.fit(
            cols, direction[cols], median[group], spread[group], proj[:, group]
        )
        if z is not None and (template == "all" or len(group) < members):
            pattern = _matched_template(z, pattern.score_whitened(z) > cut, template_z) or pattern
        chosen.append(pattern)
        row, col = divmod(int(fit.bins[locked[j]]), gray.shape[2] // 2 + 1)
        found.append(
            {
                "bin": (row, col),
                "members": len(group),
                "flagged": int(count[j]),
                "coherence": float(coherence[locked[j]]),
            }
        )
    z = None
    if not chosen:
        return PhaseLock(np.zeros(n), [])
    scores = np.zeros(n)  # an image on no pattern's side scores 0
    for start in range(0, n, block):  # bounded memory: the spectra of one block at a time
        zb = _whiten(_spectra(gray[start : start + block]), fit)
        for pattern in chosen:
            scores[start : start + block] = np.maximum(
                scores[start : start + block], pattern.score_whitened(zb)
            )
    return PhaseLock(scores, found)


@dataclass
class _BinMean:
    """A pattern scored by the mean of its member bins' scaled projections, that mean put
    back on the common scale (median 0, 95th percentile 1): averaging narrows the scenes'
    spread, which would otherwise hide a trigger's images under the cut."""

    cols: np.ndarray  # columns of the whitened spectrum
    direction: np.ndarray  # each bin's locked phase (unit complex)
    median: np.ndarray
    spread: np.ndarray
    low: float
    width: float

    @classmethod
    def fit(
        cls,
        cols: np.ndarray,
        direction: np.ndarray,
        median: np.ndarray,
        spread: np.ndarray,
        proj: np.ndarray,
    ) -> _BinMean:
        """The pattern with its scale read on the sample's projections `proj`."""
        low, width = _common_scale(((proj - median) / spread).mean(axis=1))
        return cls(cols, direction, median, spread, low, width)

    def _mean(self, proj: np.ndarray) -> np.ndarray:
        return ((proj - self.median) / self.spread).mean(axis=1)

    def score_whitened(self, z: np.ndarray) -> np.ndarray:
        proj = (z[:, self.cols] * self.direction).real
        return (self._mean(proj) - self.low) / self.width


@dataclass
class _Template:
    """A pattern scored by a matched filter: the projection on its template, on the
    common scale of the fitted sample."""

    cols: np.ndarray
    weights: np.ndarray  # the template's conjugate over its significant bins
    low: float
    width: float

    def score_whitened(self, z: np.ndarray) -> np.ndarray:
        proj = (z[:, self.cols] * self.weights).real.sum(axis=1, dtype=np.float64)
        return (proj - self.low) / self.width


_Pattern = _BinMean | _Template


def _matched_template(z: np.ndarray, flagged: np.ndarray, z_min: float) -> _Template | None:
    """The template of the sample images a pattern flags (None: too few to average)."""
    count = int(flagged.sum())
    if count < 2:
        return None
    diff = z[flagged].mean(axis=0, dtype=np.complex128) - z.mean(axis=0, dtype=np.complex128)
    cols = np.flatnonzero(np.abs(diff) * np.sqrt(count) >= z_min)
    if not len(cols):
        return None
    weights = np.conj(diff[cols]).astype(np.complex64)
    proj = (z[:, cols] * weights).real.sum(axis=1, dtype=np.float64)
    return _Template(cols, weights, *_common_scale(proj))


def _common_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 95th percentile - median) of a pattern's sample scores: the offset and
    width that put it on the doubt's common scale."""
    low, high = np.quantile(values, [0.5, 0.95])
    return float(low), max(float(high - low), 1e-12)
