"""The table's runs: plan them, decide skip/resume/rerun, train them in worker processes."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftable.data import _read_json, data_dir, data_spec
from deftable.rows import Row, _not_compared, _with_older_settings, resolved_doubt

FORMAT = "otcclip-defense-table/1"
RUN_SPEC = "table_run.json"  # what the run was asked to do (compared to decide skip/rerun)
RUN_DONE = "table_done.json"  # written by the parent when a run finished: its wall time
RUN_ATTEMPTS = "table_attempts.json"  # every attempt's wall time (a resumed run has several)
RUN_LOG = "log.txt"
SCRIPT = Path(__file__).resolve().parents[1] / "defense_table.py"  # the worker's entry
# Defenses whose behaviour changed at unchanged settings (issue 14: RoCLIP and SafeCLIP no
# longer augment the images their CLIP loss sees; SafeCLIP's passes are separate): their
# runs recorded before carry no revision, so they compare unequal and rerun.
# OTCCLIP 2 (session 8): a pair's own doubt score is the floor of its group verdict.
REVISIONS = {"roclip": 2, "safeclip": 2, "otcclip": 2}


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
            tc = resolved_doubt(tc)
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
            if row.defense in REVISIONS:
                spec["revision"] = REVISIONS[row.defense]
            runs.append(Run(row, seed, directory, spec))
    return runs


def eval_command(tc: Any, config: Any, poison_dir: Path) -> str:
    """The clean row's ASR: its model evaluated against the poisoned data's attacks."""
    return (
        f"otcclip eval --checkpoint {shlex.quote(str(tc.out))} "
        f"--poison-dir {shlex.quote(str(poison_dir))} --seed {tc.seed} "
        f"--n-zero-shot {config.eval_size} --n-probe-train {config.probe_size} "
        f"--n-probe-test {max(1, config.probe_size)} --n-retrieval 0"
    )


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """What decides whether a finished run still answers today's question: its data, its
    training settings, its schedule and its evaluation, not the row that asked for it (a
    run recorded under other overrides or another row's name that trained the same
    settings is the same run)."""
    named = ("command", "eval_command", "row", "key", "overrides")
    out = {k: v for k, v in spec.items() if k not in named}
    ignored = _not_compared(spec)
    train = _with_older_settings(spec["train"])
    out["train"] = {k: v for k, v in train.items() if k not in ignored}
    out["eval"] = dict(spec["eval"], asr_from=spec["eval"]["asr_from"] is not None)
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from disk


def _same_train(summary: dict[str, Any], spec: dict[str, Any]) -> bool:
    config = _with_older_settings(summary.get("config") or {})
    train = _with_older_settings(spec["train"])
    keys = set(config) | set(train)
    ignored = _not_compared(spec)

    # as read back from JSON (tuples -> lists), and by value: 2 == 2.0 (a --set number)
    def read(v: Any) -> Any:
        return json.loads(json.dumps(v))

    return all(read(config.get(k)) == read(train.get(k)) for k in keys if k not in ignored)


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
                    [sys.executable, str(SCRIPT), "--run-one"] + [str(run.directory / RUN_SPEC)],
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


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "-"
    return f"{100.0 * value:.1f}%"
