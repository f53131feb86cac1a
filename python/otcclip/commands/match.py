"""`otcclip match`: re-pair (or flag) image-caption pairs with a CLIP checkpoint.

Reads a caption pool and the images to check, runs one matching round
(`otcclip.matching.match_round`) and writes one parquet row per image. The
output keeps the pairs-file layout (`id`, `image`, `caption`), so it can be
trained on directly or handed to `otcclip eval --matching`. Everything is read
and checked before the model runs, and the output is written atomically: bad
input stops with a message and leaves no file behind. Webdataset shards take
the streamed path of `otcclip.match_shards` (images decoded batch by batch, shards out).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

if TYPE_CHECKING:
    from otcclip.data.image_rows import ImageRows
    from otcclip.match_shards import ShardImages

_POOL_ID_COLUMNS = ("id", "caption_id")
_SHOWN = 10


@dataclass
class _Pool:
    ids: np.ndarray
    texts: list[str]
    embeddings: np.ndarray | None
    caption_classes: np.ndarray | None = None


@click.command(name="match")
@click.option(
    "--pool",
    "pool_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Caption pool parquet: text ('caption' or 'text'), id ('id' or 'caption_id'), and "
    "optionally 'embedding' (list<float32>, precomputed caption embeddings used for pruning).",
)
@click.option(
    "--images",
    "images_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Images parquet: 'id', the image ('image' bytes or an 'image_path' relative to the "
    "file), and 'caption_id' (the pool caption each image is paired with). A pairs parquet "
    "(id, image, caption) works too: each image's caption is the pool caption of the same id. "
    "Or webdataset shards in img2dataset's layout (a .tar, a folder of them, or a poison "
    "folder's train/): each member's caption is the pool caption of its id (its key's digits); "
    "the images are decoded batch by batch, in the shards' order, never all held.",
)
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="Model weights (.safetensors from training) or a checkpoint directory.",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Output parquet, written atomically. With shards as --images: a folder that gets one "
    "shard per input shard (same names and keys: the image, the assigned caption, a .json of "
    "id, classes and scores), each written atomically once the whole round is assigned (the "
    "assignment ranks all images together, so no shard is final before the last is scored).",
)
@click.option(
    "--model",
    "model_name",
    default=None,
    help="Model name (default: the one recorded in the checkpoint).",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Candidate captions per image kept by the global-cosine pruning.",
)
@click.option(
    "--pool-bank",
    "bank",
    type=click.IntRange(min=1),
    default=None,
    help="Approximate pruning for pools too large for the exact top-k: take the k "
    "candidates from this many pool captions drawn at random with --seed (the own "
    "caption is scored anyway). [default: exact top-k over the whole pool]",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Weight of the global cosine in the score; 1 - alpha goes to the OT "
    "similarity (1 = global only, no OT).",
)
@click.option(
    "--eps",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="Entropic regularisation of the Sinkhorn.",
)
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Sinkhorn iterations.",
)
@click.option(
    "--rho",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Unbalanced OT: KL weight of the marginals (default: balanced OT).",
)
@click.option(
    "--assign",
    "method",
    type=click.Choice(["argmax", "capacity"]),
    default="argmax",
    show_default=True,
    help="argmax: each image takes its best caption; capacity: each caption is "
    "used at most --capacity times.",
)
@click.option(
    "--capacity",
    type=click.IntRange(min=1),
    default=None,
    help="Uses per caption with --assign capacity.",
)
@click.option(
    "--fallback",
    type=click.Choice(["own", "unassigned"]),
    default="own",
    show_default=True,
    help="With --assign capacity, an image whose candidates are all full keeps "
    "its own caption, or is left unassigned (null caption).",
)
@click.option(
    "--margin",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="An image keeps its own caption unless a candidate scores more than this "
    "above it (0: re-pair whenever a candidate scores higher).",
)
@click.option(
    "--max-changed",
    type=click.FloatRange(0, 1),
    default=1.0,
    show_default=True,
    help="Re-pair at most this share of the images: those whose own caption trails its "
    "best candidate most (1: every suspicious image; `otcclip train` uses 0.25).",
)
@click.option(
    "--flag-outside-topk",
    is_flag=True,
    help="Also treat an image as suspicious when its own caption is not among its "
    "k nearest captions by global cosine.",
)
@click.option(
    "--flag-only",
    is_flag=True,
    help="Score the own pairs and flag suspicious ones; do not re-pair.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images (and captions) per embedding batch.",
)
@click.option(
    "--score-batch",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Image-caption pairs per Sinkhorn batch (bounds the memory).",
)
@click.option(
    "--recompute-tokens",
    is_flag=True,
    help="Encode the candidates' word tokens per batch instead of caching the "
    "whole pool's (for pools too large to cache; slower).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for the pruning engine (default: all cores).",
)
@click.option(
    "--device", default=None, help="torch device (default: cuda when available, else cpu)."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the round's report (counts, shares, timings) as JSON here.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the model's initialisation before the weights load, and of --pool-bank's draw.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr."
)
def command(
    pool_path: Path,
    images_path: Path,
    checkpoint: Path,
    out_path: Path,
    model_name: str | None,
    k: int,
    alpha: float,
    eps: float,
    iters: int,
    rho: float | None,
    method: str,
    capacity: int | None,
    fallback: str,
    margin: float,
    max_changed: float,
    flag_outside_topk: bool,
    flag_only: bool,
    batch_size: int,
    score_batch: int,
    recompute_tokens: bool,
    threads: int | None,
    device: str | None,
    json_path: Path | None,
    seed: int,
    progress: bool,
    bank: int | None,
) -> None:
    """Re-pair (or, with --flag-only, flag) image-caption pairs by OT matching.

    Each image is scored against its k nearest pool captions by global cosine and
    against its own caption: S = alpha * cos + (1 - alpha) * s_OT, where s_OT compares
    the image's patch tokens with the caption's word tokens by optimal transport.
    The output has one row per image: id, the image, the assigned caption
    (caption, caption_id), original_caption_id, the global / OT / combined scores of
    the assigned and of the own caption, and a changed flag (with --flag-only: the own
    caption, its scores, the best candidate and a suspicious flag).

    Runs under torchrun too (each process scores its share; rank 0 writes), parquet
    input only: shards are matched in one process.
    """
    from otcclip import distributed as dist
    from otcclip.commands._checks import output_files
    from otcclip.data import DataError
    from otcclip.match_shards import shard_input, shard_output_problem
    from otcclip.matching import MatchConfig, match_round

    try:
        shards = shard_input(images_path)
    except DataError as err:
        raise click.BadParameter(str(err), param_hint="--images") from None
    inputs = {"--images": images_path, "--pool": pool_path, "--checkpoint": checkpoint}
    output_files(
        {"--json": json_path} if shards else {"--out": out_path, "--json": json_path}, inputs
    )
    problem = shard_output_problem(out_path, images_path) if shards else None
    if problem:
        raise click.BadParameter(problem, param_hint="--out")
    if method == "capacity" and capacity is None:
        raise click.BadParameter("--assign capacity needs --capacity", param_hint="--capacity")
    if method != "capacity" and capacity is not None:
        raise click.BadParameter("only meaningful with --assign capacity", param_hint="--capacity")
    if bank is not None and bank < k:
        raise click.BadParameter(
            f"a bank of {bank} captions cannot hold k = {k} candidates", param_hint="--pool-bank"
        )
    if bank is not None and flag_outside_topk:
        raise click.BadParameter(
            "--flag-outside-topk needs the exact top-k: with a bank, most own captions fall "
            "outside the candidates by chance",
            param_hint="--pool-bank",
        )
    started = time.perf_counter()
    owns_group = not dist.is_initialized() and dist.init_from_env()
    try:
        if shards is not None and dist.world_size() > 1:
            raise click.ClickException(
                "shards are matched in one process (the round reads them batch by batch, in "
                "order); run `otcclip match` without torchrun"
            )
        try:
            pool, bundle, images, own = _inputs(
                pool_path, images_path, checkpoint, model_name, k, seed, device, shards
            )
        except DataError as err:  # all is read before any output is started
            raise click.ClickException(f"{err}; nothing was written") from None
        config = MatchConfig(
            k=k,
            alpha=alpha,
            eps=eps,
            iters=iters,
            rho=rho,
            method=method,
            capacity=capacity,
            margin=margin,
            max_changed=max_changed,
            fallback=fallback,
            flag_outside_topk=flag_outside_topk,
            image_batch=batch_size,
            text_batch=batch_size,
            score_batch=score_batch,
            cache_tokens=not recompute_tokens,
            threads=threads,
            bank=bank,
            seed=seed,
        )
        if shards is not None:
            result, wrote = _match_shards(
                bundle, images, pool, own, config, flag_only, out_path, json_path
            )
            seconds = time.perf_counter() - started
            _print_summary(result, config, flag_only, out_path, seconds, wrote)
            return
        try:
            result = match_round(
                bundle,
                images.pixels,
                pool.texts,
                own,
                config,
                pool_embeddings=pool.embeddings,
                progress=progress,
                **_class_columns(images, pool),
            )
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        if dist.is_main():
            table = _output_table(result, images, pool, own, flag_only)
            report = json.dumps(_jsonable(result.report), indent=2) + "\n"
            _write_outputs(table, out_path, report, json_path)
            _print_summary(result, config, flag_only, out_path, time.perf_counter() - started)
        dist.barrier()
    finally:
        if owns_group:
            dist.destroy()


# --------------------------------------------------------------------------- reading


def _inputs(
    pool_path: Path,
    images_path: Path,
    checkpoint: Path,
    model_name: str | None,
    k: int,
    seed: int,
    device: str | None,
    shards: Path | None = None,
) -> tuple[_Pool, Any, ImageRows | ShardImages, np.ndarray]:
    """Everything the round needs, read and cross-checked before any embedding starts
    (of shards, their ids: their images are decoded during the round, batch by batch)."""
    from otcclip.data.image_rows import image_rows
    from otcclip.match_shards import scan_shards

    pool = _read_pool(pool_path)
    if k > len(pool.ids):
        raise click.BadParameter(
            f"k = {k} is larger than the pool ({len(pool.ids)} captions)", param_hint="--k"
        )
    bundle = _load_model(checkpoint, model_name, seed, device)
    if pool.embeddings is not None and pool.embeddings.shape[1] != bundle.embed_dim:
        raise click.ClickException(
            f"{pool_path}: the 'embedding' column is {pool.embeddings.shape[1]} wide but the "
            f"checkpoint's model ({bundle.name}) embeds in {bundle.embed_dim} dimensions: the "
            "embeddings come from another model (drop the column, or use their checkpoint)"
        )
    if shards is not None:
        scanned = scan_shards(shards, bundle.image_size)
        return pool, bundle, scanned, _own_indices(scanned.ids, True, pool, shards)
    table, _ = _read_table(images_path, "images", None)  # all: other columns are carried on
    images = image_rows(table, images_path, bundle.image_size)
    own = _own_indices(images.own_ids, images.own_from_pairs, pool, images_path)
    return pool, bundle, images, own


def _read_table(path: Path, what: str, wanted: tuple[str, ...] | None) -> Any:
    """The columns of `wanted` (None: all) that the parquet file has, fully validated.

    Damaged files fail in many ways (OSError, any ArrowException, invalid UTF-8 in a
    string column, which pyarrow only notices on conversion): all become one message
    here, before any column is used.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir() or path.suffix.lower() == ".tar":  # --images shards never come here
        raise click.BadParameter(
            f"{path} is a {'folder' if path.is_dir() else 'webdataset shard'}; the {what} is one "
            "parquet file: turn shards or a poison folder into one with "
            f"`otcclip poison --data {path} --out DIR` and pass DIR/train.parquet",
            param_hint=f"--{what}",
        )
    if not path.is_file():
        raise click.BadParameter(f"no such file: {path}", param_hint=f"--{what}")
    try:
        names = pq.read_schema(path).names
        columns = None if wanted is None else [c for c in names if c in wanted]
        table = pq.read_table(path, columns=columns)
        table.validate(full=True)  # e.g. invalid UTF-8 in a string column
    except (OSError, pa.ArrowException, ValueError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:300]
        raise click.BadParameter(
            f"{path} is not a readable parquet file ({type(err).__name__}: {reason})",
            param_hint=f"--{what}",
        ) from None
    return table, names


