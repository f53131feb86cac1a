"""One matching round end to end: embed -> prune (Rust) -> OT score -> assign (Rust).

Default: 50,000 fashion-scenes images against a pool of their 50,000 captions,
k = 16, alpha 0.5, eps 0.05, 50 Sinkhorn iterations, with the built-in tiny
model created from scratch (random weights: the timings do not depend on what
the model has learnt, the pairing does, so no quality is reported; `--weights` loads
a trained one, for `--bank`'s quality figures). Prints the
seconds of each stage, the scoring throughput in image-caption pairs per second
(the k candidates plus the own caption of every image), and the process's peak
resident memory (VmHWM) beside the sizes of the inputs and the cached tokens.

    python benchmarks/bench_match.py            # the full size (minutes on 2 cores)
    python benchmarks/bench_match.py --quick    # 2,000 images, seconds
    python benchmarks/bench_match.py --device cuda --threads 8   # model and OT scoring on CUDA
    python benchmarks/bench_match.py --bank 5000 --weights runs/x/model.safetensors
        # also the approximate round (`--pool-bank`): its pruning time and how much of
        # the exact round's answer it keeps (a trained model makes that a quality figure)

torch and rayon each get `--threads` threads (default 2), set before the work starts.
"""

from __future__ import annotations

import argparse
import os
import time


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images and captions")
    parser.add_argument("--n", type=int, default=None, help="images (and pool captions)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--model", default="otc-vit-tiny")
    parser.add_argument("--device", default="cpu", help="where the model and OT scoring run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-batch", type=int, default=4096)
    parser.add_argument("--image-batch", type=int, default=256)
    parser.add_argument(
        "--recompute-tokens",
        action="store_true",
        help="encode candidates' tokens per batch instead of caching the pool's",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bank", type=int, default=None, help="also run the round with a pool bank of this size"
    )
    parser.add_argument("--weights", default=None, help="a trained model's safetensors")
    args = parser.parse_args()
    n = args.n or (2_000 if args.quick else 50_000)

    # rayon reads its pool size once, at the first call into the engine
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from otcclip.data import fashion_scenes
    from otcclip.matching import MatchConfig, match_round
    from otcclip.models import create_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    bundle = create_model(args.model, weights=args.weights, seed=args.seed, device=args.device)
    t0 = time.perf_counter()
    table = fashion_scenes(n, seed=args.seed, image_size=bundle.image_size)
    build_s = time.perf_counter() - t0
    cfg = MatchConfig(
        k=args.k,
        alpha=0.5,
        eps=0.05,
        iters=50,
        margin=0.05,
        threads=args.threads,
        image_batch=args.image_batch,
        score_batch=args.score_batch,
        cache_tokens=not args.recompute_tokens,
        seed=args.seed,
    )
    print(
        f"bench_match: {n} images x pool {n} captions, k={cfg.k}, model {args.model} "
        f"({args.weights or 'from scratch'}, D={bundle.embed_dim}, image {bundle.image_size}px), "
        f"eps={cfg.eps}, iters={cfg.iters}, alpha={cfg.alpha}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    print(
        f"threads: torch {torch.get_num_threads()}, rayon {os.environ['RAYON_NUM_THREADS']}; "
        f"tokens {'recomputed per batch' if args.recompute_tokens else 'cached float16'}; "
        f"fashion-scenes built in {build_s:.1f} s; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (shared machine: compare stages within one run)"
    )
    rss_before = _peak_rss_mib()
    t0 = time.perf_counter()
    res = match_round(
        bundle,
        table.images,
        table.captions,
        np.arange(n),
        cfg,
        image_classes=table.image_classes,
        caption_classes=table.caption_classes,
    )
    total = time.perf_counter() - t0
    sec = res.report["seconds"]
    embed = sec.get("embed_pool", 0.0) + sec.get("embed_images", 0.0)
    score = sec.get("score", 0.0)
    pairs = n * (cfg.k + 1)
    print(
        f"stages (s): embed {embed:.1f} (captions {sec.get('embed_pool', 0.0):.1f}, "
        f"images {sec.get('embed_images', 0.0):.1f}) | prune {sec.get('prune', 0.0):.2f} | "
        f"score {score:.1f} | assign {sec.get('assign', 0.0):.2f} | "
        f"total {total:.1f}"
        + (
            f" | candidate tokens {sec['embed_candidates']:.1f}"
            if "embed_candidates" in sec
            else ""
        )
    )
    print(
        f"scoring: {pairs} pairs in {score:.1f} s = {pairs / score:,.0f} pairs/s "
        f"(share of round {score / total:.0%}); round: {n / total:,.0f} images/s"
    )
    inputs_mib = table.images.nbytes / 2**20
    print(
        f"memory: peak RSS (VmHWM) {_peak_rss_mib():,.0f} MiB (before the round "
        f"{rss_before:,.0f}); images {inputs_mib:,.0f} MiB, pool features "
        f"{res.report['pool_bytes'] / 2**20:,.0f} MiB"
    )
    rep = res.report
    print(
        f"pairing ({'trained weights' if args.weights else 'untrained model, not a quality figure'}"
        f"): changed {rep['changed']} of {n}, "
        f"distinct captions {rep['distinct']}"
    )
    _doubt_stage(res, table, total, args.threads, args.seed)
    if args.bank is not None:
        _bank_round(res, bundle, table, cfg, args.bank, n)


