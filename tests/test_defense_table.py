"""benchmarks/defense_table.py: a smoke run, resumability, and a changed setting rerunning."""

import dataclasses
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# --quick, made smaller still: 200 scenes, one epoch, no linear probe
TINY = ["--quick", "--scenes", "200", "--epochs", "1", "--eval-size", "50", "--probe-size", "0"]


def _load_script():
    path = ROOT / "benchmarks" / "defense_table.py"
    spec = importlib.util.spec_from_file_location("defense_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _assert_command_reproduces(command: str, spec: dict) -> None:
    """Parsing the recorded command as `otcclip train` gives exactly the run's settings."""
    from otcclip.commands.train import _settings
    from otcclip.commands.train import command as train_cli
    from otcclip.train import TrainConfig

    argv = shlex.split(command)
    assert argv[:2] == ["otcclip", "train"]
    ctx = train_cli.make_context("train", argv[2:])
    settings = _settings(ctx, dict(ctx.params))
    assert settings.pop("eval_size") == spec["eval"]["eval_size"]
    assert settings.pop("probe_size") == spec["eval"]["probe_size"]
    assert TrainConfig(**settings).to_dict() == spec["train"]


@pytest.mark.slow
def test_smoke_table_resumes_and_reruns_a_changed_setting(tmp_path):
    table = _load_script()
    out = tmp_path / "table"
    args = [*TINY, "--rows", "none,otcclip", "--seeds", "0", "--out", str(out), "--jobs", "2"]
    lines: list[str] = []

    assert table.main(args, echo=lines.append) == 0
    printed = "\n".join(lines)
    assert "| none |" in printed and "| otcclip |" in printed
    assert "attacks work without a defense (>= 80%): targeted" in printed
    assert "OTCCLIP ASR <= 2%: targeted" in printed
    results = json.loads((out / "results.json").read_text())
    runs = {r["row"]: r for r in results["runs"]}
    assert set(runs) == {"none", "otcclip"}
    data = out / "data" / "poisoned-seed0"
    assert (data / "train.parquet").is_file() and (data / "manifest.json").is_file()
    for row, run in runs.items():
        assert run["status"] == "done" and run["seed"] == 0
        assert run["command"].startswith(f"otcclip train --data {data} ")
        assert f"--defense {row}" in run["command"]
        assert 0.0 <= run["final"]["zero_shot_top1"] <= 1.0
        assert run["final"]["targeted_asr"] is not None
        run_dir = Path(run["dir"])
        assert (run_dir / "summary.json").is_file() and (run_dir / "metrics.jsonl").is_file()
        spec = json.loads((run_dir / "table_run.json").read_text())
        _assert_command_reproduces(run["command"], spec)
    markdown = (out / "results.md").read_text()
    assert results["table"] in markdown and results["table"] in printed
    assert f"otcclip poison --out {data}" in markdown and runs["none"]["command"] in markdown

    # the same command again: nothing reruns
    weights = out / "none" / "seed0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    lines.clear()
    assert table.main(args, echo=lines.append) == 0
    assert sum(line.startswith("[defense_table] skip") for line in lines) == 2
    assert not any(line.startswith("[defense_table] start") for line in lines)
    assert weights.stat().st_mtime_ns == stamp

    # a changed setting reruns the run it changes, and only that one
    lines.clear()
    changed = [*TINY, "--rows", "otcclip", "--seeds", "0", "--out", str(out), "--set", "margin=0.1"]
    assert table.main(changed, echo=lines.append) == 0
    assert any(line.startswith("[defense_table] start otcclip seed 0") for line in lines)
    spec = json.loads((out / "otcclip" / "seed0" / "table_run.json").read_text())
    assert spec["train"]["margin"] == 0.1 and "--margin 0.1" in spec["command"]
    assert (out / "otcclip" / "seed0" / "summary.json").is_file()
    assert weights.stat().st_mtime_ns == stamp

    # --report-only with the first options: otcclip's run no longer matches them
    lines.clear()
    assert table.main([*args, "--report-only"], echo=lines.append) == 0
    report = "\n".join(lines).splitlines()
    assert any(line.startswith("| none |") for line in report)
    assert any(line.startswith("| otcclip (n=0/1) |") for line in report)
    assert any("stale" in line and "otcclip" in line for line in report)
    # ... and it rewrote the aggregate for what it was given: none done, otcclip missing
    results = json.loads((out / "results.json").read_text())
    assert {r["row"]: r["status"] for r in results["runs"]} == {"none": "done", "otcclip": "stale"}
    assert (out / "epochs.png").read_bytes()[:4] == b"\x89PNG"


def test_ablation_rows_flip_the_current_defaults_and_name_themselves():
    from otcclip.train import TrainConfig

    table = _load_script()
    base = TrainConfig(lambda_intra=0.0, ot_rho=None, assign="argmax")
    names = {r.key: r.name for r in table.table_rows(base)}
    assert names["intra"] == "otcclip, lambda_intra=0.5"
    assert names["rho"].startswith("otcclip, ot_rho=1")
    assert names["assign"] == "otcclip, assign=capacity, capacity=2"
    assert names["ramp"] == "otcclip, inter_ramp=0"
    flipped = {
        r.key: r
        for r in table.table_rows(
            TrainConfig(lambda_intra=0.3, ot_rho=0.5, assign="capacity", capacity=3)
        )
    }
    assert flipped["intra"].overrides == {"lambda_intra": 0.0}
    assert flipped["rho"].overrides == {"ot_rho": None}
    assert flipped["assign"].overrides == {"assign": "argmax"}
    unramped = {r.key: r for r in table.table_rows(TrainConfig(inter_ramp=0.0))}
    assert unramped["ramp"].overrides == {"inter_ramp": 2.0}
    assert names["doubt"] == "otcclip, on_doubt=repair (the paper's re-pairing)"
    doubt = {r.key: r for r in table.table_rows(TrainConfig(on_doubt="repair"))}["doubt"]
    assert doubt.overrides == {"on_doubt": "drop"} and doubt.name == "otcclip, on_doubt=drop"
    assert [r.key for r in table.select_rows(table.table_rows(base), ["none,otcclip"])] == [
        "none",
        "otcclip",
    ]
    with pytest.raises(ValueError, match="unknown row"):
        table.select_rows(table.table_rows(base), ["nope"])


def test_a_changed_defense_default_reruns_only_that_defense(tmp_path, monkeypatch):
    from otcclip import defenses
    from otcclip.demo import train_config

    table = _load_script()
    # not --quick: it sets the warm-up explicitly, and this test is about the defaults
    args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path)])
    base = table.demo_config(args)
    rows = table.select_rows(table.table_rows(train_config(base, "otcclip")), ["none,otcclip"])
    for run in table.plan_runs(tmp_path, base, rows, [0]):
        run.directory.mkdir(parents=True)
        (run.directory / table.RUN_SPEC).write_text(json.dumps(run.spec))
    assert [table.run_state(r) for r in table.plan_runs(tmp_path, base, rows, [0])] == [
        "resume",
        "resume",
    ]
    otcclip = dict(defenses.DEFAULTS["otcclip"], warmup_epochs=5)
    monkeypatch.setitem(defenses.DEFAULTS, "otcclip", otcclip)
    again = table.plan_runs(tmp_path, base, rows, [0])
    assert again[1].spec["schedule"] == {"warmup_epochs": 5, "match_every": 1}
    assert [table.run_state(r) for r in again] == ["resume", "fresh"]


