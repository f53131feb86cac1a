"""The table's rows and settings: which configurations run, on which data, with what.

Rows are named configurations (data variant, defense, TrainConfig overrides) on the
demo's settings; the ablations flip the CURRENT OTCCLIP defaults. The baselines'
control rows (no defense with the baselines' augmentation; filter-then-train) live
here too, next to the defenses they control for.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROW_KEYS = (
    "clean",
    "none",
    "roclip",
    "safeclip",
    "otcclip",
    "alpha",
    "inter",
    "ramp",
    "intra",
    "rho",
    "assign",
    "doubt",
    "none-adaptive",
    "otcclip-adaptive",
    "none-aug",
    "filter",
    "rule",
    "no-pixel",
    "no-consistency",
    "no-cross",
    "none-varied",
    "otcclip-varied",
)
# SafeCLIP at its reference's schedule scaled to 8 epochs (W = 99 steps of unimodal warm-up,
# the low-lr CLIP phase at a fixed 1% of the rate, separate safe and risky passes), with the
# first split's posterior threshold and the share's growth chosen by validation zero-shot
# after all 8 epochs (TUNING.md, session 9): p >= 0.5, then +10% per epoch up to 85% reached
# 62.3% val against 58.6% (p >= 0.9, +10%) and 56.0% (p >= 0.9, +4%, the reference's
# rate scaled). Never chosen by ASR or by the reported images.
SAFECLIP_TUNED: dict[str, Any] = {
    "warmup_steps": 99,
    "safe_schedule": "reference",
    "safe_threshold": 0.5,
    "safe_max": 0.85,
    "safe_growth": 0.10,
    "safeclip_lr_fixed": True,
    "safeclip_lr_scale": 0.01,
}
# The references' augmentation (RoCLIP's: images and captions of every pair, every epoch),
# for the control row: what it costs plain CLIP at this budget. RoCLIP and SafeCLIP no
# longer augment the images of the view their CLIP loss sees (TUNING.md, session 7).
BASELINE_AUGMENT = {"augment": "both"}
ATTACKS = {
    "clean": [],
    "poisoned": ["targeted", "badnet"],
    "adaptive": ["targeted", "adaptive"],
    "varied": ["targeted", "badnet"],
}
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
        "state_on_disk",
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
        "doubt",
        "doubt_signals",
        "doubt_phase_template",
        "doubt_phase_scale",
        "doubt_k",
        "doubt_min_share",
        "pixel_screen",
        "round_embeddings",
    }
)


# Settings added after runs were recorded, with the value those runs trained with: a
# recorded config without the key is compared as if it held this value.
BEFORE_THE_SETTING: dict[str, Any] = {
    "on_doubt": "repair",
    "doubt": "match",
    "pixel_screen": False,
}


# The fused doubt's signals before session 12 made phase_pixel a default: a recorded run
# that left doubt_signals unset (None) trained these. The table now records the signals
# it asks for by name (`resolved_doubt`), so a change of DoubtConfig's default reruns
# the rows it touches and no others.
SIGNALS_BEFORE_PHASE = "cross,copies_pixel,recurrence_pixel,consistency_caption,consistency_image"

# phase_pixel's knobs before session 13 named them (TrainConfig.doubt_phase_*): a recorded
# fused run that read phase_pixel with these unset trained these values.
PHASE_BEFORE_TEMPLATE = {"doubt_phase_template": "off", "doubt_phase_scale": "tail"}


def _reads_phase(train: dict[str, Any]) -> bool:
    signals = train.get("doubt_signals") or ""
    return train.get("doubt") == "fused" and "phase_pixel" in signals.split(",")


def _with_older_settings(train: dict[str, Any]) -> dict[str, Any]:
    from otcclip.train import recorded_settings  # the trainer's own moved defaults

    out = {**BEFORE_THE_SETTING, **recorded_settings(train)}
    if out.get("doubt_signals") is None:
        out["doubt_signals"] = SIGNALS_BEFORE_PHASE
    for key, before in PHASE_BEFORE_TEMPLATE.items():
        # a run whose doubt never read phase_pixel did not depend on its knobs
        out[key] = (out.get(key) or before) if _reads_phase(out) else None
    return out


def resolved_doubt(tc: Any) -> Any:
    """`tc` with the fused doubt's signals, and phase_pixel's knobs where it reads them,
    named, where they are left to DoubtConfig's default."""
    from otcclip.doubt import DoubtConfig

    if tc.defense != "otcclip" or tc.doubt != "fused":
        return tc
    default = DoubtConfig()
    signals = tc.doubt_signals or ",".join(default.signals)
    named = {"doubt_signals": signals}
    if "phase_pixel" in signals.split(","):
        named["doubt_phase_template"] = tc.doubt_phase_template or default.phase_template
        named["doubt_phase_scale"] = tc.doubt_phase_scale or default.phase_scale
    return dataclasses.replace(tc, **named)


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
# The varied-copies attack's copies per target. 40 copies varied by 2 px and sigma-8 noise
# are not learned without a defense (0% targeted): the tiny model generalises from them to
# the target's true class (TUNING.md, session 9). Probed on seed 0 without a defense
# (session 10), targeted ASR after 8 epochs: 2 px / sigma 8 at 80 and 120 copies 37.5% and
# 0%; 1 px / sigma 8 at 80 37.5%; 1 px / sigma 2 at 40 and 80 50% and 62.5%; no shift,
# sigma 8, at 40 62.5%. None reached the 80% that exact copies do (100%); the table takes
# the strongest that keeps a shift: 80 copies, 1 px, sigma 2 (DemoConfig.copy_shift/noise).
N_VARIED: int | None = 80


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
    ramp = 0.0 if base.inter_ramp > 0 else 2.0
    return [
        Row("clean", "clean", "clean", "none"),
        Row("none", "none", "poisoned", "none"),
        Row("roclip", "roclip", "poisoned", "roclip"),
        Row("safeclip", "safeclip", "poisoned", "safeclip", SAFECLIP_TUNED),
        Row("otcclip", "otcclip", "poisoned", "otcclip"),
        _ablation("alpha", {"alpha": 1.0}),
        _ablation("inter", {"lambda_inter": 0.0}),
        _ablation("ramp", {"inter_ramp": ramp}),
        _ablation("intra", {"lambda_intra": intra}),
        _ablation("rho", {"ot_rho": rho}, "balanced" if rho is None else "unbalanced"),
        _ablation("assign", assign),
        _ablation(
            "doubt", {"on_doubt": doubt}, "the paper's re-pairing" if doubt == "repair" else ""
        ),
        Row("none-adaptive", "none (adaptive)", "adaptive", "none"),
        Row("otcclip-adaptive", "otcclip (adaptive)", "adaptive", "otcclip"),
        # controls for the baselines: their augmentation without their defense, and
        # the defense a user would try first
        Row("none-aug", "none, the references' augmentation", "poisoned", "none", BASELINE_AUGMENT),
        Row("filter", "filter-then-train", "poisoned", "filter"),
        # the doubt (issue 13): the paper's rule instead of the fused score, each family of
        # signals left out, and targeted copies an attacker varied
        *_doubt_rows(base),
        Row("none-varied", "none (varied copies)", "varied", "none"),
        Row("otcclip-varied", "otcclip (varied copies)", "varied", "otcclip"),
    ]


