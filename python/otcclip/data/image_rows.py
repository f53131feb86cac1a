"""The images a matching round checks: one row per image, with the caption it is paired with.

`otcclip match` reads them from a parquet file: an id, the image (bytes, or a path
relative to the file), and `caption_id`, the pool caption each image is paired with;
a pairs file (id, image, caption) works too, each image paired with the caption of
its id. The images are decoded by the package's one decoder (images.py); the image
column and every other column (url, ...) are kept as they are, to be written back
beside the round's result. Every problem is a DataError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from otcclip.data.errors import DataError
from otcclip.data.images import read_images

TEXT_COLUMNS = ("caption", "text")
IMAGE_ID_COLUMNS = ("id", "image_id")
IMAGE_COLUMNS = ("image", "jpg", "png", "image_bytes")
PATH_COLUMNS = ("image_path", "path", "filepath")
_SHOWN = 10


@dataclass
class ImageRows:
    """Decoded images with their ids, their own captions' ids and the columns to carry on."""

    ids: np.ndarray
    own_ids: np.ndarray
    pixels: np.ndarray
    column: str  # name of the image column passed through to the output
    values: Any  # pyarrow array: the bytes, or absolute paths
    own_from_pairs: bool
    image_classes: np.ndarray | None = None
    extras: dict[str, Any] | None = None  # other input columns (url, ...), carried through


def first_of(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def id_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    """A column of unique integer ids, or a DataError saying what is wrong with it."""
    col = table.column(column)
    if not pa.types.is_integer(col.type):
        raise DataError(f"{path}: column {column!r} holds {col.type}; expected integer ids")
    if col.null_count:
        raise DataError(f"{path}: column {column!r} has {col.null_count} empty cells")
    ids = np.asarray(col.to_numpy(), dtype=np.int64)
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(
            f"{path}: column {column!r} repeats ids, e.g. {values[counts > 1][:_SHOWN].tolist()}"
        )
    return ids


def class_column(table: pa.Table, column: str) -> np.ndarray | None:
    """A fashion-scenes class multi-hot column (what captions name / images show), if usable."""
    if column not in table.column_names:
        return None
    rows = table.column(column).to_pylist()
    if not rows or any(r is None or len(r) != len(rows[0]) for r in rows):
        return None
    return np.asarray(rows, dtype=np.uint8).reshape(len(rows), -1)


def image_rows(table: pa.Table, path: Path, image_size: int) -> ImageRows:
    """The rows of an images file (already read from `path`), decoded to image_size px.

    All images are decoded before anything else happens, and every unreadable one is
    named in a single error.
    """
    names = table.column_names
    id_col = first_of(names, IMAGE_ID_COLUMNS)
    image_col = first_of(names, IMAGE_COLUMNS)
    path_col = None if image_col else first_of(names, PATH_COLUMNS)
    own_col = "caption_id" if "caption_id" in names else None
    pairs = own_col is None and first_of(names, TEXT_COLUMNS) is not None
    if image_col is not None and pa.types.is_string(table.schema.field(image_col).type):
        image_col, path_col = None, image_col  # paths in a column called 'image'
    if (
        id_col is None
        or (image_col is None and path_col is None)
        or (own_col is None and not pairs)
    ):
        raise DataError(
            f"{path}: the images file needs an id ({' or '.join(IMAGE_ID_COLUMNS)}), an image "
            f"(bytes: {' / '.join(IMAGE_COLUMNS)}; or a path: {' / '.join(PATH_COLUMNS)}) and "
            f"'caption_id' (or be a pairs file with a 'caption' column); it has {names}"
        )
    if table.num_rows == 0:
        raise DataError(f"{path}: no images")
    ids = id_column(table, id_col, path)
    own_ids = ids.copy() if own_col is None else _own_ids(table, own_col, path)
    if image_col is not None:
        values, sources = _image_bytes(table, image_col, path)
        out_col = "image"
    else:
        assert path_col is not None
        values, sources = _image_paths(table, path_col, path.parent)
        out_col = "image_path"
    pixels = read_images(sources, ids, image_size, str(path))
    used = {id_col, image_col, path_col, own_col, *TEXT_COLUMNS, "caption_classes"}
    extras = {c: table.column(c) for c in names if c not in used}
    return ImageRows(
        ids, own_ids, pixels, out_col, values, pairs, class_column(table, "image_classes"), extras
    )


def _own_ids(table: pa.Table, column: str, path: Path) -> np.ndarray:
    own = table.column(column)
    if not pa.types.is_integer(own.type) or own.null_count:
        raise DataError(
            f"{path}: 'caption_id' must hold an integer id in every row ({own.type}, "
            f"{own.null_count} empty)"
        )
    return np.asarray(own.to_numpy(), dtype=np.int64)


def _image_bytes(table: pa.Table, column_name: str, path: Path) -> tuple[Any, list[Any]]:
    column = table.column(column_name)
    if pa.types.is_struct(column.type):  # Hugging Face's {"bytes", "path"}
        column = pc.struct_field(column, "bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataError(f"{path}: column {column_name!r} holds {column.type}; expected image bytes")
    values = column.combine_chunks()
    return values, values.to_pylist()


def _image_paths(table: pa.Table, column_name: str, root: Path) -> tuple[Any, list[Any]]:
    raw = table.column(column_name).to_pylist()
    sources = [None if p is None else (Path(p) if Path(p).is_absolute() else root / p) for p in raw]
    values = pa.array([None if s is None else str(s.resolve()) for s in sources], pa.string())
    return values, sources