def test_a_run_recorded_before_a_setting_existed_compares_as_its_old_value(tmp_path):
    from otcclip.demo import train_config

    table = _load_script()
    args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path)])
    base = table.demo_config(args)
    rows = table.select_rows(table.table_rows(train_config(base, "otcclip")), ["otcclip", "doubt"])
    drop, repair = table.plan_runs(tmp_path, base, rows, [0])
    for run in (drop, repair):
        old = json.loads(json.dumps(repair.spec))  # trained with what is now on_doubt=repair
        del old["train"]["on_doubt"]  # ... before the setting was recorded
        old.update(row=run.spec["row"], key=run.spec["key"], overrides=run.spec["overrides"])
        run.directory.mkdir(parents=True)
        (run.directory / table.RUN_SPEC).write_text(json.dumps(old))
    assert [table.run_state(r) for r in (drop, repair)] == ["fresh", "resume"]


def test_the_kept_rounds_default_reruns_the_fused_rows_and_no_others(tmp_path):
    """Runs recorded before session 18 left round_embeddings out at its default then,
    "model": the fused OTCCLIP rows rerun with the kept rounds, while the paper's rule
    (which names "model") and the other defenses stand."""
    from otcclip.demo import train_config

    table = _load_script()
    args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path)])
    base = table.demo_config(args)
    rows = table.select_rows(table.table_rows(train_config(base, "otcclip")), ["none,otcclip,rule"])
    runs = table.plan_runs(tmp_path, base, rows, [0])
    assert [r.spec["train"]["round_embeddings"] for r in runs] == ["training", "training", "model"]
    for run in runs:
        old = json.loads(json.dumps(run.spec))
        del old["train"]["round_embeddings"]  # as recorded before session 18
        run.directory.mkdir(parents=True)
        (run.directory / table.RUN_SPEC).write_text(json.dumps(old))
    assert [table.run_state(r) for r in runs] == ["resume", "fresh", "resume"]


