"""Augmentations that keep an image-caption pair true: for L_intra, RoCLIP and SafeCLIP.

fashion-scenes captions say where things are ("a sneaker to the left of a bag"),
so nothing here may move an item across the scene: no flips, no rotations, no
large crops. Images get a mild zoom, a small shift, brightness/contrast jitter
and pixel noise; captions get meaning-preserving synonym swaps (an item's
synonyms of the same class, equivalent place words) and the dropout of articles
only. (RoCLIP and SafeCLIP use EDA-style text edits and flips on web data;
those would break our captions, so this is a documented deviation.)

Randomness is drawn for the whole global batch from a generator seeded by
(seed, epoch, step, stream), and each process applies its own rows: a run on
two processes augments every sample exactly as a run on one does, and a
resumed run exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageAugment",
    "TextAugment",
    "augment_captions",
    "augment_images",
    "batch_generator",
    "batch_rng",
]


@dataclass(frozen=True)
class ImageAugment:
    """Mild, position-preserving image augmentation (fractions of the image side).

    min_scale: the view covers between min_scale and 1 of each side (a zoom in);
    max_shift: extra translation, as a fraction of the side; brightness/contrast:
    jitter amplitudes in normalised pixel units / as a factor; noise_std: Gaussian
    noise in normalised pixel units; whole_pixels: round the shift to whole pixels, so
    that a view without zoom (min_scale 1) is an exact translated copy, not a bilinear
    resampling (which blurs every training image, and never a test image).
    """

    min_scale: float = 0.9
    max_shift: float = 0.04
    brightness: float = 0.2
    contrast: float = 0.2
    noise_std: float = 0.05
    whole_pixels: bool = False

    def __post_init__(self) -> None:
        if not 0.5 <= self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in [0.5, 1], got {self.min_scale}")
        if not 0.0 <= self.max_shift <= 0.25:
            raise ValueError(f"max_shift must be in [0, 0.25], got {self.max_shift}")
        for name in ("brightness", "contrast", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.contrast >= 1:
            raise ValueError(f"contrast must be < 1, got {self.contrast}")

    @staticmethod
    def from_spec(spec: str) -> ImageAugment:
        """'' (the defaults) or comma-separated NAME=VALUE overrides, e.g. 'noise_std=0'.

        One string keeps every knob reachable from one CLI option (and a recorded command),
        which the augmentation probes of TUNING.md need: each part on and off.
        """
        known = {f.name for f in dataclasses.fields(ImageAugment)}
        values: dict[str, float | bool] = {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(
                    f"image augment {item!r}: expected NAME=VALUE with NAME one of "
                    f"{', '.join(sorted(known))}"
                )
            try:
                values[name] = float(raw) if name != "whole_pixels" else bool(float(raw))
            except ValueError:
                raise ValueError(f"image augment {item!r}: {raw!r} is not a number") from None
        return ImageAugment(**values)


@dataclass(frozen=True)
class TextAugment:
    """Meaning-preserving caption edits: per-phrase synonym swap, per-article dropout."""

    synonym_p: float = 0.5
    article_drop_p: float = 0.2

    def __post_init__(self) -> None:
        for name in ("synonym_p", "article_drop_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def batch_generator(seed: int, epoch: int, step: int, stream: int = 0) -> torch.Generator:
    """A torch Generator that depends only on (seed, epoch, step, stream)."""
    g = torch.Generator()
    g.manual_seed(_mix(seed, epoch, step, stream))
    return g


def batch_rng(seed: int, epoch: int, step: int, stream: int = 0) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, epoch, step, stream)."""
    return np.random.default_rng([int(seed), int(epoch), int(step), int(stream), 0x0A06])


