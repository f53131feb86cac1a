"""Pairs written as webdataset shards in img2dataset's layout, and where a folder keeps its pairs.

Shards are what web-scale tools read and write (img2dataset, webdataset, open_clip):
`00000.tar`, `00001.tar`, ... each holding `<key>.png`, `<key>.txt` and `<key>.json`
per pair. The key is the pair's id in digits, so the readers give back the same ids;
the .json holds the id and the class labels that parquet files keep in columns. Each
tar is renamed into place only when complete, and `shards.json` (counts, image shape
and mode, per-shard id ranges) is written last: a folder with it is a whole data set.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from otcclip.atomic import atomic_path, write_text
from otcclip.data.errors import DataError
from otcclip.data.fmnist import CLASSNAMES
from otcclip.data.images import array_mode
from otcclip.data.table import PairTable

SHARDS_FORMAT = "otcclip-shards/1"
SHARDS_INDEX = "shards.json"
SHARDS_FOLDER = "train"  # in a poison directory, beside manifest.json
DEFAULT_SHARD_SIZE = 10_000  # img2dataset's number_sample_per_shard
_PAIRS_FILES = ("train.parquet", "pairs.parquet", "data.parquet")
_KEY_DIGITS = 9
_TAR_FORMAT = tarfile.PAX_FORMAT  # img2dataset's keys: 000000000, 000000001, ...


def shard_key(pair_id: int) -> str:
    """The member name stem of a pair: its id in at least nine digits, as img2dataset keys are."""
    if pair_id < 0:
        raise ValueError(
            f"id {pair_id} is negative; shard keys are an id's digits, so ids must be >= 0 "
            "(renumber the table's ids)"
        )
    return f"{pair_id:0{_KEY_DIGITS}d}"


def write_shards(
    table: PairTable,
    out_dir: str | os.PathLike[str],
    shard_size: int = DEFAULT_SHARD_SIZE,
    compress_level: int = 1,
) -> dict[str, Any]:
    """Write the pairs as tar shards of `shard_size` pairs in table order; returns the index.

    Images are PNG (lossless: reading the shards back gives the same pixels), captions
    .txt, and each .json holds the id and, for fashion-scenes, the class labels. A
    folder that already holds .tar files is refused: mixing two data sets' shards
    would silently double or lose pairs.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if len(table) == 0:
        raise ValueError("no pairs to write")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; shards go into a folder")
    if out.is_dir() and any(out.glob("*.tar")):
        raise ValueError(f"{out} already holds .tar shards; remove them or choose another folder")
    keys = [shard_key(int(i)) for i in table.ids]
    shards = []
    for number, start in enumerate(range(0, len(table), shard_size)):
        rows = range(start, min(start + shard_size, len(table)))
        name = f"{number:05d}.tar"
        with (
            atomic_path(out / name) as tmp,
            tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for row in rows:
                _add_pair(tar, table, row, keys[row], compress_level)
        shards.append(
            {
                "file": name,
                "n": len(rows),
                "first_id": int(table.ids[rows[0]]),
                "last_id": int(table.ids[rows[-1]]),
            }
        )
    index = {
        "format": SHARDS_FORMAT,
        "n_pairs": len(table),
        "n_shards": len(shards),
        "shard_size": shard_size,
        "image_shape": list(table.image_shape),
        "image_mode": array_mode(table.images),
        "classnames": list(CLASSNAMES) if table.has_classes else None,
        "shards": shards,
    }
    write_text(out / SHARDS_INDEX, json.dumps(index, indent=1) + "\n")
    return index


def _add_pair(tar: tarfile.TarFile, table: PairTable, row: int, key: str, level: int) -> None:
    meta: dict[str, Any] = {"key": key, "id": int(table.ids[row])}
    if table.has_classes:
        meta["image_classes"] = np.asarray(table.image_classes[row]).tolist()
        meta["caption_classes"] = np.asarray(table.caption_classes[row]).tolist()
    image = io.BytesIO()
    Image.fromarray(table.images[row]).save(image, format="PNG", compress_level=level)
    for suffix, data in (
        ("png", image.getvalue()),
        ("txt", table.captions[row].encode("utf-8")),
        ("json", json.dumps(meta).encode("utf-8")),
    ):
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))


def read_shard_index(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The shards.json of a folder written by write_shards; None for other shards."""
    path = Path(directory) / SHARDS_INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(
            f"{path}: not a readable shard index ({err}); delete it or rewrite"
        ) from None
    if not isinstance(index, dict) or index.get("format") != SHARDS_FORMAT:
        raise DataError(f"{path}: not an {SHARDS_FORMAT} index; delete it or rewrite the shards")
    return index


def pairs_in(directory: str | os.PathLike[str]) -> Path:
    """Where a folder keeps its pairs: train.parquet, train/ shards, or shards of its own.

    A poison directory holds train.parquet (`otcclip poison`, the default) or train/
    (`--format shards`), beside manifest.json; a folder of .tar shards is its own data.
    """
    directory = Path(directory)
    for name in _PAIRS_FILES:
        if (directory / name).is_file():
            return directory / name
    folder = directory / SHARDS_FOLDER
    if folder.is_dir() and any(folder.glob("*.tar")):
        return folder
    if any(directory.glob("*.tar")):
        return directory
    found = sorted(p.name for p in directory.glob("*.parquet"))
    if len(found) == 1:
        return directory / found[0]
    raise FileNotFoundError(
        f"{directory} is not a poison directory: expected train.parquet or train/ (.tar shards), "
        "and manifest.json, in it" + (f"; found {', '.join(found)}" if found else "")
    )
