"""otcclip.stream_rounds: slots by pair id, and what a streamed round keeps and leaves out."""

from __future__ import annotations

import numpy as np
import pytest

from otcclip.matching_state import NEVER
from otcclip.stream_rounds import IdSlots, StreamedRounds


def test_ids_get_slots_in_the_order_they_first_come():
    slots = IdSlots(4)
    np.testing.assert_array_equal(slots.assign(np.array([907, 3, 907])), [0, 1, 0])
    np.testing.assert_array_equal(slots.assign(np.array([12, 3])), [2, 1])
    np.testing.assert_array_equal(slots.find(np.array([12, 5, 907])), [2, -1, 0])
    assert len(slots) == 3
    again = IdSlots.from_state(slots.state_dict())
    np.testing.assert_array_equal(again.find(np.array([907, 3, 12, 5])), [0, 1, 2, -1])
    slots.assign(np.array([40]))
    with pytest.raises(ValueError, match="all 4 slots are taken"):
        slots.assign(np.array([41]))


def test_slots_agree_with_a_dict_of_first_arrivals_over_many_batches():
    rng = np.random.default_rng(3)
    slots, reference = IdSlots(3000), {}
    for _ in range(40):  # batches that repeat ids, within and across batches
        batch = rng.integers(0, 2**40, 60) if rng.random() < 0.5 else rng.integers(0, 4000, 60)
        for pair_id in batch.tolist():
            reference.setdefault(pair_id, len(reference))
        np.testing.assert_array_equal(slots.assign(batch), [reference[i] for i in batch.tolist()])
    assert len(slots) == len(reference)
    np.testing.assert_array_equal(slots.ids[: len(slots)], list(reference))
    probe = rng.integers(0, 5000, 500)
    np.testing.assert_array_equal(slots.find(probe), [reference.get(i, -1) for i in probe.tolist()])


def test_a_batch_that_overflows_the_slots_names_the_first_id_and_gives_none():
    slots = IdSlots(3)
    slots.assign(np.array([5]))
    with pytest.raises(ValueError, match="id 9 is new, but all 3 slots"):
        slots.assign(np.array([7, 5, 8, 9, 10]))
    assert len(slots) == 1
    np.testing.assert_array_equal(slots.find(np.array([7, 8, 5])), [-1, -1, 0])


def test_a_round_leaves_out_the_doubted_until_the_next_and_sticky_keeps_them_out():
    rng = np.random.default_rng(0)
    state = StreamedRounds(6, 3)
    ids = np.array([50, 51, 52, 53, 54])
    state.write(ids, rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), epoch=0)
    np.testing.assert_array_equal(state.judged(), [0, 1, 2, 3, 4])
    assert state.kept.image_epoch[5] == NEVER
    image, caption = state.kept.embeddings(state.judged())
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(caption, axis=1), 1, atol=1e-3)

    state.apply(state.judged(), np.array([0, 1, 0, 0, 0], bool), sticky=False)
    np.testing.assert_array_equal(state.trains(np.array([51, 52, 99])), [False, True, True])
    state.apply(state.judged(), np.array([0, 0, 0, 1, 0], bool), sticky=False)
    np.testing.assert_array_equal(state.trains(np.array([51, 53])), [True, False])
    state.apply(state.judged(), np.array([0, 0, 1, 0, 0], bool), sticky=True)
    np.testing.assert_array_equal(state.trains(ids), [True, False, False, False, True])

    again = StreamedRounds.from_state(state.state_dict())
    np.testing.assert_array_equal(again.trains(ids), state.trains(ids))
    np.testing.assert_array_equal(again.kept.image, state.kept.image)
    assert again.oldest(again.judged()) == 0
