"""PairTable and EvalSet: validation, subsets by position and by id, concatenation."""

from __future__ import annotations

import numpy as np
import pytest

from otcclip.data import EvalSet, PairTable


def _table(n=5, classes=True, offset=0):
    hot = np.eye(10, dtype=np.uint8)[np.arange(n) % 10]
    return PairTable(
        ids=np.arange(n) + offset,
        images=np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2),
        captions=[f"c{i}" for i in range(n)],
        image_classes=hot if classes else None,
        caption_classes=hot.copy() if classes else None,
    )


def test_subset_by_indices_mask_and_slice():
    t = _table()
    for idx in ([3, 1], np.array([False, True, False, True, False]), slice(1, 4, 2)):
        s = t.subset(idx)
        assert s.ids.tolist() == [t.ids[i] for i in np.arange(5)[idx]]
        assert s.captions == [f"c{i}" for i in s.ids]
        np.testing.assert_array_equal(s.images, t.images[s.ids])
        np.testing.assert_array_equal(s.image_classes, t.image_classes[s.ids])
    assert len(t.subset([])) == 0


def test_rows_of_finds_ids_and_names_missing_ones():
    t = _table(offset=100).subset([4, 0, 2])
    assert t.rows_of([100, 104]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="1 ids not in the table"):
        t.rows_of([100, 7])


def test_concat_keeps_ids_unique():
    a, b = _table(3), _table(2, offset=10)
    c = PairTable.concat([a, b])
    assert c.ids.tolist() == [0, 1, 2, 10, 11]
    with pytest.raises(ValueError, match="unique"):
        PairTable.concat([a, a])
    with pytest.raises(ValueError, match="with and without"):
        PairTable.concat([a, _table(2, classes=False, offset=20)])


def test_validation_errors():
    with pytest.raises(TypeError, match="uint8"):
        PairTable(ids=[0], images=np.zeros((1, 2, 2), np.float32), captions=["a"])
    with pytest.raises(ValueError, match="captions for"):
        PairTable(ids=[0, 1], images=np.zeros((2, 2, 2), np.uint8), captions=["a"])
    with pytest.raises(TypeError, match="str"):
        PairTable(ids=[0], images=np.zeros((1, 2, 2), np.uint8), captions=[b"a"])
    with pytest.raises(ValueError, match="go together"):
        PairTable(
            ids=[0],
            images=np.zeros((1, 2, 2), np.uint8),
            captions=["a"],
            image_classes=np.zeros((1, 10)),
        )
    with pytest.raises(TypeError, match="integer"):
        PairTable(ids=np.array([0.5]), images=np.zeros((1, 2, 2), np.uint8), captions=["a"])


def test_eval_set_prompts_use_synonyms_and_articles():
    s = EvalSet(
        images=np.zeros((2, 4, 4), np.uint8),
        labels=[0, 1],
        classnames=("ankle boot", "bag"),
        templates=("a photo of {a}.", "product photo: {name}"),
        synonyms=(("ankle boot",), ("bag", "purse")),
    )
    assert s.class_prompts() == [
        ["a photo of an ankle boot.", "product photo: ankle boot"],
        ["a photo of a bag.", "product photo: bag", "a photo of a purse.", "product photo: purse"],
    ]
    with pytest.raises(ValueError, match="labels"):
        EvalSet(
            images=np.zeros((1, 4, 4), np.uint8),
            labels=[2],
            classnames=("a", "b"),
            templates=("{a}",),
        )
