"""otcclip.ot: batched Sinkhorn against POT, domains, masks, gradients, dtypes, layouts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from otcclip import ot as otc

try:  # POT (a dev dependency) is the reference; only the comparisons with it need it
    import ot as pot
except ImportError:  # pragma: no cover - exercised only without the dev extras
    pot = None

needs_pot = pytest.mark.skipif(pot is None, reason="POT (pip install pot) is the reference")


def _sets(b: int, p: int, w: int, d: int, seed: int, dtype=torch.float32):
    """Token sets around a few shared directions, so costs spread as in trained models."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g, dtype=torch.float64)
    xi = torch.randint(0, 6, (b, p), generator=g)
    yi = torch.randint(0, 6, (b, w), generator=g)
    x = centers[xi] + 0.7 * torch.randn(b, p, d, generator=g, dtype=torch.float64)
    y = centers[yi] + 0.7 * torch.randn(b, w, d, generator=g, dtype=torch.float64)
    x = x * (0.5 + torch.rand(b, p, 1, generator=g, dtype=torch.float64))  # uneven norms
    return x.to(dtype), y.to(dtype)


def _masks(b: int, p: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xm = torch.rand(b, p, generator=g) > 0.3
    ym = torch.rand(b, w, generator=g) > 0.3
    xm[:, 0] = True
    ym[:, -1] = True
    return xm, ym


def _numpy_cost(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    return 1.0 - xn @ yn.T


def _pot_reference(
    x, y, xm, ym, eps, rho=None, a=None, b=None, method="sinkhorn", stop=1e-14, max_iter=100000
):
    """POT on each pair's unmasked sub-problem, in float64."""
    out = []
    for i in range(x.shape[0]):
        mx, my = xm[i].numpy(), ym[i].numpy()
        c = _numpy_cost(x[i].double().numpy()[mx], y[i].double().numpy()[my])
        ai = np.full(c.shape[0], 1.0) if a is None else a[i].double().numpy()[mx]
        bi = np.full(c.shape[1], 1.0) if b is None else b[i].double().numpy()[my]
        ai, bi = ai / ai.sum(), bi / bi.sum()
        if rho is None:
            val = pot.sinkhorn2(ai, bi, c, eps, method=method, numItermax=max_iter, stopThr=stop)
        else:
            val = pot.unbalanced.sinkhorn_unbalanced2(
                ai, bi, c, eps, rho, numItermax=max_iter, stopThr=stop
            )
        out.append(float(val))
    return np.array(out)


def _rel(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours.double().numpy() - ref) / np.abs(ref)))


@needs_pot
@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_balanced_matches_pot_on_masked_problems(eps):
    x, y = _sets(8, 11, 9, 16, seed=1)
    xm, ym = _masks(8, 11, 9, seed=2)
    ours = otc.ot_distance(x, y, xm, ym, eps=eps, iters=3000, tol=1e-7)
    assert ours.dtype == torch.float32 and ours.shape == (8,)
    assert _rel(ours, _pot_reference(x, y, xm, ym, eps)) < 1e-4


@needs_pot
@pytest.mark.parametrize("rho", [0.1, 1.0])
def test_unbalanced_matches_pot_on_masked_problems(rho):
    x, y = _sets(8, 10, 7, 16, seed=3)
    xm, ym = _masks(8, 10, 7, seed=4)
    ours = otc.ot_distance(x, y, xm, ym, eps=0.05, iters=3000, rho=rho)
    assert _rel(ours, _pot_reference(x, y, xm, ym, 0.05, rho=rho)) < 1e-4


@needs_pot
def test_given_weights_match_pot():
    x, y = _sets(5, 8, 6, 16, seed=5)
    xm, ym = _masks(5, 8, 6, seed=6)
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(5, 8, generator=g) + 0.1, torch.rand(5, 6, generator=g) + 0.1
    ours = otc.ot_distance(x, y, xm, ym, a=a, b=b, eps=0.1, iters=2000)
    assert _rel(ours, _pot_reference(x, y, xm, ym, 0.1, a=a, b=b)) < 1e-4
    # weights on masked entries are ignored
    a2 = a.clone()
    a2[~xm] = 1e6
    again = otc.ot_distance(x, y, xm, ym, a=a2, b=b, eps=0.1, iters=2000)
    assert torch.allclose(ours, again)


