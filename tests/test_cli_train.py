"""`otcclip train`'s recorded command lines: parsing one back gives the same run."""

import shlex

import pytest

from otcclip.commands.train import _settings, command, command_line
from otcclip.train import TrainConfig


def _parse(line: str) -> TrainConfig:
    argv = shlex.split(line.split("  #")[0])
    assert argv[:2] == ["otcclip", "train"]
    ctx = command.make_context("train", argv[2:])
    return TrainConfig(**_settings(ctx, dict(ctx.params)))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"defense": "otcclip", "alpha": 1.0, "ot_rho": 0.5, "lambda_intra": 0.5},
        {"defense": "otcclip", "assign": "capacity", "capacity": 2, "max_repair": 0.2},
        {"defense": "otcclip", "ot_duplicate_cos": 1.0, "inter_symmetric": True},
        {"defense": "roclip", "out": "runs/a b", "data": "data dir/poisoned", "lr": 2e-3},
        {"defense": "roclip", "warmup_steps": 237, "augment": "text", "bank_size": 8192},
        {
            "defense": "safeclip",
            "safe_schedule": "reference",
            "safe_threshold": 0.9,
            "safe_max": 0.85,
            "safeclip_passes": "separate",
            "safeclip_lr_fixed": True,
            "image_augment": "noise_std=0,brightness=0",
        },
        {"defense": "filter", "filter_score": "slof", "filter_k": 8, "filter_max_share": 0.1},
    ],
)
def test_a_recorded_command_reruns_exactly_the_same_settings(overrides):
    config = TrainConfig(**{"data": "runs/poisoned", "out": "runs/x", **overrides})
    line = command_line(config, eval_size=500, probe_size=200)
    assert "#" not in line, line
    parsed = _parse(line)
    assert (parsed.eval_size, parsed.probe_size) == (500, 200)
    want = config.to_dict() | {"eval_size": 500, "probe_size": 200}
    assert parsed.to_dict() == want
    # the config records both, so by default the line repeats the config's own
    assert _parse(command_line(parsed)).to_dict() == want


def test_a_setting_without_an_option_is_named_not_dropped():
    config = TrainConfig(data="d", out="o", ot_duplicate_cos=None)
    line = command_line(config)
    assert line.endswith("# not expressible as options: ot_duplicate_cos=None")


def test_the_options_defaults_are_the_library_defaults():
    """The click options repeat TrainConfig's defaults (the CLI must not import torch to
    print --help); this keeps the two from drifting apart. Two differ on purpose: the
    command trains OTCCLIP and checkpoints, the library's bare config does neither."""
    ctx = command.make_context("train", ["--data", "d", "--out", "o"])
    cli = TrainConfig(**_settings(ctx, dict(ctx.params))).to_dict()
    library = TrainConfig(data="d", out="o").to_dict()
    differ = {k: (cli[k], library[k]) for k in cli if cli[k] != library[k]}
    assert differ == {"defense": ("otcclip", "none"), "checkpoint_every": (500, 0)}


def test_resume_restores_every_option_that_changes_a_printed_figure(tmp_path):
    """--eval-size and --probe-size were not recorded, so --resume evaluated differently."""
    from otcclip.checkpoint import save_checkpoint
    from otcclip.models import create_model

    run = tmp_path / "run"
    config = TrainConfig(scenes=192, out=str(run), eval_size=60, probe_size=30, eval_every=2)
    save_checkpoint(run, create_model("otc-vit-tiny"), {"config": config.to_dict()}, global_step=1)
    ctx = command.make_context("train", ["--out", str(run), "--resume"])
    resumed = TrainConfig(**_settings(ctx, dict(ctx.params)))
    assert (resumed.eval_size, resumed.probe_size, resumed.eval_every) == (60, 30, 2)
    ctx = command.make_context("train", ["--out", str(run), "--resume", "--eval-size", "80"])
    assert _settings(ctx, dict(ctx.params))["eval_size"] == 80  # an explicit option wins
    # --resume-from names the checkpoint to continue from, and implies --resume
    name = next((run / "checkpoints").glob("step-*")).name
    ctx = command.make_context("train", ["--out", str(run), "--resume-from", name])
    settings = _settings(ctx, dict(ctx.params))
    assert settings["resume"] and settings["resume_from"] == name and settings["eval_size"] == 60


