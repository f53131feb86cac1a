"""The matching round on a constructed feature world where the right answer is known.

The model is replaced by exact features: class c is the unit vector e_c; an
image's patch tokens cycle through the classes it shows; a caption's word
tokens are the classes it names; an extra "global" direction e_6 lets a test
make the global cosine misleading while the tokens stay truthful. The Sinkhorn
(`otcclip.ot`) and the engine (`otcclip.otmatch`) are the real ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import otcclip.matching as matching
from otcclip.matching import CaptionBank, MatchConfig, match_round, score_candidates
from otcclip.ot import ot_distance

C = 6  # classes
D = 8  # e_0..e_5 classes, e_6 the global-only direction, e_7 background
P = 6  # patches per image
L = 8  # tokenizer context


# --------------------------------------------------------------------------- the fake world


def make_image(classes: list[int], glob: float = 0.0) -> np.ndarray:
    """A 4x8 uint8 'image' spelling its features: row 0 multi-hot, pixel (1, 0) the global lean."""
    img = np.zeros((4, 8), np.uint8)
    img[0, classes] = 1
    img[1, 0] = round(glob * 10)
    return img


def caption(classes: list[int], glob: float = 0.0) -> str:
    words = [f"c{c}" for c in classes]
    if glob:
        words.append(f"g{round(glob * 10)}")
    return " ".join(words)


def fake_transform(images: np.ndarray, image_size: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).float()


def fake_encode_image(model: torch.nn.Module, pixels: torch.Tensor):
    shown = pixels[:, 0, :C] > 0
    eye = torch.eye(D)
    patches = torch.empty(len(pixels), P, D)
    glob = torch.zeros(len(pixels), D)
    for i in range(len(pixels)):
        cls = torch.nonzero(shown[i]).flatten().tolist() or [7]
        for p in range(P):
            patches[i, p] = eye[cls[p % len(cls)]]
        glob[i] = eye[cls].sum(0) + pixels[i, 1, 0] / 10 * eye[6]
    # not normalised and scaled, as a real encoder's outputs are
    return 3.0 * glob, 2.0 * patches


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    out = torch.full((len(texts), L), -1, dtype=torch.long)
    for i, text in enumerate(texts):
        for j, word in enumerate(text.split()[:L]):
            out[i, j] = int(word[1:]) + (100 if word[0] == "g" else 0)
    return out


def fake_encode_text(model: torch.nn.Module, tokens: torch.Tensor):
    eye = torch.eye(D)
    mask = (tokens >= 0) & (tokens < C)
    words = torch.zeros(*tokens.shape, D)
    words[mask] = eye[tokens[mask]]
    glob = words.sum(1)
    g = tokens >= 100
    glob += ((tokens - 100) * g).sum(1, keepdim=True) / 10 * eye[6]
    return glob, words, mask


@pytest.fixture
def bundle(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setattr(matching, "image_transform", fake_transform)
    monkeypatch.setattr(matching, "encode_image_fine", fake_encode_image)
    monkeypatch.setattr(matching, "encode_text_fine", fake_encode_text)
    model = torch.nn.Linear(1, 1)
    return SimpleNamespace(model=model, tokenizer=fake_tokenizer, image_size=4, embed_dim=D)


def multi_hot(sets: list[list[int]]) -> np.ndarray:
    out = np.zeros((len(sets), C), np.uint8)
    for i, s in enumerate(sets):
        out[i, s] = 1
    return out


def poisoned_world(seed: int = 0):
    """24 scenes of 1-2 classes with their true captions, 4 of them re-captioned with class 5."""
    sets = [[0], [1], [2], [3], [4], [0, 1], [2, 4], [1, 3]]
    order = np.random.default_rng(seed).permutation(24)
    shown = [sets[i % len(sets)] for i in order]  # each set 3 times: 2 clean copies survive
    named = [list(s) for s in shown]
    poisoned = np.zeros(24, bool)
    poisoned[[3, 8, 15, 20]] = True
    for i in np.flatnonzero(poisoned):
        named[i] = [5]
    images = np.stack([make_image(s) for s in shown])
    captions = [caption(s) for s in named]
    return images, captions, shown, named, poisoned


# --------------------------------------------------------------------------- the round


def test_poisoned_pairs_are_repaired_and_clean_pairs_kept(bundle):
    images, captions, shown, named, poisoned = poisoned_world()
    own = np.arange(len(images))
    cfg = MatchConfig(k=4, alpha=0.5, margin=0.05, image_batch=5, score_batch=7)
    res = match_round(
        bundle,
        images,
        captions,
        own,
        cfg,
        poisoned=poisoned,
        image_classes=multi_hot(shown),
        caption_classes=multi_hot(named),
    )
    assert res.changed.tolist() == poisoned.tolist()
    for i in np.flatnonzero(poisoned):
        assert named[res.caption[i]] == shown[i], "re-paired with a caption of its true content"
    assert (res.caption[~poisoned] == own[~poisoned]).all()
    rep = res.report
    assert rep["changed"] == 4 and rep["poisoned"] == 4
    assert rep["poison_broken"] == 1.0 and rep["clean_kept"] == 1.0
    assert rep["changed_precision"] == 1.0
    assert rep["clean_true_content"] == 1.0 and rep["clean_true_content_before"] == 1.0
    assert set(rep["seconds"]) >= {"embed_pool", "embed_images", "prune", "score", "assign"}
    # the suspicious flag says the same thing without re-pairing
    assert res.suspicious.tolist() == poisoned.tolist()
    # a true caption matches perfectly: cos = 1 and s_OT close to 1
    clean = ~poisoned
    assert np.allclose(res.global_score[clean], 1.0, atol=1e-5)
    assert (res.ot_score[clean] > 0.95).all()
    assert np.allclose(res.score, 0.5 * res.global_score + 0.5 * res.ot_score, atol=1e-6)


def test_ot_term_overrides_a_misleading_global_score(bundle):
    # the image shows {0, 1} and leans on the global-only direction; caption B
    # names an extra class but shares that lean, so it wins on global cosine
    images = np.stack([make_image([0, 1], glob=1.0)])
    pool = [caption([0, 1]), caption([0, 1, 2], glob=1.0), caption([3]), caption([4])]
    glob_only = match_round(bundle, images, pool, None, MatchConfig(k=2, alpha=1.0))
    fine = match_round(bundle, images, pool, None, MatchConfig(k=2, alpha=0.5))
    assert glob_only.caption.tolist() == [1]
    assert fine.caption.tolist() == [0]
    assert np.isnan(glob_only.ot_score).all()
    assert np.array_equal(glob_only.score, glob_only.global_score)
    assert fine.ot_score[0] > 0.95 and fine.global_score[0] < glob_only.global_score[0]


def test_alpha_one_never_runs_sinkhorn(bundle, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Sinkhorn called with alpha = 1")

    monkeypatch.setattr(matching, "ot_similarity_candidates", boom)
    images, captions, *_ = poisoned_world()
    res = match_round(bundle, images, captions, np.arange(24), MatchConfig(k=3, alpha=1.0))
    assert np.isnan(res.ot_score).all() and np.isnan(res.own_ot_score).all()
    assert "score" not in res.report["seconds"]


def test_own_caption_outside_top_k_is_scored_and_kept_by_the_margin(bundle):
    images = np.stack([make_image([0, 1], glob=1.0), make_image([3])])
    pool = [
        caption([0, 1]),
        caption([0, 1, 2], glob=1.0),
        caption([0, 1, 4], glob=1.0),
        caption([3]),
        caption([3, 4]),
    ]
    own = np.array([0, 3])
    res = match_round(bundle, images, pool, own, MatchConfig(k=2, alpha=0.5))
    assert 0 not in res.candidates[0], "the true caption must be pruned away for this test"
    assert res.report["own_outside_topk"] == 1
    assert res.caption.tolist() == [0, 3] and not res.changed.any()
    # the own score is the same S a direct computation gives
    own_cos = float(
        np.dot(
            *[v / np.linalg.norm(v) for v in ([1, 1, 0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0])]
        )
    )
    g, patches = fake_encode_image(None, fake_transform(images[:1], 4))
    _, words, mask = fake_encode_text(None, fake_tokenizer([pool[0]]))
    own_ot = 1 - ot_distance(patches, words, None, mask).item()
    assert res.own_global_score[0] == pytest.approx(own_cos, abs=1e-5)
    assert res.own_ot_score[0] == pytest.approx(own_ot, abs=1e-4)
    assert res.global_score[0] == pytest.approx(own_cos, abs=1e-5)
    assert res.score[0] == pytest.approx(0.5 * own_cos + 0.5 * own_ot, abs=1e-4)
    # treating a pruned-away own caption as suspicious re-pairs the image
    strict = match_round(
        bundle, images, pool, own, MatchConfig(k=2, alpha=0.5, flag_outside_topk=True)
    )
    assert strict.changed.tolist() == [True, False]
    assert strict.suspicious.tolist() == [True, False]
    assert strict.caption[0] in (1, 2)


def test_margin_keeps_a_slightly_beaten_own_caption(bundle):
    images = np.stack([make_image([0, 1])])
    pool = [caption([0]), caption([0, 1])]
    own = np.array([0])
    moved = match_round(bundle, images, pool, own, MatchConfig(k=2, margin=0.0))
    assert moved.changed.tolist() == [True] and moved.caption.tolist() == [1]
    gap = float(moved.best_score[0] - moved.own_score[0])
    assert gap > 0
    kept = match_round(bundle, images, pool, own, MatchConfig(k=2, margin=gap + 1e-3))
    assert kept.changed.tolist() == [False] and kept.caption.tolist() == [0]
    assert not kept.suspicious.any()


def test_budget_keeps_only_the_most_doubted_pairs_re_paired(bundle):
    images, captions, shown, named, poisoned = poisoned_world()
    # two clean images carry a half-true caption (one of their two classes): a small
    # doubt, against the poisons' caption of a class their images do not show
    pool = list(captions) + [caption([0]), caption([2])]
    own = np.arange(24)
    half = [shown.index([0, 1]), shown.index([2, 4])]
    own[half] = [24, 25]
    full = match_round(bundle, images, pool, own, MatchConfig(k=4))
    assert full.changed[poisoned].all() and full.changed[half].all()
    assert int(full.changed.sum()) == 6
    budget = match_round(bundle, images, pool, own, MatchConfig(k=4, max_changed=4 / 24))
    assert budget.changed[poisoned].all(), "the poisons trail their best candidate most"
    assert not budget.changed[half].any()
    assert (budget.caption[half] == own[half]).all()
    assert (budget.caption[poisoned] == full.caption[poisoned]).all()
    nothing = match_round(bundle, images, pool, own, MatchConfig(k=4, max_changed=0.0))
    assert not nothing.changed.any() and (nothing.caption == own).all()


def test_capacity_spreads_images_over_captions(bundle):
    images = np.stack([make_image([0])] * 6)
    pool = [
        caption([0]),
        caption([0], glob=0.1),
        caption([0], glob=0.2),
        caption([1]),
        caption([2]),
    ]
    cfg = MatchConfig(k=3, method="capacity", capacity=2, fallback="unassigned")
    res = match_round(bundle, images, pool, None, cfg)
    assert (res.caption >= 0).all()
    assert np.bincount(res.caption, minlength=5).tolist() == [2, 2, 2, 0, 0]
    argmax = match_round(bundle, images, pool, None, MatchConfig(k=3))
    assert argmax.caption.tolist() == [0] * 6


def test_batch_sizes_do_not_change_the_result(bundle):
    images, captions, *_ = poisoned_world(seed=1)
    own = np.arange(len(images))
    a = match_round(bundle, images, captions, own, MatchConfig(k=5, margin=0.02))
    b = match_round(
        bundle,
        images,
        captions,
        own,
        MatchConfig(k=5, margin=0.02, image_batch=3, text_batch=4, score_batch=5),
    )
    assert np.array_equal(a.caption, b.caption)
    assert np.array_equal(a.candidates, b.candidates)
    np.testing.assert_allclose(a.candidate_scores, b.candidate_scores, atol=1e-5)
    np.testing.assert_allclose(a.own_score, b.own_score, atol=1e-5)


def _batches(images: np.ndarray, size: int):
    """The images as a stream hands them over: one batch after another, read lazily."""
    for start in range(0, len(images), size):
        yield images[start : start + size]


@pytest.mark.parametrize("cache_tokens", [True, False])
def test_images_given_batch_by_batch_are_matched_as_in_one_array(bundle, cache_tokens):
    images, captions, *_ = poisoned_world(seed=3)
    own = np.arange(len(images))
    cfg = MatchConfig(k=4, margin=0.02, image_batch=5, text_batch=4, cache_tokens=cache_tokens)
    whole = match_round(bundle, images, captions, own, cfg)
    streamed = matching.match_image_batches(bundle, _batches(images, 5), captions, own, cfg)
    assert whole.changed.any()  # the comparison covers re-paired images
    for name in ("caption", "changed", "candidates", "candidate_scores", "own_score", "best"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name), err_msg=name)
    np.testing.assert_array_equal(streamed.image_embeddings, whole.image_embeddings)
    assert streamed.report["changed"] == whole.report["changed"]
    assert set(streamed.report["seconds"]) >= {"embed_pool", "embed_images", "prune", "assign"}


def test_batches_that_do_not_fit_the_own_captions_are_refused(bundle):
    images, captions, *_ = poisoned_world()
    own = np.arange(len(images))
    with pytest.raises(ValueError, match="20 images for 24 own captions"):
        matching.match_image_batches(bundle, _batches(images[:20], 5), captions, own)
    with pytest.raises(ValueError, match="more images than the 10 own captions"):
        matching.match_image_batches(bundle, _batches(images, 5), captions, own[:10])
    with pytest.raises(ValueError, match="no images to match"):
        matching.match_image_batches(bundle, iter([]), captions, None)


def test_batches_take_pool_embeddings_and_class_labels_as_match_round_does(bundle):
    images, captions, shown, named, _ = poisoned_world(seed=2)
    own = np.arange(len(images))
    emb = np.random.default_rng(0).standard_normal((len(captions), D)).astype(np.float32)
    labels = {"image_classes": multi_hot(shown), "caption_classes": multi_hot(named)}
    cfg = MatchConfig(k=4, image_batch=5)
    whole = match_round(bundle, images, captions, own, cfg, pool_embeddings=emb, **labels)
    streamed = matching.match_image_batches(
        bundle, _batches(images, 5), captions, own, cfg, pool_embeddings=emb, **labels
    )
    np.testing.assert_array_equal(streamed.candidates, whole.candidates)  # pruned by `emb`
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(streamed.pool_embeddings, unit, atol=1e-6)
    for key in ("clean_true_content", "clean_true_content_before"):
        assert streamed.report[key] == whole.report[key]
    with pytest.raises(ValueError, match="image_classes must be"):
        matching.match_image_batches(
            bundle, _batches(images[:20], 5), captions, own[:20], cfg, **labels
        )


def test_recomputed_tokens_agree_with_the_float16_cache(bundle):
    images, captions, *_ = poisoned_world(seed=2)
    own = np.arange(len(images))
    cached = match_round(bundle, images, captions, own, MatchConfig(k=4, margin=0.02))
    fresh = match_round(
        bundle,
        images,
        captions,
        own,
        MatchConfig(k=4, margin=0.02, cache_tokens=False, text_batch=3),
    )
    assert np.array_equal(cached.caption, fresh.caption)
    np.testing.assert_allclose(cached.candidate_scores, fresh.candidate_scores, atol=2e-3)
    assert "embed_candidates" in fresh.report["seconds"]
    assert cached.report["pool_bytes"] > fresh.report["pool_bytes"]


def test_precomputed_pool_embeddings_drive_the_pruning(bundle):
    images = np.stack([make_image([0])])
    pool = [caption([0]), caption([1]), caption([2])]
    emb = np.zeros((3, D), np.float32)
    emb[0, 1] = emb[1, 0] = emb[2, 2] = 5.0  # caption 1 now looks like class 0 to the pruning
    res = match_round(bundle, images, pool, None, MatchConfig(k=1, alpha=1.0), pool_embeddings=emb)
    assert res.candidates.tolist() == [[1]]
    assert res.global_score[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="4 wide but the model embeds in 8"):
        match_round(bundle, images, pool, None, MatchConfig(k=1), pool_embeddings=emb[:, :4])


def test_a_bank_prunes_against_its_own_rows_and_still_scores_the_own_caption(bundle):
    images = np.stack([make_image([i % C]) for i in range(12)])
    pool = [caption([i % C]) for i in range(60)]
    own = np.arange(12, dtype=np.int64)
    exact = match_round(bundle, images, pool, own, MatchConfig(k=2, alpha=1.0))
    banked = match_round(bundle, images, pool, own, MatchConfig(k=2, alpha=1.0, bank=10, seed=3))
    rows = np.sort(np.random.default_rng(3).choice(60, size=10, replace=False))
    assert np.isin(banked.candidates, rows).all()
    assert not np.isin(exact.candidates, rows).all()  # the exact top-k reaches the whole pool
    np.testing.assert_allclose(banked.own_global_score, exact.own_global_score)
    assert banked.report["pruned_against"] == 10 and exact.report["pruned_against"] == 60
    # a bank as large as the pool is the exact round
    whole = match_round(bundle, images, pool, own, MatchConfig(k=2, alpha=1.0, bank=60))
    np.testing.assert_array_equal(whole.candidates, exact.candidates)


@pytest.mark.parametrize("bank", [None, 10])
def test_a_round_from_embeddings_equals_the_models_round_at_alpha_one(bundle, bank):
    images, captions, _, _, _ = poisoned_world()
    own = np.arange(len(images), dtype=np.int64)
    config = MatchConfig(k=3, alpha=1.0, margin=0.01, bank=bank, seed=2)
    by_model = match_round(bundle, images, captions, own, config)
    # the round's own embeddings, scaled (any norm is accepted) and as float64
    by_embeddings = matching.match_embeddings(
        3.0 * by_model.image_embeddings.astype(np.float64), by_model.pool_embeddings, own, config
    )
    for name in ("caption", "best", "candidates", "changed", "suspicious"):
        np.testing.assert_array_equal(getattr(by_embeddings, name), getattr(by_model, name))
    for name in ("global_score", "own_global_score", "best_score"):
        np.testing.assert_allclose(
            getattr(by_embeddings, name), getattr(by_model, name), rtol=1e-6, atol=1e-6
        )
    assert np.isnan(by_embeddings.ot_score).all()
    assert by_embeddings.report["pruned_against"] == (bank or len(captions))


def test_a_round_from_unit_embeddings_reads_them_as_they_are():
    """A trainer's kept embeddings are unit float32 rows already: the round uses them, not a
    second copy (a streamed round's peak held both); other rows are copied, then scaled."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    pool = rng.normal(size=(50, 8)).astype(np.float32)
    before = pool.copy()
    result = matching.match_embeddings(img, pool, np.arange(40), MatchConfig(k=4, alpha=1.0))
    assert result.image_embeddings is img
    assert not np.shares_memory(result.pool_embeddings, pool)
    np.testing.assert_array_equal(pool, before)  # the caller's rows are never scaled in place
    np.testing.assert_allclose(np.linalg.norm(result.pool_embeddings, axis=1), 1.0, rtol=1e-6)


def test_a_round_from_embeddings_refuses_bad_input():
    rng = np.random.default_rng(0)
    img, pool = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    with pytest.raises(ValueError, match="alpha = 1"):
        matching.match_embeddings(img, pool, None, MatchConfig(k=2, alpha=0.5))
    with pytest.raises(ValueError, match="one model"):
        matching.match_embeddings(img, pool[:, :3], None, MatchConfig(k=2, alpha=1.0))
    with pytest.raises(ValueError, match="larger than the pool"):
        matching.match_embeddings(img, pool, None, MatchConfig(k=8, alpha=1.0))
    bad = img.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        matching.match_embeddings(bad, pool, None, MatchConfig(k=2, alpha=1.0))
    with pytest.raises(ValueError, match="all-zero rows"):
        matching.match_embeddings(np.zeros((5, 4)), pool, None, MatchConfig(k=2, alpha=1.0))
    with pytest.raises(TypeError, match="2-D float"):
        matching.match_embeddings(img[0], pool, None, MatchConfig(k=2, alpha=1.0))
    with pytest.raises(ValueError, match="own"):
        matching.match_embeddings(img, pool, np.arange(4), MatchConfig(k=2, alpha=1.0))


def test_report_without_ground_truth_has_no_poison_shares(bundle):
    images, captions, *_ = poisoned_world()
    res = match_round(bundle, images, captions, np.arange(24), MatchConfig(k=3))
    assert "poison_broken" not in res.report and "clean_true_content" not in res.report
    assert res.report["changed"] == int(res.changed.sum())
    assert res.stats["n"] == 24


def test_training_mode_is_restored(bundle):
    images, captions, *_ = poisoned_world()
    bundle.model.train()
    match_round(bundle, images, captions, np.arange(24), MatchConfig(k=2))
    assert bundle.model.training
    bundle.model.eval()
    match_round(bundle, images, captions, np.arange(24), MatchConfig(k=2))
    assert not bundle.model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"captions": []}, "pool is empty"),
        ({"captions": ["c0", "  "]}, "empty or not text"),
        ({"config": MatchConfig(k=9)}, "larger than the pool"),
        ({"own": np.array([0, 7])}, "must index the pool"),
        ({"own": np.array([0, -2])}, "or -1 for none"),
        ({"own": np.array([0])}, "shape"),
        ({"poisoned": np.array([0, 2])}, "boolean"),
        ({"images": np.zeros((0, 4, 8), np.uint8)}, "no images"),
    ],
)
def test_bad_input_is_refused(bundle, kwargs, message):
    args = {
        "images": np.stack([make_image([0]), make_image([1])]),
        "captions": [caption([0]), caption([1])],
        "own": None,
        "config": MatchConfig(k=1),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        match_round(
            bundle,
            args["images"],
            args["captions"],
            args["own"],
            args["config"],
            poisoned=kwargs.get("poisoned"),
        )


def test_images_must_be_uint8(bundle):
    with pytest.raises(TypeError, match="uint8"):
        match_round(bundle, np.zeros((2, 4, 8), np.float32), ["c0", "c1"], None, MatchConfig(k=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"alpha": 1.5}, "alpha"),
        ({"eps": 0}, "eps"),
        ({"method": "auction"}, "method"),
        ({"method": "capacity"}, "needs capacity"),
        ({"capacity": 3}, "only meaningful"),
        ({"margin": -0.1}, "margin"),
        ({"fallback": "drop"}, "fallback"),
        ({"rho": 0.0}, "rho"),
        ({"max_changed": 1.5}, "max_changed"),
        ({"k": 4, "bank": 3}, "bank must be an integer >= 4"),
        ({"bank": 100, "flag_outside_topk": True}, "needs the exact top-k"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatchConfig(**kwargs)


# --------------------------------------------------------------------------- pieces


def test_score_candidates_equals_pairwise_ot_distance():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5, 7, 16, generator=g)
    txt = torch.randn(9, 6, 16, generator=g)
    mask = torch.rand(9, 6, generator=g) > 0.3
    mask[:, 0] = True
    cand = np.array([[0, 3, 8], [1, 1, 2], [4, 5, 6], [7, -1, 0], [2, 3, 4]])
    cfg = MatchConfig(eps=0.1, iters=30, score_batch=4)
    got = score_candidates(img, txt, mask, cand, cfg)
    assert got.shape == (5, 3) and got.dtype == np.float32
    for i in range(5):
        for j in range(3):
            c = cand[i, j]
            if c < 0:
                assert np.isnan(got[i, j])
                continue
            want = (
                1
                - ot_distance(
                    img[i : i + 1], txt[c : c + 1], None, mask[c : c + 1], eps=0.1, iters=30
                ).item()
            )
            assert got[i, j] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="pool indices"):
        score_candidates(img, txt, mask, cand + 10, cfg)
    with pytest.raises(ValueError, match="token widths"):
        score_candidates(img, txt[..., :8], mask, cand, cfg)