def augment_images(
    pixels: Tensor,
    generator: torch.Generator,
    config: ImageAugment = ImageAugment(),
    *,
    offset: int = 0,
    total: int | None = None,
) -> Tensor:
    """Augment a batch of model-ready images (B, 3, S, S), normalised as the model expects.

    Parameters are drawn for `total` rows (default B) and rows
    offset..offset+B applied, so that each process of a data-parallel run gets
    its slice of one global draw.
    """
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be (B, C, S, S), got {tuple(pixels.shape)}")
    b, c, h, w = pixels.shape
    total = b if total is None else total
    if offset < 0 or offset + b > total:
        raise ValueError(f"rows {offset}..{offset + b} do not fit in a draw of {total}")
    scale = 1.0 - (1.0 - config.min_scale) * torch.rand(total, generator=generator)
    reach = (1.0 - scale) + 2.0 * config.max_shift  # grid units: the side spans 2
    shift = (torch.rand(total, 2, generator=generator) * 2.0 - 1.0) * reach.unsqueeze(1)
    if config.whole_pixels:  # grid units: one pixel is 2 / side
        side = torch.tensor([w, h], dtype=shift.dtype)
        shift = torch.round(shift * side / 2.0) * 2.0 / side
    bright = (torch.rand(total, generator=generator) * 2.0 - 1.0) * config.brightness
    contrast = 1.0 + (torch.rand(total, generator=generator) * 2.0 - 1.0) * config.contrast
    noise = torch.randn(total, c, h, w, generator=generator) * config.noise_std
    rows = slice(offset, offset + b)
    device, dtype = pixels.device, pixels.dtype
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale[rows]
    theta[:, 1, 1] = scale[rows]
    theta[:, :, 2] = shift[rows]
    grid = F.affine_grid(theta.to(device, dtype), list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast[rows].view(b, 1, 1, 1).to(device, dtype) + mean
    out = out + bright[rows].view(b, 1, 1, 1).to(device, dtype) + noise[rows].to(device, dtype)
    return out


def augment_captions(
    captions: list[str], rng: np.random.Generator, config: TextAugment = TextAugment()
) -> list[str]:
    """A meaning-preserving variant of each caption (same classes, same places)."""
    pattern, groups = _synonym_table()
    out = []
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")

        def swap(match: re.Match[str]) -> str:
            phrase = match.group(0)
            options = groups[phrase.lower()]
            if rng.random() >= config.synonym_p:
                return phrase
            return options[int(rng.integers(0, len(options)))]

        text = pattern.sub(swap, caption)
        text = _drop_articles(text, rng, config.article_drop_p)
        out.append(_fix_articles(text))
    return out


# Place words that name the same place; phrases of one group are interchangeable.
_PLACE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("top left", "upper left"),
    ("top right", "upper right"),
    ("bottom left", "lower left"),
    ("bottom right", "lower right"),
    ("center", "middle"),
    ("photo", "picture", "image"),
    ("black background", "dark background"),
)


@functools.lru_cache(maxsize=1)
def _synonym_table() -> tuple[re.Pattern[str], dict[str, tuple[str, ...]]]:
    from otcclip.data import SYNONYMS

    groups: dict[str, tuple[str, ...]] = {}
    for group in (*SYNONYMS, *_PLACE_GROUPS):
        for phrase in group:
            groups[phrase] = tuple(group)
    names = sorted(groups, key=len, reverse=True)  # "ankle boot" before "boot"
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![\w-])({alternatives})(?![\w-])", re.IGNORECASE), groups


_ARTICLE = re.compile(r"(?<![\w-])(a|an|the) (?=\w)", re.IGNORECASE)
_A_AN = re.compile(r"(?<![\w-])(a|an) (\w)", re.IGNORECASE)


def _drop_articles(text: str, rng: np.random.Generator, p: float) -> str:
    if p <= 0:
        return text
    return _ARTICLE.sub(lambda m: "" if rng.random() < p else m.group(0), text)


def _fix_articles(text: str) -> str:
    """'a' or 'an' by the next word's first letter, after a synonym swap ('an boot')."""

    def fix(match: re.Match[str]) -> str:
        article = "an" if match.group(2).lower() in "aeiou" else "a"
        if match.group(1)[0].isupper():
            article = article.capitalize()
        return f"{article} {match.group(2)}"

    return _A_AN.sub(fix, text)


def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (SeedSequence mixing: no collisions by addition)."""
    words = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)
