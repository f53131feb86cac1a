"""Losses: CLIP InfoNCE against open_clip's, row splits, masks, and the OT-InfoNCE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from otcclip.losses import clip_loss, hardest_negatives, ot_info_nce


def _features(b: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


def _tokens(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_clip_loss_matches_open_clip():
    from open_clip.loss import ClipLoss

    img, txt = _features()
    scale = torch.tensor(14.3)
    ours = clip_loss(img, txt, scale)
    theirs = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_clip_loss_rows_sum_to_the_batch_loss_with_the_same_gradient():
    img, txt = _features(b=10)
    img.requires_grad_(True)
    whole = clip_loss(img, txt, 10.0)
    (g_whole,) = torch.autograd.grad(whole, img)
    split = clip_loss(img, txt, 10.0, rows=slice(0, 4)) + clip_loss(
        img, txt, 10.0, rows=slice(4, 10)
    )
    (g_split,) = torch.autograd.grad(split, img)
    assert torch.allclose(whole, split, atol=1e-6)
    assert torch.allclose(g_whole, g_split, atol=1e-6)


def test_clip_loss_valid_mask_equals_the_loss_on_the_subset():
    img, txt = _features(b=9)
    valid = torch.tensor([True, False, True, True, False, True, False, True, True])
    masked = clip_loss(img, txt, 7.0, valid=valid)
    subset = clip_loss(img[valid], txt[valid], 7.0)
    assert torch.allclose(masked, subset, atol=1e-6)
    none_valid = torch.zeros(9, dtype=torch.bool)
    assert clip_loss(img, txt, 7.0, valid=none_valid).item() == 0.0


def test_clip_loss_duplicate_caption_is_not_a_negative():
    img, txt = _features(b=6)
    txt[3] = txt[1]  # rows 1 and 3 hold the same caption after a many-to-one re-pairing
    ids = torch.tensor([0, 1, 2, 1, 4, 5])
    scale = 5.0
    got = clip_loss(img, txt, scale, ids=ids)
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * i @ t.T
    total = 0.0
    for r in range(6):
        keep = [c for c in range(6) if c == r or ids[c] != ids[r]]
        target = keep.index(r)
        total += F.cross_entropy(logits[r, keep][None], torch.tensor([target]))
        total += F.cross_entropy(logits.T[r, keep][None], torch.tensor([target]))
    assert torch.allclose(got, total / 12, atol=1e-5)
    assert not torch.allclose(got, clip_loss(img, txt, scale), atol=1e-3)


def test_clip_loss_refuses_mismatched_shapes():
    img, txt = _features()
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(img, txt[:4], 1.0)
    with pytest.raises(ValueError, match="bool"):
        clip_loss(img, txt, 1.0, valid=torch.ones(8))
    with pytest.raises(ValueError, match="contiguous"):
        clip_loss(img, txt, 1.0, rows=slice(0, 8, 2))


def test_hardest_negatives_are_the_most_similar_other_columns():
    x, y = _features(b=7, seed=3)
    cand, available = hardest_negatives(x, y, 3)
    sim = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    assert cand.shape == (7, 4) and bool(available.all())
    assert torch.equal(cand[:, 0], torch.arange(7))
    for i in range(7):
        s = sim[i].clone()
        s[i] = -float("inf")
        assert set(cand[i, 1:].tolist()) == set(s.topk(3).indices.tolist())


def test_hardest_negatives_skip_duplicates_and_invalid_columns():
    x, y = _features(b=5, seed=4)
    ids = torch.tensor([0, 1, 1, 3, 4])
    valid = torch.tensor([True, True, True, True, False])
    cand, available = hardest_negatives(x, y, 10, ids=ids, valid=valid)
    # m is capped at B - 1 = 4; row 1 may not use column 2 (same caption) or 4 (invalid)
    assert cand.shape == (4, 5)  # the invalid row 4 is not an owned row
    row1 = cand[1][available[1]].tolist()
    assert row1[0] == 1 and set(row1[1:]) == {0, 3}
    assert int(available[0].sum()) == 1 + 3  # columns 1, 2, 3


def test_hardest_negatives_skip_near_duplicates_of_the_positive():
    x, y = _features(b=6, seed=5)
    y = y.clone()
    y[3] = 2.0 * y[0] + 0.01 * torch.randn(y.shape[1])  # another wording of caption 0
    x[0] = y[3]  # and the most similar column to image 0: its hardest negative
    plain, _ = hardest_negatives(x, y, 2)
    assert plain[0, 1].item() == 3
    cand, available = hardest_negatives(x, y, 5, duplicate_cos=0.99)
    row0 = cand[0][available[0]].tolist()
    assert 3 not in row0 and sorted(row0[1:]) == [1, 2, 4, 5]
    row3 = cand[3][available[3]].tolist()
    assert 0 not in row3, "the block is symmetric"
    assert int(available[1].sum()) == 6, "rows without a near-duplicate keep every negative"
    with pytest.raises(ValueError, match="duplicate_cos"):
        hardest_negatives(x, y, 2, duplicate_cos=1.5)


def test_ot_info_nce_ignores_a_near_duplicate_negative(ot_distance):
    torch.manual_seed(0)
    xt, yt = torch.randn(4, 3, 8), torch.randn(4, 5, 8)
    xg, yg = xt.mean(1), yt.mean(1)
    yt[1], yg[1] = yt[0], yg[0]  # caption 1 says what caption 0 says
    kw = {"negatives": 3, "eps": 0.1, "iters": 20, "rows": slice(0, 1)}
    keep = [0, 2, 3]
    with_dup = ot_info_nce(xt, yt, xg, yg, 10.0, **kw)
    without = ot_info_nce(xt[keep], yt[keep], xg[keep], yg[keep], 10.0, **kw)
    masked = ot_info_nce(xt, yt, xg, yg, 10.0, duplicate_cos=0.999, **kw)
    # the loss is a sum over owned rows divided by the valid rows: 4 against 3
    assert torch.allclose(masked * 4, without * 3, atol=1e-5)
    assert with_dup > masked + 0.1 / 4


@pytest.fixture(scope="module")
def ot_distance():
    from otcclip.ot import ot_distance

    return ot_distance


def _full_ot_logits(ot_distance, x, y, y_mask, scale, eps, iters):
    b = x.shape[0]
    xi = torch.arange(b).repeat_interleave(b)
    yj = torch.arange(b).repeat(b)
    d = ot_distance(x[xi], y[yj], None, y_mask[yj], eps=eps, iters=iters, detach_plan=True)
    return scale * (1 - d.view(b, b))


def test_ot_info_nce_with_all_negatives_is_infonce_over_the_ot_matrix(ot_distance):
    b = 6
    x, y = _tokens(b, 5, 8, 1), _tokens(b, 4, 8, 2)
    y_mask = torch.ones(b, 4, dtype=torch.bool)
    y_mask[::2, 3] = False
    xg, yg = x.mean(1), y.mean(1)
    got = ot_info_nce(x, y, xg, yg, 10.0, y_mask=y_mask, negatives=b - 1, eps=0.1, iters=30)
    logits = _full_ot_logits(ot_distance, x, y, y_mask, 10.0, 0.1, 30)
    want = F.cross_entropy(logits, torch.arange(b))
    assert torch.allclose(got, want, atol=1e-4)


def test_ot_info_nce_uses_only_the_hardest_negatives(ot_distance):
    b, m = 8, 2
    x, y = _tokens(b, 5, 8, 5), _tokens(b, 4, 8, 6)
    y_mask = torch.ones(b, 4, dtype=torch.bool)
    xg, yg = x.mean(1), y.mean(1)
    got = ot_info_nce(x, y, xg, yg, 10.0, y_mask=y_mask, negatives=m, eps=0.1, iters=30)
    logits = _full_ot_logits(ot_distance, x, y, y_mask, 10.0, 0.1, 30)
    cand, _ = hardest_negatives(xg, yg, m)
    picked = logits.gather(1, cand)
    want = (torch.logsumexp(picked, dim=1) - picked[:, 0]).mean()
    assert torch.allclose(got, want, atol=1e-4)


def test_ot_info_nce_rows_split_and_gradients_reach_both_sides():
    b = 6
    x = _tokens(b, 5, 8, 7).requires_grad_(True)
    y = _tokens(b, 4, 8, 8).requires_grad_(True)
    xg, yg = x.mean(1), y.mean(1)
    kw = {"negatives": 3, "eps": 0.1, "iters": 20}
    whole = ot_info_nce(x, y, xg, yg, 8.0, **kw)
    split = ot_info_nce(x, y, xg, yg, 8.0, rows=slice(0, 2), **kw) + ot_info_nce(
        x, y, xg, yg, 8.0, rows=slice(2, 6), **kw
    )
    assert torch.allclose(whole, split, atol=1e-5)
    gx, gy = torch.autograd.grad(whole, (x, y))
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0
    symmetric = ot_info_nce(x, y, xg, yg, 8.0, symmetric=True, **kw)
    reverse = ot_info_nce(y, x, yg, xg, 8.0, **kw)
    assert torch.allclose(symmetric, 0.5 * (whole + reverse), atol=1e-5)


def test_ot_info_nce_prefers_aligned_token_sets():
    """Positives built from their own tokens give a lower loss than shuffled pairs."""
    b = 6
    x = _tokens(b, 5, 8, 9)
    y = x[:, :4] + 0.05 * _tokens(b, 4, 8, 10)
    xg, yg = x.mean(1), y.mean(1)
    aligned = ot_info_nce(x, y, xg, yg, 10.0, negatives=5)
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    shuffled = ot_info_nce(x, y[perm], xg, yg[perm], 10.0, negatives=5)
    assert aligned < shuffled


def test_ot_info_nce_refuses_bad_shapes():
    x = _tokens(4, 5, 8, 1)
    with pytest.raises(ValueError, match="token sets"):
        ot_info_nce(x[0], x, x.mean(1), x.mean(1), 1.0)
    with pytest.raises(ValueError, match="same batch size"):
        ot_info_nce(x, x, x.mean(1)[:3], x.mean(1), 1.0)
    with pytest.raises(ValueError, match="m \\(number of OT negatives\\)"):
        hardest_negatives(x.mean(1), x.mean(1), -1)
