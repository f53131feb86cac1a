"""otcclip.doubt: neighbours, outlier scores, consistency, fusion, groups and the budget rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from otcclip import doubt
from otcclip.doubt import DoubtConfig
from otcclip.phase_lock import phase_locked_patterns


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(n_per: int, centres: int, dim: int, spread: float, seed: int) -> np.ndarray:
    """Rows scattered around `centres` random unit centres; row r belongs to centre r % centres."""
    rng = np.random.default_rng(seed)
    c = _unit(rng.normal(size=(centres, dim)))
    labels = np.arange(n_per * centres) % centres
    return _unit(c[labels] + spread * rng.normal(size=(len(labels), dim))), labels


# --------------------------------------------------------------------------- knn


def test_knn_leaves_out_the_row_itself_even_among_exact_duplicates():
    x = _unit(np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0.1, 1]], dtype=np.float32))
    idx, sim = doubt.knn(x, 2)
    assert idx.shape == (5, 2)
    for r in range(5):
        assert r not in idx[r]
    assert set(idx[0]) == {1, 2}
    assert idx[3, 0] == 4
    assert np.all(np.diff(sim, axis=1) <= 1e-6)  # sorted, most similar first


@pytest.mark.parametrize(
    "x, k, message",
    [
        (np.ones((1, 4), np.float32), 1, "pool of 1"),
        (np.ones((5, 4), np.float32), 5, "k <= N - 1"),
        (np.ones((5, 4), np.float32), 0, "k must be an int"),
        (np.array([[np.nan, 1.0], [1.0, 0.0]], np.float32), 1, "NaN or infinite"),
        (np.ones(4, np.float32), 1, "2-D"),
        (np.ones((4, 2), np.int64), 1, "floating point"),
    ],
)
def test_knn_refuses_bad_input_with_a_clear_error(x, k, message):
    with pytest.raises((ValueError, TypeError), match=message):
        doubt.knn(x, k)


# --------------------------------------------------------------------------- density


def test_a_tight_group_of_copies_is_the_densest_spot():
    x, _ = _clusters(200, 5, 16, 0.15, seed=1)
    rng = np.random.default_rng(2)
    copies = _unit(np.repeat(x[:1], 20, axis=0) + 0.001 * rng.normal(size=(20, 16)))
    data = np.vstack([x, copies])
    s = doubt.local_outlier_scores(data, k=8)
    dense = -s["kdist"]
    # row 0 and its 20 copies are the 21 densest rows
    assert set(np.argsort(-dense)[:21].tolist()) == {0, *range(1000, 1020)}
    for name in ("kdist", "slof", "dao"):
        assert s[name].shape == (1020,) and np.isfinite(s[name]).all()
    # relative scores: the copies are denser than their own neighbourhood says
    assert np.median(s["slof"][1000:]) < np.median(s["slof"][:1000])


# --------------------------------------------------------------------------- signals


def _poisoned_pairs(seed: int = 0):
    """Images and captions of 6 classes; 30 pairs get a caption of class 0 over a class-3 image."""
    img, labels = _clusters(150, 6, 24, 0.12, seed)
    rng = np.random.default_rng(seed + 7)
    text_centres = _unit(rng.normal(size=(6, 24)))
    # captions live in their own space: class centre plus noise
    cap = _unit(text_centres[labels] + 0.12 * rng.normal(size=(len(labels), 24)))
    victims = np.flatnonzero(labels == 3)[:30]
    cap[victims] = _unit(text_centres[0] + 0.12 * rng.normal(size=(30, 24)))
    poisoned = np.zeros(len(labels), bool)
    poisoned[victims] = True
    return img, cap, poisoned


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def test_neighbourhood_consistency_finds_pairs_whose_caption_belongs_elsewhere():
    img, cap, poisoned = _poisoned_pairs()
    signals = doubt.compute_signals(img, cap, DoubtConfig(k=10))
    assert _auroc(signals["consistency_caption"], poisoned) > 0.95
    assert _auroc(signals["consistency_image"], poisoned) > 0.95


def test_the_fused_score_flags_the_poisons_within_a_budget_that_follows_the_score():
    img, cap, poisoned = _poisoned_pairs(seed=3)
    cfg = DoubtConfig(
        k=10, signals=("consistency_caption", "consistency_image"), max_share=0.5, budget="mixture"
    )
    d = doubt.doubt_scores(img, cap, cfg)
    assert _auroc(d.fused, poisoned) > 0.95
    # 30 of 900 pairs are poisoned: the mixture cut doubts far fewer than the cap allows
    assert d.doubted[poisoned].mean() >= 0.9
    assert d.doubted.mean() < 0.15
    assert d.report["doubted"] == int(d.doubted.sum())


def test_signals_then_decide_is_doubt_scores():
    """A caller may compute the signals, let go of the embeddings, then decide (a streamed
    round does, for its peak memory): the verdict is doubt_scores'."""
    img, cap, _ = _poisoned_pairs(seed=4)
    cfg = DoubtConfig(k=10, signals=("cross", "consistency_caption", "consistency_image"))
    whole = doubt.doubt_scores(img, cap, cfg)
    halves = doubt.decide(doubt.doubt_signals(img, cap, cfg), None, cfg)
    np.testing.assert_array_equal(halves.fused, whole.fused)
    np.testing.assert_array_equal(halves.doubted, whole.doubted)
    assert set(doubt.doubt_signals(img, cap, replace(cfg, report_all=True))) > set(cfg.signals)


