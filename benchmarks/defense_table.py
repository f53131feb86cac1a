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
assign, doubt, none-adaptive, otcclip-adaptive, none-aug (no defense with the baselines'
augmentation: their control), filter (filter-then-train) (or the printed row names).

The parts live in benchmarks/deftable/: rows (what runs), data, runs (planning, skip /
resume / rerun, workers), report (table, results.md/.json, plots), verdicts (the bars).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the deftable package beside it

from deftable.data import (  # noqa: E402
    DATA_SPEC,
    adaptive_count,
    data_spec,
    ensure_data,
    poison_command,
)
from deftable.report import (  # noqa: E402
    COLUMNS,
    machine,
    results_table,
    write_outputs,
    write_plots,
)
from deftable.rows import (  # noqa: E402
    ATTACKS,
    MANAGED,
    N_ADAPTIVE,
    N_VARIED,
    PHASE_BEFORE_TEMPLATE,
    QUICK,
    QUICK_OVERRIDES,
    ROW_KEYS,
    SIGNALS_BEFORE_PHASE,
    Row,
    demo_config,
    select_rows,
    table_rows,
)
from deftable.runs import (  # noqa: E402
    FORMAT,
    RUN_SPEC,
    Run,
    _minutes,
    _read_json,
    execute,
    load_results,
    plan_runs,
    run_one,
    run_state,
)
from deftable.verdicts import bar_checks  # noqa: E402

__all__ = [
    "ATTACKS",
    "COLUMNS",
    "DATA_SPEC",
    "FORMAT",
    "MANAGED",
    "N_ADAPTIVE",
    "N_VARIED",
    "PHASE_BEFORE_TEMPLATE",
    "QUICK",
    "ROW_KEYS",
    "RUN_SPEC",
    "SIGNALS_BEFORE_PHASE",
    "Row",
    "Run",
    "adaptive_count",
    "bar_checks",
    "data_spec",
    "main",
    "plan_runs",
    "poison_command",
    "results_table",
    "run_state",
    "select_rows",
    "table_rows",
]

DEFAULT_OUT = Path("benchmarks/results/defense")
QUICK_OUT = Path("benchmarks/results/defense-quick")


def _echo(message: str) -> None:
    print(message, flush=True)


def _parser() -> argparse.ArgumentParser:
    from otcclip.demo import DemoConfig

    demo = DemoConfig()
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
        "--n-varied",
        type=int,
        default=None,
        help=f"copies per target of the varied-copies attack [{N_VARIED}; None: --n-captions]",
    )
    parser.add_argument(
        "--copy-shift",
        type=int,
        default=None,
        help=f"the varied copies' largest shift in px [{demo.copy_shift}]",
    )
    parser.add_argument(
        "--copy-noise",
        type=float,
        default=None,
        help=f"the varied copies' noise sigma (0-255 units) [{demo.copy_noise:g}]",
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
    for name in ("scenes", "epochs", "batch_size", "eval_size", "n_adaptive", "n_varied"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("copy_shift", "copy_noise"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
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