@pytest.mark.parametrize("rho", [None, 0.5])
def test_kernel_and_log_domains_agree(rho):
    x, y = _sets(6, 9, 7, 16, seed=8)
    xm, ym = _masks(6, 9, 7, seed=9)
    dk, pk = otc.ot_distance(
        x, y, xm, ym, eps=0.1, iters=200, rho=rho, return_plan=True, domain="kernel"
    )
    dl, pl = otc.ot_distance(
        x, y, xm, ym, eps=0.1, iters=200, rho=rho, return_plan=True, domain="log"
    )
    assert torch.allclose(dk, dl, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pk, pl, atol=1e-6)


@needs_pot
def test_small_eps_runs_in_the_log_domain_and_matches_pot(monkeypatch):
    """At eps = 0.01 exp(-C/eps) underflows in float32: auto must choose the log domain."""
    x, y = _sets(4, 8, 6, 16, seed=10)
    xm, ym = _masks(4, 8, 6, seed=11)
    spread = otc.cost_matrix(x, y).amax((1, 2)) - otc.cost_matrix(x, y).amin((1, 2))
    assert float(spread.max()) / 0.01 > otc.KERNEL_MAX_EXPONENT[torch.float32]
    calls = []
    real = otc._log_plan
    monkeypatch.setattr(otc, "_log_plan", lambda *a: calls.append(1) or real(*a))
    ours = otc.ot_distance(x, y, xm, ym, eps=0.01, iters=5000, tol=1e-8)
    assert calls, "the log domain was not chosen"
    assert torch.isfinite(ours).all()
    ref = _pot_reference(x, y, xm, ym, 0.01, method="sinkhorn_log", stop=1e-9, max_iter=5000)
    assert _rel(ours, ref) < 1e-4


def test_large_eps_runs_in_the_kernel_domain(monkeypatch):
    x, y = _sets(4, 8, 6, 16, seed=12)
    monkeypatch.setattr(otc, "_log_plan", lambda *a: pytest.fail("log domain used"))
    assert torch.isfinite(otc.ot_distance(x, y, eps=0.05)).all()


def test_masked_entries_get_no_mass_and_padding_never_matters():
    x, y = _sets(5, 9, 7, 16, seed=13)
    xm, ym = _masks(5, 9, 7, seed=14)
    d, plan = otc.ot_distance(x, y, xm, ym, eps=0.05, iters=100, return_plan=True)
    assert torch.isfinite(plan).all() and torch.isfinite(d).all()
    assert (plan[~xm] == 0).all()
    assert (plan.transpose(1, 2)[~ym] == 0).all()
    # padding full of garbage (NaN, inf, zeros) changes nothing
    xg, yg = x.clone(), y.clone()
    xg[~xm] = float("nan")
    yg[~ym] = 0.0
    pad_set, pad_token = (~ym).nonzero(as_tuple=True)
    yg[pad_set[::2], pad_token[::2], :1] = float("inf")  # indexes yg itself, not a copy
    assert torch.isinf(yg).any() and torch.isnan(xg).any()
    d2, plan2 = otc.ot_distance(xg, yg, xm, ym, eps=0.05, iters=100, return_plan=True)
    assert torch.equal(d, d2) and torch.equal(plan, plan2)
    # and equals the same pair cut down to its real tokens (balanced marginals)
    i = 2
    di = otc.ot_distance(x[i : i + 1, xm[i]], y[i : i + 1, ym[i]], eps=0.05, iters=100)
    assert torch.allclose(d[i], di[0], rtol=1e-5)
    rows = plan[i].sum(1)[xm[i]]
    assert torch.allclose(rows, torch.full_like(rows, 1 / int(xm[i].sum())), atol=1e-6)


def test_pairs_with_an_empty_side_give_distance_one_and_zero_plan():
    x, y = _sets(3, 5, 4, 8, seed=15)
    xm = torch.ones(3, 5, dtype=torch.bool)
    ym = torch.ones(3, 4, dtype=torch.bool)
    ym[1] = False  # an empty caption
    xm[2] = False
    for domain in ("kernel", "log"):
        d, plan = otc.ot_distance(x, y, xm, ym, return_plan=True, domain=domain)
        assert torch.isfinite(d).all() and torch.isfinite(plan).all()
        assert d[1] == otc.EMPTY_DISTANCE and d[2] == otc.EMPTY_DISTANCE
        assert (plan[1:] == 0).all()
        assert torch.allclose(d[0], otc.ot_distance(x[:1], y[:1], domain=domain)[0])


