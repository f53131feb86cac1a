"""Reading user image-caption data (parquet, open_clip CSV, img2dataset webdataset), writing pairs.

A sample that cannot be used (unreadable image, empty caption, caption that is not
UTF-8) is never dropped silently: the reader collects its id in a ReadReport, warns
with the count and the ids, or stops with a DataError when strict=True.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from otcclip.atomic import atomic_path
from otcclip.data.errors import DataError
from otcclip.data.fmnist import CLASSNAMES
from otcclip.data.images import array_mode, check_options, open_image, to_array
from otcclip.data.shards import pairs_in
from otcclip.data.sources import (
    CLASS_COLUMNS,
    RawPair,
    decode_caption,
    guess_format,
    multi_hot,
    parquet_columns,
    parquet_files,
    parquet_raws,
    parse_ids,
    pick,
    raws_classes,
    read_parquet,
    resolve,
    shard_raws,
    shard_urls,
    stable_id,
)
from otcclip.data.table import PairTable

FORMAT_TAG = "otcclip-pairs/1"
IMAGE_MODE_KEY = "otcclip.image_mode"
_IDS_SHOWN = 20
_stable_id = stable_id  # the id rule's old private name


@dataclass
class ReadReport:
    """What a reader saw and what it could not use, by sample id."""

    source: str
    n_seen: int = 0
    n_kept: int = 0
    unreadable_images: list[int] = field(default_factory=list)
    empty_captions: list[int] = field(default_factory=list)
    non_utf8_captions: list[int] = field(default_factory=list)
    n_resized: int = 0

    @property
    def n_dropped(self) -> int:
        return len(self.unreadable_images) + len(self.empty_captions) + len(self.non_utf8_captions)

    @property
    def ok(self) -> bool:
        return self.n_dropped == 0

    def summary(self) -> str:
        parts = []
        for label, ids in (
            ("unreadable image", self.unreadable_images),
            ("empty caption", self.empty_captions),
            ("caption not UTF-8", self.non_utf8_captions),
        ):
            if ids:
                shown = ", ".join(str(i) for i in ids[:_IDS_SHOWN])
                more = ", ..." if len(ids) > _IDS_SHOWN else ""
                parts.append(f"{len(ids)} {label} (ids {shown}{more})")
        if not parts:
            return f"{self.source}: {self.n_kept} samples read, none dropped"
        return f"{self.source}: {self.n_dropped} of {self.n_seen} samples dropped: " + "; ".join(
            parts
        )

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "n_seen": self.n_seen,
            "n_kept": self.n_kept,
            "n_dropped": self.n_dropped,
            "unreadable_images": list(self.unreadable_images),
            "empty_captions": list(self.empty_captions),
            "non_utf8_captions": list(self.non_utf8_captions),
            "n_resized": self.n_resized,
        }


def read_pairs(path: str | os.PathLike[str], **options) -> PairTable:
    """Read pairs from parquet, CSV or webdataset (by extension); warn about dropped samples.

    Options are those of read_pairs_report.
    """
    table, report = read_pairs_report(path, **options)
    if not report.ok:
        warnings.warn(report.summary(), stacklevel=2)
    return table


def read_pairs_report(
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    mode: str = "auto",
    strict: bool = False,
    fmt: str | None = None,
    caption_col: str | None = None,
    image_col: str | None = None,
    path_col: str | None = None,
    id_col: str | None = None,
    sep: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
) -> tuple[PairTable, ReadReport]:
    """Read pairs and report every unusable sample.

    image_size: resize (shorter side, then centre crop) to S x S when images are not
    already S x S; without it, images of differing sizes are an error. mode: 'auto'
    (grayscale when every image is, else RGB), 'L' or 'RGB'. strict: raise DataError
    instead of dropping unusable samples. fmt: 'parquet' | 'csv' | 'webdataset'
    (default: from the extension). Columns are found by usual names unless given;
    CSV follows open_clip (filepath/title, separator tab unless the header has none);
    relative image paths are taken from image_root, else the data file's folder.
    """
    check_options(image_size, mode)
    path = _pairs_of_folder(path) if fmt is None else path
    kind = fmt or guess_format(path)
    source = str(path)
    if kind == "parquet":
        raws, classes = _parquet_raws(
            Path(path), caption_col, image_col, path_col, id_col, image_root
        )
    elif kind == "csv":
        raws, classes = (
            _csv_raws(Path(path), caption_col, path_col or image_col, id_col, sep, image_root),
            None,
        )
    elif kind == "webdataset":
        raws = _wds_raws(path)
        classes = raws_classes(raws)
    else:
        raise ValueError(f"fmt must be 'parquet', 'csv' or 'webdataset', got {kind!r}")
    return _assemble(raws, classes, source, image_size, mode, strict)


def _pairs_of_folder(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A poison directory's pairs (train.parquet or train/ shards); other paths as given.

    A folder holding .tar or .parquet files directly is read whole, as before.
    """
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.tar")) or any(p.glob("*.parquet")):
        return path
    return pairs_in(p)


def _parquet_raws(path, caption_col, image_col, path_col, id_col, image_root):
    files = parquet_files(path)
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    raws: list[RawPair] = []
    class_parts: list[tuple[np.ndarray, np.ndarray]] = []
    for file in files:
        table = read_parquet(file)
        columns = parquet_columns(
            table.column_names, file, caption_col, image_col, path_col, id_col
        )
        raws.extend(parquet_raws(table, columns, len(raws), file, root))
        if columns.classes:
            image_classes, caption_classes = (multi_hot(table.column(c)) for c in CLASS_COLUMNS)
            class_parts.append((image_classes, caption_classes))
    classes = None
    if class_parts and len(class_parts) == len(files):
        classes = (
            np.concatenate([a for a, _ in class_parts]),
            np.concatenate([b for _, b in class_parts]),
        )
    return raws, classes


