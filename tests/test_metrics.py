"""Metrics on constructed predictions, including the cases public defense code got wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest

from otcclip import metrics as M


def test_topk_accuracy():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    labels = np.array([0, 2, 2, 1])
    assert M.topk_accuracy(scores, labels, 1) == 0.5
    assert M.topk_accuracy(scores, labels, 2) == 1.0
    assert M.topk_accuracy(scores, labels, 3) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        M.topk_accuracy(scores, labels, 4)
    with pytest.raises(ValueError, match="labels must be"):
        M.topk_accuracy(scores, np.array([0, 1, 2, 3]), 1)


def test_ties_count_against_the_model():
    # A model that scores every class alike knows nothing: top-1 must be 0, not 1/C or 1.
    constant = np.zeros((4, 10))
    assert M.topk_accuracy(constant, np.array([0, 1, 2, 3]), 1) == 0.0
    assert M.topk_accuracy(constant, np.array([0, 1, 2, 3]), 10) == 1.0


def test_targeted_asr_compares_with_the_target_label_not_the_true_one():
    true = np.array([1, 2, 3, 4])
    # A model that classifies every target correctly: the attack failed everywhere.
    assert M.targeted_asr(true, target_labels=8) == 0.0
    # "ASR" computed as 1 - accuracy would call this a 100% success; it is 1 of 4.
    wrong_but_not_target = np.array([8, 5, 6, 7])
    assert M.targeted_asr(wrong_but_not_target, 8) == 0.25
    assert M.targeted_asr(np.array([8, 8, 0, 8]), np.array([8, 8, 8, 8])) == 0.75
    with pytest.raises(ValueError, match="at least one"):
        M.targeted_asr(np.array([], dtype=np.int64), 8)


def test_backdoor_asr_leaves_out_images_of_the_target_class():
    true = np.array([8, 8, 8, 8, 1, 2, 3, 4])
    pred = np.array([8, 8, 8, 8, 8, 8, 0, 0])
    # Counting the target-class images would give 6/8 = 75%; the right answer is 2/4.
    assert M.backdoor_asr(pred, true, 8) == 0.5
    # Compared with the target, not with the true label.
    assert M.backdoor_asr(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4]), 8) == 0.0
    with pytest.raises(ValueError, match="not the target"):
        M.backdoor_asr(np.array([8, 8]), np.array([8, 8]), 8)


def test_recall_at_k_identity_and_reversed():
    sim = np.eye(5, dtype=np.float32)
    r = M.recall_at_k(sim, ks=(1, 5))
    assert r == {"i2t@1": 1.0, "i2t@5": 1.0, "t2i@1": 1.0, "t2i@5": 1.0}
    worst = -np.eye(5, dtype=np.float32)  # the right caption scores lowest of all
    r = M.recall_at_k(worst, ks=(1, 4, 5))
    assert r["i2t@1"] == 0.0 and r["i2t@4"] == 0.0 and r["i2t@5"] == 1.0


def test_recall_ties_count_against_and_positives_are_honoured():
    constant = np.zeros((4, 4), dtype=np.float32)
    assert (
        M.recall_at_k(constant, ks=(1, 3, 4))["i2t@3"] == 0.0
    )  # 3 wrong items tie with the right one
    # Two copies of the same caption (texts 0 and 1) are both right for images 0 and 1.
    sim = np.array([[0.9, 1.0, 0.1], [1.0, 0.2, 0.3], [0.0, 0.1, 0.8]], dtype=np.float32)
    pos = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    r = M.recall_at_k(sim, ks=(1,), positives=pos)
    assert r["i2t@1"] == 1.0 and r["t2i@1"] == 1.0
    assert M.recall_at_k(sim, ks=(1,))["i2t@1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no positive"):
        M.recall_at_k(sim, positives=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="non-square"):
        M.recall_at_k(np.zeros((2, 3), np.float32))


def test_reassignment_precision_recall():
    poisoned = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    changed = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    r = M.reassignment_precision_recall(poisoned, changed)
    assert r["precision"] == 0.75 and r["recall"] == 0.75
    assert r["n_changed"] == 4 and r["n_poisoned_changed"] == 3 and r["n_clean_changed"] == 1
    empty = M.reassignment_precision_recall(np.zeros(3, bool), np.zeros(3, bool))
    assert math.isnan(empty["precision"]) and math.isnan(empty["recall"])
    with pytest.raises(TypeError, match="bool"):
        M.reassignment_precision_recall(np.array([1, 0]), np.array([True, False]))


def test_true_content_share():
    image = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    caption = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]])
    # Row 0: exact; row 1 names a class not shown; row 2 exact; row 3 names nothing.
    assert M.true_content_share(image, caption) == 0.5
    caption_subset = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]])
    assert M.true_content_share(image, caption_subset, mode="subset") == 0.5
    assert M.true_content_share(image, caption_subset, mode="exact") == 0.25
    mask = np.array([True, True, False, False])
    assert M.true_content_share(image, caption, mask) == 0.5
    assert math.isnan(M.true_content_share(image, caption, np.zeros(4, bool)))
    assert M.names_target_share(caption, 2, np.ones(4, bool)) == 0.25


def test_predict_breaks_ties_by_lowest_index():
    assert M.predict(np.array([[0.1, 0.3, 0.3], [0.0, 0.0, 0.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="NaN"):
        M.predict(np.array([[np.nan, 0.0]]))
