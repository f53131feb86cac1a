"""otcclip.phase_lock: position-locked triggers found by the phase of their spectrum."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from otcclip.phase_lock import phase_locked_patterns


def _backdoored(kind: str, n_poison: int = 36):
    from otcclip.attacks import backdoor, poisoned_ids
    from otcclip.data import fashion_scenes

    clean = fashion_scenes(1200, seed=0, image_size=56)
    table, manifest = backdoor(clean, kind, n_poison, "bag", 1)
    return table.images, np.isin(table.ids, poisoned_ids([manifest]))


@pytest.fixture(scope="module")
def sig_scenes():
    return _backdoored("sig")


@pytest.fixture(scope="module")
def blended_images(blended_scenes):  # tests/conftest.py: 1,200 scenes, 36 blended
    table, poisoned = blended_scenes
    return table.images, poisoned


@pytest.mark.parametrize("template", ["off", "narrow", "all"])
@pytest.mark.parametrize("kind", ["sig", "blended", "badnet"])
def test_a_position_locked_trigger_is_found_from_the_pixels_alone(
    kind, template, sig_scenes, blended_images
):
    scenes = {"sig": sig_scenes, "blended": blended_images}
    images, poisoned = scenes[kind] if kind in scenes else _backdoored(kind)
    result = phase_locked_patterns(images, template=template)
    assert result.scores.shape == (len(images),) and np.isfinite(result.scores).all()
    assert roc_auc_score(poisoned, result.scores) >= 0.98
    assert result.patterns and result.patterns[0]["coherence"] >= 0.5


def test_sig_is_locked_at_its_own_frequency(sig_scenes):
    # SIG adds sin(2 pi * 6 * column / 56) to every row: row 0, column 6 of the spectrum
    images, poisoned = sig_scenes
    patterns = phase_locked_patterns(images).patterns
    assert patterns[0]["bin"] == (0, 6)
    assert patterns[0]["flagged"] >= 0.5 * poisoned.sum()


def test_the_matched_template_puts_a_spread_trigger_over_the_cut(blended_images):
    # blended noise spreads over hundreds of bins; the mean of the 32 strongest leaves
    # most of its images under the cut, the template (every significant bin) does not
    images, poisoned = blended_images
    bins = phase_locked_patterns(images).scores
    matched = phase_locked_patterns(images, template="all").scores
    assert (matched[poisoned] >= 3).mean() >= 0.9 > (bins[poisoned] >= 3).mean()
    assert (matched[~poisoned] >= 3).mean() <= 0.005


def test_clean_scenes_lock_no_pattern_and_score_zero(sig_scenes):
    images, poisoned = sig_scenes
    result = phase_locked_patterns(images[~poisoned])
    assert result.patterns == []
    assert not result.scores.any()


def test_the_fit_on_a_sample_scores_every_image_and_is_seeded(sig_scenes):
    images, poisoned = sig_scenes
    # fitted on 1,000 of the 1,200 images (about 30 of the 36 poisons), scored on all
    a = phase_locked_patterns(images, fit_rows=1000, seed=3)
    b = phase_locked_patterns(images, fit_rows=1000, seed=3)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert roc_auc_score(poisoned, a.scores) >= 0.98


def test_bad_input_gets_a_clear_error(sig_scenes):
    images, _ = sig_scenes
    with pytest.raises(ValueError, match="at least 16 images"):
        phase_locked_patterns(images[:10])
    with pytest.raises(ValueError, match="tail must be a share"):
        phase_locked_patterns(images, tail=0.7)
    with pytest.raises(ValueError, match="min_coherence"):
        phase_locked_patterns(images, min_coherence=0.0)
    with pytest.raises(ValueError, match="template_z"):
        phase_locked_patterns(images, template="all", template_z=0.0)
    with pytest.raises(ValueError, match="template must be one of"):
        phase_locked_patterns(images, template=True)
    with pytest.raises(TypeError, match="uint8"):
        phase_locked_patterns(images.astype(np.float32))


def test_images_without_any_structure_lock_nothing():
    flat = np.full((40, 16, 16), 7, np.uint8)  # every bin empty: nothing to whiten
    noise = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    for images in (flat, noise):
        result = phase_locked_patterns(images)
        assert result.patterns == [] and not result.scores.any()