def _csv_raws(path, caption_col, path_col, id_col, sep, image_root) -> list[RawPair]:
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {str(path)!r}")
    # surrogateescape keeps undecodable bytes, so each bad caption is found and reported.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if sep is None:
        header = text.split("\n", 1)[0]
        sep = "\t" if "\t" in header or path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    names = reader.fieldnames or []
    cap = caption_col or "title"
    pth = path_col or "filepath"
    for wanted, what in ((cap, "caption"), (pth, "image path")):
        if wanted not in names:
            raise DataError(
                f"{path}: no {what} column {wanted!r} (separator {sep!r}); columns are {names}"
            )
    idc = pick(names, id_col, ("id",))
    if id_col is not None and idc is None:
        raise DataError(f"{path}: no id column {id_col!r}; columns are {names}")
    root = Path(image_root) if image_root else path.parent
    rows = list(reader)
    ids = parse_ids([r[idc] for r in rows], idc, path) if idc else range(len(rows))
    return [
        RawPair(i, resolve(root, r[pth]) if r[pth] else None, r[cap])
        for i, r in zip(ids, rows, strict=True)
    ]


def _wds_raws(path: str | os.PathLike[str]) -> list[RawPair]:
    """Every sample of every shard, in shard order then file order."""
    return [raw for url in shard_urls(path) for raw in shard_raws(url)]


def _decode_image(data: bytes | Path | None) -> Image.Image | None:
    try:
        return open_image(data)
    except DataError:
        return None


def _assemble(raws, classes, source, image_size, mode, strict) -> tuple[PairTable, ReadReport]:
    report = ReadReport(source=source)
    keep_rows: list[int] = []
    pixels: list[np.ndarray] = []
    captions: list[str] = []
    ids: list[int] = []
    for row, raw in enumerate(raws):
        report.n_seen += 1
        caption = decode_caption(raw.caption)
        image = _decode_image(raw.image)
        if image is None:
            report.unreadable_images.append(raw.id)
        elif caption is None:
            report.non_utf8_captions.append(raw.id)
        elif caption == "":
            report.empty_captions.append(raw.id)
        if image is None or not caption:
            continue
        if image_size is not None and image.size != (image_size, image_size):
            report.n_resized += 1
        pixels.append(to_array(image, image_size, mode))
        captions.append(caption)
        ids.append(raw.id)
        keep_rows.append(row)
    report.n_kept = len(ids)
    if strict and not report.ok:
        raise DataError(report.summary() + " (strict: nothing read)")
    if not ids:
        raise DataError(f"{source}: no usable samples ({report.summary()})")
    shapes = {p.shape[:2] for p in pixels}
    if len(shapes) > 1:
        raise DataError(
            f"{source}: images have {len(shapes)} different sizes (e.g. {sorted(shapes)[:3]}); "
            "pass image_size (--image-size) to resize them to one"
        )
    if any(p.ndim == 3 for p in pixels):
        pixels = [np.repeat(p[:, :, None], 3, axis=2) if p.ndim == 2 else p for p in pixels]
    id_array = np.asarray(ids, dtype=np.int64)
    if len(np.unique(id_array)) != len(id_array):
        values, counts = np.unique(id_array, return_counts=True)
        raise DataError(f"{source}: duplicate sample ids, e.g. {values[counts > 1][:5].tolist()}")
    image_classes = caption_classes = None
    if classes is not None:
        image_classes, caption_classes = classes[0][keep_rows], classes[1][keep_rows]
    table = PairTable(
        ids=id_array,
        images=np.stack(pixels),
        captions=captions,
        image_classes=image_classes,
        caption_classes=caption_classes,
    )
    return table, report


def _png(image: np.ndarray, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def write_pairs(table: PairTable, path: str | os.PathLike[str], compress_level: int = 1) -> None:
    """Write pairs to one parquet file (id, PNG image bytes, caption, classes), atomically."""
    columns = {
        "id": pa.array(table.ids, type=pa.int64()),
        "image": pa.array([_png(im, compress_level) for im in table.images], type=pa.binary()),
        "caption": pa.array(table.captions, type=pa.string()),
    }
    # The streaming source cannot look at every image first: it takes the mode from here.
    metadata = {"otcclip.format": FORMAT_TAG, IMAGE_MODE_KEY: array_mode(table.images)}
    if table.has_classes:
        for name in ("image_classes", "caption_classes"):
            columns[name] = pa.array(list(getattr(table, name)), type=pa.list_(pa.uint8()))
        metadata["otcclip.classnames"] = json.dumps(list(CLASSNAMES))
    arrow = pa.table(columns).replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp, row_group_size=8192)


def read_pair_columns(path: str | os.PathLike[str], columns: Iterable[str]) -> dict[str, object]:
    """Some columns of a pairs parquet (no image decoding), for bookkeeping on big files.

    Returns {name: values} for the columns present: 'id' as int64, 'changed' as bool,
    class columns as uint8 (N, C), anything else as a Python list (None for nulls).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no parquet file at {str(path)!r}")
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a parquet file ({err})") from err
    wanted = [c for c in columns if c in names]
    table = read_parquet(path, wanted)
    out: dict[str, object] = {}
    for name in wanted:
        column = table.column(name)
        if name == "id":
            if column.null_count:
                raise DataError(f"{path}: the id column has nulls")
            out[name] = np.asarray(column.to_numpy(), dtype=np.int64)
        elif name == "changed":
            out[name] = np.asarray(column.fill_null(False).to_numpy(), dtype=bool)
        elif name in ("image_classes", "caption_classes"):
            out[name] = multi_hot(column)
        else:
            out[name] = column.to_pylist()
    return out
