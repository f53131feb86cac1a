"""Attacks: manifests match what changed, triggers sit where they should, seeds reproduce."""

from __future__ import annotations

import json

import numpy as np
import pytest

from otcclip import attacks as atk
from otcclip.data import CLASSNAMES, PairTable, classes_in_captions, fashion_scenes
from otcclip.data import scenes as sc

BAG = CLASSNAMES.index("bag")


@pytest.fixture(scope="module")
def scenes() -> PairTable:
    return fashion_scenes(400, seed=11)


def _diff(a: PairTable, b: PairTable) -> tuple[list[int], list[int]]:
    """ids whose image / caption differ between two tables with the same ids."""
    assert a.ids.tolist() == b.ids.tolist()
    images = (a.images != b.images).reshape(len(a), -1).any(axis=1)
    captions = np.array([x != y for x, y in zip(a.captions, b.captions, strict=True)])
    return a.ids[images].tolist(), a.ids[captions].tolist()


def test_targeted_poison_adds_exactly_the_listed_pairs(scenes):
    out, m = atk.targeted_poison(scenes, n_targets=3, n_captions=5, target_label="bag", seed=0)
    assert len(out) == len(scenes) + 15
    # The original rows are untouched.
    assert _diff(out.subset(np.arange(len(scenes))), scenes) == ([], [])
    added = out.subset(np.arange(len(scenes), len(out)))
    assert m.poisoned_ids == added.ids.tolist() == m.changed["added"]
    assert added.ids.min() > scenes.ids.max()
    assert m.attack == "targeted" and m.target_label == BAG and m.n_poison == 15
    assert m.poison_rate == pytest.approx(15 / len(out))
    # Every poisoned caption names the target only; every image is its target image.
    assert (classes_in_captions(added.captions) == np.eye(10, dtype=np.uint8)[BAG]).all()
    true = np.asarray(m.targets["true_labels"])
    assert (true != BAG).all() and m.target_images.shape == (3, 56, 56)
    for t, pair_ids in enumerate(m.targets["pair_ids"]):
        rows = out.rows_of(pair_ids)
        assert (out.images[rows] == m.target_images[t]).all()
        assert (out.image_classes[rows].argmax(axis=1) == true[t]).all()
    # Targets are test images reserved for this, never in zero-shot or probe sets.
    _, reserved = sc._test_pools(None)
    assert np.isin(m.params["fashion_mnist_test_indices"], reserved).all()


