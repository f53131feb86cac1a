"""Pixel-level helpers shared by the model-free detectors (`otcclip.doubt`,
`otcclip.phase_lock`), so that neither reaches into the other's internals."""

from __future__ import annotations

import numpy as np

__all__ = ["gray_u8"]


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