def _doubt_rows(base: Any) -> list[Row]:
    from otcclip.doubt import SIGNALS, DoubtConfig

    if base.doubt != "fused":  # the default is the paper's rule: flip to the fused doubt
        return [_ablation("rule", {"doubt": "fused"})]
    signals = base.doubt_signals.split(",") if base.doubt_signals else DoubtConfig().signals
    rule: dict[str, Any] = {"doubt": "match"}
    if base.round_embeddings != "model":  # the paper's rule scores every pair with the model
        rule["round_embeddings"] = "model"
    rows = [Row("rule", "otcclip, doubt=match (the paper's rule)", "poisoned", "otcclip", rule)]
    for key, family in (
        ("no-pixel", "pixel"),
        ("no-consistency", "consistency"),
        ("no-cross", "cross"),
    ):
        kept = [s for s in signals if SIGNALS[s] != family]
        if kept and len(kept) < len(signals):
            rows.append(
                Row(
                    key,
                    f"otcclip, doubt without {family} signals",
                    "poisoned",
                    "otcclip",
                    {"doubt_signals": ",".join(kept)},
                )
            )
    return rows


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


def parse_value(text: str) -> Any:
    """A --set value: none/null, true/false, an int, a float, else the text itself."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


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
        out[key] = parse_value(raw)
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
    for name in ("copy_shift", "copy_noise"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    if args.n_varied is not None:
        sizes["n_varied"] = args.n_varied
    elif not args.quick:
        sizes["n_varied"] = N_VARIED
    return DemoConfig(
        out=str(args.out),
        threads=args.threads,
        progress=False,
        train_overrides=overrides,
        **sizes,
    )
