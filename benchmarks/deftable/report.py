"""The table's outputs: the markdown table, results.json/.md with every command, plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deftable.data import adaptive_count, data_dir, poison_command, varied_count
from deftable.runs import FORMAT, RUN_LOG, Run


def _values(runs: Sequence[Run], get: Callable[[Run], Any]) -> list[float]:
    out = []
    for run in runs:
        v = get(run)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            out.append(float(v))
    return out


def _stat(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


COLUMNS: list[tuple[str, Callable[[Run], Any], float]] = [
    ("targeted ASR %", lambda r: r.final.get("targeted_asr"), 100.0),
    ("backdoor ASR %", lambda r: r.final.get("backdoor_asr"), 100.0),
    ("zero-shot top-1 %", lambda r: r.final.get("zero_shot_top1"), 100.0),
    ("linear probe %", lambda r: r.final.get("linear_probe"), 100.0),
    ("s/epoch", lambda r: r.seconds_per_epoch, 1.0),
    ("re-pair precision %", lambda r: r.last_round.get("changed_precision"), 100.0),
    ("clean pairs true content %", lambda r: r.last_round.get("clean_true_content"), 100.0),
]


def _by_row(runs: Sequence[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.row.key, []).append(run)
    return out


def results_table(runs: Sequence[Run]) -> str:
    """Markdown: one line per row, mean ± std over the seeds that finished."""
    header = ["row"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(COLUMNS) + "|"]
    for group in _by_row(runs).values():
        done = [r for r in group if r.status == "done"]
        name = group[0].row.name
        if len(done) < len(group):
            name += f" (n={len(done)}/{len(group)})"
        cells = [_stat(_values(done, get), scale) for _, get, scale in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def machine(threads: int, jobs: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads_per_run": threads,
        "jobs": jobs,
        "load_average": None if load is None else [round(x, 2) for x in load],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _finite(obj: Any) -> Any:
    """NaN (e.g. the precision of a round that re-paired nothing) as null: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _run_record(run: Run) -> dict[str, Any]:
    return {
        "row": run.row.name,
        "key": run.row.key,
        "seed": run.seed,
        "status": run.status,
        "dir": str(run.directory),
        "command": run.spec["command"],
        "eval_command": run.spec["eval_command"],
        "final": run.final,
        "seconds_per_epoch": run.seconds_per_epoch,
        "last_round": run.last_round,
        "wall_seconds": run.wall_seconds,
        "log": str(run.directory / RUN_LOG),
    }


PLOTTED = ("clean", "none", "roclip", "safeclip", "otcclip", "filter")


def write_plots(out: Path, runs: Sequence[Run]) -> str:
    """Per-epoch ASR / zero-shot of the main rows, and OTCCLIP's rounds (lowest seed of each)."""
    from otcclip.plots import plot_epochs, plot_rounds

    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if run.status == "done" and run.row.key in PLOTTED and run.epochs:
            chosen.setdefault(run.row.name, run)
    if not chosen:
        return ""
    series = {name: run.epochs for name, run in chosen.items()}
    plot_epochs(series, out / "epochs.png")
    wrote = ", epochs.png"
    if plot_rounds(series, out / "rounds.png"):
        wrote += ", rounds.png"
    return wrote


def write_outputs(
    out: Path,
    runs: Sequence[Run],
    base: Any,
    seeds: Sequence[int],
    invocation: str,
    host: dict[str, Any],
    table: str,
    bars: list[str],
) -> None:
    from otcclip.atomic import write_text

    config = dataclasses.asdict(base)
    config.pop("seed", None)
    variants = sorted(
        {(r.row.variant, r.seed) for r in runs}
        | ({("poisoned", r.seed) for r in runs if r.row.variant == "clean"})
    )
    data = [
        {
            "variant": v,
            "seed": s,
            "dir": str(data_dir(out, v, s)),
            "command": poison_command(dataclasses.replace(base, seed=s), v, data_dir(out, v, s)),
        }
        for v, s in variants
    ]
    rows = {r.row.key: r.row for r in runs}
    results = {
        "format": FORMAT,
        "invocation": invocation,
        "cwd": os.getcwd(),
        "machine": host,
        "seeds": list(seeds),
        "settings": config,
        "rows": [
            {
                "key": r.key,
                "name": r.name,
                "slug": r.slug,
                "variant": r.variant,
                "defense": r.defense,
                "overrides": r.overrides,
            }
            for r in rows.values()
        ],
        "data": data,
        "runs": [_run_record(r) for r in runs],
        "table": table,
        "bars": bars,
    }
    text = json.dumps(_finite(results), indent=2, default=str, allow_nan=False)
    write_text(out / "results.json", text + "\n")
    commands = []
    for run in runs:
        commands.append(f"    # {run.label} ({run.status})\n    {run.spec['command']}")
        if run.spec["eval_command"]:
            commands.append(
                f"    # its ASR columns (as the table measures them):\n"
                f"    {run.spec['eval_command']}"
            )
    c = base
    text = (
        f"# otcclip defense table\n\n{table}\n\n" + "\n".join(f"- {b}" for b in bars) + "\n\n"
        f"fashion-scenes: {c.scenes} training scenes (1-{c.max_items} items, {c.image_size} px); "
        f"targeted poisoning ({c.n_targets} targets x {c.n_captions} captions -> "
        f"'{c.target_label}'; {varied_count(c)} varied copies per target in the varied rows) "
        f"with BadNet ({c.n_backdoor} images) or the adaptive backdoor "
        f"({adaptive_count(c)} images); model {c.model}, {c.epochs} epochs, "
        f"batch {c.batch_size}, lr {c.lr}; "
        f"evaluation {c.eval_size} zero-shot images, linear probe {c.probe_size}/{c.probe_size}; "
        f"seeds {' '.join(map(str, seeds))}; mean ± std over the seeds that finished.\n\n"
        f"Machine: {host['cpu']} ({host['cpu_count']} CPUs), GPU {host['gpu']}, torch "
        f"{host['torch']}, {host['torch_threads_per_run']} torch thread(s) per run, "
        f"{host['jobs']} run(s) at a time, load average {host['load_average']}; {host['date']}.\n\n"
        f"## Commands\n\nThe whole table (from {os.getcwd()}):\n\n    {invocation}\n\n"
        "The data, one `otcclip poison` per variant and seed:\n\n"
        + "\n".join(f"    {d['command']}" for d in data)
        + "\n\nEach run:\n\n"
        + "\n".join(commands)
        + "\n"
    )
    write_text(out / "results.md", text)
