"""The end-to-end demo: poison fashion-scenes, train with and without a defense, compare.

This is the project's main job on the embedded default, and a template for a
user's own comparison: every step is an ordinary library call (or CLI
command, recorded in the results), so each can be rerun alone.

    fashion-scenes -> targeted poisoning + BadNet -> train (none, otcclip, ...)
    -> evaluate each epoch -> table + plots + results.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from otcclip.atomic import write_text

DEFENSES = ("none", "otcclip")
ALL_DEFENSES = ("clean", "none", "roclip", "safeclip", "otcclip")


@dataclass
class DemoConfig:
    """Sizes chosen so that `none` + `otcclip` finish in about 12-15 minutes on 2 CPU cores."""

    out: str = "runs/demo"
    scenes: int = 20000
    max_items: int = 2
    image_size: int = 56
    model: str = "otc-vit-tiny"
    epochs: int = 8
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0
    threads: int | None = None
    defenses: tuple[str, ...] = DEFENSES
    target_label: str = "bag"
    n_targets: int = 8
    n_captions: int = 40
    n_backdoor: int = 200
    # the adaptive backdoor's poison count where one is built (the results table's
    # adaptive rows; the demo builds none); None: n_backdoor
    n_adaptive: int | None = None
    # copies per target of the varied-copies targeted attack where one is built (the
    # results table's varied rows; the demo builds none); None: n_captions
    n_varied: int | None = None
    # their per-copy variation: a shift of up to copy_shift px and noise of sigma copy_noise
    # (the strongest of the varied attacks probed without a defense: TUNING.md, session 10)
    copy_shift: int = 1
    copy_noise: float = 2.0
    eval_size: int = 1000
    probe_size: int = 1000
    progress: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    defense: str
    metrics: list[dict[str, Any]]
    final: dict[str, Any]
    seconds_per_epoch: float
    command: str


def build_poisoned_data(config: DemoConfig) -> tuple[Any, list[Any], Any]:
    """The clean scenes, the attacks' manifests and the poisoned table, written to out/poisoned."""
    from otcclip.attacks import backdoor, poisoned_ids, save_manifests, targeted_poison
    from otcclip.data import fashion_scenes, write_pairs

    clean = fashion_scenes(
        config.scenes, seed=config.seed, image_size=config.image_size, max_items=config.max_items
    )
    table, targeted = targeted_poison(
        clean, config.n_targets, config.n_captions, config.target_label, seed=config.seed + 1
    )
    table, badnet = backdoor(
        table,
        "badnet",
        config.n_backdoor,
        config.target_label,
        seed=config.seed + 2,
        exclude_ids=poisoned_ids([targeted]),
    )
    manifests = [targeted, badnet]
    directory = Path(config.out) / "poisoned"
    write_pairs(table, directory / "train.parquet")
    save_manifests(directory, manifests, {"n_rows": len(table), "scenes": config.scenes})
    if "clean" in config.defenses:
        # what the clean run trains on, so that its recorded command reruns it exactly
        write_pairs(clean, Path(config.out) / "clean-data" / "train.parquet")
    return clean, manifests, table


def train_config(config: DemoConfig, defense: str) -> Any:
    from otcclip.train import TrainConfig

    settings = {
        "defense": "none" if defense == "clean" else defense,
        "model": config.model,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "out": str(Path(config.out) / defense),
        "threads": config.threads,
        "progress": config.progress,
        "eval_every": 1,
        "checkpoint_every": 0,
        **config.train_overrides,
    }
    return TrainConfig(**settings)


def run_defense(config: DemoConfig, defense: str, clean: Any, poisoned: Any, manifests: list[Any]):
    """Train one defense (or `clean`: no defense on the unpoisoned scenes) and summarise it."""
    from otcclip.evaluate import EpochEvaluation
    from otcclip.train import train

    tc = train_config(config, defense)
    table = clean if defense == "clean" else poisoned
    evaluation = EpochEvaluation(
        every=1,
        epochs=config.epochs,
        eval_size=config.eval_size,
        probe_size=config.probe_size,
        seed=config.seed,
        manifests=manifests,
    )
    result = train(tc, [evaluation], table=table, manifests=[] if defense == "clean" else manifests)
    metrics = list(result.metrics)
    final = dict((metrics[-1].get("eval") or {}) if metrics else {})
    seconds = [m["seconds"] + m.get("prepare_seconds", 0.0) for m in metrics]
    return RunSummary(
        defense=defense,
        metrics=metrics,
        final=final,
        seconds_per_epoch=float(np.mean(seconds)) if seconds else float("nan"),
        command=_train_command(tc, config, defense),
    )