def _read_pool(path: Path) -> _Pool:
    import pyarrow as pa

    from otcclip.data.image_rows import TEXT_COLUMNS, class_column, first_of, id_column

    table, names = _read_table(
        path, "pool", (*TEXT_COLUMNS, *_POOL_ID_COLUMNS, "embedding", "caption_classes")
    )
    text_col = first_of(names, TEXT_COLUMNS)
    id_col = first_of(names, _POOL_ID_COLUMNS)
    if text_col is None or id_col is None:
        raise click.ClickException(
            f"{path}: a caption pool needs a text column ({' or '.join(TEXT_COLUMNS)}) and an "
            f"id column ({' or '.join(_POOL_ID_COLUMNS)}); it has {names}"
        )
    if table.num_rows == 0:
        raise click.ClickException(f"{path}: the caption pool is empty")
    ids = id_column(table, id_col, path)
    column = table.column(text_col)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise click.ClickException(
            f"{path}: column {text_col!r} holds {column.type}; expected text"
        )
    texts = column.to_pylist()
    empty = [int(i) for i, t in zip(ids, texts, strict=True) if t is None or not t.strip()]
    if empty:
        raise click.ClickException(
            f"{path}: {len(empty)} captions are empty (ids {empty[:_SHOWN]}); every caption "
            "in the pool needs text"
        )
    embeddings = None
    if "embedding" in names:
        embeddings = _embeddings(table.column("embedding"), path)
    return _Pool(ids, texts, embeddings, class_column(table, "caption_classes"))