def test_a_missing_pixel_signal_is_said_when_nothing_else_is_fused():
    img, cap, _ = _poisoned_pairs()
    with pytest.raises(ValueError, match="without images"):
        doubt.doubt_scores(img, cap, DoubtConfig(k=5, signals=("density_pixel",)))
    with pytest.raises(ValueError, match="without images"):
        doubt.doubt_scores(img, cap, DoubtConfig(k=5, signals=("recurrence_pixel",)))


def test_mismatched_embeddings_are_refused():
    img, cap, _ = _poisoned_pairs()
    with pytest.raises(ValueError, match="caption embeddings"):
        doubt.doubt_scores(img, cap[:-1], DoubtConfig(k=5))
    bad = cap.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="rows \\[4\\]"):
        doubt.doubt_scores(img, bad, DoubtConfig(k=5))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"signals": ("nope",)}, "subset of"),
        ({"signals": ()}, "non-empty"),
        ({"k": 0}, "k must be"),
        ({"min_share": 0.5, "max_share": 0.2}, "min_share"),
        ({"duplicate_sim": 2.0}, "cosine"),
        ({"fusion": "mean"}, "fusion must be"),
        ({"phase_scale": "z"}, "phase_scale must be"),
        ({"phase_template": True}, "phase_template must be"),
    ],
)
def test_config_refuses_bad_knobs(options, message):
    with pytest.raises(ValueError, match=message):
        DoubtConfig(**options)


def test_the_phase_signal_on_its_own_scale_is_fused_as_it_comes():
    # a pattern-scaled score: most images 0, a tail, and 20 images beyond the cut 3
    rng = np.random.default_rng(0)
    phase = np.where(rng.random(1000) < 0.3, rng.exponential(0.8, 1000), 0.0)
    phase[:20] = 3.5
    signals = {"phase_pixel": phase}
    only = {"signals": ("phase_pixel",), "min_share": 0.0}
    rescaled = doubt.decide(signals, None, DoubtConfig(**only, phase_scale="tail"))
    own = doubt.decide(signals, None, DoubtConfig(**only, phase_scale="own"))
    np.testing.assert_array_equal(own.z["phase_pixel"], phase)
    assert own.doubted[:20].all() and own.doubted.sum() == (phase > 3).sum()
    # rescaled by its own 95th percentile, the same images fall under the cut
    assert not rescaled.doubted[:20].all()


