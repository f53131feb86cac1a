"""`otcclip poison`: build (or read) a training set and write a poisoned copy with its manifest.

The output directory holds the poisoned pairs (train.parquet, or with --format shards
train/ as webdataset shards in img2dataset's layout), manifest.json (every attack
applied, in order, with the ids it touched and its trigger) and, for targeted
poisoning, targets.npz (the target images evaluation needs). Without --attack the
pairs are clean: `--scenes N --format shards` writes N fashion-scenes as shards. The
directory is filled under a temporary name and renamed into place only when
complete: a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import click


def _parse_amount(value: str) -> int | float:
    """'200' -> 200 samples; '0.01' or '1%' -> a fraction of the rows."""
    text = value.strip()
    try:
        if text.endswith("%"):
            amount: int | float = float(text[:-1]) / 100.0
        elif text.isdigit():
            amount = int(text)
        else:
            amount = float(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a count (200) nor a fraction (0.01, 1%)", param_hint="--n-poison"
        ) from None
    if isinstance(amount, float) and not 0.0 < amount <= 1.0:
        raise click.BadParameter(
            f"poison rate must be in (0, 1] (a count is a whole number), got {value!r}",
            param_hint="--n-poison",
        )
    if isinstance(amount, int) and amount < 1:
        raise click.BadParameter("poison count must be >= 1", param_hint="--n-poison")
    return amount


def _parse_params(items: tuple[str, ...]) -> dict[str, object]:
    """KEY=VALUE trigger parameters; numbers become numbers."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        value: object = raw.strip()
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[key.strip().replace("-", "_")] = value
    return out


def _params_for(kind: str, params: dict[str, object]) -> dict[str, object]:
    from otcclip.attacks import TRIGGER_DEFAULTS

    return {k: v for k, v in params.items() if k in TRIGGER_DEFAULTS[kind]}