def _embeddings(column: Any, path: Path) -> np.ndarray:
    import pyarrow as pa

    if not (
        pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
        or pa.types.is_fixed_size_list(column.type)
    ):
        raise click.ClickException(
            f"{path}: column 'embedding' holds {column.type}; expected list<float32>"
        )
    if column.null_count:
        raise click.ClickException(
            f"{path}: column 'embedding' has {column.null_count} empty cells"
        )
    column = column.combine_chunks()
    lengths = np.asarray(
        column.value_lengths()
        if hasattr(column, "value_lengths")
        else [len(v) for v in column.to_pylist()]
    )
    if len(np.unique(lengths)) != 1 or lengths[0] == 0:
        raise click.ClickException(
            f"{path}: the embeddings have differing or zero lengths "
            f"({sorted(set(lengths.tolist()))[:5]})"
        )
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = values.reshape(len(column), int(lengths[0]))
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1) | (np.abs(emb).sum(axis=1) == 0))
    if len(bad):
        raise click.ClickException(
            f"{path}: {len(bad)} embeddings are zero or not finite (rows {bad[:_SHOWN].tolist()})"
        )
    return emb


def _own_indices(own_ids: np.ndarray, by_id: bool, pool: _Pool, path: Path) -> np.ndarray:
    """Pool rows of the images' own captions (`by_id`: the caption of the image's own id)."""
    order = np.argsort(pool.ids)
    pos = np.searchsorted(pool.ids, own_ids, sorter=order)
    pos = np.minimum(pos, len(order) - 1)
    own = order[pos]
    missing = pool.ids[own] != own_ids
    if missing.any():
        what = (
            "image ids (pairs files and shards pair each image with the caption of its id)"
            if by_id
            else "caption_id values"
        )
        raise click.ClickException(
            f"{path}: {int(missing.sum())} {what} are not in the pool "
            f"(e.g. {own_ids[missing][:_SHOWN].tolist()}); the pool must hold every "
            "image's own caption"
        )
    return own.astype(np.int64)