def _bank_round(exact, bundle, table, cfg, bank: int, n: int) -> None:
    """The same round with the approximate pruning (`MatchConfig.bank`), against the exact one.

    The exact pruning is O(N x M) and the scoring O(N x k), so at N = M the pruning's
    share grows with the pool; from this run's stage times, the pool at which the exact
    pruning would cost as much as the scoring is M x score / prune (both measured here).
    """
    import dataclasses

    import numpy as np

    from otcclip.matching import match_round

    res = match_round(
        bundle,
        table.images,
        table.captions,
        np.arange(n),
        dataclasses.replace(cfg, bank=bank),
        image_classes=table.image_classes,
        caption_classes=table.caption_classes,
    )
    exact_s, bank_s = exact.report["seconds"], res.report["seconds"]
    kept = np.mean(
        [np.isin(a, b).mean() for a, b in zip(exact.candidates, res.candidates, strict=True)]
    )
    same = float(np.mean(exact.caption == res.caption))
    print(
        f"bank {bank} of {n} captions: prune {bank_s.get('prune', 0.0):.2f} s against the "
        f"exact {exact_s.get('prune', 0.0):.2f} s; score {bank_s.get('score', 0.0):.1f} s; "
        f"exact top-{cfg.k} candidates kept {kept:.1%}; same caption assigned {same:.1%}; "
        f"clean pairs of their true content: exact {exact.report.get('clean_true_content', 0):.1%}"
        f", bank {res.report.get('clean_true_content', 0):.1%}"
    )
    prune, score = exact_s.get("prune", 0.0), exact_s.get("score", 0.0)
    if prune > 0 and score > 0:
        print(
            f"crossover: the exact prune is {prune / score:.1%} of the scoring at M = {n}; "
            f"it would equal it at about M = {n * score / prune:,.0f} captions (N = M)"
        )


def _doubt_stage(res, table, round_s: float, threads: int, seed: int) -> None:
    """The fused doubt of an OTCCLIP round on the round's own embeddings (otcclip.doubt).

    The pixel evidence depends on the data only, so a trainer computes it once per
    run; the model-dependent signals run every round. Both are printed against the
    round they join.
    """
    import numpy as np

    from otcclip.doubt import DoubtConfig, doubt_scores, pixel_evidence

    config = DoubtConfig(threads=threads, seed=seed)
    t0 = time.perf_counter()
    pixels = pixel_evidence(table.images, config)
    pixel_s = time.perf_counter() - t0
    lead = np.nan_to_num(res.best_score.astype(np.float64) - res.own_score.astype(np.float64))
    t0 = time.perf_counter()
    doubt_scores(
        res.image_embeddings,
        np.ascontiguousarray(res.pool_embeddings),
        config,
        pixels=pixels,
        lead=lead,
    )
    doubt_s = time.perf_counter() - t0
    print(
        f"doubt: signals + fusion + budget {doubt_s:.1f} s per round = {doubt_s / round_s:.1%} "
        f"of the round (bar: <= 10%); pixel evidence {pixel_s:.1f} s once per run "
        f"= {pixel_s / round_s:.0%} of one round"
    )


if __name__ == "__main__":
    main()
