"""Reading user image-caption data (parquet, open_clip CSV, img2dataset webdataset), writing pairs.

A sample that cannot be used (unreadable image, empty caption, caption that is not
UTF-8) is never dropped silently: the reader collects its id in a ReadReport, warns
with the count and the ids, or stops with a DataError when strict=True.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from otcclip.atomic import atomic_path
from otcclip.data.fmnist import CLASSNAMES
from otcclip.data.table import PairTable

FORMAT_TAG = "otcclip-pairs/1"
_CAPTION_COLUMNS = ("caption", "text", "title", "txt")
_IMAGE_COLUMNS = ("image", "jpg", "png", "jpeg", "webp", "image_bytes", "bytes")
_PATH_COLUMNS = ("image_path", "filepath", "path", "file_name", "filename")
_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_IDS_SHOWN = 20


class DataError(ValueError):
    """Data that cannot be read as asked (bad layout, or unusable samples with strict=True)."""


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


@dataclass
class _Raw:
    """One sample before decoding: id, image bytes or path (or None), caption (or None)."""

    id: int
    image: bytes | Path | None
    caption: bytes | str | None


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
    if mode not in ("auto", "L", "RGB"):
        raise ValueError(f"mode must be 'auto', 'L' or 'RGB', got {mode!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    kind = fmt or _guess_format(path)
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
        raws, classes = _wds_raws(path), None
    else:
        raise ValueError(f"fmt must be 'parquet', 'csv' or 'webdataset', got {kind!r}")
    return _assemble(raws, classes, source, image_size, mode, strict)


def _guess_format(path: str | os.PathLike[str]) -> str:
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


def _stable_id(key: str) -> int:
    """img2dataset keys are digits (kept as the id); anything else gets a stable 63-bit hash."""
    if key.isdigit() and len(key) <= 18:
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _parse_ids(values: list, column: str, source: Path) -> list[int]:
    out = []
    for row, value in enumerate(values):
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: id column {column!r} row {row} is {value!r}; expected an int"
            ) from None
    return out


def _pick(names: Iterable[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    names = list(names)
    if wanted is not None:
        return wanted if wanted in names else None
    return next((c for c in candidates if c in names), None)


def _read_parquet(file: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet table; a damaged file (flipped bytes, truncation) is a DataError.

    pyarrow reports damage as OSError ("Corrupt snappy compressed data", "Couldn't
    deserialize thrift") or any ArrowException, which commands would show as a traceback.
    """
    try:
        return pq.read_table(file, columns=columns)
    except (OSError, pa.ArrowException) as err:
        reason = " ".join(str(err).split())[:300]
        raise DataError(f"{file}: not a readable parquet file ({reason})") from None


def _parquet_raws(path, caption_col, image_col, path_col, id_col, image_root):
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no parquet data at {str(path)!r}")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    raws: list[_Raw] = []
    class_parts: list[tuple[np.ndarray, np.ndarray]] = []
    offset = 0
    for file in files:
        table = _read_parquet(file)
        names = table.column_names
        cap = _pick(names, caption_col, _CAPTION_COLUMNS)
        if cap is None:
            raise DataError(
                f"{file}: no caption column ({caption_col or ' / '.join(_CAPTION_COLUMNS)}); "
                f"columns are {names}"
            )
        img = _pick(names, image_col, _IMAGE_COLUMNS) if path_col is None else None
        pth = _pick(names, path_col, _PATH_COLUMNS) if img is None else None
        if img is None and pth is None:
            raise DataError(
                f"{file}: no image column (bytes: {' / '.join(_IMAGE_COLUMNS)}; paths: "
                f"{' / '.join(_PATH_COLUMNS)}); columns are {names}"
            )
        idc = _pick(names, id_col, ("id",))
        if id_col is not None and idc is None:
            raise DataError(f"{file}: no id column {id_col!r}; columns are {names}")
        n = table.num_rows
        ids = (
            _parse_ids(table.column(idc).to_pylist(), idc, file)
            if idc
            else range(offset, offset + n)
        )
        captions = _captions_as_bytes(table.column(cap))
        if img is not None:
            column = table.column(img)
            if pa.types.is_struct(column.type):  # Hugging Face's {"bytes", "path"}
                column = pc.struct_field(column, "bytes")
            images: list = column.to_pylist()
        else:
            images = [
                None if p is None else _resolve(root, p) for p in table.column(pth).to_pylist()
            ]
        raws.extend(_Raw(i, im, c) for i, im, c in zip(ids, images, captions, strict=True))
        if "image_classes" in names and "caption_classes" in names:
            class_parts.append(
                (
                    _multi_hot(table.column("image_classes")),
                    _multi_hot(table.column("caption_classes")),
                )
            )
        offset += n
    classes = None
    if class_parts and len(class_parts) == len(files):
        classes = (
            np.concatenate([a for a, _ in class_parts]),
            np.concatenate([b for _, b in class_parts]),
        )
    return raws, classes


