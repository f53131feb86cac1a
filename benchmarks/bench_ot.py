"""OT scoring benchmark: otcclip.ot.ot_distance against its peers, side by side in one run.

Every method scores the same pairs of token sets (P = 49 patches, W = 32 words, D = 512,
float32, not normalised) with eps = 0.05 and 50 Sinkhorn iterations, cost matrices included
(normalisation and the P x W products), on the CPU with the same thread count:
- ot_distance: chunked, compiled kernel-domain Sinkhorn (the first call, which compiles, is
  timed apart), and the same with compilation off (eager);
- a naive log-domain torch Sinkhorn, the textbook loop over the whole batch;
- a naive kernel-domain torch Sinkhorn (batched matrix-vector products);
- a loop over POT's ``ot.sinkhorn2`` (on a subset of the pairs, scaled to pairs/s);
- the matching layout: ``ot_similarity_candidates``, each image against k = 16 captions;
- the same on captions of 12 words padded to W with a mask, against the same captions cut
  to their 12 words, without and with a gradient (L_inter's layout: 8 candidates, the plan
  detached): the token positions no caption fills are dropped, so the ratio should be ~1;
- ot_distance on bfloat16 inputs, and in the log domain.
All peers run the same iterations in the same order (column scaling first, from a uniform
row scaling), so after 50 iterations they agree to float32 rounding; the agreement check
prints the largest relative difference of D_OT on the checked pairs.

The CPU is often shared: the load average at the start is printed with the results, and
fine-grained two-thread parallelism suffers most from other processes (each parallel region
waits for its slowest thread), so compare the ratios of one run rather than runs. Each line
also gives the process CPU time per pair (all threads, spin-waiting included), which other
processes disturb less than wall time.

    python benchmarks/bench_ot.py            # 2048 pairs, 2 threads
    python benchmarks/bench_ot.py --quick    # 256 pairs, seconds
    python benchmarks/bench_ot.py --device cuda --pairs 65536   # the CUDA path
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import numpy as np
import torch

P, W, D = 49, 32, 512


def make_tokens(n: int, length: int, seed: int, centers: torch.Tensor) -> torch.Tensor:
    """Token sets drawn around shared concept directions, with uneven norms.

    Costs then spread like those of trained features (some tokens close, most far), rather
    than the narrow band of independent random vectors.
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, centers.shape[0], (n, length), generator=g)
    noise = torch.randn(n, length, centers.shape[1], generator=g)
    scale = 0.5 + torch.rand(n, length, 1, generator=g)
    return (centers[idx] + 0.6 * noise / math.sqrt(centers.shape[1])) * scale


def naive_log(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Textbook log-domain Sinkhorn on dual potentials f, g (uniform marginals)."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    yn = torch.nn.functional.normalize(y, dim=-1)
    c = 1.0 - torch.bmm(xn, yn.transpose(1, 2))
    n, p, w = c.shape
    log_a, log_b = -math.log(p), -math.log(w)
    f = torch.full((n, p), eps * log_a, device=c.device)
    g = torch.zeros(n, w, device=c.device)
    for _ in range(iters):
        g = eps * log_b - eps * torch.logsumexp((f.unsqueeze(-1) - c) / eps, dim=1)
        f = eps * log_a - eps * torch.logsumexp((g.unsqueeze(-2) - c) / eps, dim=2)
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - c) / eps)
    return (plan * c).sum((1, 2))


