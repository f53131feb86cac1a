"""Issue 6's results table: every defense and ablation on poisoned fashion-scenes, over seeds.

Each row is a named configuration (data variant, defense, TrainConfig overrides) trained
with the demo's settings (`otcclip.demo.DemoConfig`: scenes, epochs, lr, batch, model,
evaluation and probe sizes), so that the table and `otcclip demo` agree. Data variants:
`clean` (fashion-scenes without poison), `poisoned` (the demo's targeted poisoning +
BadNet, exactly `build_poisoned_data`) and `adaptive` (targeted poisoning + the adaptive
backdoor, same counts and seeds). The ablation rows flip the CURRENT TrainConfig defaults
(read when the script runs) and name themselves from what they set.

Every (row, seed) run trains in its own worker process (`--jobs` at a time, `--threads`
torch threads each) into OUT/<row-slug>/seed<k>/ (the trainer's run directory: summary.json,
metrics.jsonl, log.txt). The script is resumable: a run whose summary.json exists and whose
recorded settings equal today's is skipped, a changed setting reruns it, an interrupted run
resumes from its last epoch. Data are built once per (variant, seed) under
OUT/data/<variant>-seed<k>/ in `otcclip poison`'s layout, so every run can be repeated by
hand with the `otcclip train --data ...` command recorded beside it (the data with the
recorded `otcclip poison` command). A finished run keeps its weights and metrics; its
checkpoints are deleted. The clean row's ASR columns are its model measured against the
poisoned data's attacks (as `otcclip demo` does; by hand: the recorded `otcclip eval`).

OUT/results.json holds every run's final metrics and command, OUT/results.md the table as
printed, the bars, the commands and the machine, both for the rows and seeds of the last
invocation; OUT/epochs.png and rounds.png plot the main rows (lowest seed). --report-only
trains nothing: it re-prints the table from the run directories and rewrites those files
for the rows and seeds it is given (so a table gathered over several invocations can be
written whole; give it the options of the runs). A failing run is reported with its log and
the others go on.

    python benchmarks/defense_table.py                         # the full table, seeds 0 1 2
    python benchmarks/defense_table.py --jobs 2 --threads 1    # two runs at a time
    python benchmarks/defense_table.py --rows none,otcclip --seeds 0
    python benchmarks/defense_table.py --quick                 # a smoke run (tiny sizes)
    python benchmarks/defense_table.py --set lambda_inter=0.25 # a setting for every row
    python benchmarks/defense_table.py --report-only           # re-print from OUT

Row keys for --rows: clean, none, roclip, safeclip, otcclip, alpha, inter, intra, rho,
assign, none-adaptive, otcclip-adaptive (or the printed row names).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("benchmarks/results/defense")
QUICK_OUT = Path("benchmarks/results/defense-quick")
FORMAT = "otcclip-defense-table/1"
RUN_SPEC = "table_run.json"  # what the run was asked to do (compared to decide skip/rerun)
RUN_DONE = "table_done.json"  # written by the parent when a run finished: its wall time
RUN_ATTEMPTS = "table_attempts.json"  # every attempt's wall time (a resumed run has several)
RUN_LOG = "log.txt"
DATA_SPEC = "table_data.json"
ROW_KEYS = (
    "clean",
    "none",
    "roclip",
    "safeclip",
    "otcclip",
    "alpha",
    "inter",
    "intra",
    "rho",
    "assign",
    "none-adaptive",
    "otcclip-adaptive",
)
ATTACKS = {"clean": [], "poisoned": ["targeted", "badnet"], "adaptive": ["targeted", "adaptive"]}
# TrainConfig fields that do not change what a run computes, or that are paths under OUT:
# a difference in these alone does not rerun a finished run.
NOT_COMPARED = frozenset(
    {
        "data",
        "out",
        "resume",
        "progress",
        "threads",
        "device",
        "tensorboard",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "match_batch",
        "ot_compile",
    }
)
# OTCCLIP's own knobs: a row of another defense never reads them, so a change of an
# OTCCLIP default does not rerun the none / RoCLIP / SafeCLIP rows (SafeCLIP's split is a
# fixed global-cosine round that reads none of these).
OTCCLIP_ONLY = frozenset(
    {
        "lambda_inter",
        "inter_ramp",
        "lambda_intra",
        "ot_negatives",
        "eps",
        "iters",
        "ot_rho",
        "ot_scale",
        "inter_symmetric",
        "ot_duplicate_cos",
        "k",
        "alpha",
        "match_eps",
        "match_iters",
        "assign",
        "capacity",
        "margin",
        "fallback",
        "flag_outside_topk",
        "rematch_from",
        "on_doubt",
        "max_repair",
    }
)


# Settings added after runs were recorded, with the value those runs trained with: a
# recorded config without the key is compared as if it held this value.
BEFORE_THE_SETTING = {"on_doubt": "repair"}


def _with_older_settings(train: dict[str, Any]) -> dict[str, Any]:
    return {**BEFORE_THE_SETTING, **train}


def _not_compared(spec: dict[str, Any]) -> frozenset[str]:
    return NOT_COMPARED if spec.get("defense") == "otcclip" else NOT_COMPARED | OTCCLIP_ONLY


# TrainConfig fields the table sets itself (per row, per seed, or by its own options).
MANAGED = {
    "data": "per variant and seed",
    "scenes": "use --scenes",
    "data_seed": "the seed",
    "image_size": "the demo's",
    "out": "per row and seed",
    "resume": "automatic",
    "seed": "use --seeds",
    "defense": "per row",
    "threads": "use --threads",
    "progress": "off in workers",
    "eval_every": "every epoch",
    "epochs": "use --epochs",
    "batch_size": "use --batch-size",
}
# --quick: about the sizes of tests/test_demo.py, with a matching round in epoch 2.
QUICK = {
    "scenes": 400,
    "epochs": 2,
    "batch_size": 64,
    "n_targets": 2,
    "n_captions": 5,
    "n_backdoor": 12,
    "eval_size": 100,
    "probe_size": 100,
}
QUICK_OVERRIDES = {"warmup_epochs": 1, "k": 4, "iters": 5}
# The adaptive backdoor's poison count. Its captions name the scene's true items as well
# as the target, so the trigger explains less of each caption than BadNet's does: at
# BadNet's 200 it reached 47% without a defense (73.6 / 56.0 / 11.4% by seed), under the
# issue's 80% bar, which asks for the count to be tuned until the attack works. On seed 2,
# the weakest, 400 gave 92.4% and 600 79.9% (TUNING.md, session 5).
N_ADAPTIVE = 400


def _echo(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- rows


@dataclass
class Row:
    key: str
    name: str
    variant: str
    defense: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9._]+", "-", self.name.lower()).strip("-")


def _value(v: Any) -> str:
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def _ablation(key: str, overrides: dict[str, Any], tag: str = "") -> Row:
    name = "otcclip, " + ", ".join(f"{k}={_value(v)}" for k, v in overrides.items())
    return Row(key, name + (f" ({tag})" if tag else ""), "poisoned", "otcclip", overrides)


def table_rows(base: Any) -> list[Row]:
    """The table's rows; `base` is the otcclip TrainConfig the flipped ablations start from."""
    intra = 0.0 if base.lambda_intra > 0 else 0.5
    rho = None if base.ot_rho is not None else 1.0
    if base.assign == "capacity":
        assign: dict[str, Any] = {"assign": "argmax"}
    else:
        assign = {"assign": "capacity", "capacity": 2}
    doubt = "repair" if base.on_doubt == "drop" else "drop"
    return [
        Row("clean", "clean", "clean", "none"),
        Row("none", "none", "poisoned", "none"),
        Row("roclip", "roclip", "poisoned", "roclip"),
        Row("safeclip", "safeclip", "poisoned", "safeclip"),
        Row("otcclip", "otcclip", "poisoned", "otcclip"),
        _ablation("alpha", {"alpha": 1.0}),
        _ablation("inter", {"lambda_inter": 0.0}),
        _ablation("intra", {"lambda_intra": intra}),
        _ablation("rho", {"ot_rho": rho}, "balanced" if rho is None else "unbalanced"),
        _ablation("assign", assign),
        _ablation(
            "doubt", {"on_doubt": doubt}, "the paper's re-pairing" if doubt == "repair" else ""
        ),
        Row("none-adaptive", "none (adaptive)", "adaptive", "none"),
        Row("otcclip-adaptive", "otcclip (adaptive)", "adaptive", "otcclip"),
    ]