def test_the_adaptive_count_reruns_only_the_adaptive_rows(tmp_path, capsys):
    from otcclip.demo import train_config

    table = _load_script()
    wanted = ["none,none-adaptive"]

    def plan(*options: str) -> list:
        args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path), *options])
        base = table.demo_config(args)
        rows = table.select_rows(table.table_rows(train_config(base, "otcclip")), wanted)
        return table.plan_runs(tmp_path, base, rows, [0])

    poisoned, adaptive = plan("--n-adaptive", "200")
    assert poisoned.spec["data"]["n_backdoor"] == adaptive.spec["data"]["n_backdoor"] == 200
    for run in (poisoned, adaptive):
        run.directory.mkdir(parents=True)
        (run.directory / table.RUN_SPEC).write_text(json.dumps(run.spec))
    poisoned, adaptive = plan()  # the default count
    assert adaptive.spec["data"]["n_backdoor"] == table.N_ADAPTIVE != 200
    assert poisoned.spec["data"]["n_backdoor"] == 200
    assert [table.run_state(r) for r in (poisoned, adaptive)] == ["resume", "fresh"]
    base = table.demo_config(table._parser().parse_args(["--out", str(tmp_path)]))
    command = table.poison_command(base, "adaptive", tmp_path)
    assert "--attack adaptive --target-label bag --n-targets 8 --n-captions 40 " in command
    assert f"--n-poison {table.N_ADAPTIVE} " in command
    assert "--n-poison 200 " in table.poison_command(base, "poisoned", tmp_path)
    with pytest.raises(SystemExit):
        table.main(["--n-adaptive", "0", "--out", str(tmp_path)])
    assert "--n-adaptive must be >= 1" in capsys.readouterr().err