def test_gradients_flow_through_cost_and_plan():
    x, y = _sets(3, 5, 4, 6, seed=16, dtype=torch.float64)
    xm, ym = _masks(3, 5, 4, seed=17)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def fn(xx, yy):
        return otc.ot_distance(xx, yy, xm, ym, eps=0.2, iters=15)

    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-6)
    d = fn(x, y).sum()
    gx, gy = torch.autograd.grad(d, (x, y))
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0
    assert (gx[~xm] == 0).all()  # padding gets no gradient


@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_detach_plan_differentiates_only_through_the_cost(domain):
    x, y = _sets(4, 6, 5, 8, seed=18)
    x.requires_grad_(True)
    d, plan = otc.ot_distance(
        x, y, eps=0.1, iters=50, detach_plan=True, return_plan=True, domain=domain
    )
    assert not plan.requires_grad
    (g_detached,) = torch.autograd.grad(d.sum(), x)
    manual = (plan * otc.cost_matrix(x, y)).sum()
    (g_manual,) = torch.autograd.grad(manual, x)
    assert torch.allclose(g_detached, g_manual, atol=1e-6)
    (g_full,) = torch.autograd.grad(otc.ot_distance(x, y, eps=0.1, iters=50).sum(), x)
    assert not torch.allclose(g_detached, g_full, atol=1e-6)  # the plan's own gradient