def test_leaving_out_a_family_drops_exactly_its_signals():
    cfg = DoubtConfig()
    without = cfg.without("consistency")
    assert all(doubt.SIGNALS[s] != "consistency" for s in without.signals)
    assert set(without.signals) == {s for s in cfg.signals if doubt.SIGNALS[s] != "consistency"}
    with pytest.raises(ValueError, match="family"):
        cfg.without("colour")


# --------------------------------------------------------------------------- fusion and budget


def test_robust_z_is_median_and_mad_based():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    z = doubt.robust_z(x)
    # median 3, MAD 1 -> scale 1.4826
    np.testing.assert_allclose(z, (x - 3.0) / 1.4826)
    assert np.all(doubt.robust_z(np.full(4, 2.0)) == 0)
    with pytest.raises(ValueError, match="NaN"):
        doubt.robust_z(np.array([1.0, np.nan]))


def test_fuse_takes_the_strongest_signal_per_pair():
    z = {"a": np.array([0.0, 5.0, 1.0]), "b": np.array([4.0, 0.0, 1.0])}
    np.testing.assert_array_equal(doubt.fuse(z, ["a", "b"]), [4.0, 5.0, 1.0])
    np.testing.assert_array_equal(doubt.fuse(z, ["a"]), [0.0, 5.0, 1.0])
    with pytest.raises(ValueError, match="not computed"):
        doubt.fuse(z, ["c"])


def test_group_verdict_lifts_a_pair_to_its_copies_median_but_never_lowers_it():
    scores = np.array([1.0, 9.0, 8.0, 0.0, 7.0, 0.5, 0.5])
    idx = np.array([[1, 2], [2, 0], [1, 3], [0, 1], [5, 6], [4, 6], [4, 5]])
    sim = np.array(
        [[0.5, 0.5], [0.99, 0.5], [0.99, 0.2], [0.1, 0.1], [0.99, 0.99], [0.99, 0.99], [1, 1]]
    )
    out = doubt.group_verdict(scores, idx, sim, 0.95)
    # row 0: no copy; rows 1 and 2: each other's copy (no chain to row 0), the lower one
    # lifted to their median; row 3: none; row 4 (a patched image) keeps its own score
    # against its two clean look-alikes, which stay at their median
    np.testing.assert_array_equal(out, [1.0, 9.0, 8.5, 0.0, 7.0, 0.5, 0.5])


def test_tail_scale_maps_median_to_zero_and_the_tail_quantile_to_one():
    x = np.arange(101, dtype=np.float64)
    t = doubt.tail_scale(x, tail=0.9)
    assert t[50] == pytest.approx(0.0) and t[90] == pytest.approx(1.0)
    ranks = doubt.upper_rank(np.array([3.0, 1.0, 3.0, 2.0]))
    np.testing.assert_array_equal(ranks, [1, 0.25, 1, 0.5])


def test_mixture_threshold_cuts_between_two_clear_modes():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, 970), rng.normal(10, 1, 30)]
    cut = doubt.mixture_threshold(x, 0.0, 0.5)
    above = x > cut
    assert above[970:].all()
    assert above[:970].sum() <= 2


def test_fixed_threshold_is_the_cut_unless_the_share_leaves_its_bounds():
    x = np.arange(100, dtype=np.float64)
    assert doubt.fixed_threshold(x, 89.5, 0.0, 1.0) == 89.5  # 10 above
    assert (x > doubt.fixed_threshold(x, 49.5, 0.0, 0.2)).sum() == 20  # capped
    assert (x > doubt.fixed_threshold(x, 200.0, 0.05, 1.0)).sum() == 5  # at least 5%