def select_rows(rows: list[Row], wanted: Sequence[str] | None) -> list[Row]:
    if not wanted:
        return rows
    by_name = {r.key: r for r in rows} | {r.name: r for r in rows} | {r.slug: r for r in rows}
    chosen: list[Row] = []
    for item in wanted:
        names = [item] if item in by_name else [s.strip() for s in item.split(",") if s.strip()]
        for name in names:
            if name not in by_name:
                raise ValueError(
                    f"unknown row {name!r}; expected one of {', '.join(r.key for r in rows)} "
                    "(or a printed row name)"
                )
            if by_name[name] not in chosen:
                chosen.append(by_name[name])
    return [r for r in rows if r in chosen]


# ---------------------------------------------------------------------------- settings


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE TrainConfig overrides: numbers, true/false and none are parsed."""
    from otcclip.train import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not KEY=VALUE")
        if key not in known:
            raise ValueError(f"--set {key}: not a TrainConfig setting")
        if key in MANAGED:
            raise ValueError(f"--set {key}: set by the table itself ({MANAGED[key]})")
        text = raw.strip()
        value: Any = text
        if text.lower() in ("none", "null"):
            value = None
        elif text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(text)
                    break
                except ValueError:
                    continue
        out[key] = value
    return out


def demo_config(args: argparse.Namespace) -> Any:
    """The demo's settings (seed 0), with --quick and the size options applied."""
    from otcclip.demo import DemoConfig

    sizes: dict[str, Any] = dict(QUICK) if args.quick else {}
    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    for name in ("scenes", "epochs", "batch_size", "eval_size", "probe_size"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    overrides.update(_parse_set(args.set))
    if args.n_adaptive is not None:
        sizes["n_adaptive"] = args.n_adaptive
    elif not args.quick:
        sizes["n_adaptive"] = N_ADAPTIVE
    return DemoConfig(
        out=str(args.out),
        threads=args.threads,
        progress=False,
        train_overrides=overrides,
        **sizes,
    )


def data_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "data" / f"{variant}-seed{seed}"


def adaptive_count(config: Any) -> int:
    return config.n_backdoor if config.n_adaptive is None else config.n_adaptive


def data_spec(config: Any, variant: str) -> dict[str, Any]:
    spec = {
        "variant": variant,
        "seed": config.seed,
        "attacks": ATTACKS[variant],
        "scenes": config.scenes,
        "max_items": config.max_items,
        "image_size": config.image_size,
        "target_label": config.target_label,
        "n_targets": config.n_targets,
        "n_captions": config.n_captions,
        "n_backdoor": config.n_backdoor,
    }
    if variant == "adaptive":  # its backdoor has a count of its own
        spec["n_backdoor"] = adaptive_count(config)
    return spec


def poison_command(config: Any, variant: str, directory: Path) -> str:
    """The `otcclip poison` command that writes the same data (the demo's seeds: k, k+1, k+2)."""
    parts = [
        f"otcclip poison --out {shlex.quote(str(directory))} --scenes {config.scenes}",
        f"--max-items {config.max_items} --image-size {config.image_size}",
    ]
    if ATTACKS[variant]:
        parts.append(" ".join(f"--attack {a}" for a in ATTACKS[variant]))
        parts.append(
            f"--target-label {config.target_label} --n-targets {config.n_targets} "
            f"--n-captions {config.n_captions} "
            f"--n-poison {data_spec(config, variant)['n_backdoor']}"
        )
    parts.append(f"--seed {config.seed}")
    return " ".join(parts)


@dataclass
class Run:
    row: Row
    seed: int
    directory: Path
    spec: dict[str, Any]
    status: str = "pending"  # pending | done | failed | missing | stale
    final: dict[str, Any] = field(default_factory=dict)
    seconds_per_epoch: float | None = None
    last_round: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float | None = None
    returncode: int | None = None

    @property
    def label(self) -> str:
        return f"{self.row.name} seed {self.seed}"


def plan_runs(out: Path, base: Any, rows: list[Row], seeds: Sequence[int]) -> list[Run]:
    from otcclip.commands.train import command_line
    from otcclip.defenses import schedule
    from otcclip.demo import train_config

    runs = []
    for row in rows:
        for seed in seeds:
            config = dataclasses.replace(base, seed=seed)
            directory = out / row.slug / f"seed{seed}"
            tc = train_config(config, row.defense)
            tc = dataclasses.replace(
                tc,
                **row.overrides,
                data=str(data_dir(out, row.variant, seed)),
                out=str(directory),
                threads=base.threads,
                progress=False,
            )
            tc.validate()
            asr_from = data_dir(out, "poisoned", seed) if row.variant == "clean" else None
            spec = {
                "format": FORMAT,
                "row": row.name,
                "key": row.key,
                "seed": seed,
                "variant": row.variant,
                "defense": row.defense,
                "overrides": row.overrides,
                "data": data_spec(config, row.variant),
                "train": tc.to_dict(),
                # resolved W and R: a change of a defense's defaults reruns its rows
                "schedule": schedule(tc.defense, tc),
                "eval": {
                    "every": 1,
                    "eval_size": config.eval_size,
                    "probe_size": config.probe_size,
                    "asr_from": None if asr_from is None else str(asr_from),
                },
                "command": command_line(tc, config.eval_size, config.probe_size),
                "eval_command": None if asr_from is None else eval_command(tc, config, asr_from),
            }
            runs.append(Run(row, seed, directory, spec))
    return runs


# ---------------------------------------------------------------------------- commands


def eval_command(tc: Any, config: Any, poison_dir: Path) -> str:
    """The clean row's ASR: its model evaluated against the poisoned data's attacks."""
    return (
        f"otcclip eval --checkpoint {shlex.quote(str(tc.out))} "
        f"--poison-dir {shlex.quote(str(poison_dir))} --seed {tc.seed} "
        f"--n-zero-shot {config.eval_size} --n-probe-train {config.probe_size} "
        f"--n-probe-test {max(1, config.probe_size)} --n-retrieval 0"
    )


# ---------------------------------------------------------------------------- data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_data(out: Path, config: Any, variants: set[str], echo: Callable[[str], None]) -> None:
    """Build the (variant, seed) data that are missing or were built with other settings."""
    from otcclip.atomic import write_text

    stale = sorted(
        v
        for v in variants
        if _read_json(data_dir(out, v, config.seed) / DATA_SPEC) != data_spec(config, v)
        or not (data_dir(out, v, config.seed) / "train.parquet").is_file()
    )
    if not stale:
        return
    from otcclip.attacks import adaptive_backdoor, poisoned_ids, save_manifests, targeted_poison
    from otcclip.data import fashion_scenes, write_pairs
    from otcclip.demo import build_poisoned_data

    start = time.perf_counter()
    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-seed{config.seed}.", dir=root))
    try:
        clean = None
        if "clean" in stale or "poisoned" in stale:
            # exactly the demo's data: writes tmp/poisoned (train.parquet, manifest.json, ...)
            clean, _, _ = build_poisoned_data(dataclasses.replace(config, out=str(tmp)))
        if "clean" in stale:
            write_pairs(clean, tmp / "clean" / "train.parquet")
            save_manifests(tmp / "clean", [], {"n_rows": len(clean), "scenes": config.scenes})
        if "adaptive" in stale:
            if clean is None:
                clean = fashion_scenes(
                    config.scenes,
                    seed=config.seed,
                    image_size=config.image_size,
                    max_items=config.max_items,
                )
            table, targeted = targeted_poison(
                clean, config.n_targets, config.n_captions, config.target_label, config.seed + 1
            )
            table, adaptive = adaptive_backdoor(
                table,
                adaptive_count(config),
                config.target_label,
                config.seed + 2,
                exclude_ids=poisoned_ids([targeted]),
            )
            write_pairs(table, tmp / "adaptive" / "train.parquet")
            save_manifests(
                tmp / "adaptive",
                [targeted, adaptive],
                {"n_rows": len(table), "scenes": config.scenes},
            )
        for variant in stale:
            built = tmp / variant
            write_text(built / DATA_SPEC, json.dumps(data_spec(config, variant), indent=2) + "\n")
            dest = data_dir(out, variant, config.seed)
            if dest.exists():
                shutil.rmtree(dest)
            built.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    echo(
        f"[defense_table] built data {', '.join(f'{v}-seed{config.seed}' for v in stale)} "
        f"({config.scenes} scenes) in {time.perf_counter() - start:.1f}s"
    )


# ---------------------------------------------------------------------------- run state


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """What decides whether a finished run still answers today's question."""
    out = {k: v for k, v in spec.items() if k not in ("command", "eval_command")}
    ignored = _not_compared(spec)
    train = _with_older_settings(spec["train"])
    out["train"] = {k: v for k, v in train.items() if k not in ignored}
    out["eval"] = dict(spec["eval"], asr_from=spec["eval"]["asr_from"] is not None)
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from disk


def _same_train(summary: dict[str, Any], spec: dict[str, Any]) -> bool:
    config = _with_older_settings(summary.get("config") or {})
    keys = set(config) | set(spec["train"])
    ignored = _not_compared(spec)
    return all(
        json.dumps(config.get(k)) == json.dumps(spec["train"].get(k))
        for k in keys
        if k not in ignored
    )


def run_state(run: Run) -> str:
    """done (finished with today's settings), stale (finished with others), resume, fresh."""
    recorded = _read_json(run.directory / RUN_SPEC)
    today = _comparable(run.spec)
    if isinstance(recorded, dict) and "schedule" not in recorded:
        today.pop("schedule", None)  # recorded before the table wrote the resolved schedule
    same = isinstance(recorded, dict) and _comparable(recorded) == today
    summary = _read_json(run.directory / "summary.json")
    if isinstance(summary, dict):
        return "done" if same and _same_train(summary, run.spec) else "stale"
    return "resume" if same else "fresh"


def load_results(run: Run) -> None:
    """Fill a finished run's final metrics, s/epoch and last matching round from its files."""
    epochs = []
    metrics = run.directory / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                if m.get("event") == "epoch":
                    epochs.append(m)
    summary = _read_json(run.directory / "summary.json") or {}
    last = summary.get("final") or (epochs[-1] if epochs else {})
    run.final = dict(last.get("eval") or {})
    run.epochs = epochs
    seconds = [m["seconds"] + m.get("prepare_seconds", 0.0) for m in epochs]
    run.seconds_per_epoch = statistics.fmean(seconds) if seconds else None
    rounds = [m["defense"] for m in epochs if "round" in (m.get("defense") or {})]
    run.last_round = dict(rounds[-1]) if rounds else {}
    done = _read_json(run.directory / RUN_DONE) or {}
    run.wall_seconds = done.get("wall_seconds")


# ---------------------------------------------------------------------------- worker


def run_one(spec_path: Path) -> int:
    """Train one (row, seed) from its spec file; resumes when the run has a checkpoint."""
    spec = json.loads(spec_path.read_text())
    import torch

    from otcclip.attacks import load_manifests
    from otcclip.checkpoint import load_checkpoint
    from otcclip.evaluate import EpochEvaluation
    from otcclip.train import TrainConfig, train

    config = TrainConfig.from_dict(spec["train"])
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    resume = load_checkpoint(config.out) is not None
    config = dataclasses.replace(config, resume=resume)
    manifests = None
    if spec["eval"]["asr_from"]:
        manifests, _ = load_manifests(spec["eval"]["asr_from"])
    print(f"[defense_table] {spec['row']} seed {spec['seed']}", file=sys.stderr)
    print(f"[defense_table] command: {spec['command']}", file=sys.stderr)
    if resume:
        print("[defense_table] resuming from the last checkpoint", file=sys.stderr)
    evaluation = EpochEvaluation(
        every=spec["eval"]["every"],
        epochs=config.epochs,
        eval_size=spec["eval"]["eval_size"],
        probe_size=spec["eval"]["probe_size"],
        seed=config.seed,
        manifests=manifests,
    )
    train(config, [evaluation])
    return 0


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def execute(
    runs: list[Run],
    jobs: int,
    threads: int,
    echo: Callable[[str], None],
    on_finish: Callable[[], None] = lambda: None,
) -> None:
    """Run the runs in worker processes, `jobs` at a time; a failure never stops the others.

    `on_finish` is called after each run ends (the caller rewrites results.json).
    """
    from otcclip.atomic import write_text

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[name] = str(threads)
    pending = list(runs)
    running: dict[subprocess.Popen, tuple[Run, float, Any]] = {}
    total, started = len(runs), 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                started += 1
                log = open(run.directory / RUN_LOG, "ab")  # noqa: SIM115 (closed on exit)
                proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--run-one"]
                    + [str(run.directory / RUN_SPEC)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
                running[proc] = (run, time.perf_counter(), log)
                echo(f"[defense_table] start {run.label} ({started}/{total}) -> {run.directory}")
            time.sleep(0.1)
            for proc in [p for p in running if p.poll() is not None]:
                run, start, log = running.pop(proc)
                log.close()
                wall = time.perf_counter() - start
                run.returncode = proc.returncode
                now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                attempts = _read_json(run.directory / RUN_ATTEMPTS) or []
                attempts.append({"wall_seconds": wall, "exit": proc.returncode, "ended": now})
                write_text(run.directory / RUN_ATTEMPTS, json.dumps(attempts, indent=2) + "\n")
                run.wall_seconds = sum(a["wall_seconds"] for a in attempts)
                if proc.returncode == 0 and (run.directory / "summary.json").is_file():
                    done = {"wall_seconds": run.wall_seconds, "attempts": len(attempts)}
                    write_text(run.directory / RUN_DONE, json.dumps(done, indent=2) + "\n")
                    run.status = "done"
                    # finished: the checkpoints (about 80 MB a run) are no longer needed
                    shutil.rmtree(run.directory / "checkpoints", ignore_errors=True)
                    load_results(run)
                    f = run.final
                    echo(
                        f"[defense_table] done  {run.label} in {_minutes(wall)}: "
                        f"targeted ASR {_pct(f.get('targeted_asr'))}, "
                        f"backdoor ASR {_pct(f.get('backdoor_asr'))}, "
                        f"zero-shot {_pct(f.get('zero_shot_top1'))}"
                    )
                else:
                    run.status = "failed"
                    echo(
                        f"[defense_table] FAILED {run.label} (exit {proc.returncode}) after "
                        f"{_minutes(wall)}; log: {run.directory / RUN_LOG}"
                    )
                on_finish()
    except BaseException:
        for proc, (run, _, log) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
            echo(f"[defense_table] stopped {run.label}")
        raise


# ---------------------------------------------------------------------------- table


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{100.0 * value:.1f}%"


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


def _mean(runs: Sequence[Run], key: str, metric: str) -> float | None:
    values = _values(
        [r for r in runs if r.row.key == key and r.status == "done"], lambda r: r.final.get(metric)
    )
    return statistics.fmean(values) if values else None


def bar_checks(runs: Sequence[Run], jobs: int) -> list[str]:
    """The issue's bars, computed from the table's numbers."""
    rows = {r.row.key: r.row.name for r in runs}

    def m(key: str, metric: str) -> float | None:
        return _mean(runs, key, metric)

    def missing(*keys: str) -> str | None:
        absent = [k for k in keys if k in rows and m(k, "zero_shot_top1") is None]
        not_run = [k for k in keys if k not in rows]
        if not_run:
            return f"not measured (row {', '.join(not_run)} not among the rows run)"
        if absent:
            return f"not measured (no finished run of {', '.join(repr(rows[k]) for k in absent)})"
        return None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def asr(key: str) -> tuple[float | None, float | None]:
        return m(key, "targeted_asr"), m(key, "backdoor_asr")

    def works(t: float, b: float) -> bool:
        return t >= 0.8 and b >= 0.8

    def stopped(t: float, b: float) -> bool:
        return t <= 0.02 and b <= 0.02

    lines = []
    asr_bars = (
        ("none", "attacks work without a defense (>= 80%)", works),
        ("none-adaptive", "the adaptive attack works without a defense (>= 80%)", works),
        ("otcclip", "OTCCLIP ASR <= 2%", stopped),
        ("otcclip-adaptive", "OTCCLIP ASR <= 2% against the adaptive attack", stopped),
    )
    for key, label, passes in asr_bars:
        t, b = asr(key)
        gap = missing(key)
        if gap or t is None or b is None:
            lines.append(f"{label}: {gap or 'not measured (no ASR recorded)'}")
        else:
            shown = f"targeted {_pct(t)}, backdoor {_pct(b)}"
            lines.append(f"{label}: {shown}: {verdict(passes(t, b))}")
    label = "OTCCLIP zero-shot within 2 points of clean"
    gap = missing("otcclip", "clean")
    if gap:
        lines.append(f"{label}: {gap}")
    else:
        otc, clean = m("otcclip", "zero_shot_top1"), m("clean", "zero_shot_top1")
        assert otc is not None and clean is not None
        diff = 100.0 * (otc - clean)
        lines.append(
            f"{label}: {_pct(otc)} vs {_pct(clean)} ({diff:+.1f} points): {verdict(diff >= -2.0)}"
        )
    for peer, name in (("roclip", "RoCLIP"), ("safeclip", "SafeCLIP")):
        label = f"OTCCLIP vs {name} (higher zero-shot and linear probe at equal or lower ASR)"
        gap = missing("otcclip", peer)
        if gap:
            lines.append(f"{label}: {gap}")
            continue
        parts, worse = [], []
        for metric, title, higher in (
            ("zero_shot_top1", "zero-shot", True),
            ("linear_probe", "linear probe", True),
            ("targeted_asr", "targeted ASR", False),
            ("backdoor_asr", "backdoor ASR", False),
        ):
            a, b = m("otcclip", metric), m(peer, metric)
            parts.append(f"{title} {_pct(a)} vs {_pct(b)}")
            if a is None or b is None:
                worse.append(f"{title} not measured")
            elif (a < b) if higher else (a > b):
                worse.append(f"{'lower' if higher else 'higher'} {title}")
        result = "met" if not worse else f"NOT met ({', '.join(worse)})"
        lines.append(f"{label}: {', '.join(parts)}: {result}")
    groups = _by_row(runs)
    short = []
    for g in groups.values():
        failed = sum(r.status == "failed" for r in g)
        if any(r.status != "done" for r in g):
            short.append(
                f"{g[0].row.name} {sum(r.status == 'done' for r in g)}/{len(g)}"
                + (f" ({failed} failed)" if failed else "")
            )
    seeds = sorted({r.seed for r in runs})
    lines.append(
        f"{len(seeds)} seed(s) ({' '.join(map(str, seeds))}) for every row: "
        + ("all finished" if not short else "missing runs: " + "; ".join(short))
    )
    walls = [r.wall_seconds for r in runs if r.status == "done" and r.wall_seconds]
    if walls:
        total = sum(walls) / 60.0
        elapsed = total / max(1, jobs)
        if short:
            result = "not all runs finished"
        elif len(groups) < len(ROW_KEYS):
            result = f"only {len(groups)} of the {len(ROW_KEYS)} rows"
        else:
            result = verdict(elapsed <= 60.0)
        lines.append(
            f"whole table under an hour on this machine: {total:.1f} min of runs "
            f"(sum of wall times; about {elapsed:.1f} min at --jobs {jobs}): {result}"
        )
    return lines


# ---------------------------------------------------------------------------- outputs


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


PLOTTED = ("clean", "none", "roclip", "safeclip", "otcclip")


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
        f"'{c.target_label}') with BadNet ({c.n_backdoor} images) or the adaptive backdoor "
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


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Row keys: " + ", ".join(ROW_KEYS),
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rows", nargs="+", default=None, help="row keys or names, or comma lists [all]"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time (worker processes) [1; with --report-only: as last recorded]",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"[{DEFAULT_OUT}; with --quick {QUICK_OUT}]"
    )
    parser.add_argument("--scenes", type=int, default=None, help="[the demo's]")
    parser.add_argument("--epochs", type=int, default=None, help="[the demo's]")
    parser.add_argument("--batch-size", type=int, default=None, help="[the demo's]")
    parser.add_argument("--eval-size", type=int, default=None, help="[the demo's]")
    parser.add_argument("--probe-size", type=int, default=None, help="[the demo's]")
    parser.add_argument(
        "--n-adaptive",
        type=int,
        default=None,
        help=f"the adaptive backdoor's poison count [{N_ADAPTIVE}; with --quick BadNet's]",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig override for every row, before the ablations flip (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny sizes for a smoke run: {QUICK} {QUICK_OVERRIDES}",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: re-print the table from OUT and rewrite results.md, results.json "
        "and the plots for these rows and seeds (give the options of the runs)",
    )
    parser.add_argument("--run-one", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = _echo) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run_one is not None:
        return run_one(args.run_one)
    jobs_given = args.jobs is not None
    args.jobs = args.jobs if jobs_given else 1
    for name in ("jobs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("scenes", "epochs", "batch_size", "eval_size", "n_adaptive"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.probe_size is not None and args.probe_size < 0:
        parser.error("--probe-size must be >= 0")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct integers >= 0")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    out: Path = args.out

    from otcclip.demo import train_config

    try:
        base = demo_config(args)
        # the ablations flip the current defaults of the otcclip row (seed 0's; seed-free)
        rows = select_rows(table_rows(train_config(base, "otcclip")), args.rows)
        runs = plan_runs(out, base, rows, args.seeds)
    except (ValueError, TypeError) as err:
        parser.error(str(err))

    states = {id(r): run_state(r) for r in runs}
    if args.report_only:
        for run in runs:
            state = states[id(run)]
            run.status = {"done": "done", "stale": "stale"}.get(state, "missing")
            if state == "done":
                load_results(run)
            elif state == "stale":
                echo(f"[defense_table] stale (ran with other settings): {run.directory}")
        recorded = _read_json(out / "results.json") or {}
        jobs = args.jobs if jobs_given else (recorded.get("machine") or {}).get("jobs") or 1
        table, bars = results_table(runs), bar_checks(runs, jobs)
        echo(table)
        echo("")
        for line in bars:
            echo(line)
        if any(r.status == "done" for r in runs):
            invocation = "python benchmarks/defense_table.py " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
            )
            host = machine(args.threads, jobs)
            write_outputs(out, runs, base, args.seeds, invocation, host, table, bars)
            plots = write_plots(out, runs)
            echo(f"[defense_table] wrote {out}/results.md, results.json{plots}")
        return 0

    invocation = "python benchmarks/defense_table.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    host = machine(args.threads, args.jobs)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        variants = {r.variant for r in rows}
        if "clean" in variants:
            variants.add("poisoned")  # the clean row's ASR is measured against its attacks
        ensure_data(out, dataclasses.replace(base, seed=seed), variants, echo)

    from otcclip.atomic import write_text

    todo = []
    for run in runs:
        state = states[id(run)]
        if state == "done":
            run.status = "done"
            load_results(run)
            echo(f"[defense_table] skip  {run.label}: finished ({run.directory})")
            continue
        if state in ("stale", "fresh") and run.directory.exists():
            if state == "stale":
                echo(f"[defense_table] rerun {run.label}: its settings changed")
            shutil.rmtree(run.directory)  # another setting's run: start over
        run.directory.mkdir(parents=True, exist_ok=True)
        write_text(run.directory / RUN_SPEC, json.dumps(run.spec, indent=2) + "\n")
        if state == "resume" and (run.directory / "checkpoints").is_dir():
            echo(f"[defense_table] resume {run.label} from its last checkpoint")
        todo.append(run)
    echo(
        f"[defense_table] {len(runs)} runs ({len(rows)} rows x {len(args.seeds)} seeds): "
        f"{len(runs) - len(todo)} finished, {len(todo)} to run, {args.jobs} at a time, "
        f"{args.threads} torch thread(s) each"
    )

    def save() -> tuple[str, list[str]]:
        table, bars = results_table(runs), bar_checks(runs, args.jobs)
        write_outputs(out, runs, base, args.seeds, invocation, host, table, bars)
        write_plots(out, runs)
        return table, bars

    start = time.perf_counter()
    try:
        execute(todo, args.jobs, args.threads, echo, on_finish=save)
    finally:
        for run in runs:
            if run.status == "pending":
                run.status = "missing"
        table, bars = save()
    echo("")
    echo(table)
    echo("")
    for line in bars:
        echo(line)
    failed = [r for r in runs if r.status == "failed"]
    elapsed = _minutes(time.perf_counter() - start)
    echo(
        f"[defense_table] {len(todo) - len(failed)} run(s) in {elapsed}"
        f"{f', {len(failed)} failed' if failed else ''}; wrote {out}/results.md, results.json"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
