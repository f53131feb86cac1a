"""Where samples come from before decoding: tar shards and parquet rows, with their ids.

Both the in-memory reader (readers.py) and the streaming source (stream.py) take
samples from here, so that the two give every sample the same id, the same caption
bytes and the same image bytes: one set of rules for finding columns, naming ids and
walking shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from otcclip.data.errors import DataError
from otcclip.data.fmnist import CLASSNAMES

CAPTION_COLUMNS = ("caption", "text", "title", "txt")
IMAGE_COLUMNS = ("image", "jpg", "png", "jpeg", "webp", "image_bytes", "bytes")
PATH_COLUMNS = ("image_path", "filepath", "path", "file_name", "filename")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASS_COLUMNS = ("image_classes", "caption_classes")


@dataclass
class RawPair:
    """One sample before decoding: id, image bytes or path (or None), caption (or None).

    `classes` holds (image_classes, caption_classes) when the source records them
    (fashion-scenes written by otcclip), else None.
    """

    id: int
    image: bytes | Path | None
    caption: bytes | str | None
    classes: tuple[list[int], list[int]] | None = None


def stable_id(key: str) -> int:
    """img2dataset keys are digits (kept as the id); anything else gets a stable 63-bit hash."""
    if key.isascii() and key.isdigit() and len(key) <= 19 and int(key) < 2**63:
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def guess_format(path: str | os.PathLike[str]) -> str:
    """'parquet', 'csv' or 'webdataset', from the extension or what a folder holds."""
    text = str(path)
    p = Path(text)
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".tar" or "{" in text:
        return "webdataset"
    if p.is_dir():
        if any(p.glob("*.tar")):
            return "webdataset"
        if any(p.glob("*.parquet")):
            return "parquet"
    if not p.exists():
        raise FileNotFoundError(f"no data at {text!r}")
    raise ValueError(
        f"cannot tell the format of {text!r}; expected .parquet, .csv/.tsv, .tar shards "
        "(or a folder of them), or pass fmt="
    )


def decode_caption(data: bytes | str | None) -> str | None:
    """The caption, '' when empty, None when not valid UTF-8."""
    if data is None:
        return ""
    if isinstance(data, str):
        try:
            data.encode("utf-8")  # surrogates mark bytes that were not UTF-8
        except UnicodeEncodeError:
            return None
        return data.strip()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------------- shards


def shard_urls(path: str | os.PathLike[str]) -> list[str]:
    """Shard files of a .tar, a folder of .tar files, or a brace pattern ('{00000..00009}.tar')."""
    from webdataset.shardlists import expand_urls

    text = str(path)
    p = Path(text)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {text!r}")
        return shards
    shards = list(expand_urls(text)) if "{" in text else [text]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"no webdataset shard at {missing[0]!r}")
    return shards


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The members of one shard grouped by key, in file order, as webdataset's tar iterator
    gives them: '__key__' and one entry of raw bytes per suffix ('png', 'txt', 'json', ...).

    For readers that need a member as it is stored (its key, its suffix, its bytes), e.g. to
    copy it into another shard; a damaged tar is a DataError naming the file.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        with open(url, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (OSError, ValueError, tarfile.TarError) as err:  # a damaged tar, not a sample
        raise DataError(f"{url}: cannot read the webdataset shard: {err}") from err


def sample_image_key(sample: dict[str, Any]) -> str | None:
    """The suffix of a shard sample's image member ('jpg', 'png', ...), None when it has none."""
    return next((k for k in SHARD_IMAGE_KEYS if k in sample), None)


def shard_raws(url: str) -> Iterator[RawPair]:
    """The samples of one shard in file order, grouped by key with webdataset's tar iterator.

    Only this shard's current sample is held; the file is closed when the walk ends.
    """
    for sample in shard_samples(url):
        image_key = sample_image_key(sample)
        yield RawPair(
            stable_id(sample["__key__"]),
            None if image_key is None else sample[image_key],
            sample.get("txt"),
            _json_classes(sample.get("json")),
        )


def _json_classes(data: bytes | None) -> tuple[list[int], list[int]] | None:
    """Class labels from a member's .json (written by write_shards); None when it has none.

    img2dataset's own .json (url, status, sizes) carries no labels and is not needed:
    a .json that does not parse only means no labels, never a dropped sample.
    """
    if not data or b"image_classes" not in data:
        return None
    try:
        meta = json.loads(data)
        pair = tuple([int(v) for v in meta[name]] for name in CLASS_COLUMNS)
    except (ValueError, TypeError, KeyError):
        return None
    return pair  # type: ignore[return-value]