def test_mixture_threshold_holds_the_share_within_its_bounds():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, 500), rng.normal(10, 1, 500)]  # half the pairs in the upper mode
    assert (x > doubt.mixture_threshold(x, 0.0, 0.25)).mean() == pytest.approx(0.25, abs=0.002)
    flat = rng.normal(0, 1, 1000)
    assert (flat > doubt.mixture_threshold(flat, 0.05, 0.25)).mean() >= 0.05
    with pytest.raises(ValueError, match="NaN"):
        doubt.mixture_threshold(np.array([1.0, np.inf]))


# --------------------------------------------------------------------------- pixels


def test_pixel_evidence_is_reused_and_checked_against_the_pairs():
    img, cap, _ = _poisoned_pairs()
    images = np.random.default_rng(0).integers(0, 256, (len(img), 20, 20), dtype=np.uint8)
    ev = doubt.pixel_evidence(images, DoubtConfig(pixel_k=4))
    d = doubt.doubt_scores(img, cap, DoubtConfig(k=5, pixel_k=4), pixels=ev)
    assert {"copies_pixel", "recurrence_pixel"} <= set(d.signals)
    assert ev.aligned.shape == (len(img), 4)
    with pytest.raises(ValueError, match="pixel evidence for"):
        doubt.compute_signals(img[:-1], cap[:-1], DoubtConfig(k=5), pixels=ev)


def test_saved_pixel_evidence_loads_mapped_and_gives_the_same_verdict(tmp_path):
    """A streamed trainer keeps the evidence on disk between rounds and maps it for one."""
    img, cap, _ = _poisoned_pairs()
    images = np.random.default_rng(1).integers(0, 256, (len(img), 20, 20), dtype=np.uint8)
    config = DoubtConfig(k=5, pixel_k=4)
    ev = doubt.pixel_evidence(images, config)
    ev.save(tmp_path / "evidence")
    loaded = doubt.PixelEvidence.load(tmp_path / "evidence")
    assert isinstance(loaded.keys.base, np.memmap) and not loaded.keys.flags.writeable
    for name, value in ev.state_dict().items():
        assert np.array_equal(loaded.state_dict()[name], value), name
    a = doubt.doubt_scores(img, cap, config, pixels=ev)
    b = doubt.doubt_scores(img, cap, config, pixels=loaded)
    assert np.array_equal(a.fused, b.fused) and np.array_equal(a.doubted, b.doubted)
    (tmp_path / "evidence" / "aligned.npy").unlink()
    (tmp_path / "evidence" / "keys.npy").unlink()
    with pytest.raises(ValueError, match=r": aligned\.npy, keys\.npy missing"):
        doubt.PixelEvidence.load(tmp_path / "evidence")