def test_a_run_saved_before_the_kept_rounds_were_the_default_resumes_with_its_own(tmp_path):
    """A checkpoint saved before round_embeddings existed trained rounds that embed every
    pair again; resuming it must not switch to the kept rounds, today's default."""
    from otcclip.checkpoint import save_checkpoint
    from otcclip.models import create_model

    run = tmp_path / "run"
    config = TrainConfig(scenes=192, out=str(run), defense="otcclip").to_dict()
    assert config["round_embeddings"] == "training"  # recorded always, default or not
    del config["round_embeddings"]
    assert TrainConfig.from_dict(config).round_embeddings == "model"  # the library resumes so
    save_checkpoint(run, create_model("otc-vit-tiny"), {"config": config}, global_step=1)
    ctx = command.make_context("train", ["--out", str(run), "--resume"])
    assert _settings(ctx, dict(ctx.params))["round_embeddings"] == "model"
    ctx = command.make_context(
        "train", ["--out", str(run), "--resume", "--round-embeddings", "training"]
    )
    assert _settings(ctx, dict(ctx.params))["round_embeddings"] == "training"  # as asked
    # a run saved with the setting resumes with what it saved
    config["round_embeddings"] = "training"
    save_checkpoint(run, create_model("otc-vit-tiny"), {"config": config}, global_step=2)
    ctx = command.make_context("train", ["--out", str(run), "--resume"])
    assert _settings(ctx, dict(ctx.params))["round_embeddings"] == "training"


def _invoke(*args: object):
    from click.testing import CliRunner

    from otcclip.cli import main

    return CliRunner().invoke(main, ["train", *map(str, args)], catch_exceptions=False)


def test_out_and_threads_are_checked_before_any_work(tmp_path, monkeypatch):
    import otcclip.train

    monkeypatch.setattr(otcclip.train, "train", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "file").write_text("mine")
    r = _invoke("--scenes", 10, "--out", tmp_path / "file")
    assert r.exit_code == 2 and "is a file; the run directory is a folder" in r.output
    r = _invoke("--scenes", 10, "--out", tmp_path / "file" / "run")
    assert r.exit_code == 2 and "is a file, so" in r.output
    assert (tmp_path / "file").read_text() == "mine"
    r = _invoke("--scenes", 10, "--out", tmp_path / "run", "--threads", 3000)
    assert r.exit_code == 2 and "Invalid value for --threads" in r.output and "3000" in r.output
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_is_one_line_naming_the_way_back(tmp_path):
    from otcclip.checkpoint import save_checkpoint
    from otcclip.models import create_model

    run = tmp_path / "run"
    config = TrainConfig(scenes=192, out=str(run))
    bundle = create_model("otc-vit-tiny")
    old = save_checkpoint(run, bundle, {"config": config.to_dict()}, global_step=1)
    new = save_checkpoint(run, bundle, {"config": config.to_dict()}, global_step=2)
    (new / "state.safetensors").write_bytes(b"\x00" * 10)  # truncated
    r = _invoke("--out", run, "--resume")
    assert r.exit_code == 1
    assert r.output.startswith("Error: checkpoint ") and len(r.output.splitlines()) == 1
    assert f"resume from it with --resume-from {old.name}" in r.output


def test_help_states_the_real_image_size_minimum():
    from otcclip.commands.poison import command as poison

    text = poison.get_help(poison.make_context("poison", ["--out", "x"]))
    assert "x>=56" in " ".join(text.split())


def test_settings_added_later_are_recorded_only_when_set():
    """Records made before eval_size/probe_size/resume_from existed must still compare equal
    (the results table reruns a row whose recorded config differs)."""
    plain = TrainConfig(scenes=10).to_dict()
    assert not {"eval_size", "probe_size", "resume_from"} & set(plain)
    assert TrainConfig.from_dict(plain) == TrainConfig(scenes=10)
    assert TrainConfig(scenes=10, eval_size=60).to_dict()["eval_size"] == 60