def test_empty_batches():
    x, y = _sets(2, 4, 3, 8, seed=38)
    d, plan = otc.ot_distance(x[:0], y[:0], return_plan=True)
    assert d.shape == (0,) and plan.shape == (0, 4, 3)
    assert otc.ot_similarity_matrix(x, y[:0]).shape == (2, 0)
    assert otc.ot_similarity_candidates(x, y, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert otc.ot_similarity_pairs(x, y, torch.zeros(0, 2, dtype=torch.long)).shape == (0,)


def test_no_gradient_without_requires_grad():
    x, y = _sets(2, 4, 3, 8, seed=19)
    assert not otc.ot_distance(x, y).requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    x, y = _sets(6, 9, 7, 32, seed=20)
    xm, ym = _masks(6, 9, 7, seed=21)
    xh, yh = x.to(dtype), y.to(dtype)
    d = otc.ot_distance(xh, yh, xm, ym, eps=0.05, iters=100)
    assert d.dtype == torch.float32
    ref = otc.ot_distance(xh.float(), yh.float(), xm, ym, eps=0.05, iters=100)
    assert torch.allclose(d, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(d, otc.ot_distance(x, y, xm, ym, eps=0.05, iters=100), rtol=2e-2)


def test_autocast_regions_score_in_float32():
    # the trainer runs the OT losses inside bf16 autocast on CUDA: the cost products must
    # not follow it into bf16 (measured on an H200: a KeyError in the domain test)
    x, y = _sets(5, 7, 6, 16, seed=40)
    xm, ym = _masks(5, 7, 6, seed=41)
    cand = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4], [4, 0]])
    kw = {"eps": 0.1, "iters": 30}
    ref_d = otc.ot_distance(x, y, xm, ym, **kw)
    ref_c = otc.ot_similarity_candidates(x, y, cand, xm, ym, **kw)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = otc.ot_distance(x, y, xm, ym, **kw)
        c = otc.ot_similarity_candidates(xg, y, cand, xm, ym, detach_plan=True, **kw)
        assert torch.is_autocast_enabled("cpu")  # restored for the caller's own ops
    assert d.dtype == c.dtype == torch.float32
    assert torch.allclose(d, ref_d, atol=1e-6) and torch.allclose(c, ref_c, atol=1e-6)
    (g,) = torch.autograd.grad(c.sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_tolerance_stops_early_and_is_close(monkeypatch):
    x, y = _sets(4, 8, 6, 16, seed=22)
    steps = []
    real = otc._kernel_step_bmm
    monkeypatch.setattr(otc, "_kernel_step_bmm", lambda *a: steps.append(1) or real(*a))
    d_tol = otc.ot_distance(x, y, eps=0.1, iters=5000, tol=1e-6)
    assert len(steps) < 5000
    d_full = otc.ot_distance(x, y, eps=0.1, iters=3000)
    assert torch.allclose(d_tol, d_full, rtol=1e-4)


def test_chunks_and_batch_composition_do_not_change_results():
    chunk = otc._chunk_size(torch.device("cpu"))
    n = chunk * 2 + 5
    x, y = _sets(n, 7, 5, 8, seed=23)
    xm, ym = _masks(n, 7, 5, seed=24)
    d = otc.ot_distance(x, y, xm, ym, iters=30)
    for i in (0, chunk, n - 1):
        alone = otc.ot_distance(x[i : i + 1], y[i : i + 1], xm[i : i + 1], ym[i : i + 1], iters=30)
        assert torch.allclose(d[i], alone[0], rtol=1e-6, atol=1e-7)


def test_similarity_layouts_agree_with_ot_distance():
    x, y = _sets(5, 7, 6, 16, seed=25)
    y = torch.cat([y, _sets(2, 7, 6, 16, seed=26)[1]])  # By = 7
    xm = _masks(5, 7, 6, seed=27)[0]
    ym = _masks(7, 7, 6, seed=28)[1]
    kw = {"eps": 0.1, "iters": 40}
    sim = otc.ot_similarity_matrix(x, y, xm, ym, **kw)
    assert sim.shape == (5, 7)
    for i in range(5):
        d = otc.ot_distance(x[i].expand(7, -1, -1), y, xm[i].expand(7, -1), ym, **kw)
        assert torch.allclose(sim[i], 1 - d, atol=1e-6)
    pairs = torch.tensor([[0, 6], [4, 0], [2, 2], [2, 2]])
    sp = otc.ot_similarity_pairs(x, y, pairs, xm, ym, **kw)
    assert torch.allclose(sp, sim[pairs[:, 0], pairs[:, 1]], atol=1e-6)
    cand = torch.tensor([[1, 3, 5], [0, 0, 6], [2, 4, 1], [6, 5, 4], [3, 2, 1]])
    sc = otc.ot_similarity_candidates(x, y, cand, xm, ym, **kw)
    assert torch.allclose(sc, sim.gather(1, cand), atol=1e-6)


def test_similarity_gradients_and_detached_plan():
    x, y = _sets(3, 5, 4, 8, seed=29)
    x.requires_grad_(True)
    for detach in (False, True):
        s = otc.ot_similarity_matrix(x, y, eps=0.1, iters=20, detach_plan=detach)
        (g,) = torch.autograd.grad(s.sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("detach", [False, True])
def test_positions_no_set_gives_mass_change_no_similarity_or_gradient(detach):
    """Captions padded far past the longest one (and a start slot every mask leaves out):
    the similarities and the real tokens' gradients are those of the tight padding, and the
    padding gets no gradient, with or without a gradient path or a detached plan."""
    x, y = _sets(4, 6, 5, 8, seed=31)
    ym = _masks(4, 6, 5, seed=32)[1]
    g = torch.Generator().manual_seed(33)
    wide = torch.cat([torch.randn(4, 1, 8, generator=g), y, torch.randn(4, 9, 8, generator=g)], 1)
    wide_mask = torch.cat(
        [torch.zeros(4, 1, dtype=torch.bool), ym, torch.zeros(4, 9, dtype=bool)], 1
    )
    cand = torch.tensor([[1, 3], [0, 2], [2, 2], [3, 0]])
    kw = {"eps": 0.1, "iters": 30, "detach_plan": detach}
    results = []
    for ys, mask in ((y, ym), (wide, wide_mask)):
        xs, ys = x.clone().requires_grad_(True), ys.clone().requires_grad_(True)
        s = otc.ot_similarity_candidates(xs, ys, cand, y_mask=mask, **kw)
        m = otc.ot_similarity_matrix(xs, ys, y_mask=mask, **kw)
        gx, gy = torch.autograd.grad(s.sum() + m.sum(), (xs, ys))
        results.append((s.detach(), m.detach(), gx, gy))
        with torch.no_grad():
            results[-1] += (otc.ot_similarity_candidates(x, ys, cand, y_mask=mask, **kw),)
    (s1, m1, gx1, gy1, n1), (s2, m2, gx2, gy2, n2) = results
    assert torch.allclose(s1, s2, atol=1e-6) and torch.allclose(m1, m2, atol=1e-6)
    assert torch.allclose(n1, n2, atol=1e-6) and torch.allclose(n1, s1, atol=1e-6)
    assert torch.allclose(gx1, gx2, atol=1e-6)
    assert torch.allclose(gy1, gy2[:, 1:6], atol=1e-6)
    assert (gy2[:, 0] == 0).all() and (gy2[:, 6:] == 0).all()


@pytest.mark.slow  # compiles (about 15-30 s on 2 cores when inductor's cache is cold)
def test_compiled_loop_matches_eager():
    n = otc._chunk_size(torch.device("cpu")) + 3
    x, y = _sets(n, 9, 7, 16, seed=30)
    xm, ym = _masks(n, 9, 7, seed=31)
    otc.set_compile("off")
    try:
        eager = otc.ot_distance(x, y, xm, ym, iters=25, rho=0.5)
        otc.set_compile("on")
        compiled = otc.ot_distance(x, y, xm, ym, iters=25, rho=0.5)
    finally:
        otc.set_compile("auto")
    if otc._COMPILER.failed:
        pytest.skip("torch.compile is not available here")
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


def test_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    compiler = otc._Compiler()
    compiler.mode = "on"

    def broken(*args, **kwargs):
        def fn(*a, **k):
            raise RuntimeError("no C++ compiler")

        return fn

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(otc, "_COMPILER", compiler)
    x, y = _sets(otc._chunk_size(torch.device("cpu")), 6, 5, 8, seed=32)  # one full chunk
    with caplog.at_level(logging.WARNING, logger="otcclip.ot"):
        d = otc.ot_distance(x, y, iters=20)
    assert compiler.failed and "running eagerly" in caplog.text
    otc.set_compile("off")
    try:
        assert torch.allclose(d, otc.ot_distance(x, y, iters=20))
    finally:
        otc.set_compile("auto")


@needs_pot
def test_sinkhorn_on_given_costs_matches_pot():
    g = torch.Generator().manual_seed(33)
    c = torch.rand(3, 6, 5, generator=g, dtype=torch.float64)
    a = torch.rand(3, 6, generator=g, dtype=torch.float64)
    b = torch.rand(3, 5, generator=g, dtype=torch.float64)
    plan = otc.sinkhorn(c, a, b, eps=0.05, iters=2000)
    for i in range(3):
        ref = pot.sinkhorn(
            (a[i] / a[i].sum()).numpy(),
            (b[i] / b[i].sum()).numpy(),
            c[i].numpy(),
            0.05,
            numItermax=100000,
            stopThr=1e-14,
        )
        assert np.allclose(plan[i].numpy(), ref, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"eps": 0.0}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"eps": float("inf")}, ValueError),
        ({"eps": float("nan")}, ValueError),
        ({"iters": 0}, ValueError),
        ({"tol": -1.0}, ValueError),
        ({"rho": 0.0}, ValueError),
        ({"domain": "fast"}, ValueError),
        ({"x_mask": torch.ones(2, 4)}, TypeError),
        ({"y_mask": torch.ones(2, 2, dtype=torch.bool)}, ValueError),
        ({"a": -torch.ones(2, 4)}, ValueError),
        ({"b": torch.ones(3, 3)}, ValueError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    x, y = _sets(2, 4, 3, 8, seed=34)
    with pytest.raises(error):
        otc.ot_distance(x, y, **kwargs)


def test_eps_inf_and_nan_features_are_refused():
    """eps = inf used to give a uniform plan, NaN tokens a NaN distance: both silently."""
    x, y = _sets(3, 4, 3, 8, seed=36)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got inf"):
        otc.ot_distance(x, y, eps=float("inf"))
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x holds NaN or inf in 1 real tokens \(first: set 1, "):
        otc.ot_distance(bad, y)
    bad_y = y.clone()
    bad_y[2, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="y holds NaN or inf"):
        otc.ot_distance(x, bad_y)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False  # the NaN sits in padding: allowed
    assert torch.isfinite(otc.ot_distance(bad, y, x_mask=mask)).all()


def test_bad_shapes_are_clear_errors():
    x, y = _sets(2, 4, 3, 8, seed=35)
    with pytest.raises(ValueError, match="same number of sets"):
        otc.ot_distance(x, y[:1])
    with pytest.raises(ValueError, match="feature dim"):
        otc.ot_distance(x, y[..., :4])
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        otc.ot_distance(x[0], y[0])
    with pytest.raises(TypeError, match="float"):
        otc.ot_distance(x.long(), y)
    with pytest.raises(ValueError, match="outside"):
        otc.ot_similarity_pairs(x, y, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="rows"):
        otc.ot_similarity_candidates(x, y, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected keyword"):
        otc.ot_similarity_matrix(x, y, epsilon=0.1)
    with pytest.raises(ValueError):
        otc.set_compile("sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x, y = _sets(70, 9, 7, 16, seed=36)
    xm, ym = _masks(70, 9, 7, seed=37)
    cpu = otc.ot_distance(x, y, xm, ym, iters=40)
    gpu = otc.ot_distance(x.cuda(), y.cuda(), xm.cuda(), ym.cuda(), iters=40)
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-4, atol=1e-5)