def test_the_table_aggregates_the_seeds_as_computed_by_hand(tmp_path):
    """The smoke run can only range-check its numbers; here the mean ± std and the bars
    are checked against figures worked out by hand."""
    table = _load_script()
    none = table.Row(key="none", name="none", variant="poisoned", defense="none")
    otc = table.Row(key="otcclip", name="otcclip", variant="poisoned", defense="otcclip")
    finals = {
        # zero-shot 0.70 / 0.74 / 0.78: mean 74.0, sample std sqrt((16 + 0 + 16) / 2) = 4.0
        "none": [(0.70, 1.0, 0.9), (0.74, 0.8, 1.0), (0.78, 0.9, 0.95)],
        # one seed failed: mean of the two finished (0.60, 0.64) = 62.0, std 2.8 (0.04 / √2)
        "otcclip": [(0.60, 0.0, 0.01), (0.64, 0.05, 0.03), None],
    }
    runs = []
    for row in (none, otc):
        for seed, final in enumerate(finals[row.key]):
            run = table.Run(row=row, seed=seed, directory=tmp_path / f"{row.key}{seed}", spec={})
            if final is None:
                run.status = "failed"
            else:
                run.status = "done"
                zs, targeted, backdoor = final
                run.final = {"zero_shot_top1": zs, "targeted_asr": targeted}
                run.final["backdoor_asr"] = backdoor
                run.seconds_per_epoch = 10.0 + seed
            runs.append(run)
    lines = table.results_table(runs).splitlines()
    none_cells = [c.strip() for c in lines[2].strip("|").split("|")]
    otc_cells = [c.strip() for c in lines[3].strip("|").split("|")]
    # targeted 1.0 / 0.8 / 0.9: mean 90.0, std 10.0; backdoor 0.9 / 1.0 / 0.95: 95.0 ± 5.0
    assert none_cells[:4] == ["none", "90.0 ± 10.0", "95.0 ± 5.0", "74.0 ± 4.0"]
    assert none_cells[5] == "11.0 ± 1.0"  # s/epoch 10, 11, 12
    assert otc_cells[:4] == ["otcclip (n=2/3)", "2.5 ± 3.5", "2.0 ± 1.4", "62.0 ± 2.8"]
    bars = "\n".join(table.bar_checks(runs, jobs=1))
    assert "attacks work without a defense (>= 80%): targeted 90.0%, backdoor 95.0%: met" in bars
    assert "OTCCLIP ASR <= 2%: targeted 2.500%, backdoor 2.000%: NOT met" in bars
    # issue 13's bar reads the clean row, absent here: said, not guessed
    assert "the clean model's + 1 point: not measured (row clean not among" in bars
    assert "varied-copies" not in bars  # a variant's line only where the row ran


def test_the_doubt_rows_leave_out_one_family_each_and_the_rule_row_is_the_papers():
    from otcclip.doubt import SIGNALS, DoubtConfig
    from otcclip.train import TrainConfig

    table = _load_script()
    rows = {r.key: r for r in table.table_rows(TrainConfig())}
    # the paper's rule scores every pair with the model: it cannot take the kept rounds
    assert rows["rule"].overrides == {"doubt": "match", "round_embeddings": "model"}
    assert rows["rule"].slug == "otcclip-doubt-match-the-paper-s-rule"
    dataclasses.replace(
        TrainConfig(defense="otcclip", scenes=64), **rows["rule"].overrides
    ).validate()
    default = set(DoubtConfig().signals)
    for key, family in (("no-pixel", "pixel"), ("no-consistency", "consistency")):
        kept = set(rows[key].overrides["doubt_signals"].split(","))
        assert kept == {s for s in default if SIGNALS[s] != family}
        assert kept < default
    assert rows["none-varied"].variant == rows["otcclip-varied"].variant == "varied"
    # with the paper's rule as the default, the rule row flips to the fused doubt
    flipped = {r.key: r for r in table.table_rows(TrainConfig(doubt="match"))}
    assert flipped["rule"].overrides == {"doubt": "fused"} and "no-pixel" not in flipped