def naive_kernel(x: torch.Tensor, y: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Textbook kernel-domain Sinkhorn with batched matrix-vector products."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    yn = torch.nn.functional.normalize(y, dim=-1)
    c = 1.0 - torch.bmm(xn, yn.transpose(1, 2))
    n, p, w = c.shape
    k = torch.exp(-c / eps)
    a = torch.full((n, p, 1), 1.0 / p, device=c.device)
    b = torch.full((n, w, 1), 1.0 / w, device=c.device)
    u = a
    for _ in range(iters):
        v = b / torch.bmm(k.transpose(1, 2), u)
        u = a / torch.bmm(k, v)
    plan = u * k * v.transpose(1, 2)
    return (plan * c).sum((1, 2))


def pot_loop(x: np.ndarray, y: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """POT's ot.sinkhorn2 pair by pair, cost included (stopThr=0: exactly `iters` iterations)."""
    import ot

    a, b = np.full(x.shape[1], 1.0 / x.shape[1]), np.full(y.shape[1], 1.0 / y.shape[1])
    out = np.empty(len(x))
    for i in range(len(x)):
        xn = x[i] / np.linalg.norm(x[i], axis=1, keepdims=True)
        yn = y[i] / np.linalg.norm(y[i], axis=1, keepdims=True)
        c = 1.0 - xn @ yn.T
        out[i] = ot.sinkhorn2(a, b, c, eps, numItermax=iters, stopThr=0.0)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall time of `repeats` runs, and the process CPU time of that run."""
    best, cpu = math.inf, math.inf
    for _ in range(repeats):
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return best, cpu


def rel_diff(a, b) -> float:
    a = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _padding_ratios(otc, xi, pool, cand, eps, iters, repeats, report) -> dict[str, float]:
    """Candidates on padded captions (12 real words of W) against the 12 words alone."""
    words = 12
    tight = pool[:, :words].contiguous()
    mask = torch.zeros(pool.shape[:2], dtype=torch.bool, device=pool.device)
    mask[:, :words] = True
    wide = pool.clone()  # the padding holds other tokens, as a text tower's output does
    out = {}
    for grad in (False, True):
        kw = {"eps": eps, "iters": iters, "detach_plan": True}
        c = cand[:, :8] if grad else cand

        def run(y, m, c=c, kw=kw, grad=grad):
            with torch.enable_grad() if grad else torch.no_grad():
                x = xi.detach().requires_grad_(grad)
                s = otc.ot_similarity_candidates(x, y, c, y_mask=m, **kw)
                if grad:
                    s.sum().backward()

        layout = "with gradient, k=8" if grad else f"k={cand.shape[1]}"
        times = {}
        for label, y, m in (("padded", wide, mask), ("tight", tight, None)):
            name = f"candidates ({layout}), {label} captions"
            times[label] = best_time(lambda y=y, m=m: run(y, m), repeats)
            report(name, c.numel(), times[label])
        out[f"padded / tight captions ({layout})"] = times["padded"][0] / times["tight"][0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=None, help="pairs scored (default 2048)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--pot-pairs", type=int, default=None, help="pairs for the POT loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (POT always runs on the CPU)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for development")
    args = ap.parse_args()
    quick = args.quick
    n = args.pairs or (256 if quick else 2048)
    n_pot = min(n, args.pot_pairs or (32 if quick else 200))
    n_naive = min(n, 256 if quick else 1024)
    repeats = 2 if quick else 3
    eps, iters = args.eps, args.iters

    torch.set_num_threads(args.threads)
    from otcclip import ot as otc

    g = torch.Generator().manual_seed(args.seed)
    centers = torch.nn.functional.normalize(torch.randn(64, D, generator=g), dim=-1)
    x = make_tokens(n, P, args.seed + 1, centers).to(args.device)
    y = make_tokens(n, W, args.seed + 2, centers).to(args.device)
    print(
        f"bench_ot: P={P} W={W} D={D} eps={eps} iters={iters} pairs={n} device={args.device} "
        f"threads={torch.get_num_threads()} float32, cost matrices included; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    rows: dict[str, float] = {}

    def report(name: str, pairs: int, times: tuple[float, float], note: str = "") -> None:
        wall, cpu = times
        rows[name] = pairs / wall
        per_pair = cpu / pairs * 1e6
        print(f"{name:<40s} {pairs / wall:>10,.0f} pairs/s  {per_pair:>8,.1f} CPU-us/pair{note}")

    # ours: compiled (first call compiles) and eager
    otc.set_compile("on")
    t0 = time.perf_counter()
    ours = otc.ot_distance(x, y, eps=eps, iters=iters)
    _sync()
    first = time.perf_counter() - t0
    fell_back = otc._COMPILER.failed
    label = "ot_distance (eager: compile failed)" if fell_back else "ot_distance (compiled)"
    report(
        label,
        n,
        best_time(lambda: otc.ot_distance(x, y, eps=eps, iters=iters), repeats),
        f"   (first call {first:.1f} s, compilation included)",
    )
    otc.set_compile("off")
    report(
        "ot_distance (eager)",
        n,
        best_time(lambda: otc.ot_distance(x, y, eps=eps, iters=iters), repeats),
    )
    otc.set_compile("on")

    xs, ys = x[:n_naive], y[:n_naive]
    ref_log = naive_log(xs, ys, eps, iters)
    report(
        "naive log-domain torch Sinkhorn",
        n_naive,
        best_time(lambda: naive_log(xs, ys, eps, iters), repeats),
    )
    ref_kernel = naive_kernel(xs, ys, eps, iters)
    report(
        "naive kernel-domain torch Sinkhorn",
        n_naive,
        best_time(lambda: naive_kernel(xs, ys, eps, iters), repeats),
    )
    xp, yp = x[:n_pot].cpu().numpy(), y[:n_pot].cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": 50 iterations by design
        ref_pot = pot_loop(xp, yp, eps, iters)
        report(
            f"POT ot.sinkhorn2 loop ({n_pot} pairs)",
            n_pot,
            best_time(lambda: pot_loop(xp, yp, eps, iters), 1),
        )

    # the matching layout: each image against k captions of a pool
    k = 16
    n_img = max(1, n // k)
    pool = y[: max(k, n // 4)]
    cand = torch.randint(0, pool.shape[0], (n_img, k), generator=g).to(args.device)
    xi = x[:n_img]
    sim = otc.ot_similarity_candidates(xi, pool, cand, eps=eps, iters=iters)
    n_chk = min(n_img, 8)
    ref_cand = otc.ot_distance(
        xi[:n_chk].repeat_interleave(k, 0), pool[cand[:n_chk].reshape(-1)], eps=eps, iters=iters
    )
    report(
        f"ot_similarity_candidates (k={k})",
        n_img * k,
        best_time(
            lambda: otc.ot_similarity_candidates(xi, pool, cand, eps=eps, iters=iters), repeats
        ),
    )
    padding = _padding_ratios(otc, xi, pool, cand, eps, iters, repeats, report)
    xb, yb = x.bfloat16(), y.bfloat16()
    otc.ot_distance(xb, yb, eps=eps, iters=iters)
    report(
        "ot_distance (bfloat16 input)",
        n,
        best_time(lambda: otc.ot_distance(xb, yb, eps=eps, iters=iters), repeats),
    )
    report(
        "ot_distance (log domain forced)",
        n_naive,
        best_time(lambda: otc.ot_distance(xs, ys, eps=eps, iters=iters, domain="log"), 1),
    )

    print(
        "agreement (max relative difference of D_OT): "
        f"vs naive log {rel_diff(ours[:n_naive], ref_log):.1e}, "
        f"vs naive kernel {rel_diff(ours[:n_naive], ref_kernel):.1e}, "
        f"vs POT {rel_diff(ours[:n_pot], ref_pot):.1e}; "
        f"candidates layout vs ot_distance {rel_diff(1 - sim[:n_chk].reshape(-1), ref_cand):.1e}"
    )
    lead = rows[label]
    for peer in (
        "naive log-domain torch Sinkhorn",
        "naive kernel-domain torch Sinkhorn",
        f"POT ot.sinkhorn2 loop ({n_pot} pairs)",
        "ot_distance (eager)",
    ):
        print(f"ratio: ot_distance / {peer}: {lead / rows[peer]:.1f}x")
    for name, ratio in padding.items():
        print(f"ratio: {name}: {ratio:.2f}x (1.00: the padding costs nothing)")
    if args.device == "cpu":
        target = 50_000
        verdict = "met" if lead >= target else "NOT met"
        print(
            f"target >= {target:,} pairs/s on 2 CPU threads: {verdict} "
            f"({lead:,.0f} pairs/s with {torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    main()