def raws_classes(raws: list[RawPair]) -> tuple[np.ndarray, np.ndarray] | None:
    """(image_classes, caption_classes) as (N, C) uint8 when every sample has them alike."""
    if not raws or any(r.classes is None for r in raws):
        return None
    widths = {len(part) for r in raws for part in r.classes}  # type: ignore[union-attr]
    if len(widths) != 1:
        return None
    image = np.asarray([r.classes[0] for r in raws], dtype=np.uint8)  # type: ignore[index]
    caption = np.asarray([r.classes[1] for r in raws], dtype=np.uint8)  # type: ignore[index]
    return image, caption


# --------------------------------------------------------------------------- parquet


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns of a parquet file hold the caption, the image (bytes or path) and the id."""

    caption: str
    image: str | None
    path: str | None
    id: str | None
    classes: bool

    @property
    def names(self) -> list[str]:
        """The columns a pair needs (the class columns are read apart, by the in-memory reader)."""
        return [c for c in (self.id, self.caption, self.image, self.path) if c is not None]


def pick(names: Iterable[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    names = list(names)
    if wanted is not None:
        return wanted if wanted in names else None
    return next((c for c in candidates if c in names), None)


def parquet_columns(
    names: list[str],
    file: Path,
    caption_col: str | None = None,
    image_col: str | None = None,
    path_col: str | None = None,
    id_col: str | None = None,
) -> ParquetColumns:
    """The columns to read, found by usual names unless given; a DataError lists what is there."""
    cap = pick(names, caption_col, CAPTION_COLUMNS)
    if cap is None:
        raise DataError(
            f"{file}: no caption column ({caption_col or ' / '.join(CAPTION_COLUMNS)}); "
            f"columns are {names}"
        )
    img = pick(names, image_col, IMAGE_COLUMNS) if path_col is None else None
    pth = pick(names, path_col, PATH_COLUMNS) if img is None else None
    if img is None and pth is None:
        raise DataError(
            f"{file}: no image column (bytes: {' / '.join(IMAGE_COLUMNS)}; paths: "
            f"{' / '.join(PATH_COLUMNS)}); columns are {names}"
        )
    idc = pick(names, id_col, ("id",))
    if id_col is not None and idc is None:
        raise DataError(f"{file}: no id column {id_col!r}; columns are {names}")
    return ParquetColumns(cap, img, pth, idc, all(c in names for c in CLASS_COLUMNS))


def parse_ids(values: list, column: str, source: Path) -> list[int]:
    out = []
    for row, value in enumerate(values):
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: id column {column!r} row {row} is {value!r}; expected an int"
            ) from None
    return out


def parquet_raws(
    table: pa.Table, columns: ParquetColumns, first_id: int, file: Path, root: Path
) -> list[RawPair]:
    """The rows of a parquet table (a whole file or one row group) as raw samples.

    Without an id column, a row's id is its position in the data set: `first_id` is
    the number of rows before this table (in earlier files and row groups).
    """
    n = table.num_rows
    ids = (
        parse_ids(table.column(columns.id).to_pylist(), columns.id, file)
        if columns.id
        else range(first_id, first_id + n)
    )
    captions = captions_as_bytes(table.column(columns.caption))
    if columns.image is not None:
        column = table.column(columns.image)
        if pa.types.is_struct(column.type):  # Hugging Face's {"bytes", "path"}
            column = pc.struct_field(column, "bytes")
        images: list = column.to_pylist()
    else:
        assert columns.path is not None
        images = [
            None if p is None else resolve(root, p) for p in table.column(columns.path).to_pylist()
        ]
    return [RawPair(i, im, c) for i, im, c in zip(ids, images, captions, strict=True)]


def read_parquet(file: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet table; a damaged file (flipped bytes, truncation) is a DataError.

    pyarrow reports damage as OSError ("Corrupt snappy compressed data", "Couldn't
    deserialize thrift") or any ArrowException, which commands would show as a traceback.
    """
    try:
        table = pq.read_table(file, columns=columns)
        table.schema.names  # noqa: B018  (a flipped byte in a name fails only here)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        raise DataError(f"{file}: not a readable parquet file ({_reason(err)})") from None
    return table


def parquet_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no parquet data at {str(path)!r}")
    return files


def multi_hot(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<uint8> column of equal-length lists as a (N, C) array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if array.null_count:
        raise DataError("class columns must not hold nulls")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if n else len(CLASSNAMES)
    if n and (lengths != width).any():
        raise DataError("class columns must hold lists of equal length")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.uint8).reshape(n, width)


def captions_as_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """Caption cells as raw bytes, so that bad UTF-8 is caught per sample, not per file."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataError(f"caption column has type {column.type}; expected strings or bytes")
    return column.to_pylist()


def resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