def test_the_varied_copies_data_records_its_variation_in_spec_and_command(tmp_path):
    from deftable.data import data_spec, poison_command
    from otcclip.demo import DemoConfig

    config = DemoConfig(out=str(tmp_path), scenes=600)
    spec = data_spec(config, "varied")
    assert spec["copy_shift"] == 1 and spec["copy_noise"] == 2.0
    assert "copy_shift" not in data_spec(config, "poisoned")
    command = poison_command(config, "varied", tmp_path / "varied")
    assert "--copy-shift 1 --copy-noise 2" in command and "--attack badnet" in command
    # the varied rows' count and variation are their own: the other variants keep theirs
    tuned = DemoConfig(out=str(tmp_path), scenes=600, n_varied=100, copy_shift=0, copy_noise=4)
    spec = data_spec(tuned, "varied")
    assert (spec["n_captions"], spec["copy_shift"], spec["copy_noise"]) == (100, 0, 4.0)
    assert data_spec(tuned, "poisoned")["n_captions"] == data_spec(config, "poisoned")["n_captions"]
    command = poison_command(tuned, "varied", tmp_path / "varied")
    assert "--n-captions 100 " in command and "--copy-shift 0 --copy-noise 4" in command


def test_a_run_made_under_another_row_with_the_same_settings_is_adopted(tmp_path):
    """What a run computed decides whether it stands, not the row that asked for it: the
    default's runs made earlier with --set (the number written 2, not 2.0) are its runs."""
    from otcclip.demo import train_config

    table = _load_script()

    def plan(*options: str) -> dict:
        args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path), *options])
        base = table.demo_config(args)
        rows = table.select_rows(table.table_rows(train_config(base, "otcclip")), ["otcclip"])
        return {r.row.key: r for r in table.plan_runs(tmp_path, base, rows, [0])}

    earlier = plan("--set", "inter_ramp=2")["otcclip"]  # made before 2 was the default
    assert earlier.spec["train"]["inter_ramp"] == 2 and earlier.spec["overrides"] == {}
    today = plan()["otcclip"]
    recorded = dict(earlier.spec, row="otcclip, inter_ramp=2", key="ramp")
    today.directory.mkdir(parents=True)
    (today.directory / table.RUN_SPEC).write_text(json.dumps(recorded))
    assert table.run_state(today) == "resume"
    summary = {"config": earlier.spec["train"]}
    (today.directory / "summary.json").write_text(json.dumps(summary))
    assert table.run_state(today) == "done"
    summary["config"] = dict(earlier.spec["train"], inter_ramp=1)
    (today.directory / "summary.json").write_text(json.dumps(summary))
    assert table.run_state(today) == "stale"


def test_the_fused_rows_name_their_signals_and_older_unnamed_runs_keep_their_own(tmp_path):
    """A run that left doubt_signals unset fused the default of its day (the five signals
    before phase_pixel): the fused rows rerun, the paper's rule (no signals) stands."""
    from otcclip.demo import train_config
    from otcclip.doubt import DoubtConfig

    table = _load_script()
    args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path)])
    base = table.demo_config(args)
    rows = table.select_rows(table.table_rows(train_config(base, "otcclip")), ["otcclip", "rule"])
    fused, rule = table.plan_runs(tmp_path, base, rows, [0])
    assert fused.spec["train"]["doubt_signals"] == ",".join(DoubtConfig().signals)
    assert "--doubt-signals" in fused.spec["command"]
    _assert_command_reproduces(fused.spec["command"], fused.spec)
    assert rule.spec["train"]["doubt_signals"] is None
    for run in (fused, rule):
        old = json.loads(json.dumps(run.spec))
        old["train"]["doubt_signals"] = None  # recorded unset, before session 12
        run.directory.mkdir(parents=True)
        (run.directory / table.RUN_SPEC).write_text(json.dumps(old))
        (run.directory / "summary.json").write_text(json.dumps({"config": old["train"]}))
    assert [table.run_state(r) for r in (fused, rule)] == ["stale", "done"]
    # named as they are today, the fused run stands
    summary = {"config": fused.spec["train"]}
    (fused.directory / table.RUN_SPEC).write_text(json.dumps(fused.spec))
    (fused.directory / "summary.json").write_text(json.dumps(summary))
    assert table.run_state(fused) == "done"
    recorded = dict(fused.spec["train"], doubt_signals=table.SIGNALS_BEFORE_PHASE)
    (fused.directory / "summary.json").write_text(json.dumps({"config": recorded}))
    assert table.run_state(fused) == "stale"


