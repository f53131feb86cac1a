"""Pruning benchmark: otmatch.topk against its peers, measured side by side in one run.

Peers, on the same data (L2-normalised float32 rows, seeded):
- torch: chunked ``mm`` + ``topk`` (the obvious PyTorch approach);
- faiss: ``IndexFlatIP`` (exact inner-product search), when faiss is installed;
- SGEMM: a plain ``torch.mm`` of square matrices with the same FLOP count, the
  machine's own matrix-multiply throughput: the physical limit of any exact method.

Every method runs in its own fresh subprocess with the same thread count
(``torch.set_num_threads``, ``faiss.omp_set_num_threads``, ``threads=`` for
otmatch), after a small warm-up call. Peak memory is the growth of the
process's peak resident set size (VmHWM, reset through /proc/self/clear_refs
after the inputs exist) while the method runs: it counts everything the method
allocates natively (outputs, score chunks, faiss's copy of the pool), which
tracemalloc cannot see. The inputs themselves are the baseline.

Also timed: otmatch.assign on N x k candidates (argmax against numpy's
argmax, and capacity against the 1 s target).

    python benchmarks/bench_topk.py            # N=20000, M=100000, d=512, k=16, 2 threads
    python benchmarks/bench_topk.py --quick    # a small shape, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _data(n: int, m: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p = rng.standard_normal((m, d), dtype=np.float32)
    for s in range(0, m, 65536):  # normalise in place, in slices: no full-size temporary
        p[s : s + 65536] /= np.linalg.norm(p[s : s + 65536], axis=1, keepdims=True)
    return q, p


# --------------------------------------------------------------------------- methods


def _otmatch(q, p, k, threads, args):
    from otcclip import otmatch

    return otmatch.topk(q, p, k, threads=threads)


def _torch(q, p, k, threads, args):
    import torch

    qt, pt = torch.from_numpy(q), torch.from_numpy(p)
    idx = np.empty((len(q), k), np.int64)
    sc = np.empty((len(q), k), np.float32)
    for s in range(0, len(q), args.torch_chunk):
        v, i = torch.topk(qt[s : s + args.torch_chunk] @ pt.T, k, dim=1)
        idx[s : s + len(i)] = i.numpy()
        sc[s : s + len(v)] = v.numpy()
    return idx, sc


def _faiss(q, p, k, threads, args):
    import faiss

    index = faiss.IndexFlatIP(p.shape[1])
    index.add(p)
    sc, idx = index.search(q, k)
    return idx.astype(np.int64), sc


def _sgemm(q, p, k, threads, args):
    import torch

    side, reps = _sgemm_shape(2.0 * len(q) * len(p) * q.shape[1])
    a = torch.randn(side, side)
    b = torch.randn(side, side)
    for _ in range(reps):
        torch.mm(a, b)
    return None


def _sgemm_shape(flop: float) -> tuple[int, int]:
    """Square SGEMM side and repetitions with about `flop` floating-point operations."""
    side = 4096 if flop >= 2 * 4096**3 else 1024
    return side, max(1, round(flop / (2 * side**3)))


METHODS = {"otmatch": _otmatch, "torch": _torch, "faiss": _faiss, "sgemm": _sgemm}


def _worker(args: argparse.Namespace) -> None:
    """Runs one method in this (fresh) process and prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    q, p = _data(args.n, args.m, args.d, args.seed)
    fn = METHODS[args.worker]
    fn(q[:64], p[: max(args.k, 4096)], args.k, args.threads, args)  # warm-up: threads, kernels
    base = _status("VmRSS")
    reset = _reset_peak()
    times = []
    out = None
    for _ in range(args.repeat):
        t = time.perf_counter()
        out = fn(q, p, args.k, args.threads, args)
        times.append(time.perf_counter() - t)
    peak = _status("VmHWM") - base
    result = {"seconds": min(times), "peak_growth": peak, "peak_reset": reset}
    if args.worker == "sgemm":
        side, reps = _sgemm_shape(2.0 * args.n * args.m * args.d)
        result["flop"] = 2.0 * side**3 * reps
        result["shape"] = f"{side}^3 x {reps}"
    if out is not None:
        np.save(args.save, out[0])
    print(json.dumps(result))