def test_caption_bank_keeps_the_most_recent():
    bank = CaptionBank(3)
    bank.add([1, 2], ["a", "b"])
    bank.add([3, 4], ["c", "d"])
    assert bank.ids.tolist() == [2, 3, 4] and bank.captions == ["b", "c", "d"]
    bank.add([2], ["b2"])
    assert bank.ids.tolist() == [3, 4, 2] and bank.captions == ["c", "d", "b2"]
    assert len(bank) == 3
    with pytest.raises(ValueError, match="2 ids for 1 captions"):
        bank.add([5, 6], ["e"])
    with pytest.raises(ValueError, match="capacity"):
        CaptionBank(0)


def test_images_without_an_own_caption_in_the_pool(bundle):
    # a FIFO bank: image 1's caption is not in it (own = -1), so nothing can keep it
    images = np.stack([make_image([0]), make_image([1])])
    bank = [caption([0]), caption([1]), caption([2])]
    res = match_round(bundle, images, bank, np.array([0, -1]), MatchConfig(k=2, margin=0.5))
    assert res.caption.tolist() == [0, 1]
    assert res.changed.tolist() == [False, True]
    assert np.isnan(res.own_score[1]) and not np.isnan(res.own_score[0])
    assert not res.suspicious.any()
    assert res.report["own_outside_topk"] == 0