def test_phase_knobs_are_named_where_the_doubt_reads_phase_pixel_and_older_runs_keep_theirs(
    tmp_path,
):
    """A fused run that read phase_pixel with its knobs unset trained the template-less,
    tail-scaled score of session 12: it stands while that is the default and reruns
    otherwise, as does a run recorded with other knobs. A row whose doubt never reads
    phase_pixel (no-pixel) does not depend on the knobs, so it stands whatever they were."""
    from otcclip.demo import train_config
    from otcclip.doubt import DoubtConfig

    table = _load_script()
    args = table._parser().parse_args(["--scenes", "200", "--out", str(tmp_path)])
    base = table.demo_config(args)
    rows = table.select_rows(
        table.table_rows(train_config(base, "otcclip")), ["otcclip", "no-pixel"]
    )
    fused, no_pixel = table.plan_runs(tmp_path, base, rows, [0])
    assert fused.spec["train"]["doubt_phase_template"] == DoubtConfig().phase_template
    assert fused.spec["train"]["doubt_phase_scale"] == DoubtConfig().phase_scale
    assert "--doubt-phase-template" in fused.spec["command"]
    _assert_command_reproduces(fused.spec["command"], fused.spec)
    assert no_pixel.spec["train"].get("doubt_phase_template") is None
    for run in (fused, no_pixel):
        old = json.loads(json.dumps(run.spec))
        for key in table.PHASE_BEFORE_TEMPLATE:
            old["train"].pop(key, None)  # recorded before session 13
        run.directory.mkdir(parents=True)
        (run.directory / table.RUN_SPEC).write_text(json.dumps(old))
        (run.directory / "summary.json").write_text(json.dumps({"config": old["train"]}))
    default = DoubtConfig()
    before = table.PHASE_BEFORE_TEMPLATE
    same = (default.phase_template, default.phase_scale) == (
        before["doubt_phase_template"],
        before["doubt_phase_scale"],
    )
    expected = "done" if same else "stale"
    assert [table.run_state(r) for r in (fused, no_pixel)] == [expected, "done"]
    # recorded with another template: the fused run reruns, whatever today's default
    other = next(t for t in ("off", "narrow", "all") if t != default.phase_template)
    recorded = dict(fused.spec["train"], doubt_phase_template=other)
    (fused.directory / table.RUN_SPEC).write_text(json.dumps(dict(fused.spec, train=recorded)))
    (fused.directory / "summary.json").write_text(json.dumps({"config": recorded}))
    assert table.run_state(fused) == "stale"
    (fused.directory / table.RUN_SPEC).write_text(json.dumps(fused.spec))
    (fused.directory / "summary.json").write_text(json.dumps({"config": fused.spec["train"]}))
    assert table.run_state(fused) == "done"


@pytest.mark.parametrize(("backdoor", "result"), [(0.025, "met"), (0.027, "NOT met")])
def test_the_backdoor_bar_is_the_clean_models_rate_plus_one_point(tmp_path, backdoor, result):
    table = _load_script()
    runs = []
    for key, final in (("clean", (0.72, 0.0, 0.016)), ("otcclip", (0.75, 0.0, backdoor))):
        row = table.Row(key=key, name=key, variant="poisoned", defense="none")
        run = table.Run(row=row, seed=0, directory=tmp_path / key, spec={})
        run.status = "done"
        zs, targeted, bd = final
        run.final = {"zero_shot_top1": zs, "targeted_asr": targeted, "backdoor_asr": bd}
        runs.append(run)
    bars = "\n".join(table.bar_checks(runs, jobs=1))
    line = "otcclip: targeted ASR <= 2%, backdoor ASR <= the clean model's + 1 point"
    assert f"{line}: targeted 0.0%, backdoor {100 * backdoor:.1f}% (clean 1.6%): {result}" in bars
