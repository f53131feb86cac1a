"""Data: fashion-scenes (the embedded default), readers/writers for user data, PairTable.

Captions stay strings here; tokenising them is the trainer's business, per batch.
"""

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
from otcclip.data.readers import (
    DataError,
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
from otcclip.data.table import EvalSet, PairTable

__all__ = [
    "CLASSNAMES",
    "POSITIONS",
    "SYNONYMS",
    "TEST_ID_OFFSET",
    "ZERO_SHOT_TEMPLATES",
    "DataError",
    "EvalSet",
    "PairTable",
    "ReadReport",
    "class_index",
    "classes_in_captions",
    "fashion_scenes",
    "load_fashion_mnist",
    "probe_sets",
    "read_idx",
    "read_pair_columns",
    "read_pairs",
    "read_pairs_report",
    "resolve_root",
    "with_article",
    "write_pairs",
    "validation_set",
    "zero_shot_set",
]