@click.command(name="poison")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory (train.parquet or train/ shards, manifest.json, targets.npz).",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["parquet", "shards"]),
    default="parquet",
    show_default=True,
    help="How the pairs are written: one train.parquet, or train/00000.tar ... webdataset "
    "shards (img2dataset's layout: .png, .txt, .json per pair) for streaming.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=None,
    help="Pairs per shard with --format shards [default: 10000, as img2dataset].",
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    help="User data: .parquet, .csv/.tsv (open_clip layout), webdataset .tar shards, or "
    "a poison directory (its train.parquet or train/ shards).",
)
@click.option(
    "--scenes",
    "n_scenes",
    type=click.IntRange(min=1),
    help="Build this many fashion-scenes training pairs (default 50000 without --data).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=56),
    default=None,
    help="Scene canvas in pixels (default 56); with --data, resize images to this size "
    "(at least 56: the evaluation's test scenes and the targets are built at this size).",
)
@click.option(
    "--max-items",
    type=click.IntRange(1, 3),
    default=3,
    show_default=True,
    help="Items per scene, at most.",
)
@click.option(
    "--fashion-mnist",
    "fmnist_root",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of the Fashion-MNIST IDX files (default $OTCCLIP_FASHION_MNIST, else "
    "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist).",
)
@click.option(
    "--attack",
    "attacks",
    multiple=True,
    type=click.Choice(
        ["targeted", "targeted-adaptive", "badnet", "blended", "sig", "wanet", "adaptive"]
    ),
    help="An attack to apply (repeatable; applied in order, never to the same sample).",
)
@click.option(
    "--target-label",
    default="bag",
    show_default=True,
    help="The class the attacks push towards (name, synonym or index).",
)
@click.option(
    "--source-label",
    default=None,
    help="Targeted poisoning: the true class of the target images (default: random).",
)
@click.option(
    "--n-targets",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Targeted poisoning: number of target test images.",
)
@click.option(
    "--n-captions",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Targeted poisoning: poisoned captions per target image.",
)
@click.option(
    "--copy-shift",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Targeted poisoning: shift each copy of a target by up to this many pixels.",
)
@click.option(
    "--copy-noise",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Targeted poisoning: Gaussian pixel noise (sigma, 0-255 units) on each copy.",
)
@click.option(
    "--n-poison",
    default="200",
    show_default=True,
    help="Backdoors: samples to poison, a count (200) or a fraction (0.01, 1%).",
)
@click.option(
    "--label-consistent",
    is_flag=True,
    help="Backdoors: trigger only images showing the target class, captions untouched.",
)
@click.option(
    "--trigger",
    type=click.Choice(["badnet", "blended", "sig", "wanet"]),
    default="badnet",
    show_default=True,
    help="The adaptive attack's image trigger.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Trigger parameter, e.g. patch_size=4, alpha=0.1, strength=1 (repeatable).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seeds the scenes (this seed) and the i-th attack (seed + 1 + i).",
)
@click.option("--strict", is_flag=True, help="With --data: stop on any unusable sample.")
@click.option("--csv-img-key", default="filepath", show_default=True, help="CSV image column.")
@click.option("--csv-caption-key", default="title", show_default=True, help="CSV caption column.")
@click.option(
    "--csv-separator",
    default=None,
    help="CSV separator (default: tab if the header has one, else comma).",
)
@click.option("--force", is_flag=True, help="Replace an existing, non-empty output directory.")
def command(
    out_dir: Path,
    out_format: str,
    shard_size: int | None,
    data_path: Path | None,
    n_scenes: int | None,
    image_size: int | None,
    max_items: int,
    fmnist_root: Path | None,
    attacks: tuple[str, ...],
    target_label: str,
    source_label: str | None,
    n_targets: int,
    n_captions: int,
    copy_shift: int,
    copy_noise: float,
    n_poison: str,
    label_consistent: bool,
    trigger: str,
    params: tuple[str, ...],
    seed: int,
    strict: bool,
    csv_img_key: str,
    csv_caption_key: str,
    csv_separator: str | None,
    force: bool,
) -> None:
    """Build fashion-scenes (or read --data) and write a poisoned copy with a manifest.

    \b
    Examples:
      otcclip poison --out runs/poisoned --scenes 20000 --attack targeted --attack badnet \\
          --target-label bag --n-targets 8 --n-captions 40 --n-poison 200 --seed 0
      otcclip poison --out runs/scenes-shards --scenes 100000 --format shards
    """
    from otcclip import attacks as atk
    from otcclip.data import class_index, fashion_scenes, read_pairs_report

    if data_path is not None and n_scenes is not None:
        raise click.UsageError("give --data or --scenes, not both")
    if shard_size is not None and out_format != "shards":
        raise click.BadParameter("only meaningful with --format shards", param_hint="--shard-size")
    write_data = _data_writer(out_format, shard_size)
    try:
        target = class_index(target_label)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--target-label") from None
    source = None
    if source_label is not None:
        try:
            source = class_index(source_label)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--source-label") from None
    amount = _parse_amount(n_poison)
    trigger_params = _parse_params(params)
    kinds = [trigger if a == "adaptive" else a for a in attacks if not a.startswith("targeted")]
    known = {k for kind in kinds for k in _params_for(kind, trigger_params)}
    unused = set(trigger_params) - known
    if unused:
        raise click.BadParameter(
            f"{sorted(unused)} apply to none of the triggers used ({', '.join(kinds) or 'none'})",
            param_hint="--param",
        )
    if label_consistent and not any(a in ("badnet", "blended", "sig", "wanet") for a in attacks):
        raise click.BadParameter(
            "applies to badnet/blended/sig/wanet only", param_hint="--label-consistent"
        )
    _check_out_dir(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise click.ClickException(f"{out_dir} exists and is not empty; pass --force to replace it")

    try:
        if data_path is not None:
            csv = data_path.suffix.lower() in (".csv", ".tsv")
            table, report = read_pairs_report(
                data_path,
                image_size=image_size,
                strict=strict,
                caption_col=csv_caption_key if csv else None,
                path_col=csv_img_key if csv else None,
                sep=csv_separator,
            )
            if not report.ok:
                click.echo(f"warning: {report.summary()}", err=True)
            data_info = {"source": str(data_path), "n": len(table), "read_report": report.to_dict()}
        else:
            n = n_scenes if n_scenes is not None else 50_000
            size = image_size if image_size is not None else 56
            table = fashion_scenes(
                n, "train", seed=seed, image_size=size, max_items=max_items, root=fmnist_root
            )
            data_info = {
                "source": "fashion-scenes",
                "n": n,
                "split": "train",
                "max_items": max_items,
            }
        data_info.update(
            format=out_format,
            image_size=int(table.images.shape[1]),
            seed=seed,
            fashion_mnist=None if fmnist_root is None else str(fmnist_root),
        )

        manifests: list[atk.Manifest] = []
        for i, name in enumerate(attacks):
            attack_seed = seed + 1 + i
            touched = atk.poisoned_ids(manifests)
            if name.startswith("targeted"):
                table, m = atk.targeted_poison(
                    table,
                    n_targets,
                    n_captions,
                    target,
                    attack_seed,
                    source_labels=source,
                    adaptive=name == "targeted-adaptive",
                    root=fmnist_root,
                    copy_shift=copy_shift,
                    copy_noise=copy_noise,
                )
            elif name == "adaptive":
                table, m = atk.adaptive_backdoor(
                    table,
                    amount,
                    target,
                    attack_seed,
                    trigger=trigger,
                    exclude_ids=touched,
                    trigger_params=_params_for(trigger, trigger_params),
                )
            else:
                table, m = atk.backdoor(
                    table,
                    name,
                    amount,
                    target,
                    attack_seed,
                    label_consistent,
                    exclude_ids=touched,
                    trigger_params=_params_for(name, trigger_params),
                )
            manifests.append(m)
        data_info["n_rows"] = len(table)
        # Rates are final only once every attack has run (targeted poisoning adds rows).
        for m in manifests:
            m.poison_rate = m.n_poison / len(table)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None

    try:
        written = _write_dir(out_dir, table, manifests, data_info, write_data, atk.save_manifests)
    except ValueError as err:  # e.g. negative ids, which shard keys cannot hold
        raise click.ClickException(str(err)) from None
    click.echo(
        f"wrote {out_dir}/{written} ({len(table)} pairs), {out_dir}/manifest.json"
        + (f", {out_dir}/targets.npz" if any(m.targets for m in manifests) else "")
    )
    click.echo(atk.manifest_summary(manifests, len(table)))


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that cannot become a folder, before any work.

    --force replaces a folder; an existing file used to be renamed to a hidden
    `.tmp.old` leftover with a folder put in its place (exit 0).
    """
    from otcclip.atomic import file_target_problem

    if out_dir.exists() and not out_dir.is_dir():
        raise click.BadParameter(
            f"{out_dir} is a file; the output is a folder (--force replaces only a folder)",
            param_hint="--out",
        )
    problem = file_target_problem(out_dir)
    if problem is not None and not out_dir.is_dir():
        raise click.BadParameter(problem, param_hint="--out")


def _data_writer(out_format: str, shard_size: int | None):
    """(table, folder) -> what it wrote there, as the summary names it."""
    from otcclip.data import write_pairs, write_shards
    from otcclip.data.shards import DEFAULT_SHARD_SIZE, SHARDS_FOLDER

    def parquet(table, folder: Path) -> str:
        write_pairs(table, folder / "train.parquet")
        return "train.parquet"

    def shards(table, folder: Path) -> str:
        index = write_shards(table, folder / SHARDS_FOLDER, shard_size or DEFAULT_SHARD_SIZE)
        return f"{SHARDS_FOLDER}/ ({index['n_shards']} shards)"

    return shards if out_format == "shards" else parquet


def _write_dir(out_dir: Path, table, manifests, data_info, write_data, save_manifests) -> str:
    """Fill a sibling temporary directory, then swap it into place; returns what holds the pairs."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    old = None
    try:
        written = write_data(table, tmp)
        save_manifests(tmp, manifests, data_info)
        if out_dir.exists():
            old = tmp.with_name(tmp.name + ".old")
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            old.rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
    return written
