"""otcclip.matching_state, and OTCCLIP's rounds from the training pass's embeddings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from otcclip import matching_state
from otcclip.matching_state import MatchingState


def test_writes_are_normalised_float16_and_stamped_by_epoch():
    state = MatchingState(5, 3)
    state.write_images(np.array([0, 2]), np.array([[3.0, 0, 4], [0, 2, 0]]), epoch=1)
    state.write_captions(np.arange(5), np.ones((5, 3)), epoch=0)
    assert state.image.dtype == np.float16
    np.testing.assert_allclose(state.image[0], [0.6, 0, 0.8], atol=1e-3)
    never = matching_state.NEVER
    assert state.image_epoch.tolist() == [1, never, 1, never, never]
    assert state.stale_images(0).tolist() == [1, 3, 4]  # the first round: never written
    # the round opening epoch 2 re-embeds what epoch 1 did not write
    assert state.stale_images(2).tolist() == [1, 3, 4]
    assert state.stale_captions(2).tolist() == [0, 1, 2, 3, 4]
    assert state.stale_captions(1).tolist() == []
    with pytest.raises(ValueError, match="never written"):
        state.embeddings()
    with pytest.raises(ValueError, match=r"1 rows were never written \(first: \[3\]\)"):
        state.embeddings(np.array([2, 3]))
    images, _ = state.embeddings(np.array([2, 0]))  # the written rows alone, in that order
    np.testing.assert_allclose(images, [[0, 1, 0], [0.6, 0, 0.8]], atol=1e-3)
    state.write_images(np.array([1, 3, 4]), np.ones((3, 3)), epoch=1)
    images, captions = state.embeddings()
    assert images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(captions, axis=1), 1.0, atol=1e-3)


def test_the_state_round_trips_exactly_and_refuses_a_damaged_one():
    state = MatchingState(4, 2)
    state.write_images(np.arange(4), np.random.default_rng(0).normal(size=(4, 2)), epoch=3)
    again = MatchingState.from_state(state.state_dict())
    for name, value in state.state_dict().items():
        np.testing.assert_array_equal(getattr(again, name), value)
    bad = dict(state.state_dict(), caption=np.zeros((3, 2), np.float16))
    with pytest.raises(ValueError, match="of one shape"):
        MatchingState.from_state(bad)
    bad = dict(state.state_dict(), image_epoch=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="one per row"):
        MatchingState.from_state(bad)


def test_a_state_on_disk_is_memory_mapped_and_restores_into_its_files(tmp_path):
    """`directory`: the four arrays are .npy files mapped in memory; the writes reach the
    files, and a restored state maps fresh files with the saved values."""
    state = MatchingState(4, 3, tmp_path / "state")
    assert isinstance(state.image, np.memmap) and state.image_epoch[0] == matching_state.NEVER
    state.write_images(np.array([1, 3]), np.array([[0.0, 3, 4], [1, 0, 0]]), epoch=2)
    state.flush()
    on_disk = np.load(tmp_path / "state" / "image.npy")
    np.testing.assert_array_equal(on_disk, state.image)
    assert np.load(tmp_path / "state" / "image_epoch.npy")[1] == 2
    saved = {k: np.array(v) for k, v in state.state_dict().items()}
    del state  # its mapping goes before the restore maps the same files anew
    again = MatchingState.from_state(saved, tmp_path / "state")
    assert isinstance(again.caption, np.memmap)
    for name, value in saved.items():
        np.testing.assert_array_equal(getattr(again, name), value)
    in_memory = MatchingState.from_state(saved)
    assert not isinstance(in_memory.image, np.memmap) and in_memory.directory is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.write_images(np.array([0]), np.ones((2, 3)), 0), "for"),
        (lambda s: s.write_images(np.array([7]), np.ones((1, 3)), 0), "must lie in"),
        (lambda s: s.write_captions(np.array([-1]), np.ones((1, 3)), 0), "must lie in"),
        (lambda s: s.write_captions(np.array([0]), np.ones((1, 3)), -2), "epoch must be"),
    ],
)
def test_bad_writes_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(MatchingState(4, 3))


def test_a_state_needs_rows_and_width():
    with pytest.raises(ValueError, match="n must be"):
        MatchingState(0, 3)
    with pytest.raises(ValueError, match="dim must be"):
        MatchingState(3, True)


def _kept_run(tmp_path, **settings):
    """A small OTCCLIP run (192 scenes, a round every epoch after one of warm-up) with
    its rounds from the training pass."""
    from otcclip.train import TrainConfig

    return TrainConfig(
        scenes=192,
        model="otc-vit-tiny",
        batch_size=32,
        defense="otcclip",
        warmup_epochs=1,
        match_every=1,
        round_embeddings="training",
        progress=False,
        threads=1,
        out=str(tmp_path),
        **settings,
    )


@pytest.mark.slow
def test_rounds_from_the_training_pass_embed_only_what_it_did_not_train(tmp_path, monkeypatch):
    """With round_embeddings=training no round embeds the whole data: the first re-embeds
    the pairs the warm-up screened out, the next ones the pairs the last round left out;
    the OT round (match_round) never runs when doubted pairs are dropped."""
    import otcclip.matching as matching
    from otcclip.train import train

    def no_round(*args, **kwargs):
        raise AssertionError("the model's round ran")

    monkeypatch.setattr(matching, "match_round", no_round)
    config = _kept_run(tmp_path, epochs=3)
    result = train(config)
    rounds = [m["defense"] for m in result.metrics if "round" in m.get("defense", {})]
    assert [r["round"] for r in rounds] == [1, 2]
    warmup = next(m["defense"] for m in result.metrics if "screened" in m.get("defense", {}))

    def untrained(left_out: int) -> int:  # left out, or in the epoch's last partial batch
        return 192 - (192 - left_out) // 32 * 32

    assert rounds[0]["refreshed_images"] == untrained(warmup["screened"])
    assert rounds[1]["refreshed_images"] == untrained(rounds[0]["sitting_out"])
    assert all(r["refreshed_images"] <= 192 // 4 for r in rounds)
    with pytest.raises(ValueError, match="needs doubt=fused.*--round-embeddings model"):
        dataclasses.replace(config, doubt="match").validate()
    dataclasses.replace(config, doubt="match", round_embeddings="model").validate()


@pytest.mark.slow
def test_repairing_from_kept_embeddings_scores_only_the_doubted_pairs(tmp_path, monkeypatch):
    """Under on_doubt=repair the OT round runs on the doubted pairs' images alone, with the
    kept caption embeddings as its pool (no pass over all images or captions)."""
    import otcclip.matching as matching
    from otcclip.train import train

    calls: list[tuple[int, int]] = []
    real = matching.match_round

    def counted(bundle, images, captions, own, config=None, **kwargs):
        assert kwargs.get("pool_embeddings") is not None and not config.cache_tokens
        calls.append((len(images), len(captions)))
        return real(bundle, images, captions, own, config, **kwargs)

    monkeypatch.setattr(matching, "match_round", counted)
    result = train(_kept_run(tmp_path, epochs=2, on_doubt="repair"))
    round_ = next(m["defense"] for m in result.metrics if "round" in m.get("defense", {}))
    doubted = round_["doubt_doubted"]
    assert doubted > 0 and calls == [(doubted, 192)]
    assert "rescore" in round_["seconds_by_stage"]
