"""`otcclip match` over webdataset shards: images read batch by batch, one output shard per input.

The parquet path of `otcclip match` holds the whole images file in memory; shards are
how web-scale data comes (img2dataset's layout), too large for that. This module keeps
the shard path apart from the command so that the command stays one screen of options
and the parquet path stays as it was. It reads the shards with the package's readers
(`data.sources` walks the tars, `data.stream.PairStream` orders the units, `data.images`
decodes), in the shards' own order, never shuffled, in three passes:

1. ids, before the model runs: each member's id (its key's digits, as every reader
   names it), so that an id missing from the pool or repeated stops the command before
   any work, and the round gets each image's own caption up front. No image is decoded.
2. the round: `matching.match_image_batches`, with the images decoded one batch at a
   time; memory holds the batch, the pool's features and a few numbers per image.
   A member that cannot be decoded stops it with a DataError naming its shard and id.
3. the output: one shard per input shard (same file name, same member keys) holding
   the image member's original bytes (copied, not re-encoded), the assigned caption
   (.txt) and a .json with the id, the key, the class labels the readers take and the
   round's scores. Each shard is written to a temporary file and renamed when whole.

Why the output waits for the end of the round: match_image_batches assigns only once
every image is scored (a capacity assignment, the --max-changed budget and the report
rank all images together), so no input shard's captions are final before the last one
is scored. A failure during the round therefore leaves no output at all; one during
the writing leaves the shards already renamed and no partial file.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from otcclip.atomic import atomic_path, file_target_problem, same_file, write_text
from otcclip.data.errors import DataError
from otcclip.data.images import read_image
from otcclip.data.shards import SHARDS_FOLDER, SHARDS_INDEX, read_shard_index
from otcclip.data.sources import sample_image_key, shard_raws, shard_samples, stable_id
from otcclip.data.stream import PairStream
from otcclip.matching import MatchConfig, MatchResult, match_image_batches

_SHOWN = 10
# the round's per-pair fields in each output .json (flag-only has its own set)
_SCORES = ("global_score", "ot_score", "score")


@dataclass
class ShardImages:
    """The input shards after the ids pass: their units in order and each one's member ids.

    image_classes: (N, C) uint8 when every member's .json carries class labels (shards
    written by otcclip), for the report's true-content shares; index: the input folder's
    shards.json, when it has one (copied, with the new counts, beside the output).
    """

    source: Path
    stream: PairStream
    shard_ids: list[np.ndarray]
    image_classes: np.ndarray | None
    index: dict[str, Any] | None

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate(self.shard_ids)


def shard_input(path: Path) -> Path | None:
    """The shards `--images` names: a .tar, a folder of them, or a poison folder's train/.

    None when `path` is not shards (a parquet file: the in-memory path). A folder that
    holds no shards, or shards beside parquet files, is a DataError saying what was expected.
    """
    if path.suffix.lower() == ".tar":
        if not path.is_file():
            raise DataError(f"no such webdataset shard: {path}")
        return path
    if not path.is_dir():
        return None
    tars = sorted(path.glob("*.tar"))
    parquets = sorted(p.name for p in path.glob("*.parquet"))
    inner = path / SHARDS_FOLDER
    inner_tars = sorted(inner.glob("*.tar")) if inner.is_dir() else []
    if tars and (parquets or inner_tars):
        other = ", ".join(parquets) if parquets else f"{SHARDS_FOLDER}/ shards"
        raise DataError(
            f"{path} mixes formats: .tar shards and {other}; give the shards a folder of their "
            "own (or pass the parquet file)"
        )
    if tars:
        return path
    if inner_tars:
        if parquets:
            raise DataError(
                f"{path} holds both {SHARDS_FOLDER}/ shards and {', '.join(parquets)}: which "
                f"pairs to match is ambiguous; pass {inner} or one of the parquet files"
            )
        return inner
    found = f"; it holds {', '.join(parquets)} (pass that file)" if parquets else ""
    raise DataError(
        f"{path} holds no webdataset shards: expected .tar files (00000.tar, ...) in it or in "
        f"{SHARDS_FOLDER}/ (a poison folder written with --format shards){found}"
    )


def shard_output_problem(out: Path, images: Path) -> str | None:
    """Why `out` cannot take the output shards (None when it can), checked before any work."""
    if out.suffix.lower() in (".parquet", ".pq", ".tar"):
        return (
            f"the --images are webdataset shards, so --out is a folder that gets one shard per "
            f"input shard; {out} looks like a file name"
        )
    if out.exists() and not out.is_dir():
        return f"{out} is a file; the output shards go into a folder"
    if same_file(out, images):
        return f"{out} is the --images input: writing there would mix the outputs with it"
    if out.is_dir() and any(out.glob("*.tar")):
        return f"{out} already holds .tar shards; remove them or choose another folder"
    return file_target_problem(out / "00000.tar")


def scan_shards(source: Path, image_size: int) -> ShardImages:
    """The ids pass: every member's id, shard by shard, read without decoding any image."""
    stream = PairStream(source, image_size=image_size, shuffle=False, rank=0, world_size=1)
    shard_ids: list[np.ndarray] = []
    labels: list[list[int] | None] = []  # image classes only: the captions are the pool's
    for unit in stream.units:
        ids = []
        for raw in shard_raws(unit.file):
            ids.append(raw.id)
            labels.append(None if raw.classes is None else raw.classes[0])
        shard_ids.append(np.asarray(ids, dtype=np.int64))
    ids = np.concatenate(shard_ids)
    if len(ids) == 0:
        raise DataError(f"{source}: the shards hold no members")
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(
            f"{source}: ids repeat across or within the shards (e.g. "
            f"{values[counts > 1][:_SHOWN].tolist()}); each member needs its own key"
        )
    folder = source if source.is_dir() else source.parent
    return ShardImages(source, stream, shard_ids, _image_classes(labels), read_shard_index(folder))