def test_a_real_model_scores_what_its_own_features_say():
    """The round's scores equal those built from `otcclip.models` directly (tiny model, scratch)."""
    from otcclip.data import fashion_scenes
    from otcclip.models import (
        create_model,
        embed_images,
        embed_texts,
        encode_image_fine,
        encode_text_fine,
        image_transform,
    )

    bundle = create_model("otc-vit-tiny", seed=1)
    table = fashion_scenes(12, seed=5, image_size=bundle.image_size)
    own = np.arange(12)
    cfg = MatchConfig(k=3, eps=0.1, iters=30, image_batch=5, text_batch=4)
    res = match_round(bundle, table.images, table.captions, own, cfg)
    g = embed_images(bundle, table.images)
    h = embed_texts(bundle, table.captions)
    np.testing.assert_allclose(res.own_global_score, (g * h).sum(1), atol=1e-5)
    np.testing.assert_allclose(res.global_score, (g * h[res.caption]).sum(1), atol=1e-5)
    with torch.no_grad():
        _, patches = encode_image_fine(
            bundle.model, image_transform(table.images, bundle.image_size)
        )
        _, words, mask = encode_text_fine(bundle.model, bundle.tokenizer(table.captions))
        s_ot = 1 - ot_distance(patches, words, None, mask, eps=0.1, iters=30)
    # the pool's word tokens are cached in float16: agreement to about 1e-3
    np.testing.assert_allclose(res.own_ot_score, s_ot.numpy(), atol=2e-3)
    np.testing.assert_allclose(
        res.own_score, 0.5 * res.own_global_score + 0.5 * res.own_ot_score, atol=1e-6
    )
    assert res.caption.shape == (12,) and set(res.caption.tolist()) <= set(range(12))