def _train_command(tc: Any, config: DemoConfig, defense: str) -> str:
    from otcclip.commands.train import command_line

    data = Path(config.out) / ("clean-data" if defense == "clean" else "poisoned")
    exact = dataclasses.replace(tc, data=str(data), progress=True, threads=None)
    return command_line(exact, config.eval_size, config.probe_size)


def _pct(value: Any) -> str:
    # None (not measured) and NaN (nothing to measure, e.g. no pair re-paired) print as "-".
    if value is None or value != value:
        return "   -  "
    return f"{100.0 * float(value):5.1f}%"


def last_round(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rounds = [m["defense"] for m in metrics if "round" in (m.get("defense") or {})]
    return rounds[-1] if rounds else {}


def results_table(runs: Sequence[RunSummary]) -> str:
    """One line per defense; the columns the README quotes."""
    header = (
        f"{'defense':<10}{'targeted ASR':>14}{'backdoor ASR':>14}{'zero-shot':>11}"
        f"{'lin. probe':>12}{'s/epoch':>9}{'re-pair prec.':>15}{'clean kept':>12}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        f = run.final
        rnd = last_round(run.metrics)
        lines.append(
            f"{run.defense:<10}{_pct(f.get('targeted_asr')):>14}{_pct(f.get('backdoor_asr')):>14}"
            f"{_pct(f.get('zero_shot_top1')):>11}{_pct(f.get('linear_probe')):>12}"
            f"{run.seconds_per_epoch:>9.1f}{_pct(rnd.get('changed_precision')):>15}"
            f"{_pct(rnd.get('clean_kept')):>12}"
        )
    return "\n".join(lines)


def run_demo(config: DemoConfig, echo: Any = print) -> list[RunSummary]:
    """Everything the README's main command does; returns one summary per defense."""
    from otcclip.attacks import manifest_summary
    from otcclip.plots import plot_epochs, plot_rounds

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    echo(f"[demo] building {config.scenes} fashion-scenes and poisoning them (seed {config.seed})")
    clean, manifests, poisoned = build_poisoned_data(config)
    echo(manifest_summary(manifests, len(poisoned)))
    runs = []
    for defense in config.defenses:
        echo(f"[demo] training '{defense}' for {config.epochs} epochs")
        runs.append(run_defense(config, defense, clean, poisoned, manifests))
        echo(results_table(runs))
    table = results_table(runs)
    plot_epochs({r.defense: r.metrics for r in runs}, out / "epochs.png")
    has_rounds = plot_rounds({r.defense: r.metrics for r in runs}, out / "rounds.png")
    minutes = (time.perf_counter() - start) / 60.0
    results = {
        "config": dataclasses.asdict(config),
        "table": table,
        "minutes": minutes,
        "runs": [
            {
                "defense": r.defense,
                "command": r.command,
                "final": r.final,
                "seconds_per_epoch": r.seconds_per_epoch,
                "last_round": last_round(r.metrics),
            }
            for r in runs
        ],
    }
    write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    write_text(out / "results.md", _markdown(config, runs, table, minutes))
    echo("")
    echo(table)
    plots = "epochs.png" + (", rounds.png" if has_rounds else "")
    echo(f"[demo] {minutes:.1f} min; wrote {out}/results.md, results.json, {plots}")
    return runs


def _markdown(config: DemoConfig, runs: Sequence[RunSummary], table: str, minutes: float) -> str:
    commands = "\n".join(f"    {r.command}" for r in runs)
    return (
        f"# otcclip demo results\n\n```\n{table}\n```\n\n"
        f"fashion-scenes: {config.scenes} training scenes (1-{config.max_items} items, "
        f"{config.image_size} px), targeted poisoning ({config.n_targets} targets x "
        f"{config.n_captions} captions -> '{config.target_label}'), BadNet "
        f"({config.n_backdoor} images -> '{config.target_label}'); model {config.model}, "
        f"{config.epochs} epochs, seed {config.seed}; {minutes:.1f} minutes in all.\n\n"
        f"The same runs, one command each (after `otcclip demo` wrote {config.out}/poisoned):\n\n"
        f"{commands}\n"
    )