def _image_classes(labels: list[list[int] | None]) -> np.ndarray | None:
    """(N, C) uint8 when every member's .json gave labels of one width, else None."""
    rows = [row for row in labels if row is not None]
    if len(rows) != len(labels) or len({len(row) for row in rows}) != 1:
        return None
    return np.asarray(rows, dtype=np.uint8)


def image_batches(images: ShardImages, batch: int) -> Iterator[np.ndarray]:
    """The images in the shards' order, decoded `batch` at a time (the round's image batch)."""
    stream = images.stream
    expected = images.ids
    held: list[np.ndarray] = []
    for row, (raw, unit) in enumerate(stream.raws()):
        if row >= len(expected) or raw.id != expected[row]:
            raise DataError(
                f"{unit.name} changed while it was being matched (member {row} is id {raw.id}); "
                "match it again once it is complete"
            )
        held.append(
            read_image(raw.image, stream.image_size, stream.mode, f"{unit.name}: id {raw.id}")
        )
        if len(held) == batch:
            yield np.stack(held)
            held = []
    if held:
        yield np.stack(held)


def match_shards(
    bundle: Any,
    images: ShardImages,
    captions: Sequence[str],
    own: np.ndarray,
    config: MatchConfig,
    *,
    pool_embeddings: np.ndarray | None = None,
    image_classes: np.ndarray | None = None,
    caption_classes: np.ndarray | None = None,
) -> MatchResult:
    """The round over the shards: match_image_batches on their images, batch by batch."""
    return match_image_batches(
        bundle,
        image_batches(images, config.image_batch),
        captions,
        own,
        config,
        pool_embeddings=pool_embeddings,
        image_classes=image_classes,
        caption_classes=caption_classes,
    )


@dataclass
class PoolCaptions:
    """What the output needs of the pool: ids, texts, and class labels when the pool has them."""

    ids: np.ndarray
    texts: list[str]
    classes: np.ndarray | None


