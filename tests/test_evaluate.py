"""evaluate() with hand-made encoders whose right answers are known, and with a real model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otcclip import attacks as atk
from otcclip import evaluate as ev
from otcclip.data import (
    CLASSNAMES,
    classes_in_captions,
    fashion_scenes,
    probe_sets,
    write_pairs,
    zero_shot_set,
)

BAG = CLASSNAMES.index("bag")


class LookupEncoder:
    """Images embedded by a table from image bytes to a class vector (the 'model's belief');
    texts by the classes they name. Unknown images embed to a direction no class uses."""

    dim = len(CLASSNAMES) + 1

    def __init__(self) -> None:
        self.known: dict[bytes, np.ndarray] = {}

    def teach(self, images: np.ndarray, hot: np.ndarray) -> None:
        for image, h in zip(images, np.atleast_2d(hot), strict=True):
            self.known[image.tobytes()] = h

    def _unit(self, hot: np.ndarray) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        v[: len(CLASSNAMES)] = hot
        if not v.any():
            v[-1] = 1.0
        return v / np.linalg.norm(v)

    def images(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self._unit(self.known.get(im.tobytes(), np.zeros(10))) for im in images])

    def texts(self, captions: list[str]) -> np.ndarray:
        return np.stack([self._unit(h) for h in classes_in_captions(captions)])


def _one_hot(labels) -> np.ndarray:
    return np.eye(len(CLASSNAMES), dtype=np.float32)[np.asarray(labels)]


@pytest.fixture(scope="module")
def world():
    train = fashion_scenes(300, seed=0)
    poisoned, targeted = atk.targeted_poison(train, 4, 5, "bag", seed=1)
    poisoned, badnet = atk.backdoor(
        poisoned, "badnet", 20, "bag", seed=2, exclude_ids=targeted.poisoned_ids
    )
    return {
        "poisoned": poisoned,
        "manifests": [targeted, badnet],
        "zs": zero_shot_set(200, seed=0),
        "probe": probe_sets(200, 100, seed=0),
        "scenes": fashion_scenes(120, "test", seed=0),
    }


def _encoder(world, fooled_targets: int, backdoored: bool) -> LookupEncoder:
    enc = LookupEncoder()
    zs, (ptrain, ptest), scenes = world["zs"], world["probe"], world["scenes"]
    for s in (zs, ptrain, ptest):
        enc.teach(s.images, _one_hot(s.labels))
    enc.teach(scenes.images, scenes.image_classes)
    targeted, badnet = world["manifests"]
    true = np.asarray(targeted.targets["true_labels"])
    believed = true.copy()
    believed[:fooled_targets] = BAG
    enc.teach(targeted.target_images, _one_hot(believed))
    if backdoored:
        enc.teach(atk.apply_trigger(zs.images, badnet), _one_hot(np.full(len(zs), BAG)))
    return enc


def test_a_perfect_clean_model(world):
    enc = _encoder(world, fooled_targets=0, backdoored=False)
    r = ev.evaluate(
        enc, world["zs"], world["manifests"], world["probe"], test_scenes=world["scenes"]
    )
    assert r["zero_shot_top1"] == 1.0 and r["zero_shot_top5"] == 1.0
    assert r["linear_probe"] == 1.0
    assert r["targeted_asr"] == 0.0 and r["backdoor_asr"] == 0.0
    targeted, backdoor = r["attacks"]
    assert targeted["true_class_accuracy"] == 1.0 and targeted["n"] == 4
    # Triggered images are unknown to this encoder: it predicts no class at all (ties ->
    # class 0), never the target; the baseline without trigger is 0 as well.
    assert backdoor["baseline"] == 0.0 and backdoor["n"] == int((world["zs"].labels != BAG).sum())
    json.dumps(r, allow_nan=False)


def test_a_poisoned_model(world):
    enc = _encoder(world, fooled_targets=3, backdoored=True)
    r = ev.evaluate(enc, world["zs"], world["manifests"])
    assert r["targeted_asr"] == 0.75
    assert r["backdoor_asr"] == 1.0 and r["attacks"][1]["baseline"] == 0.0
    assert r["attacks"][0]["hits"] == 3 and r["attacks"][0]["predictions"].count("bag") == 3
    assert r["linear_probe"] is None and r["recall"] is None and r["reassignment"] is None
    table = ev.format_report(r)
    assert "targeted ASR -> bag" in table and "75.0%  (3 of 4 targets)" in table
    assert "backdoor ASR badnet -> bag" in table and "100.0%" in table


def test_retrieval_counts_duplicate_captions_as_right(world):
    scenes = world["scenes"]

    class Exact:
        """Each distinct caption text and its images share a direction: perfect retrieval."""

        def __init__(self):
            texts = sorted(set(scenes.captions))
            self.index = {t: i for i, t in enumerate(texts)}
            self.by_image = {
                im.tobytes(): self.index[c]
                for im, c in zip(scenes.images, scenes.captions, strict=True)
            }
            self.dim = len(texts)

        def images(self, images):
            return np.eye(self.dim, dtype=np.float32)[
                [self.by_image[im.tobytes()] for im in images]
            ]

        def texts(self, captions):
            return np.eye(self.dim, dtype=np.float32)[[self.index[c] for c in captions]]

    r = ev.retrieval(Exact(), scenes)
    assert all(r[f"{way}@{k}"] == 1.0 for way in ("i2t", "t2i") for k in (1, 5, 10))
    # Class-level knowledge only: many scenes share a class set, ties count against.
    coarse = ev.retrieval(_encoder(world, 0, False), scenes)
    assert coarse["i2t@1"] < 0.5 and coarse["i2t@10"] >= coarse["i2t@1"]


def test_linear_probe_on_noise_is_near_chance(world):
    class Noise:
        def images(self, images):
            rng = np.random.default_rng(len(images))
            return rng.normal(size=(len(images), 16)).astype(np.float32)

        def texts(self, captions):
            raise AssertionError("the probe needs no text")

    train, test = world["probe"]
    r = ev.linear_probe(Noise(), train, test, seed=0)
    assert r["accuracy"] < 0.3 and r["C"] in ev.PROBE_CS


def test_reassignment_from_a_matching_output(tmp_path, world):
    poisoned = world["poisoned"]
    manifests = world["manifests"]
    write_pairs(poisoned, tmp_path / "train.parquet")
    bad = set(atk.poisoned_ids(manifests).tolist())
    ids = poisoned.ids
    # The matcher restores every backdoor caption and 10 of the 20 targeted pairs, and
    # disturbs 5 clean pairs by giving them a wrong caption.
    targeted, badnet = manifests
    fixed = set(badnet.poisoned_ids) | set(targeted.poisoned_ids[:10])
    clean_ids = [int(i) for i in ids if int(i) not in bad][:5]
    captions = []
    for i, cap, hot in zip(ids, poisoned.captions, poisoned.image_classes, strict=True):
        if int(i) in fixed:
            captions.append(" and ".join(f"a {CLASSNAMES[c]}" for c in np.flatnonzero(hot)))
        elif int(i) in clean_ids:
            captions.append("a pizza")
        else:
            captions.append(cap)
    changed = np.isin(ids, list(fixed | set(clean_ids)))
    pq.write_table(
        pa.table({"id": ids, "caption": captions, "changed": changed}), tmp_path / "m.parquet"
    )
    r = ev.reassignment(tmp_path / "m.parquet", manifests, tmp_path / "train.parquet")
    assert r["precision"] == pytest.approx(30 / 35) and r["recall"] == pytest.approx(30 / 40)
    assert r["n_changed"] == 35 and r["n"] == len(poisoned)
    n_clean = len(poisoned) - 40
    assert r["clean_true_content_before"] == 1.0
    assert r["clean_true_content"] == pytest.approx((n_clean - 5) / n_clean)
    assert r["poisoned_still_naming_target"] == {"targeted": 0.5, "badnet": 0.0}
    # Without the 'changed' column, the captions are compared with the original data.
    pq.write_table(pa.table({"id": ids, "caption": captions}), tmp_path / "m2.parquet")
    r2 = ev.reassignment(tmp_path / "m2.parquet", manifests, poisoned)
    assert r2["precision"] == r["precision"] and r2["recall"] == r["recall"]
    with pytest.raises(ValueError, match="no 'changed' column"):
        ev.reassignment(tmp_path / "m2.parquet", manifests)


def test_reassignment_of_other_data_is_refused_and_partial_coverage_said(tmp_path, world):
    """A matching file of another dataset whose ids overlap used to give exit 0 and figures
    computed on a fraction of the rows (the missing count only in the JSON)."""
    poisoned, manifests = world["poisoned"], world["manifests"]
    other = fashion_scenes(60, seed=9)  # ids 0..59 fall inside the data's ids
    pq.write_table(
        pa.table({"id": other.ids, "caption": other.captions, "changed": [False] * 60}),
        tmp_path / "other.parquet",
    )
    with pytest.raises(ValueError, match=r"of its 60 unchanged pairs hold another caption"):
        ev.reassignment(tmp_path / "other.parquet", manifests, poisoned)
    # A genuine output of part of the data: accepted, and the table says it is partial.
    part = np.arange(60)
    pq.write_table(
        pa.table(
            {
                "id": poisoned.ids[part],
                "caption": [poisoned.captions[i] for i in part],
                "changed": [False] * 60,
            }
        ),
        tmp_path / "part.parquet",
    )
    r = ev.reassignment(tmp_path / "part.parquet", manifests, poisoned)
    assert r["n"] == 60 and r["n_data"] == len(poisoned) == 320
    missing = len(set(atk.poisoned_ids(manifests).tolist()) - set(poisoned.ids[part].tolist()))
    assert r["poisoned_missing"] == missing > 0
    table = ev.format_report({"zero_shot_top1": 0.5, "reassignment": r})
    assert "only 60 of the data's 320 rows" in table
    assert f"{missing} (not in the output)" in table


def test_evaluate_rejects_what_is_not_a_model(world):
    with pytest.raises(TypeError, match="ModelBundle"):
        ev.evaluate(object(), world["zs"])


def test_real_model_end_to_end(world, tmp_path):
    models = pytest.importorskip("otcclip.models")
    bundle = models.create_model("otc-vit-tiny", seed=0)
    zs = world["zs"].subset(slice(0, 40))
    train, test = world["probe"]
    r = ev.evaluate(
        bundle,
        zs,
        world["manifests"],
        (train.subset(slice(0, 60)), test.subset(slice(0, 30))),
        test_scenes=world["scenes"].subset(np.arange(30)),
        batch_size=32,
    )
    for key in ("zero_shot_top1", "zero_shot_top5", "linear_probe", "targeted_asr", "backdoor_asr"):
        assert 0.0 <= r[key] <= 1.0
    assert r["zero_shot_top5"] >= r["zero_shot_top1"]
    assert set(r["recall"]) == {"i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "n"}


def test_epoch_evaluation_of_small_images_runs_at_the_model_size():
    """Training on 48 px images stopped with 'image_size must be an int >= 56, got 48'."""
    from types import SimpleNamespace

    from otcclip.data.scenes import MIN_IMAGE_SIZE

    table = SimpleNamespace(images=np.zeros((4, 48, 48), np.uint8))
    ctx = SimpleNamespace(
        is_main=True, table=table, bundle=SimpleNamespace(image_size=64), manifests=[]
    )
    callback = ev.EpochEvaluation(every=1, epochs=1, eval_size=20)
    callback.on_train_start(ctx)
    assert callback.sets[0].images.shape[1:] == (64, 64)
    ctx.bundle.image_size = 32  # a model smaller than the test scenes: their minimum
    callback.on_train_start(ctx)
    assert callback.sets[0].images.shape[1] == MIN_IMAGE_SIZE
    ctx.manifests = [
        atk.Manifest(
            attack="badnet",
            target_label=BAG,
            seed=0,
            poisoned_ids=[],
            params={"trigger": {"kind": "badnet"}},
        )
    ]
    with pytest.raises(ValueError, match="are 48 px.*pass --image-size 56 \\(or --eval-every 0\\)"):
        callback.on_train_start(ctx)
