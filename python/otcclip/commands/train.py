"""`otcclip train`: CLIP from scratch with a defense (none, roclip, safeclip, otcclip, filter).

This command wires the per-epoch evaluation (`otcclip.evaluate`) into the loop
as a callback: the trainer itself never imports evaluation. Under `torchrun`
every process runs this command; rank 0 evaluates, prints and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

_SCHEDULE_HELP = (
    "[default per defense: otcclip W=2 R=1; roclip W=4 R=2; safeclip W=1 (its unimodal "
    "warm-up epochs); filter W=2]"
)


@click.command(name="train")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Training pairs: a poison directory from `otcclip poison` (train.parquet + "
    "manifest.json: per-epoch ASR) or a .parquet / .csv / webdataset .tar file.",
)
@click.option("--scenes", type=click.IntRange(min=1), help="Build N fashion-scenes instead.")
@click.option("--data-seed", type=click.IntRange(min=0), help="Seed of --scenes [default: --seed].")
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="Resize data images to S x S when reading (fashion-scenes default 56, and at least "
    "56 for fashion-scenes; evaluation of smaller images runs at the model's size).",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Stream the pairs of --data (a shard folder, a poison directory written with "
    "--format shards, or parquet) through DataLoader workers instead of reading them into "
    "memory: memory holds about batch x prefetch x workers pairs. Every defense streams: "
    "otcclip with its default --round-embeddings training (its rounds doubt from the kept "
    "embeddings, and a pass before the first epoch reads every image once for the pixel "
    "signals), filter (it scores the kept image embeddings), safeclip with "
    "--safeclip-passes mixed (its split reads the kept embeddings). Shards need their "
    "shards.json. A run resumes with the same --workers and process count.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="With --stream: DataLoader workers per process that read and decode (0: the "
    "training process reads). Part of the data order: keep it to reproduce or resume a run.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="With --stream: batches each worker prepares ahead.",
)
@click.option(
    "--model",
    default="otc-vit-tiny",
    show_default=True,
    help="A built-in model (otc-vit-tiny, ...) or any open_clip name (RN50, ViT-B-32, ...).",
)
@click.option(
    "--defense",
    type=click.Choice(["none", "roclip", "safeclip", "otcclip", "filter"]),
    default="otcclip",
    show_default=True,
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Global batch (split over torchrun processes).",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option(
    "--lr-warmup-steps",
    type=click.IntRange(min=0),
    help="Linear warm-up steps of the cosine schedule [default: 5% of all steps].",
)
@click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True), help="Clip grad norm.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 (else fp16) mixed precision on CUDA, fp32 on the CPU.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run directory: checkpoints/, metrics.jsonl, model.safetensors, summary.json.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last checkpoint; options not given are taken "
    "from the run.",
)
@click.option(
    "--resume-from",
    metavar="CHECKPOINT",
    help="With a damaged newest checkpoint: resume from this older one instead (a step-... "
    "directory in RUN/checkpoints, as the error names it). Implies --resume.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Also checkpoint every N steps within an epoch (0: at epoch ends only).",
)
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Evaluate every E epochs and after the last (0: never): zero-shot; ASR with a manifest.",
)
@click.option("--eval-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--val-size",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Zero-shot on N clean validation images (test-pool images outside the zero-shot "
    "and probe sets) every epoch: the metric to tune by (0: off).",
)
@click.option(
    "--probe-size",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Linear probe on N train / N test images after the last epoch (0: off).",
)
@click.option("--threads", type=click.IntRange(min=1), help="torch (and otmatch) threads.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--tensorboard", is_flag=True, help="Also log to RUN/tensorboard (needs tensorboard)."
)
@click.option(
    "--warmup-epochs",
    type=click.IntRange(min=0),
    help="W: epochs before the defense first acts. " + _SCHEDULE_HELP,
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    help="RoCLIP / SafeCLIP / filter: the warm-up in optimizer steps (overrides "
    "--warmup-epochs; a defense switches mid-epoch where it can).",
)
@click.option(
    "--augment",
    type=click.Choice(["auto", "off", "images", "text", "both"]),
    default="auto",
    show_default=True,
    help="Augment the first view's images / captions: auto = as the defense plans it "
    "(roclip: text; none, safeclip, otcclip, filter: off; the references of RoCLIP and "
    "SafeCLIP augment images too: --augment both / images).",
)
@click.option(
    "--image-augment",
    default="",
    help="Image augmentation overrides NAME=VALUE,... of min_scale (0.9), max_shift (0.04), "
    "brightness (0.2), contrast (0.2), noise_std (0.05) [default: those].",
)
@click.option(
    "--match-every",
    type=click.IntRange(min=0),
    help="R: a matching round every R epochs after W (0: never). " + _SCHEDULE_HELP,
)
@click.option("--k", type=click.IntRange(min=1), default=16, show_default=True, help="Candidates.")
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="S = alpha*cos + (1-alpha)*s_OT (1: global only).",
)
@click.option(
    "--eps",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="Sinkhorn eps (L_inter/L_intra, and matching unless --match-eps).",
)
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--match-eps", type=click.FloatRange(min=0, min_open=True), help="[default: --eps]")
@click.option("--match-iters", type=click.IntRange(min=1), help="[default: --iters]")
@click.option(
    "--rho", type=click.FloatRange(min=0, min_open=True), help="Unbalanced OT (KL weight)."
)
@click.option(
    "--assign",
    type=click.Choice(["argmax", "capacity"]),
    default="argmax",
    show_default=True,
)
@click.option("--capacity", type=click.IntRange(min=1), help="With --assign capacity.")
@click.option(
    "--margin",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Keep the own caption unless beaten by more (re-pair only suspicious pairs).",
)
@click.option(
    "--fallback",
    type=click.Choice(["own", "unassigned"]),
    default="own",
    show_default=True,
    help="An image whose candidates are all full (capacity): own caption or sit out.",
)
@click.option(
    "--flag-outside-topk",
    is_flag=True,
    help="Also re-pair every image whose own caption is not among its k candidates.",
)
@click.option(
    "--rematch-from",
    type=click.Choice(["original", "previous", "sticky"]),
    default="original",
    show_default=True,
    help="A round starts from the original captions, from the previous pairing, or "
    "(sticky) from the original caption until a round doubts the pair.",
)
@click.option(
    "--on-doubt",
    type=click.Choice(["drop", "repair"]),
    default="drop",
    show_default=True,
    help="What a round does with the pairs it doubts: leave them out of the epoch, or "
    "re-pair them with their best candidate (the paper's re-assignment).",
)
@click.option(
    "--max-repair",
    type=click.FloatRange(0, 1),
    default=0.25,
    show_default=True,
    help="The most a round re-pairs, as a share of the images: the most suspicious first "
    "(largest lead of the best candidate over the own caption).",
)
@click.option(
    "--doubt",
    type=click.Choice(["fused", "match"]),
    default="fused",
    show_default=True,
    help="Which pairs a round doubts: 'fused' = the fused doubt score of otcclip.doubt "
    "(density, neighbourhood consistency and the round's cross-modal lead), cut by a "
    "label-free mixture and capped by --max-repair; 'match' = the paper's rule (a "
    "candidate beats the own caption by --margin), capped by --max-repair.",
)
@click.option(
    "--doubt-signals",
    default=None,
    help="Comma-separated signals the fused doubt uses (see otcclip.doubt.SIGNALS) "
    "[default: otcclip.doubt.DoubtConfig's].",
)
@click.option(
    "--doubt-phase-template",
    type=click.Choice(["off", "narrow", "all"]),
    default=None,
    help="Which of the phase_pixel signal's patterns are scored along their matched "
    "template ('narrow': those that lock few frequency bins, such as SIG's sine; with "
    "--doubt-phase-scale own it finds more of a SIG backdoor, at some clean pairs) "
    "[default: otcclip.doubt.DoubtConfig's].",
)
@click.option(
    "--doubt-phase-scale",
    type=click.Choice(["own", "tail"]),
    default=None,
    help="'own' fuses phase_pixel on its own per-pattern scale; 'tail' rescales it like "
    "every other signal [default: otcclip.doubt.DoubtConfig's].",
)
@click.option(
    "--doubt-k",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Neighbours of the doubt signals' self-joins.",
)
@click.option(
    "--doubt-min-share",
    type=click.FloatRange(0, 1),
    default=0.005,
    show_default=True,
    help="The fused doubt leaves out at least this share of the pairs each round.",
)
@click.option(
    "--pixel-screen/--no-pixel-screen",
    default=True,
    show_default=True,
    help="With --doubt fused: leave out of the warm-up the pairs the pixel signals alone "
    "doubt (copies of one image, a patch trigger); they need no model.",
)
@click.option(
    "--lambda-inter",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Weight of L_inter (patch-word OT-InfoNCE), from the first epoch.",
)
@click.option(
    "--inter-ramp",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Epochs over which L_inter's weight grows linearly from 0 to --lambda-inter, so "
    "that the global alignment forms first (0: full weight from the first step).",
)
@click.option(
    "--lambda-intra",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Weight of L_intra (OT-InfoNCE between augmented views; costs a second forward).",
)
@click.option(
    "--ot-negatives",
    type=click.IntRange(min=0),
    default=7,
    show_default=True,
    help="m: OT-InfoNCE over the positive and the m hardest in-batch negatives.",
)
@click.option(
    "--ot-scale",
    type=click.FloatRange(min=0, min_open=True),
    help="Fixed logit scale of the OT losses [default: the learned CLIP scale].",
)
@click.option("--inter-symmetric", is_flag=True, help="L_inter in both directions (2x the OT).")
@click.option(
    "--ot-duplicate-cos",
    type=click.FloatRange(-1, 1),
    default=0.95,
    show_default=True,
    help="OT losses: a caption whose embedding has a cosine above this with the positive's "
    "says the same thing and is not used as a negative (1: every other caption is).",
)
@click.option(
    "--ot-compile",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="torch.compile the Sinkhorn loop (auto: for runs with enough OT work to pay off).",
)
@click.option(
    "--match-batch",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images / captions per batch when a round embeds the data.",
)
@click.option(
    "--match-bank",
    type=click.IntRange(min=1),
    default=None,
    help="OTCCLIP: prune each round's candidates from a random bank of this many captions "
    "instead of the exact top-k over all of them (for pools past the crossover in the "
    "README; approximate). [default: exact]",
)
@click.option(
    "--state-on-disk",
    is_flag=True,
    help="Keep the per-pair state (the embeddings kept for OTCCLIP's rounds, the filter and "
    "SafeCLIP on a stream; a stream's slots) in memory-mapped files under "
    "OUT/matching-state/ instead of memory: at web scale it is N x D float16 twice per "
    "process. Needs --out.",
)
@click.option(
    "--round-embeddings",
    type=click.Choice(["training", "model"]),
    default="training",
    show_default=True,
    help="OTCCLIP: where a round takes each pair's global embeddings: keep them from the "
    "training pass and re-embed only the pairs the last epoch left out (training: no "
    "embedding pass of the round's own; needs --doubt fused; the cross-modal signal is "
    "then the global-cosine lead, and only repaired pairs are scored by OT), or embed every "
    "pair again (model; the paper's rule, --doubt match, needs it).",
)
@click.option(
    "--bank-size",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="RoCLIP: FIFO caption bank size.",
)
@click.option(
    "--safeclip-lr-scale",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="SafeCLIP: learning-rate factor of its one CLIP epoch after the warm-up.",
)
@click.option(
    "--safeclip-lr-fixed/--safeclip-lr-scheduled",
    default=False,
    show_default=True,
    help="SafeCLIP: the low-lr phase at --safeclip-lr-scale times the base rate (the "
    "reference: 1%) instead of times the schedule's rate.",
)
@click.option(
    "--safe-start",
    type=click.FloatRange(0, 1),
    default=0.3,
    show_default=True,
    help="SafeCLIP: safe share of the first mixed epoch.",
)
@click.option(
    "--safe-growth",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="SafeCLIP: safe share added per epoch.",
)
@click.option(
    "--safe-max",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="SafeCLIP: the largest safe share (the reference: 0.85).",
)
@click.option(
    "--safe-threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="SafeCLIP: posterior of the high-cosine component a safe pair needs (schedule "
    "share: every split; reference: the first split, where the reference uses 0.9).",
)
@click.option(
    "--safe-schedule",
    type=click.Choice(["share", "reference"]),
    default="share",
    show_default=True,
    help="SafeCLIP: share = start + growth per epoch among confident pairs; reference = "
    "the confident pairs first, then that share + growth per epoch.",
)
@click.option(
    "--safeclip-passes",
    type=click.Choice(["mixed", "separate"]),
    default="separate",
    show_default=True,
    help="SafeCLIP: safe and risky rows share batches (mixed) or get batches of their own "
    "(separate, the reference: the CLIP loss sees a full batch of negatives).",
)
@click.option(
    "--filter-score",
    type=click.Choice(["kdist", "slof", "dao"]),
    default="dao",
    show_default=True,
    help="filter: the local-outlier score on the warm-up model's image embeddings.",
)
@click.option(
    "--filter-k", type=click.IntRange(min=1), default=16, show_default=True, help="filter: k."
)
@click.option(
    "--filter-max-share",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.25,
    show_default=True,
    help="filter: the most the label-free (mixture) cut may drop.",
)
def command(**options: Any) -> None:
    """Train CLIP from scratch on (possibly poisoned) pairs, with a defense.

    \b
    Examples:
      otcclip train --scenes 20000 --defense otcclip --epochs 10 --out runs/otc
      otcclip train --data runs/poisoned --defense none --out runs/none
      otcclip train --out runs/otc --resume
      otcclip train --data runs/shards --stream --defense none --out runs/stream
      torchrun --nproc_per_node 2 -m otcclip.cli train --data runs/poisoned --out runs/ddp
    """
    from otcclip import distributed as dist
    from otcclip.checkpoint import CheckpointError
    from otcclip.train import TrainConfig, train

    ctx = click.get_current_context()
    dist.init_from_env()
    try:
        _check_out(options["out"], options["threads"])
        settings = _settings(ctx, options)
        config = TrainConfig(**settings)
        try:
            config.validate()
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        callbacks = []
        if config.eval_every > 0:
            from otcclip.evaluate import EpochEvaluation

            callbacks.append(
                EpochEvaluation(
                    every=config.eval_every,
                    epochs=config.epochs,
                    eval_size=config.eval_size,
                    probe_size=config.probe_size,
                    seed=config.seed,
                    val_size=config.val_size,
                )
            )
        try:
            result = train(config, callbacks)
        except (ValueError, TypeError, FileNotFoundError, CheckpointError) as err:
            raise click.ClickException(str(err)) from None
        if dist.is_main():
            final = result.metrics[-1] if result.metrics else {}
            click.echo(f"done: {config.out} (model.safetensors, metrics.jsonl, summary.json)")
            ev = final.get("eval") or {}
            shown = {k: ev.get(k) for k in ("zero_shot_top1", "targeted_asr", "backdoor_asr")}
            click.echo(json.dumps({"epoch": final.get("epoch"), **shown}))
    finally:
        dist.destroy()


def _check_out(out: Path, threads: int | None) -> None:
    """Refuse, before any work, an --out that cannot be a run folder and a thread count
    the matching engine would refuse at the first round (after epochs of training)."""
    from otcclip.atomic import file_target_problem

    if out.exists() and not out.is_dir():
        raise click.BadParameter(
            f"{out} is a file; the run directory is a folder", param_hint="--out"
        )
    problem = file_target_problem(out)
    if problem is not None and not out.is_dir():
        raise click.BadParameter(problem, param_hint="--out")
    if threads is not None:
        from otcclip.otmatch import max_threads

        if threads > max_threads():
            raise click.BadParameter(
                f"at most {max_threads()} (4 per core) on this machine, got {threads}",
                param_hint="--threads",
            )


def _settings(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields from the options; with --resume, unset ones come from the run."""
    rename = {"rho": "ot_rho"}
    settings = {rename.get(k, k): v for k, v in options.items()}
    settings["progress"] = options["progress"]
    for key in ("data", "out"):
        if settings[key] is not None:
            settings[key] = str(settings[key])
    if options["resume_from"] is not None:
        settings["resume"] = options["resume"] = True
    if not options["resume"]:
        if settings["data"] is None and settings["scenes"] is None:
            raise click.UsageError("give the training data: --data PATH or --scenes N")
        if settings["data"] is not None and settings["scenes"] is not None:
            raise click.UsageError("give --data or --scenes, not both")
        return settings
    saved = _saved_config(Path(settings["out"]), options["resume_from"])
    for name in options:
        key = rename.get(name, name)
        if key == "resume_from":
            continue  # where this resumption starts, never the run's earlier choice
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None) and key in saved:
            settings[key] = saved[key]
    settings["resume"] = True
    return settings


