"""`otcclip demo`: the main job on the embedded default (fashion-scenes)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Folder for the poisoned data, one run folder per defense, results and plots.",
)
@click.option("--scenes", type=click.IntRange(min=500), default=20000, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--model", default="otc-vit-tiny", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="torch and otmatch threads.")
@click.option(
    "--all",
    "all_defenses",
    is_flag=True,
    help="Also train RoCLIP, SafeCLIP and a model on the clean (unpoisoned) scenes.",
)
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    type=click.Choice(["clean", "none", "roclip", "safeclip", "otcclip"]),
    help="Train only these (repeatable) [default: none, otcclip].",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A tiny run (2,000 scenes, 2 epochs) to check that everything works.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(
    out: Path,
    scenes: int,
    epochs: int,
    model: str,
    batch_size: int,
    seed: int,
    threads: int | None,
    all_defenses: bool,
    defenses: tuple[str, ...],
    quick: bool,
    progress: bool,
) -> None:
    """Poison fashion-scenes, train without a defense and with OTCCLIP, compare.

    Builds fashion-scenes from Fashion-MNIST, poisons it with targeted poisoning
    (8 test images x 40 captions -> "bag") and a BadNet backdoor (200 images),
    trains each defense from scratch, evaluates every epoch and prints one table:
    targeted ASR, backdoor ASR, zero-shot top-1, linear probe, seconds per epoch,
    re-pairing precision. Writes OUT/results.md, results.json, epochs.png and
    rounds.png. About 12-15 minutes on 2 CPU cores with the defaults.
    """
    from otcclip.demo import ALL_DEFENSES, DEFENSES, DemoConfig, run_demo

    chosen = defenses or (ALL_DEFENSES if all_defenses else DEFENSES)
    config = DemoConfig(
        out=str(out),
        scenes=2000 if quick else scenes,
        epochs=2 if quick else epochs,
        model=model,
        batch_size=batch_size,
        seed=seed,
        threads=threads,
        defenses=tuple(chosen),
        n_backdoor=40 if quick else 200,
        n_captions=10 if quick else 40,
        eval_size=300 if quick else 1000,
        probe_size=300 if quick else 1000,
        progress=progress,
        train_overrides={"warmup_epochs": 1} if quick else {},
    )
    try:
        run_demo(config, echo=click.echo)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
