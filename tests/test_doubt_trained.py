"""otcclip.doubt on features a model really learned from poisoned scenes.

A small seeded CLIP is trained without a defense on fashion-scenes with a
targeted attack (varied copies) and a blended backdoor; the doubt signals are
then read from its own embeddings. The poisoned pairs must score above the
clean ones: the pixel signals find the copies, and the model's neighbourhood
consistency finds the blended backdoor, which no pixel signal sees.
"""

from __future__ import annotations

import numpy as np
import pytest

from otcclip import doubt
from otcclip.attacks import backdoor, targeted_poison

pytestmark = pytest.mark.slow


def _auroc(score: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(positive.sum()), np.zeros(negative.sum())]
    return float(roc_auc_score(y, np.r_[score[positive], score[negative]]))


@pytest.fixture(scope="module")
def trained():
    """(table, image embeddings, caption embeddings, rows per attack) of a trained model."""
    import torch

    from otcclip.data import fashion_scenes
    from otcclip.evaluate import BundleEncoder
    from otcclip.train import TrainConfig, train

    table = fashion_scenes(2500, seed=11)
    table, targeted = targeted_poison(table, 4, 25, "bag", 12, copy_shift=2, copy_noise=8.0)
    table, blended = backdoor(table, "blended", 90, "bag", 13)
    config = TrainConfig(
        scenes=len(table),
        epochs=3,
        batch_size=128,
        lr=2e-3,
        seed=11,
        progress=False,
        threads=2,
        eval_every=0,
    )
    result = train(config, table=table, manifests=[targeted, blended])
    encoder = BundleEncoder(result.bundle, batch_size=512)
    with torch.no_grad():
        g = encoder.images(table.images)
        h = encoder.texts(table.captions)
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    h = (h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32)
    rows = {m.attack: np.isin(table.ids, np.asarray(m.poisoned_ids)) for m in (targeted, blended)}
    return table, g, h, rows


def test_poisoned_pairs_score_above_clean_ones_on_trained_features(trained):
    table, g, h, rows = trained
    clean = ~(rows["targeted"] | rows["blended"])
    config = doubt.DoubtConfig(k=10)
    pixels = doubt.pixel_evidence(table.images, config)
    d = doubt.doubt_scores(g, h, config, pixels=pixels)
    got = {
        "copies_pixel, targeted": _auroc(d.signals["copies_pixel"], rows["targeted"], clean),
        "fused, targeted": _auroc(d.fused, rows["targeted"], clean),
        "recurrence_pixel, blended": _auroc(d.signals["recurrence_pixel"], rows["blended"], clean),
        "consistency_caption, blended": _auroc(
            d.signals["consistency_caption"], rows["blended"], clean
        ),
        "fused, blended": _auroc(d.fused, rows["blended"], clean),
    }
    print(got)  # shown by pytest on failure, and with -s
    # the copies: the pixel evidence, and so the fused score, ranks them high
    assert got["copies_pixel, targeted"] > 0.97
    assert got["fused, targeted"] > 0.9
    # the blended trigger hides from the pixels; the model's neighbourhoods see it (at
    # this size 0.74 and 0.73 were measured; 0.5 is chance)
    assert got["recurrence_pixel, blended"] < 0.7
    assert got["consistency_caption, blended"] > 0.65
    assert got["fused, blended"] > 0.65