def _blocky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A texture of 4 px blocks: smooth at the scale of pixel noise, like a real item."""
    return np.kron(rng.integers(0, 256, (h // 4, w // 4)), np.ones((4, 4))).astype(np.uint8)


def test_variants_of_one_image_share_a_verdict_and_count_as_copies():
    from otcclip.attacks import vary_copies

    rng = np.random.default_rng(5)
    scenes = np.full((60, 56, 56), 128, np.uint8)
    for i in range(60):  # every scene a different textured item somewhere
        y, x = rng.integers(0, 30, 2)
        scenes[i, y : y + 20, x : x + 16] = _blocky(rng, 20, 16)
    variants = vary_copies(np.repeat(scenes[:1], 12, axis=0), 2, 8.0, rng)
    images = np.vstack([scenes, variants])
    ev = doubt.pixel_evidence(images, DoubtConfig(pixel_k=8))
    copies = (ev.aligned >= 0.95).sum(axis=1)
    assert np.all(copies[60:] >= 4) and np.all(copies[1:60] == 0)


def test_a_subset_of_the_evidence_keeps_copies_only_among_its_own_images():
    """A streamed round judges only the pairs that have streamed: a copy outside them
    can no longer count or share a verdict; per-image scores stay the whole set's."""
    rng = np.random.default_rng(5)
    scenes = np.full((40, 56, 56), 128, np.uint8)
    for i in range(40):
        y, x = rng.integers(0, 30, 2)
        scenes[i, y : y + 20, x : x + 16] = _blocky(rng, 20, 16)
    images = np.vstack([scenes, np.repeat(scenes[:1], 3, axis=0)])  # rows 0, 40-42: copies
    config = DoubtConfig(pixel_k=4, signals=("copies_pixel", "recurrence_pixel", "phase_pixel"))
    ev = doubt.pixel_evidence(images, config)
    rows = np.array([42, 0, *range(1, 40)])  # 40 and 41 have not streamed
    sub = ev.subset(rows)
    assert len(sub) == len(rows) and np.array_equal(sub.keys, ev.keys[rows])
    assert np.array_equal(sub.recurrence, ev.recurrence[rows])
    assert np.array_equal(sub.phase, ev.phase[rows])
    copies = doubt.pixel_signals(sub, config)["copies_pixel"]
    assert copies[0] == copies[1] == 1  # 42 and 0 see each other, not 40 or 41
    assert doubt.pixel_signals(ev, config)["copies_pixel"][42] == 3
    index = sub.neighbours[0]
    assert index.shape == (len(rows), 4) and index.max() < len(rows)
    assert np.all(sub.aligned[index == np.arange(len(rows))[:, None]] == -1)
    with pytest.raises(ValueError, match="must not repeat"):
        ev.subset(np.array([1, 1]))
    with pytest.raises(ValueError, match="images in 0..42"):
        ev.subset(np.array([43]))


def test_loading_a_subset_from_disk_equals_the_subset_of_the_whole(tmp_path, monkeypatch):
    """A streamed round reads its rows of the saved evidence a block at a time, so the
    mapped whole's pages are never resident beside the copy; the result is `subset`'s."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 56, 56), dtype=np.uint8)
    images[45:] = images[3]  # copies, two of them outside the rows
    config = DoubtConfig(pixel_k=5, signals=("copies_pixel", "recurrence_pixel", "phase_pixel"))
    ev = doubt.pixel_evidence(images, config)
    ev.save(tmp_path)
    rows = np.array([47, 3, *range(4, 40), 46, 0])
    monkeypatch.setattr(doubt, "_READ_BLOCK", 7)  # several blocks, the last one short
    loaded = doubt.PixelEvidence.load(tmp_path, rows=rows)
    expected = ev.subset(rows)
    for name, value in expected.state_dict().items():
        got = loaded.state_dict()[name]
        assert not isinstance(got, np.memmap) and got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    with pytest.raises(ValueError, match="must not repeat"):
        doubt.PixelEvidence.load(tmp_path, rows=np.array([2, 2]))


@pytest.mark.parametrize(
    ("signal", "field"), [("pattern_pixel", "pattern"), ("phase_pixel", "phase")]
)
def test_a_fitted_pixel_signal_is_computed_only_when_fused_and_survives_the_state(
    blended_scenes, signal, field
):
    table, poisoned = blended_scenes
    images = table.images
    others = tuple(s for s in DoubtConfig().signals if s != signal)
    plain = doubt.pixel_evidence(images, DoubtConfig(signals=others))
    assert getattr(plain, field) is None and field not in plain.state_dict()
    fused = DoubtConfig(signals=(*others, signal))
    ev = doubt.pixel_evidence(images, fused)
    again = doubt.PixelEvidence.from_state(ev.state_dict())
    np.testing.assert_array_equal(getattr(again, field), getattr(ev, field))
    assert roc_auc_score(poisoned, doubt.pixel_signals(again, fused)[signal]) >= 0.98
    with pytest.raises(ValueError, match=f"no {field} scores"):
        doubt.pixel_signals(plain, fused)
    state = dict(ev.state_dict(), **{field: getattr(ev, field)[:-1]})
    with pytest.raises(ValueError, match=f"one {field} score per image"):
        doubt.PixelEvidence.from_state(state)


def test_the_phase_signal_is_zero_on_a_pool_too_small_to_hold_a_pattern(blended_scenes):
    table, _ = blended_scenes
    config = DoubtConfig()
    assert "phase_pixel" in config.signals  # a default since session 12
    few = table.images[:12]  # enough for pixel_k = 8 neighbours, too few for a phase tail
    ev = doubt.pixel_evidence(few, config)
    np.testing.assert_array_equal(ev.phase, np.zeros(12))
    with pytest.raises(ValueError, match="at least 16 images"):
        phase_locked_patterns(few)


def test_the_pixel_screen_reads_only_the_pixel_signals_and_none_without_them():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(300, 16, 16), dtype=np.uint8)
    images[:6] = images[0]  # six copies of one image: 2% of the pairs
    config = DoubtConfig(signals=("cross", "copies_pixel"))
    pixels = doubt.pixel_evidence(images, config)
    screen = doubt.pixel_screen(pixels, config)
    assert set(screen.signals) == {"copies_pixel"}
    assert screen.doubted[:6].all() and not screen.doubted[6:].any()
    nothing = doubt.pixel_screen(pixels, DoubtConfig(signals=("cross",)))
    assert not nothing.doubted.any() and nothing.report["doubted"] == 0


def test_neighbour_dots_are_the_gathered_einsum_block_by_block():
    """A block of rows at a time (memory bounded by the block, not N x k x D), same numbers."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    idx = rng.integers(0, 50, size=(50, 5))
    whole = np.einsum("nd,nkd->nk", x, x[idx])
    got = doubt.neighbour_dots(x, idx, block=8)
    assert got.dtype == np.float32 and np.array_equal(got, whole)
    # the rows of a block: row first + i against its neighbours
    assert np.array_equal(doubt.neighbour_dots(x, idx[20:30], block=4, first=20), whole[20:30])