def _run_worker(method: str, args: argparse.Namespace, save: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", method, "--save", str(save)]
    for key in ("n", "m", "d", "k", "threads", "seed", "repeat", "torch_chunk"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        if method == "faiss" and "No module named 'faiss'" in r.stderr:
            return None
        raise RuntimeError(f"{method} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- assign


def _bench_assign(n: int, k: int, m: int, seed: int) -> None:
    from otcclip import otmatch

    rng = np.random.default_rng(seed)
    cand = rng.integers(0, m, size=(n, k), dtype=np.int64)
    scores = -np.sort(-rng.random((n, k), dtype=np.float32), axis=1)  # rows as topk writes them
    own = np.arange(n, dtype=np.int64) % m

    def best(f, repeat=3):
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    t_np = best(lambda: cand[np.arange(n), np.argmax(scores, axis=1)])
    t_arg = best(lambda: otmatch.assign(cand, scores))
    t_cap = best(lambda: otmatch.assign(cand, scores, own=own, method="capacity", capacity=4))
    t_cap_m = best(
        lambda: otmatch.assign(cand, scores, own=own, method="capacity", capacity=4, margin=0.05)
    )
    print(f"assign N={n:,} k={k} (pool {m:,}):")
    print(f"  argmax            {t_arg * 1e3:8.1f} ms   numpy argmax {t_np * 1e3:.1f} ms")
    print(f"  otmatch/numpy argmax = {t_np / t_arg:.2f}x (assign also validates, computes stats)")
    print(f"  capacity=4        {t_cap * 1e3:8.1f} ms   target < 1000 ms: {_ok(t_cap < 1.0)}")
    print(f"  capacity, margin  {t_cap_m * 1e3:8.1f} ms   target < 1000 ms: {_ok(t_cap_m < 1.0)}")


def _ok(flag: bool) -> str:
    return "met" if flag else "NOT met"


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--m", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per method (best is kept)")
    ap.add_argument("--torch-chunk", type=int, default=1024, help="queries per torch mm chunk")
    ap.add_argument("--assign-n", type=int, help="default 1,000,000 (100,000 with --quick)")
    ap.add_argument("--quick", action="store_true", help="N=2000, M=20000, assign N=100000")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.n, args.m, args.repeat = 2000, 20_000, 3
    if args.assign_n is None:
        args.assign_n = 100_000 if args.quick else 1_000_000

    from otcclip import otmatch

    flop = 2.0 * args.n * args.m * args.d
    inputs = (args.n + args.m) * args.d * 4
    outputs = args.n * args.k * (8 + 4)
    print(
        f"topk N={args.n:,} M={args.m:,} d={args.d} k={args.k}, {args.threads} threads, "
        f"otmatch kernel {otmatch.kernel_name()}; inputs {inputs / MIB:.1f} MiB, "
        f"outputs {outputs / MIB:.1f} MiB"
    )
    skip = set(filter(None, args.skip.split(",")))
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("otmatch", "torch", "faiss", "sgemm"):
            if method in skip:
                continue
            r = _run_worker(method, args, Path(tmp) / f"{method}.npy")
            if r is None:
                print(f"  {method:8s} not installed")
                continue
            if method != "sgemm":
                r["indices"] = np.load(Path(tmp) / f"{method}.npy")
            res[method] = r
    for method, r in res.items():
        gflops = r.get("flop", flop) / r["seconds"] / 1e9
        extra = f" ({r['shape']})" if "shape" in r else ""
        print(
            f"  {method:8s} {r['seconds']:8.3f} s {gflops:7.1f} GFLOP/s"
            f"   peak memory +{r['peak_growth'] / MIB:7.1f} MiB over the inputs{extra}"
        )
    ot = res.get("otmatch")
    if ot is not None:
        ot_rate = flop / ot["seconds"]
        for peer in ("torch", "faiss"):
            if peer in res:
                print(f"otmatch/{peer} = {res[peer]['seconds'] / ot['seconds']:.2f}x")
        if "sgemm" in res:
            sg = res["sgemm"]
            frac = ot_rate / (sg["flop"] / sg["seconds"])
            print(f"otmatch/sgemm = {frac:.2f} of the machine's SGEMM throughput (target >= 0.70)")
        if "torch" in res:
            a, b = ot["indices"], res["torch"]["indices"]
            same = (a == b).mean()
            sets = np.mean([len(np.intersect1d(x, y)) / args.k for x, y in zip(a, b, strict=True)])
            print(f"index agreement with torch: {same:.4%} same position, {sets:.4%} same set")
        ratio = (inputs + ot["peak_growth"]) / (inputs + outputs)
        print(
            f"otmatch peak memory = {ratio:.3f} x (inputs + outputs) (target <= 1.10)"
            + ("" if ot["peak_reset"] else "  [peak not reset: upper bound]")
        )
    _bench_assign(args.assign_n, args.k, max(args.m, args.assign_n), args.seed)


if __name__ == "__main__":
    main()