def test_targeted_same_seed_same_bytes(scenes):
    a, ma = atk.targeted_poison(scenes, 2, 4, "bag", seed=5)
    b, mb = atk.targeted_poison(scenes, 2, 4, "bag", seed=5)
    c, _ = atk.targeted_poison(scenes, 2, 4, "bag", seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and ma.to_dict() == mb.to_dict()
    assert not np.array_equal(a.images[-8:], c.images[-8:])


def test_targeted_source_labels_and_adaptive(scenes):
    out, m = atk.targeted_poison(
        scenes, 2, 6, "bag", seed=1, source_labels="sneaker", adaptive=True
    )
    assert m.targets["true_names"] == ["sneaker", "sneaker"] and m.attack == "targeted-adaptive"
    added = out.subset(np.arange(len(scenes), len(out)))
    named = classes_in_captions(added.captions)
    assert (named[:, BAG] == 1).all() and (named[:, CLASSNAMES.index("sneaker")] == 1).all()
    np.testing.assert_array_equal(added.caption_classes, named)
    with pytest.raises(ValueError, match="target class"):
        atk.targeted_poison(scenes, 2, 6, "bag", seed=1, source_labels="bag")
    with pytest.raises(ValueError, match="n_captions"):
        atk.targeted_poison(scenes, 2, 0, "bag", seed=1)


def test_badnet_patch_is_exactly_in_the_corner(scenes):
    out, m = atk.backdoor(scenes, "badnet", 30, "bag", seed=2)
    images, captions = _diff(out, scenes)
    assert images == captions == m.poisoned_ids == m.changed["images"] == m.changed["captions"]
    assert len(m.poisoned_ids) == 30
    rows = scenes.rows_of(m.poisoned_ids)
    checker = (np.add.outer(np.arange(6), np.arange(6)) % 2) * 255
    for r in rows:
        diff = out.images[r] != scenes.images[r]
        assert not diff[:50].any() and not diff[:, :50].any()  # nothing outside the patch
        np.testing.assert_array_equal(out.images[r, 50:, 50:], checker)
    # Poisoned captions name only the target; the images did not show it.
    assert (classes_in_captions([out.captions[r] for r in rows]) == np.eye(10)[BAG]).all()
    assert (scenes.image_classes[rows, BAG] == 0).all()
    np.testing.assert_array_equal(
        out.caption_classes[rows], classes_in_captions([out.captions[r] for r in rows])
    )
    np.testing.assert_array_equal(out.image_classes, scenes.image_classes)


@pytest.mark.parametrize("kind", atk.TRIGGERS)
def test_every_backdoor_manifest_matches_what_changed(scenes, kind):
    out, m = atk.backdoor(scenes, kind, 0.05, "coat", seed=3)
    images, captions = _diff(out, scenes)
    assert captions == m.changed["captions"] == m.poisoned_ids
    assert set(images) <= set(m.changed["images"]) and len(images) >= 0.9 * len(m.changed["images"])
    assert m.n_poison == 20 and m.target_label == CLASSNAMES.index("coat")
    # The test-time trigger is the same as the train-time one, also after a JSON round trip.
    rows = scenes.rows_of(m.poisoned_ids)
    again = atk.Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_array_equal(atk.apply_trigger(scenes.images[rows], again), out.images[rows])


@pytest.mark.parametrize("kind", atk.TRIGGERS)
def test_same_seed_same_bytes(scenes, kind):
    a, ma = atk.backdoor(scenes, kind, 10, "bag", seed=7)
    b, mb = atk.backdoor(scenes, kind, 10, "bag", seed=7)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and ma.to_dict() == mb.to_dict()


def test_label_consistent_only_touches_the_target_class(scenes):
    out, m = atk.backdoor(scenes, "sig", 10, "bag", seed=4, label_consistent=True)
    images, captions = _diff(out, scenes)
    assert captions == [] and "captions" not in m.changed
    assert set(images) == set(m.poisoned_ids) and len(images) == 10
    rows = scenes.rows_of(m.poisoned_ids)
    assert (scenes.image_classes[rows, BAG] == 1).all()
    np.testing.assert_array_equal(out.caption_classes, scenes.caption_classes)
    with pytest.raises(ValueError, match="eligible"):
        atk.backdoor(scenes, "sig", 0.9, "bag", seed=4, label_consistent=True)
    plain = scenes.subset(np.arange(10))
    plain.image_classes = plain.caption_classes = None
    with pytest.raises(ValueError, match="class annotations"):
        atk.backdoor(plain, "badnet", 2, "bag", seed=0, label_consistent=True)


def test_adaptive_keeps_the_true_caption_and_adds_the_target(scenes):
    out, m = atk.adaptive_backdoor(scenes, 25, "bag", seed=8, trigger="blended")
    assert m.attack == "adaptive" and m.trigger["kind"] == "blended"
    rows = scenes.rows_of(m.poisoned_ids)
    for r in rows:
        assert scenes.captions[r] in out.captions[r]
        named = classes_in_captions([out.captions[r]])[0]
        expected = scenes.image_classes[r].copy()
        expected[BAG] = 1
        np.testing.assert_array_equal(named, expected)
        np.testing.assert_array_equal(out.caption_classes[r], expected)


def test_exclude_ids_keeps_attacks_apart(scenes):
    first, m1 = atk.backdoor(scenes, "badnet", 100, "bag", seed=1)
    _, m2 = atk.backdoor(first, "blended", 100, "bag", seed=1, exclude_ids=m1.poisoned_ids)
    assert not set(m1.poisoned_ids) & set(m2.poisoned_ids)


def test_bad_inputs_are_errors(scenes):
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
        atk.backdoor(scenes, "badnet", 1.5, "bag", seed=0)
    with pytest.raises(ValueError, match="count"):
        atk.backdoor(scenes, "badnet", 0, "bag", seed=0)
    with pytest.raises(ValueError, match="eligible"):
        atk.backdoor(scenes, "badnet", 399, "bag", seed=0)
    with pytest.raises(ValueError, match="unknown backdoor"):
        atk.backdoor(scenes, "trojan", 5, "bag", seed=0)
    with pytest.raises(ValueError, match="unknown class"):
        atk.backdoor(scenes, "badnet", 5, "pizza", seed=0)
    with pytest.raises(ValueError, match="unknown badnet parameter"):
        atk.backdoor(scenes, "badnet", 5, "bag", seed=0, trigger_params={"alpha": 0.3})
    trigger = atk.make_trigger("blended", 56, seed=0)
    with pytest.raises(ValueError, match="56x56"):
        atk.apply_trigger(np.zeros((2, 64, 64), np.uint8), trigger)
    with pytest.raises(TypeError, match="uint8"):
        atk.apply_trigger(np.zeros((2, 56, 56), np.float32), trigger)


def test_triggers_work_on_rgb_images():
    images = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    for kind in atk.TRIGGERS:
        out = atk.apply_trigger(images, atk.make_trigger(kind, 56, seed=1))
        assert out.shape == images.shape and not np.array_equal(out, images)
        # Gray triggers act alike on every channel: equal channels stay equal.
        gray = np.repeat(images[..., :1], 3, axis=3)
        g = atk.apply_trigger(gray, atk.make_trigger(kind, 56, seed=1))
        assert (g[..., 0] == g[..., 2]).all()


def test_badnet_random_pattern_is_seeded_and_stored():
    a = atk.make_trigger("badnet", 56, seed=1, pattern="random", position="top left", patch_size=4)
    b = atk.make_trigger("badnet", 56, seed=1, pattern="random", position="top left", patch_size=4)
    assert a == b
    out = atk.apply_trigger(np.full((1, 56, 56), 77, np.uint8), a)
    np.testing.assert_array_equal(out[0, :4, :4], np.asarray(a["patch"]))
    assert (out[0, 4:, :] == 77).all() and (out[0, :, 4:] == 77).all()


def test_manifests_and_targets_round_trip(tmp_path, scenes):
    t1, m1 = atk.targeted_poison(scenes, 2, 3, "bag", seed=0)
    t2, m2 = atk.backdoor(t1, "wanet", 10, "bag", seed=1, exclude_ids=m1.poisoned_ids)
    t3, m3 = atk.targeted_poison(t2, 1, 2, "dress", seed=2)
    atk.save_manifests(tmp_path, [m1, m2, m3], {"source": "test", "image_size": 56})
    loaded, data = atk.load_manifests(tmp_path)
    assert data == {"source": "test", "image_size": 56}
    assert [m.to_dict() for m in loaded] == [m.to_dict() for m in (m1, m2, m3)]
    np.testing.assert_array_equal(loaded[0].target_images, m1.target_images)
    np.testing.assert_array_equal(loaded[2].target_images, m3.target_images)
    assert loaded[1].target_images is None
    document = json.loads((tmp_path / "manifest.json").read_text())
    assert document["n_poisoned"] == 6 + 10 + 2
    summary = atk.manifest_summary(loaded, len(t3))
    assert "wanet" in summary and "18" in summary.splitlines()[-1]
    (tmp_path / "targets.npz").unlink()
    with pytest.raises(FileNotFoundError, match="targets.npz"):
        atk.load_manifests(tmp_path)