def test_a_block_of_the_self_join_is_the_whole_join_s_rows():
    x, _ = _clusters(30, 4, 8, 0.3, seed=5)
    x[7] = x[8]  # an exact duplicate may not push a row's own index into its list
    idx, sim = doubt.knn(x, 6)
    part_idx, part_sim = doubt.knn(x, 6, rows=slice(5, 40))
    assert np.array_equal(part_idx, idx[5:40]) and np.array_equal(part_sim, sim[5:40])
    assert not (part_idx == np.arange(5, 40)[:, None]).any()


@pytest.mark.parametrize("with_pixels", [True, False])
def test_the_consistency_signals_by_blocks_are_the_whole_join_s(monkeypatch, with_pixels):
    """A round holds a block of the wide self-joins at a time, not N lists of k + reach;
    the signals are the same to the bit."""
    rng = np.random.default_rng(2)
    image, _ = _clusters(150, 6, 16, 0.4, seed=6)
    caption = _unit(image + 0.3 * rng.normal(size=image.shape))
    caption[10:14] = caption[10]  # identical captions may not vouch for each other
    keys = _unit(rng.normal(size=(len(image), 12)))
    keys[40:44] = keys[40]  # copies may not vouch either
    n, k = len(image), 4
    pixels = doubt.PixelEvidence(
        keys,
        (rng.integers(0, n, (n, k)), rng.random((n, k)).astype(np.float32)),
        np.zeros((n, k), np.float32),
        np.zeros(n),
    )
    config = DoubtConfig(
        k=8, reach=16, signals=("cross", "consistency_caption", "consistency_image"), threads=1
    )
    kw = {"pixels": pixels if with_pixels else None, "wanted": config.signals}
    whole = doubt.compute_signals(image, caption, config, **kw)
    monkeypatch.setattr(doubt, "_JOIN_BLOCK", 64)  # 900 rows: 15 blocks, the last partial
    blocks = doubt.compute_signals(image, caption, config, **kw)
    for name in ("consistency_caption", "consistency_image"):
        assert np.array_equal(whole[name], blocks[name]), name
        assert whole[name].std() > 0
