"""Streamed training's memory and speed as the data grows: memory must not grow with the images.

Issue 16: pairs are streamed, not held. For each size N (default 20,000, 100,000 and
400,000 fashion-scenes pairs) this writes clean shards once with the documented
command (`otcclip poison --scenes N --format shards`, cached under --cache), then
measures in a fresh process per size, so that each size's peak memory is its own.

`--defense otcclip` (the default: the issue's measure) runs the trainer's streamed OTCCLIP
(`train --stream --defense otcclip --round-embeddings training`, otc-vit-tiny from
scratch, one warm-up epoch, a round before the second): the pixel pass and the warm-up's
screen (`otcclip.stream_pixels`: every image read once, then the detectors by blocks), one
epoch (DataLoader workers decode and preprocess; the training pass keeps every pair's
embeddings), then the first round from those embeddings, stopped at the second epoch's
first step. Printed: training pairs per second (steps x batch / step seconds), the share
of step time spent waiting for the next batch (the trainer's `data_wait_share`), also
after the first step (whose wait starts the workers, each reading a whole shard before
its first batch), the time of the pixel pass and screen and of the round (as the trainer
prepares those epochs), and peak RSS of the trainer and of its largest child process: the
pixel pass runs in a process of its own (its peak is printed too), the DataLoader workers
fork from the trainer. The trainer's memory grows with N by design only through the kept
N x D float16 embeddings and the id map (about 290 bytes a pair at D = 64) while it trains,
and, while a round runs, the judged pairs' pixel evidence it reads from disk (about 650)
and the round's float32 copy of the embeddings.

`--defense none` is the session-12 measure: plain streamed training for one epoch or its
first --max-steps steps; then, each in its own process, one OTCCLIP matching round that
re-embeds every pair (the in-memory round's engine path, fed the shards' images batch by
batch through `matching.match_image_batches`) and the pixel pass alone (its time, the part
spent reading, the evidence it keeps, its peak RSS). `--skip-round` and `--skip-pixels`
leave those out.

The line before the last says what the trainer's peak gained per pair between the smallest
and the largest size. The last line is the ratio of the training peak RSS at the largest size to the
smallest (the larger of the trainer's and the largest child's ratios): streaming keeps it
<= 1.3. The model is created from scratch (timings do not depend on what it has
learnt). torch and rayon get --threads threads each; build the extension in release
mode (maturin develop --release, as scripts/setup.sh does): a debug build is far slower.

    python benchmarks/bench_scale.py                               # hours on 2 cores
    python benchmarks/bench_scale.py --sizes 2000 8000 --shard-size 500
    python benchmarks/bench_scale.py --defense none --max-steps 50 --skip-round
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_RESULT = "bench_scale result: "  # prefix of a child process's JSON line
_LIMIT = 1.3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 400_000])
    parser.add_argument(
        "--defense",
        choices=["otcclip", "none"],
        default="otcclip",
        help="otcclip: the trainer's streamed OTCCLIP, one epoch and its first round; none: "
        "plain streamed training, the round and the pixel pass measured apart",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="train this many steps (--defense none)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--prefetch", type=int, default=2, help="batches each worker prepares")
    parser.add_argument("--threads", type=int, default=1, help="torch and rayon threads")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=10_000, help="pairs per shard")
    parser.add_argument("--model", default="otc-vit-tiny")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_scale"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-round", action="store_true", help="training only (the round takes longest)"
    )
    parser.add_argument(
        "--skip-pixels", action="store_true", help="no pixel pass (streamed OTCCLIP's first step)"
    )
    parser.add_argument(
        "--child", choices=["train", "round", "pixels", "otcclip"], help=argparse.SUPPRESS
    )
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _set_threads(args.threads)
    if args.child is not None:
        children = {"train": _train, "round": _round, "pixels": _pixels, "otcclip": _otcclip}
        result = children[args.child](args)
        print(_RESULT + json.dumps(result), flush=True)
        return 0
    _check(args)
    _print_header(args)
    peaks: list[tuple[int, float, float]] = []
    for n in args.sizes:
        data = _shards(n, args)
        if args.defense == "otcclip":
            trained = _in_child("otcclip", data, args)
            print(_otcclip_line(n, trained, args), flush=True)
        else:
            trained = _in_child("train", data, args)
            matched = None if args.skip_round else _in_child("round", data, args)
            pixels = None if args.skip_pixels else _in_child("pixels", data, args)
            print(_size_line(n, trained, matched, pixels, args), flush=True)
        peaks.append((n, trained["rss_trainer_mib"], trained["rss_worker_mib"]))
    print(_growth_line(peaks))
    print(_ratio_line(peaks))
    return 0


def _set_threads(threads: int) -> None:
    """Before torch and the engine start: rayon reads its pool size once."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)


