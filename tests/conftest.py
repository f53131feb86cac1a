"""Fixtures shared by more than one test module."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def blended_scenes():
    """1,200 scenes, 36 of them carrying a blended trigger (test_pixels, test_doubt)."""
    from otcclip.attacks import backdoor, poisoned_ids
    from otcclip.data import fashion_scenes

    clean = fashion_scenes(1200, seed=0, image_size=56)
    table, manifest = backdoor(clean, "blended", 36, "bag", 1)
    return table, np.isin(table.ids, poisoned_ids([manifest]))
