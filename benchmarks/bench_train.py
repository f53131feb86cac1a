"""Seconds per training epoch for each defense, on the same data, model and batch size.

Each defense trains `--epochs` epochs from scratch with its defense active from
the first epoch (W = 0) and its own period R, so that the timed epochs hold its
regular work: OTCCLIP's L_inter and one matching round every R epochs, RoCLIP's
nearest-neighbour epochs every R, SafeCLIP's per-epoch similarity pass, GMM and
two views. The first epoch is a warm-up (allocations, thread pools, SafeCLIP's
low-learning-rate epoch) and is not timed; the rest are averaged, so a round
every R epochs is amortised over R. Ratios are against `none` measured in the
same run.

    python benchmarks/bench_train.py            # 4,000 scenes, batch 256, 3 epochs
    python benchmarks/bench_train.py --quick    # a small smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFENSES = ("none", "roclip", "safeclip", "otcclip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="1 warm-up + timed epochs")
    parser.add_argument("--model", default="otc-vit-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--match-every", type=int, default=None, help="R (default: per defense)")
    parser.add_argument("--defenses", default=",".join(DEFENSES))
    parser.add_argument("--quick", action="store_true", help="1,024 scenes, batch 128")
    args = parser.parse_args()
    if args.quick:
        args.scenes, args.batch_size = 1024, 128
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first one is not timed)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch
    from otcclip.data import fashion_scenes
    from otcclip.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    table = fashion_scenes(args.scenes, seed=0)
    steps = len(table) // args.batch_size
    print(
        f"bench_train: model {args.model}, {len(table)} fashion-scenes, batch {args.batch_size} "
        f"({steps} steps/epoch), torch threads {torch.get_num_threads()}, "
        f"{args.epochs - 1} timed epochs after 1 warm-up epoch"
    )
    rows = []
    for defense in args.defenses.split(","):
        config = TrainConfig(
            defense=defense,
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            threads=args.threads,
            progress=False,
            warmup_epochs=0,
            match_every=args.match_every,
            log_every=10**9,
            ot_compile="on",  # compiled in the untimed first epoch
        )
        start = time.perf_counter()
        result = train(config, table=table)
        wall = time.perf_counter() - start
        timed = result.metrics[1:]
        train_s = sum(m["seconds"] for m in timed) / len(timed)
        prep_s = sum(m["prepare_seconds"] for m in timed) / len(timed)
        phases = sorted({m["phase"] for m in timed})
        stages = {}
        for m in timed:
            for stage, sec in (m.get("defense") or {}).get("seconds_by_stage", {}).items():
                stages[stage] = stages.get(stage, 0.0) + sec / len(timed)
        rows.append((defense, ",".join(phases), train_s, prep_s, wall, stages))
        print(f"  {defense}: done in {wall:.1f}s", file=sys.stderr)

    base = next((r[2] + r[3] for r in rows if r[0] == "none"), None)
    header = f"{'defense':<10}{'phases':<22}{'train s/ep':>11}{'prep s/ep':>11}{'total s/ep':>12}"
    print(header + f"{'vs none':>9}")
    print("-" * (len(header) + 9))
    for defense, phases, train_s, prep_s, _, stages in rows:
        total = train_s + prep_s
        ratio = f"{total / base:.2f}x" if base else "n/a"
        print(f"{defense:<10}{phases:<22}{train_s:>11.2f}{prep_s:>11.2f}{total:>12.2f}{ratio:>9}")
        if stages:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(stages.items()))
            print(f"{'':<10}matching round per epoch: {parts}")
    otc = next((r for r in rows if r[0] == "otcclip"), None)
    if otc is not None and base:
        ratio = (otc[2] + otc[3]) / base
        verdict = "met" if ratio <= 1.3 else "NOT met"
        print(f"target otcclip <= 1.30x none: {ratio:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
