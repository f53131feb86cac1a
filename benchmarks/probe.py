"""A short tuning probe: the table's training for the first few epochs of its schedule.

Trains one configuration on a poison directory with the table's settings (the demo's
model, batch, lr and epoch count, so that the learning-rate schedule of the first epochs
is the table's), stops after `--stop-after` epochs, and prints one line per epoch:
zero-shot on the reported images, zero-shot on the clean validation split (the tuning
metric), targeted and backdoor ASR. Every probe is appended to `--log` (JSON lines) with
its settings, so that TUNING.md can quote it.

    python benchmarks/probe.py --data runs/p20k --defense none --stop-after 3 \\
        --set augment=images --set image_augment=noise_std=0 --tag "none, image aug, no noise"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from otcclip.atomic import write_text


class StopAfter:
    """A trainer callback that ends the run after `epochs` epochs (a probe of the schedule)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_start(self, ctx: Any) -> None:
        pass

    def on_step_end(self, ctx: Any, info: dict) -> None:
        pass

    def on_checkpoint(self, ctx: Any, path: Path, info: dict) -> None:
        pass

    def on_epoch_end(self, ctx: Any, epoch: int, metrics: dict) -> dict | None:
        if epoch + 1 >= self.epochs:
            raise _Stop
        return None

    def on_train_end(self, ctx: Any, result: Any) -> None:
        pass


class _Stop(Exception):
    pass


class Recorder:
    """Keeps each epoch's metrics line (the evaluation has run before it: callbacks order)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def on_train_start(self, ctx: Any) -> None:
        pass

    def on_step_end(self, ctx: Any, info: dict) -> None:
        pass

    def on_checkpoint(self, ctx: Any, path: Path, info: dict) -> None:
        pass

    def on_epoch_end(self, ctx: Any, epoch: int, metrics: dict) -> dict | None:
        self.epochs.append(dict(metrics))
        ev = metrics.get("eval") or {}
        print(epoch_line(metrics, ev), flush=True)
        return None

    def on_train_end(self, ctx: Any, result: Any) -> None:
        pass


def epoch_line(metrics: dict[str, Any], ev: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        v = ev.get(key)
        return "-" if v is None else f"{100 * v:.1f}%"

    return (
        f"  epoch {metrics['epoch']} {metrics.get('phase', '')}: loss {metrics.get('loss', 0):.3f}"
        f" | zero-shot {pct('zero_shot_top1')} | val {pct('val_zero_shot_top1')}"
        f" | targeted {pct('targeted_asr')} | backdoor {pct('backdoor_asr')}"
        f" | {metrics['seconds']:.0f}s (+{metrics['prepare_seconds']:.0f}s)"
    )


def _parse_set(items: list[str]) -> dict[str, Any]:
    from deftable.rows import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        out[key.strip().replace("-", "_")] = parse_value(raw)
    return out


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a poison directory (otcclip poison)")
    parser.add_argument("--defense", default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8, help="the schedule's length [8]")
    parser.add_argument("--stop-after", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="")
    parser.add_argument("--log", type=Path, default=Path("benchmarks/results/probes.jsonl"))
    args = parser.parse_args(argv)

    import torch

    from otcclip.demo import DemoConfig, train_config
    from otcclip.evaluate import EpochEvaluation
    from otcclip.train import train

    torch.set_num_threads(args.threads)
    demo = DemoConfig(seed=args.seed, threads=args.threads, progress=False, epochs=args.epochs)
    overrides = _parse_set(args.set)
    config = dataclasses.replace(
        train_config(demo, args.defense), data=args.data, out=None, **overrides
    )
    config.validate()
    invocation = "python benchmarks/probe.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    print(f"[probe] {args.tag or args.defense}: {invocation}", flush=True)
    evaluation = EpochEvaluation(
        every=1,
        epochs=args.epochs,
        eval_size=args.eval_size,
        probe_size=0,
        seed=args.seed,
        val_size=args.val_size,
    )
    recorder = Recorder()
    start = time.perf_counter()
    with contextlib.suppress(_Stop):
        train(config, [evaluation, recorder, StopAfter(args.stop_after)])
    record = {
        "tag": args.tag,
        "command": invocation,
        "defense": args.defense,
        "seed": args.seed,
        "overrides": overrides,
        "wall_seconds": time.perf_counter() - start,
        "epochs": [
            {
                "epoch": m["epoch"],
                "phase": m.get("phase"),
                "loss": m.get("loss"),
                "defense": m.get("defense"),
                **{
                    k: (m.get("eval") or {}).get(k)
                    for k in (
                        "zero_shot_top1",
                        "val_zero_shot_top1",
                        "targeted_asr",
                        "backdoor_asr",
                    )
                },
            }
            for m in recorder.epochs
        ],
    }
    args.log.parent.mkdir(parents=True, exist_ok=True)
    old = args.log.read_text() if args.log.exists() else ""
    write_text(args.log, old + json.dumps(record, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run())
