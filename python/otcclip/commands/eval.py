"""`otcclip eval`: zero-shot, linear probe, attack success, retrieval, re-assignment of a model.

The test sets are fashion-scenes built from Fashion-MNIST test images (the zero-shot
and probe sets single-item, the retrieval scenes 1-3 items), at the poisoned data's
image size when --poison-dir is given, so that its triggers fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _weights_file(path: Path) -> Path:
    """A weights file, or a checkpoint directory holding model.safetensors."""
    if path.is_dir():
        inner = path / "model.safetensors"
        if inner.is_file():
            return inner
        raise click.BadParameter(f"{path} holds no model.safetensors", param_hint="--checkpoint")
    if not path.is_file():
        raise click.BadParameter(f"no such file: {path}", param_hint="--checkpoint")
    return path


def _model_name(path: Path) -> str | None:
    """The model name recorded in the weights' safetensors metadata (save_weights puts it there)."""
    from otcclip.models import model_name_of

    try:
        return model_name_of(path)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--checkpoint") from None


@click.command(name="eval")
@click.option(
    "--checkpoint",
    "checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="Weights from otcclip.models.save_weights (or a checkpoint directory).",
)
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model name (default: the one recorded in the weights).",
)
@click.option(
    "--poison-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output of `otcclip poison`: measure its attacks' success.",
)
@click.option(
    "--matching",
    type=click.Path(path_type=Path),
    default=None,
    help="A matching output parquet (id, caption[, changed]): re-assignment precision/recall "
    "against --poison-dir's manifest.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the results as JSON here.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seeds the test sets and the linear probe.",
)
@click.option("--n-zero-shot", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option(
    "--n-probe-train",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="Linear-probe training images (0: no linear probe).",
)
@click.option("--n-probe-test", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--n-retrieval",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Held-out test scenes for recall@k (0: no retrieval).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=56),
    default=None,
    help="Test image size (default: the poisoned data's, else 56).",
)
@click.option(
    "--fashion-mnist",
    "fmnist_root",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of the Fashion-MNIST IDX files (default $OTCCLIP_FASHION_MNIST, else "
    "/usr/share/datasets/fashion-mnist).",
)
@click.option(
    "--val-size",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also zero-shot on this many clean validation images: test-pool images outside the "
    "zero-shot and linear-probe sets, the split that tuning chooses settings by (as "
    "benchmarks/probe.py does), so that the reported images never decide one.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--device", default=None, help="torch device (default: cuda when available, else cpu)."
)
def command(
    checkpoint: Path,
    model_name: str | None,
    poison_dir: Path | None,
    matching: Path | None,
    json_path: Path | None,
    seed: int,
    n_zero_shot: int,
    n_probe_train: int,
    n_probe_test: int,
    n_retrieval: int,
    image_size: int | None,
    fmnist_root: Path | None,
    val_size: int,
    batch_size: int,
    device: str | None,
) -> None:
    """Evaluate a checkpoint: zero-shot, linear probe, ASR, retrieval, re-assignment."""
    from otcclip.atomic import write_text
    from otcclip.commands._checks import output_files
    from otcclip.data import fashion_scenes, probe_sets, zero_shot_set
    from otcclip.evaluate import evaluate, format_report, load_eval_inputs, validation_zero_shot

    output_files({"--json": json_path}, {"--checkpoint": checkpoint, "--matching": matching})
    weights = _weights_file(checkpoint)
    if matching is not None and poison_dir is None:
        raise click.UsageError(
            "--matching needs --poison-dir (the manifest says which pairs were poisoned)"
        )
    if matching is not None and not matching.is_file():
        raise click.BadParameter(f"no such file: {matching}", param_hint="--matching")
    try:
        manifests, data_info, train = load_eval_inputs(poison_dir)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    size = image_size or int(data_info.get("image_size", 56))
    if size != data_info.get("image_size", size) and any(m.trigger for m in manifests):
        raise click.BadParameter(
            f"the triggers were made for {data_info['image_size']} px images",
            param_hint="--image-size",
        )

    import torch

    from otcclip.models import create_model

    name = model_name or _model_name(weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kwargs = {"weights": weights, "seed": seed, "device": device}
        bundle = create_model(name, **kwargs) if name else create_model(**kwargs)
        eval_set = zero_shot_set(n_zero_shot, seed=seed, image_size=size, root=fmnist_root)
        probe = (
            probe_sets(n_probe_train, n_probe_test, seed=seed, image_size=size, root=fmnist_root)
            if n_probe_train
            else None
        )
        scenes = (
            fashion_scenes(n_retrieval, "test", seed=seed, image_size=size, root=fmnist_root)
            if n_retrieval
            else None
        )
        result = evaluate(
            bundle,
            eval_set,
            manifests,
            probe,
            test_scenes=scenes,
            matching=matching,
            train=train,
            seed=seed,
            batch_size=batch_size,
        )
        if val_size:
            seen = [eval_set] + ([] if probe is None else list(probe))
            result.update(
                validation_zero_shot(bundle, val_size, seed, size, seen, fmnist_root, batch_size)
            )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    result["checkpoint"] = str(checkpoint)
    result["model"] = getattr(bundle, "name", name)
    result["poison_dir"] = None if poison_dir is None else str(poison_dir)
    result["image_size"] = size
    click.echo(format_report(result))
    if json_path is not None:
        write_text(json_path, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