def write_matched_shards(
    images: ShardImages,
    out: Path,
    result: MatchResult,
    pool: PoolCaptions,
    own: np.ndarray,
    flag_only: bool,
) -> list[Path]:
    """One output shard per input shard, each renamed into place when whole; then shards.json.

    Row i of `result` and `own` is the i-th member over the shards in order (the ids
    pass's order, checked again member by member while copying).
    """
    written: list[Path] = []
    row = 0
    shards = []
    for unit, ids in zip(images.stream.units, images.shard_ids, strict=True):
        target = out / Path(unit.file).name
        with atomic_path(target) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            member = 0
            for sample in shard_samples(unit.file):
                key = sample["__key__"]
                if member >= len(ids) or stable_id(key) != ids[member]:
                    raise _changed(unit.file, f"member {member} is key {key}")
                caption, meta = _pair_record(row + member, result, pool, own, flag_only)
                _add_member(tar, key, sample, caption, meta)
                member += 1
            if member != len(ids):
                raise _changed(unit.file, f"{member} members, {len(ids)} when it was matched")
        row += member
        written.append(target)
        if len(ids):
            shards.append(
                {
                    "file": target.name,
                    "n": len(ids),
                    "first_id": int(ids[0]),
                    "last_id": int(ids[-1]),
                }
            )
    if images.index is not None:
        index = {**images.index, "n_pairs": int(row), "n_shards": len(shards), "shards": shards}
        write_text(out / SHARDS_INDEX, json.dumps(index, indent=1) + "\n")
    return written


def _changed(file: str, what: str) -> DataError:
    return DataError(
        f"{file} changed while it was being matched ({what}); the output shards written "
        "before it are whole, it has none: match again once the input is complete"
    )


def _pair_record(
    row: int, result: MatchResult, pool: PoolCaptions, own: np.ndarray, flag_only: bool
) -> tuple[str | None, dict[str, Any]]:
    """The caption a member gets (None: unassigned) and the round's fields of its .json."""
    mine = int(own[row])
    if flag_only:
        caption_index = mine
        meta: dict[str, Any] = {
            "caption_id": int(pool.ids[mine]),
            **{name: _number(getattr(result, "own_" + name)[row]) for name in _SCORES},
            "best_caption_id": _pool_id(pool, int(result.best[row])),
            "best_score": _number(result.best_score[row]),
            "suspicious": bool(result.suspicious[row]),
        }
    else:
        caption_index = int(result.caption[row])
        meta = {
            "caption_id": _pool_id(pool, caption_index),
            "original_caption_id": int(pool.ids[mine]),
            **{name: _number(getattr(result, name)[row]) for name in _SCORES},
            "own_score": _number(result.own_score[row]),
            "changed": bool(result.changed[row] or caption_index < 0),
            "suspicious": bool(result.suspicious[row]),
        }
    if pool.classes is not None and caption_index >= 0:
        meta["caption_classes"] = pool.classes[caption_index].tolist()
    caption = pool.texts[caption_index] if caption_index >= 0 else None
    return caption, meta


def _add_member(
    tar: tarfile.TarFile, key: str, sample: dict[str, Any], caption: str | None, meta: dict
) -> None:
    """The pair's members: the image bytes as stored, the caption (none when unassigned) and
    the .json: the input's own fields (url, ...; a clash renamed input_*), then the round's."""
    image_key = sample_image_key(sample)
    members: list[tuple[str, bytes]] = []
    if image_key is not None:
        members.append((image_key, sample[image_key]))
    if caption is not None:
        members.append(("txt", caption.encode("utf-8")))
    record = {"key": key, "id": stable_id(key)}
    for name, value in _input_meta(sample.get("json")).items():
        if name in ("key", "id", "caption_classes"):  # the same, or stale after re-pairing
            continue
        record["input_" + name if name in meta else name] = value
    record.update(meta)
    members.append(("json", json.dumps(record).encode("utf-8")))
    for suffix, data in members:
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))


def _input_meta(data: bytes | None) -> dict[str, Any]:
    """A member's own .json as a dict; one that is not a JSON object is kept as its text."""
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except ValueError:
        meta = None
    if isinstance(meta, dict):
        return meta
    return {"input_json": data.decode("utf-8", errors="replace")}


def _pool_id(pool: PoolCaptions, index: int) -> int | None:
    return int(pool.ids[index]) if index >= 0 else None


def _number(value: Any) -> float | None:
    """A score for JSON: NaN (no OT with alpha 1, no own caption) becomes null."""
    value = float(value)
    return value if math.isfinite(value) else None