def _saved_config(run_dir: Path, name: str | None = None) -> dict[str, Any]:
    from otcclip.checkpoint import load_checkpoint

    try:
        checkpoint = load_checkpoint(run_dir, name)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if checkpoint is None:
        raise click.ClickException(f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}")
    from otcclip.train import recorded_settings

    # a setting saved at a default that has since moved resumes at the value it trained
    return recorded_settings(dict(checkpoint.state["config"]))


_NOT_IN_LINE = ("resume", "resume_from")  # how a run was continued, not what it computes


def command_line(config: Any, eval_size: int | None = None, probe_size: int | None = None) -> str:
    """The `otcclip train` command line that runs exactly `config` (a TrainConfig).

    Results tables record it so that every row can be rerun by hand. Each setting that
    differs from the CLI's own default is spelled out (and the main ones always, for the
    reader). The defaults are read by parsing a minimal command line with this command
    itself, so the line stays exact when defaults move; a setting no option can express
    is named in a trailing comment rather than silently dropped.
    """
    from otcclip.train import TrainConfig

    parsed = command.make_context("train", ["--out", "-", "--scenes", "1"]).params
    defaults = {("ot_rho" if k == "rho" else k): v for k, v in parsed.items()}
    defaults["scenes"] = None
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    values = config.to_dict()
    if eval_size is not None:
        values["eval_size"] = eval_size
    if probe_size is not None:
        values["probe_size"] = probe_size
    always = {"data", "defense", "model", "epochs", "batch_size", "lr", "seed", "out"}
    parts, lost = ["otcclip", "train"], []
    for param in command.params:
        name = "ot_rho" if param.name == "rho" else str(param.name)
        if not isinstance(param, click.Option) or name not in values or name in _NOT_IN_LINE:
            continue
        value, default = values[name], defaults.get(name)
        if param.is_flag:
            if bool(value) == bool(default):
                continue
            if value:
                parts.append(param.opts[0])
            elif param.secondary_opts:
                parts.append(param.secondary_opts[0])
            else:
                lost.append(f"{name}={value}")
            continue
        if value == default and name not in always:
            continue
        if value is None:
            if default is not None:
                lost.append(f"{name}=None")
            continue
        parts += [param.opts[0], shlex.quote(str(value))]
    # settings without an option: the CLI leaves TrainConfig's default
    lost += [
        f"{k}={v!r}"
        for k, v in values.items()
        if k not in defaults and k != "resume" and v != fields.get(k, v)
    ]
    text = " ".join(parts)
    return text + (f"  # not expressible as options: {', '.join(lost)}" if lost else "")
