"""Data: fashion-scenes (the embedded default), readers/writers for user data, PairTable.

Small data is read whole into a PairTable; large data is streamed (PairStream, from
webdataset shards or parquet row groups). Captions stay strings here; tokenising them
is the trainer's business, per batch. The stream is imported on first use, since it
brings in torch.
"""

from otcclip.data.errors import DataError
from otcclip.data.fmnist import (
    CLASSNAMES,
    SYNONYMS,
    class_index,
    classes_in_captions,
    load_fashion_mnist,
    read_idx,
    resolve_root,
    with_article,
)
from otcclip.data.images import read_image, read_images
from otcclip.data.readers import (
    ReadReport,
    read_pair_columns,
    read_pairs,
    read_pairs_report,
    write_pairs,
)
from otcclip.data.scenes import (
    POSITIONS,
    TEST_ID_OFFSET,
    ZERO_SHOT_TEMPLATES,
    fashion_scenes,
    probe_sets,
    validation_set,
    zero_shot_set,
)
from otcclip.data.shards import pairs_in, read_shard_index, write_shards
from otcclip.data.table import EvalSet, PairTable

_STREAM_NAMES = ("PairStream", "StreamUnit", "StreamedPair")


def __getattr__(name: str) -> object:
    if name in _STREAM_NAMES:
        from otcclip.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'otcclip.data' has no attribute {name!r}")


__all__ = [
    "CLASSNAMES",
    "POSITIONS",
    "SYNONYMS",
    "TEST_ID_OFFSET",
    "ZERO_SHOT_TEMPLATES",
    "DataError",
    "EvalSet",
    "PairStream",
    "PairTable",
    "ReadReport",
    "StreamUnit",
    "StreamedPair",
    "class_index",
    "classes_in_captions",
    "fashion_scenes",
    "load_fashion_mnist",
    "pairs_in",
    "probe_sets",
    "read_idx",
    "read_image",
    "read_images",
    "read_pair_columns",
    "read_pairs",
    "read_pairs_report",
    "read_shard_index",
    "resolve_root",
    "with_article",
    "write_pairs",
    "write_shards",
    "validation_set",
    "zero_shot_set",
]