def _multi_hot(column: pa.ChunkedArray) -> np.ndarray:
    """A list<uint8> column of equal-length lists as a (N, C) array."""
    array = column.combine_chunks()
    n = len(array)
    if array.null_count:
        raise DataError("class columns must not hold nulls")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if n else len(CLASSNAMES)
    if n and (lengths != width).any():
        raise DataError("class columns must hold lists of equal length")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.uint8).reshape(n, width)


def _captions_as_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """Caption cells as raw bytes, so that bad UTF-8 is caught per sample, not per file."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataError(f"caption column has type {column.type}; expected strings or bytes")
    return column.to_pylist()


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _csv_raws(path, caption_col, path_col, id_col, sep, image_root) -> list[_Raw]:
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
    idc = _pick(names, id_col, ("id",))
    if id_col is not None and idc is None:
        raise DataError(f"{path}: no id column {id_col!r}; columns are {names}")
    root = Path(image_root) if image_root else path.parent
    rows = list(reader)
    ids = _parse_ids([r[idc] for r in rows], idc, path) if idc else range(len(rows))
    return [
        _Raw(i, _resolve(root, r[pth]) if r[pth] else None, r[cap])
        for i, r in zip(ids, rows, strict=True)
    ]


def _wds_urls(path: str | os.PathLike[str]) -> list[str]:
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


def _wds_raws(path: str | os.PathLike[str]) -> list[_Raw]:
    """Samples grouped by key with webdataset's own tar iterator; each shard closed after use."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    raws = []
    for url in _wds_urls(path):
        try:
            with open(url, "rb") as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    image = next((sample[k] for k in _WDS_IMAGE_KEYS if k in sample), None)
                    raws.append(_Raw(_stable_id(sample["__key__"]), image, sample.get("txt")))
        except (OSError, ValueError, tarfile.TarError) as err:  # a damaged tar, not a sample
            raise DataError(f"{url}: cannot read the webdataset shard: {err}") from err
    return raws


def _decode_image(data: bytes | Path | None) -> Image.Image | None:
    if data is None:
        return None
    try:
        image = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return image


def _decode_caption(data: bytes | str | None) -> str | None:
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


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then a centre crop: keeps the aspect ratio, as CLIP does."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _assemble(raws, classes, source, image_size, mode, strict) -> tuple[PairTable, ReadReport]:
    report = ReadReport(source=source)
    keep_rows: list[int] = []
    pixels: list[np.ndarray] = []
    captions: list[str] = []
    ids: list[int] = []
    for row, raw in enumerate(raws):
        report.n_seen += 1
        caption = _decode_caption(raw.caption)
        image = _decode_image(raw.image)
        if image is None:
            report.unreadable_images.append(raw.id)
        elif caption is None:
            report.non_utf8_captions.append(raw.id)
        elif caption == "":
            report.empty_captions.append(raw.id)
        if image is None or not caption:
            continue
        gray = image.mode in ("L", "1", "LA", "I", "I;16") if mode == "auto" else mode == "L"
        wanted = "L" if gray else "RGB"
        if image.mode != wanted:
            image = image.convert(wanted)
        if image_size is not None and image.size != (image_size, image_size):
            image = _fit(image, image_size)
            report.n_resized += 1
        pixels.append(np.asarray(image, dtype=np.uint8))
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
    metadata = {"otcclip.format": FORMAT_TAG}
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
    table = _read_parquet(path, wanted)
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
            out[name] = _multi_hot(column)
        else:
            out[name] = column.to_pylist()
    return out
