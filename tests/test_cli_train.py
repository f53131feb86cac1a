"""`otcclip train`'s recorded command lines: parsing one back gives the same run."""

import shlex

import pytest

from otcclip.commands.train import _settings, command, command_line
from otcclip.train import TrainConfig


def _parse(line: str) -> tuple[TrainConfig, int, int]:
    argv = shlex.split(line.split("  #")[0])
    assert argv[:2] == ["otcclip", "train"]
    ctx = command.make_context("train", argv[2:])
    settings = _settings(ctx, dict(ctx.params))
    eval_size, probe_size = settings.pop("eval_size"), settings.pop("probe_size")
    assert settings.pop("val_size") == 0  # evaluation only, not a training setting
    return TrainConfig(**settings), eval_size, probe_size


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
    parsed, eval_size, probe_size = _parse(line)
    assert (eval_size, probe_size) == (500, 200)
    assert parsed.to_dict() == config.to_dict()


def test_a_setting_without_an_option_is_named_not_dropped():
    config = TrainConfig(data="d", out="o", ot_duplicate_cos=None)
    line = command_line(config)
    assert line.endswith("# not expressible as options: ot_duplicate_cos=None")


def test_the_options_defaults_are_the_library_defaults():
    """The click options repeat TrainConfig's defaults (the CLI must not import torch to
    print --help); this keeps the two from drifting apart. Two differ on purpose: the
    command trains OTCCLIP and checkpoints, the library's bare config does neither."""
    ctx = command.make_context("train", ["--data", "d", "--out", "o"])
    settings = _settings(ctx, dict(ctx.params))
    settings.pop("eval_size"), settings.pop("probe_size"), settings.pop("val_size")
    cli = TrainConfig(**settings).to_dict()
    library = TrainConfig(data="d", out="o").to_dict()
    differ = {k: (cli[k], library[k]) for k in cli if cli[k] != library[k]}
    assert differ == {"defense": ("otcclip", "none"), "checkpoint_every": (500, 0)}