def _load_model(checkpoint: Path, model_name: str | None, seed: int, device: str | None) -> Any:
    import torch

    from otcclip.models import create_model

    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    if not weights.is_file():
        what = "holds no model.safetensors" if checkpoint.is_dir() else "does not exist"
        raise click.BadParameter(f"{checkpoint} {what}", param_hint="--checkpoint")
    name = model_name or _recorded_model_name(weights)
    if name is None:
        raise click.BadParameter(
            f"{weights} does not record its model; pass --model", param_hint="--checkpoint"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return create_model(name, weights=weights, seed=seed, device=device)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as err:
        raise click.ClickException(f"cannot load {weights} as model {name!r}: {err}") from None


def _recorded_model_name(weights: Path) -> str | None:
    """The model name that `save_weights` records (None for other weight files: pass --model)."""
    from otcclip.models import model_name_of

    if weights.suffix != ".safetensors":
        return None
    try:
        return model_name_of(weights)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--checkpoint") from None


def _class_columns(images: ImageRows | ShardImages, pool: _Pool) -> dict[str, np.ndarray]:
    """Class annotations (fashion-scenes files) for the true-content shares of the report."""
    ic, cc = images.image_classes, pool.caption_classes
    if ic is None or cc is None or ic.shape[1] != cc.shape[1]:
        return {}
    return {"image_classes": ic, "caption_classes": cc}


# --------------------------------------------------------------------------- writing


def _match_shards(
    bundle: Any,
    images: ShardImages,
    pool: _Pool,
    own: np.ndarray,
    config: Any,
    flag_only: bool,
    out_path: Path,
    json_path: Path | None,
) -> tuple[Any, str]:
    """The round over shards, then its output shards and report (see otcclip.match_shards)."""
    from otcclip.atomic import write_text
    from otcclip.data import DataError
    from otcclip.match_shards import PoolCaptions, match_shards, write_matched_shards

    try:
        result = match_shards(
            bundle,
            images,
            pool.texts,
            own,
            config,
            pool_embeddings=pool.embeddings,
            **_class_columns(images, pool),
        )
    except DataError as err:  # a member that cannot be decoded, by id: before any output
        raise click.ClickException(f"{err}; nothing was written") from None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    captions = PoolCaptions(pool.ids, pool.texts, pool.caption_classes)
    try:
        written = write_matched_shards(images, out_path, result, captions, own, flag_only)
    except DataError as err:
        raise click.ClickException(str(err)) from None
    if json_path is not None:
        write_text(json_path, json.dumps(_jsonable(result.report), indent=2) + "\n")
    return result, f"{len(result):,} pairs in {len(written)} shards"


def _output_table(
    result: Any, images: ImageRows, pool: _Pool, own: np.ndarray, flag_only: bool
) -> Any:
    import pyarrow as pa

    def ids_or_null(index: np.ndarray) -> Any:
        ok = index >= 0
        return pa.array(np.where(ok, pool.ids[np.maximum(index, 0)], 0), pa.int64(), mask=~ok)

    def texts(index: np.ndarray) -> Any:
        return pa.array([pool.texts[i] if i >= 0 else None for i in index.tolist()], pa.string())

    def floats(x: np.ndarray) -> Any:
        return pa.array(np.asarray(x, np.float32), pa.float32())

    columns: dict[str, Any] = {"id": pa.array(images.ids, pa.int64()), images.column: images.values}
    if flag_only:
        columns.update(
            caption=texts(own),
            caption_id=pa.array(pool.ids[own], pa.int64()),
            global_score=floats(result.own_global_score),
            ot_score=floats(result.own_ot_score),
            score=floats(result.own_score),
            best_caption_id=ids_or_null(result.best),
            best_score=floats(result.best_score),
            suspicious=pa.array(result.suspicious, pa.bool_()),
        )
    else:
        columns.update(
            caption=texts(result.caption),
            caption_id=ids_or_null(result.caption),
            original_caption_id=pa.array(pool.ids[own], pa.int64()),
            global_score=floats(result.global_score),
            ot_score=floats(result.ot_score),
            score=floats(result.score),
            own_score=floats(result.own_score),
            changed=pa.array(result.changed | (result.caption < 0), pa.bool_()),
            suspicious=pa.array(result.suspicious, pa.bool_()),
        )
    for name, values in (images.extras or {}).items():
        columns["input_" + name if name in columns else name] = values
    return pa.table(columns).replace_schema_metadata(
        {"otcclip.matching": json.dumps(_jsonable(result.report))}
    )


def _write_outputs(table: Any, out_path: Path, report: str, json_path: Path | None) -> None:
    """The parquet and the JSON report, both complete or neither (staged, then renamed)."""
    import contextlib

    import pyarrow.parquet as pq

    from otcclip.atomic import atomic_path

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out_path))
        pq.write_table(table, tmp)
        if json_path is not None:
            stack.enter_context(atomic_path(json_path)).write_text(report, encoding="utf-8")