def _check(args: argparse.Namespace) -> None:
    if min(args.sizes) < args.batch_size:
        raise SystemExit(f"every size must hold a batch of {args.batch_size} pairs")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit("--max-steps must be >= 1")
    if args.defense == "otcclip" and args.max_steps is not None:
        raise SystemExit("--max-steps would stop the epoch before its round: use --defense none")
    if len(args.sizes) < 2:
        raise SystemExit("give at least two --sizes: the last line compares the extremes")


def _print_header(args: argparse.Namespace) -> None:
    import torch

    from otcclip import otmatch

    torch.set_num_threads(args.threads)
    span = "one epoch" if args.max_steps is None else f"the first {args.max_steps} steps"
    if args.defense == "otcclip":
        print(
            f"bench_scale: clean fashion-scenes shards ({args.shard_size} pairs per shard), "
            f"model {args.model} from scratch, streamed OTCCLIP (--round-embeddings training): "
            f"the pixel pass and screen, one epoch (batch {args.batch_size}, {args.workers} "
            f"workers x prefetch {args.prefetch}), then its first round; a fresh process per size"
        )
    else:
        print(
            f"bench_scale: clean fashion-scenes shards ({args.shard_size} pairs per shard), model "
            f"{args.model} from scratch, defense none streamed, batch {args.batch_size}, {span} "
            f"per size, {args.workers} workers x prefetch {args.prefetch}; "
            + (
                "no matching round (--skip-round)"
                if args.skip_round
                else "then one OTCCLIP matching round over the same pairs (the defense's "
                "settings, images read batch by batch)"
            )
            + ("" if args.skip_pixels else ", then streamed OTCCLIP's pixel pass")
            + "; a fresh process per size"
        )
    print(
        f"threads: torch {torch.get_num_threads()}, rayon {os.environ['RAYON_NUM_THREADS']} "
        f"(engine kernel {otmatch.kernel_name()}; build the extension in release mode); load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


def _shards(n: int, args: argparse.Namespace) -> Path:
    """The poison directory of n clean scenes, written once with the documented command."""
    out = args.cache / f"scenes-{n}-seed{args.seed}-shard{args.shard_size}"
    if (out / "train" / "shards.json").is_file():
        return out
    command = [sys.executable, "-m", "otcclip.cli", "poison", "--out", str(out)]
    command += ["--scenes", str(n), "--format", "shards", "--shard-size", str(args.shard_size)]
    command += ["--seed", str(args.seed), "--force"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=_child_env())
    print(f"  wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return out


def _child_env() -> dict[str, str]:
    """This interpreter's import path for the children, so they run the same code."""
    path = os.pathsep.join(p for p in sys.path if p)
    return dict(os.environ, PYTHONPATH=path)


def _in_child(kind: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
    command += ["--data", str(data), "--workers", str(args.workers)]
    command += ["--prefetch", str(args.prefetch), "--threads", str(args.threads)]
    command += ["--batch-size", str(args.batch_size), "--model", args.model]
    command += ["--seed", str(args.seed)]
    if args.max_steps is not None:
        command += ["--max-steps", str(args.max_steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    lines = [x for x in done.stdout.splitlines() if x.startswith(_RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {kind} process for {data} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT) :])


class _Stop(Exception):
    """Raised by a step recorder: after --max-steps steps, or once the round is made."""


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """Child: the streamed training run; step times, waits and peak memory."""
    from otcclip.train import Callback, train

    class Steps(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.waits: list[float] = []

        def on_step_end(self, ctx: Any, info: dict[str, Any]) -> None:
            self.seconds.append(info["seconds"])
            self.waits.append(info["data_seconds"])
            if args.max_steps is not None and len(self.seconds) >= args.max_steps:
                raise _Stop

    steps = Steps()
    with contextlib.suppress(_Stop):
        train(_stream_config(args, defense="none", epochs=1), [steps])
    return _measured(steps.seconds, steps.waits, args)


def _stream_config(args: argparse.Namespace, **changes: Any) -> Any:
    """The streamed run both training children make, with their own defense and epochs."""
    from otcclip.train import TrainConfig

    return TrainConfig(
        data=str(args.data),
        stream=True,
        model=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        prefetch=args.prefetch,
        threads=args.threads,
        seed=args.seed,
        progress=False,
        log_every=10**9,
        **changes,
    )


def _measured(seconds: list[float], waits: list[float], args: argparse.Namespace) -> dict:
    """Step speed, the wait for data, and the peak memory of the trainer and its workers."""
    import gc

    gc.collect()  # the stopped epoch's DataLoader: its workers are joined, then counted
    step_s = sum(seconds)
    return {
        "steps": len(seconds),
        "pairs_per_s": len(seconds) * args.batch_size / step_s,
        "data_wait_share": sum(waits) / step_s,
        "first_wait_s": waits[0],
        "later_wait_share": sum(waits[1:]) / max(sum(seconds[1:]), 1e-9),
        "rss_trainer_mib": _peak_mib(resource.RUSAGE_SELF),
        "rss_worker_mib": _peak_mib(resource.RUSAGE_CHILDREN),
    }


def _otcclip(args: argparse.Namespace) -> dict[str, Any]:
    """Child: the trainer's streamed OTCCLIP, one epoch and its first round; peak memory."""
    from otcclip.train import Callback, train

    class Recorder(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.waits: list[float] = []
            self.plans: dict[int, tuple[dict[str, Any], float]] = {}

        def on_epoch_start(
            self, ctx: Any, epoch: int, info: dict[str, Any], seconds: float
        ) -> None:
            self.plans[epoch] = (dict(info), seconds)

        def on_step_end(self, ctx: Any, info: dict[str, Any]) -> None:
            if info["epoch"] > 1:  # the round is made: its epoch is not measured
                raise _Stop
            self.seconds.append(info["seconds"])
            self.waits.append(info["data_seconds"])

    config = _stream_config(
        args,
        defense="otcclip",
        round_embeddings="training",
        warmup_epochs=1,
        match_every=1,
        epochs=2,
    )
    recorder = Recorder()
    with contextlib.suppress(_Stop):
        train(config, [recorder])
    screen, pass_s = recorder.plans[0]
    round_info, round_s = recorder.plans[1]
    return {
        **_measured(recorder.seconds, recorder.waits, args),
        "pass_s": pass_s,
        "rss_pass_mib": float(screen.get("pixel_pass_peak_rss_mib", 0.0)),
        "screened": int(screen.get("screened", 0)),
        "round_s": round_s,
        "judged": int(round_info["judged"]),
        "left_out": int(round_info["sitting_out"]),
    }


def _round(args: argparse.Namespace) -> dict[str, Any]:
    """Child: one OTCCLIP matching round over the shards' pairs, images read batch by batch."""
    import numpy as np

    from otcclip.data import PairStream, pairs_in
    from otcclip.data.sources import decode_caption
    from otcclip.defenses import OTCCLIPDefense
    from otcclip.matching import match_image_batches
    from otcclip.models import create_model
    from otcclip.train import TrainConfig

    config = OTCCLIPDefense(TrainConfig(defense="otcclip", threads=args.threads)).match_config()
    bundle = create_model(args.model, seed=args.seed)
    pairs = PairStream(pairs_in(args.data), shuffle=False)  # one fixed order for both passes
    start = time.perf_counter()
    captions = [decode_caption(raw.caption) or "" for raw, _ in pairs.raws()]

    def batches() -> Any:
        held: list[np.ndarray] = []
        for pair in pairs:
            held.append(pair.image)
            if len(held) == config.image_batch:
                yield np.stack(held)
                held = []
        if held:
            yield np.stack(held)

    own = np.arange(len(captions), dtype=np.int64)
    result = match_image_batches(bundle, batches(), captions, own, config)
    return {
        "seconds": time.perf_counter() - start,
        "stages": result.report["seconds"],
        "changed": int(result.changed.sum()),
        "rss_mib": _peak_mib(resource.RUSAGE_SELF),
    }


def _pixels(args: argparse.Namespace) -> dict[str, Any]:
    """Child: the pixel pass of a streamed OTCCLIP run over the shards' pairs."""
    import tempfile

    from otcclip.data import PairStream, pairs_in
    from otcclip.doubt import DoubtConfig
    from otcclip.stream_pixels import stream_pixel_evidence
    from otcclip.stream_rounds import IdSlots

    pairs = PairStream(pairs_in(args.data))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        done = stream_pixel_evidence(
            pairs,
            IdSlots(int(pairs.n_pairs or 0)),
            DoubtConfig(threads=args.threads),
            workdir=workdir,
            workers=args.workers,
            log=lambda line: None,
        )
    return {
        "seconds": time.perf_counter() - start,
        "read_seconds": done.read_seconds,
        "evidence_mib": sum(a.nbytes for a in done.evidence.state_dict().values()) / 2**20,
        "rss_mib": max(_peak_mib(resource.RUSAGE_SELF), done.peak_rss_mib or 0.0),
    }


def _peak_mib(who: int) -> float:
    """Peak resident memory in MiB (Linux reports ru_maxrss in KiB; for RUSAGE_CHILDREN it is
    the largest of the reaped descendants: the DataLoader workers and the pixel pass's
    process with its own workers)."""
    return resource.getrusage(who).ru_maxrss / 1024


def _size_line(
    n: int,
    trained: dict[str, Any],
    matched: dict[str, Any] | None,
    pixels: dict[str, Any] | None,
    args: argparse.Namespace,
) -> str:
    worker = f" + largest worker {trained['rss_worker_mib']:.0f}" if args.workers else ""
    line = (
        f"N={n}: train {trained['steps']} steps x {args.batch_size}: "
        f"{trained['pairs_per_s']:.0f} pairs/s, waiting on data "
        f"{100 * trained['data_wait_share']:.1f}% of step time (the first step's "
        f"{trained['first_wait_s']:.1f}s starts the workers; after it "
        f"{100 * trained['later_wait_share']:.1f}%), peak RSS trainer "
        f"{trained['rss_trainer_mib']:.0f}{worker} MiB | "
    )
    if matched is None:
        line += "round not measured (--skip-round)"
    else:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(matched["stages"].items()))
        line += (
            f"round {matched['seconds']:.1f}s ({stages}; the rest reading shards), re-paired "
            f"{matched['changed']}, peak RSS {matched['rss_mib']:.0f} MiB"
        )
    if pixels is None:
        return line + " | pixel pass not measured (--skip-pixels)"
    return line + (
        f" | pixel pass {pixels['seconds']:.1f}s (reading {pixels['read_seconds']:.1f}s), "
        f"evidence {pixels['evidence_mib']:.2f} MiB, peak RSS {pixels['rss_mib']:.0f} MiB"
    )


def _otcclip_line(n: int, measured: dict[str, Any], args: argparse.Namespace) -> str:
    worker = (
        f" + largest child {measured['rss_worker_mib']:.0f} MiB (the pixel pass's process "
        f"{measured['rss_pass_mib']:.0f} MiB, or a DataLoader worker)"
    )
    return (
        f"N={n}: streamed OTCCLIP | pixel pass and screen {measured['pass_s']:.2f}s "
        f"({measured['screened']} screened) | epoch {measured['steps']} steps x "
        f"{args.batch_size}: {measured['pairs_per_s']:.0f} pairs/s, waiting on data "
        f"{100 * measured['data_wait_share']:.1f}% of step time (the first step's "
        f"{measured['first_wait_s']:.1f}s starts the workers; after it "
        f"{100 * measured['later_wait_share']:.1f}%) | round {measured['round_s']:.2f}s "
        f"({measured['judged']} judged, {measured['left_out']} left out) | peak RSS trainer "
        f"{measured['rss_trainer_mib']:.0f} MiB{worker}"
    )


def _growth_line(peaks: list[tuple[int, float, float]]) -> str:
    """What the trainer's peak gained per pair from the smallest size to the largest: the
    per-pair state (kept embeddings, pixel evidence, a round's working arrays)."""
    (n0, small, _), (n1, large, _) = min(peaks), max(peaks)
    per_pair = (large - small) * 2**20 / max(1, n1 - n0)
    return (
        f"trainer peak RSS {small:.0f} -> {large:.0f} MiB from {n0} to {n1} pairs: "
        f"{per_pair:,.0f} bytes a pair"
    )


def _ratio_line(peaks: list[tuple[int, float, float]]) -> str:
    """Largest size against smallest, for the trainer and the worker; the larger ratio counts."""
    small = min(peaks)
    large = max(peaks)
    ratios = [large[1] / small[1]]
    if small[2] > 0:
        ratios.append(large[2] / small[2])
    ratio = max(ratios)
    verdict = "met" if ratio <= _LIMIT else "NOT met"
    return f"peak RSS ratio largest/smallest: {ratio:.2f} (<= {_LIMIT}: {verdict})"


if __name__ == "__main__":
    sys.exit(main())
