"""The one image decoder of the package: bytes or a file to a uint8 array of the wanted size.

The in-memory readers, the streaming source and `otcclip match` all decode here, so
that one image becomes the same pixels whichever way it is read. Resizing follows
CLIP: the shorter side to the size, then a centre crop (the aspect ratio is kept).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from otcclip.data.errors import DataError

GRAY_MODES = ("L", "1", "LA", "I", "I;16")
_MODES = ("auto", "L", "RGB")
_IDS_SHOWN = 10

ImageSource = bytes | bytearray | memoryview | str | os.PathLike
"""Encoded image bytes (PNG, JPEG, WebP, ...) or the path of an image file."""


def open_image(source: ImageSource | None, name: str = "image") -> Image.Image:
    """The decoded image; a DataError naming `name` (the sample's id and file) when it is not one.

    Decoding happens here in full (`load`), so a truncated file fails now rather than
    later inside a resize.
    """
    if source is None:
        raise DataError(f"{name}: no image")
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            image = Image.open(os.fspath(source))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataError(
            f"{name}: cannot decode the image ({reason}); re-encode or drop this sample"
        ) from None
    return image


def is_gray(image: Image.Image) -> bool:
    """Whether the image holds one channel (grayscale in any of PIL's bit depths)."""
    return image.mode in GRAY_MODES


def fit(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then a centre crop: keeps the aspect ratio, as CLIP does."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_array(image: Image.Image, size: int | None = None, mode: str = "auto") -> np.ndarray:
    """Pixels as uint8 (H, W) for grayscale or (H, W, 3), fitted to size x size when given.

    mode 'auto' keeps a grayscale image grayscale and makes anything else RGB; 'L' and
    'RGB' force one.
    """
    _check_mode(mode)
    gray = is_gray(image) if mode == "auto" else mode == "L"
    wanted = "L" if gray else "RGB"
    if image.mode != wanted:
        image = image.convert(wanted)
    if size is not None and image.size != (size, size):
        image = fit(image, size)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


def read_image(
    source: ImageSource | None, size: int | None = None, mode: str = "auto", name: str = "image"
) -> np.ndarray:
    """Decode one image to a uint8 array (see to_array); DataError naming `name` if unreadable."""
    return to_array(open_image(source, name), size, mode)


def read_images(
    sources: Sequence[ImageSource | None], ids: Sequence[int], size: int, where: str
) -> np.ndarray:
    """Every image at size x size, all or nothing: (N, S, S), or (N, S, S, 3) if any is colour.

    Every unreadable image is found before the DataError, which names them all by id
    (`where` says which file), so one run tells the user everything to fix.
    """
    decoded: list[Image.Image | None] = []
    for source, i in zip(sources, ids, strict=True):
        try:
            decoded.append(open_image(source, f"id {i}"))
        except DataError:
            decoded.append(None)
    bad = [int(i) for i, image in zip(ids, decoded, strict=True) if image is None]
    if bad:
        more = ", ..." if len(bad) > _IDS_SHOWN else ""
        raise DataError(
            f"{where}: {len(bad)} of {len(decoded)} images cannot be read "
            f"(ids {bad[:_IDS_SHOWN]}{more})"
        )
    gray = all(is_gray(image) for image in decoded if image is not None)
    shape = (len(decoded), size, size) if gray else (len(decoded), size, size, 3)
    out = np.empty(shape, np.uint8)
    for row, image in enumerate(decoded):
        assert image is not None
        out[row] = to_array(image, size, "L" if gray else "RGB")
    return out


def array_mode(pixels: np.ndarray) -> str:
    """'L' for a stack of grayscale images (N, H, W), 'RGB' for (N, H, W, 3)."""
    return "L" if pixels.ndim == 3 else "RGB"


def check_options(image_size: int | None, mode: str) -> None:
    """Refuse a bad size or mode before any file is opened (every reader takes both)."""
    _check_mode(mode)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'auto', 'L' or 'RGB', got {mode!r}")