def _print_summary(
    result: Any, config: Any, flag_only: bool, out_path: Path, seconds: float, wrote: str = ""
) -> None:
    rep = result.report
    n, m = rep["images"], rep["pool"]
    how = f"{config.method}" + (f" (capacity {config.capacity})" if config.capacity else "")
    click.echo(
        f"matched {n:,} images against {m:,} captions: k={config.k}, alpha={config.alpha}, "
        f"eps={config.eps}, iters={config.iters}, {how}, margin {config.margin}"
    )
    outside = rep.get("own_outside_topk", 0)
    if flag_only:
        click.echo(
            f"  suspicious: {rep['suspicious']:,} of {n:,} ({rep['suspicious'] / n:.1%}); "
            f"own caption outside the top {config.k}: {outside:,}; nothing re-paired"
        )
    else:
        click.echo(
            f"  changed: {rep['changed']:,} of {n:,} ({rep['changed_share']:.1%}); kept by the "
            f"margin: {result.stats.get('kept_by_margin', 0):,}; unassigned: "
            f"{rep['unassigned']:,}; distinct captions used: {rep['distinct']:,}; own caption "
            f"outside the top {config.k}: {outside:,}"
        )
    if "clean_true_content" in rep and not flag_only:
        click.echo(
            "  pairs holding a caption of their true content (from the class columns): "
            f"{rep['clean_true_content_before']:.1%} before, {rep['clean_true_content']:.1%} after"
        )
    sec = rep.get("seconds", {})
    stages = ", ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in sec.items())
    click.echo(
        f"  time: {seconds:.1f} s in all (reading and loading included); the round: "
        f"{sum(sec.values()):.1f} s ({stages})"
    )
    click.echo(f"wrote {out_path} ({wrote or f'{n:,} rows'})")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
