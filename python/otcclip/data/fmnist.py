"""Fashion-MNIST: locating the IDX files, reading them, and the class vocabulary.

The images are the real Fashion-MNIST ones (Debian package `dataset-fashion-mnist`);
nothing is downloaded. The vocabulary (names, synonyms, articles) lives here because
scenes, attacks, zero-shot prompts and caption parsing must all agree on it.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "OTCCLIP_FASHION_MNIST"
ROOT_FLAG = "--fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

CLASSNAMES: tuple[str, ...] = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Other names a caption may use for each class. None may be another class's name or
# contain a position word ("top"), so that captions stay unambiguous and parseable.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "tee shirt"),
    ("trousers", "pants", "slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock", "gown"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "flip-flop", "slide sandal"),
    ("shirt", "blouse", "button-up shirt"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "bootie"),
)

_PLURAL_NOUNS = frozenset({"trousers", "pants", "slacks"})
_SPLITS = {"train": "train", "test": "t10k"}


def with_article(noun: str) -> str:
    """'a sneaker', 'an ankle boot', 'a pair of trousers': what a caption says for one item."""
    if noun in _PLURAL_NOUNS:
        return f"a pair of {noun}"
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def class_index(label: str | int) -> int:
    """Class index from an index, a class name or a synonym ('bag', 'handbag', '8')."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(CLASSNAMES):
            return int(label)
        raise ValueError(f"class index must be in 0..{len(CLASSNAMES) - 1}, got {label}")
    if not isinstance(label, str):
        raise TypeError(f"class label must be a str or an int, got {type(label).__name__}")
    text = label.strip().lower()
    if text.isdigit():
        return class_index(int(text))
    for index, names in enumerate(SYNONYMS):
        if text in names:
            return index
    raise ValueError(
        f"unknown class label {label!r}; expected one of {', '.join(CLASSNAMES)} "
        "(or a synonym, or an index 0-9)"
    )


@functools.lru_cache(maxsize=1)
def _caption_pattern() -> tuple[re.Pattern[str], dict[str, int]]:
    lookup = {name: index for index, names in enumerate(SYNONYMS) for name in names}
    # Longest names first so that "ankle boot" wins over "boot" and "t-shirt" over "shirt".
    names = sorted(lookup, key=len, reverse=True)
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![\w-])({alternatives})(?![\w-])"), lookup


def classes_in_captions(captions: list[str]) -> np.ndarray:
    """uint8 multi-hot (N, C) of the classes each caption names, by the vocabulary above.

    Lets evaluation judge any caption (a re-assigned one, a user's one) by what it says,
    not by where it came from.
    """
    pattern, lookup = _caption_pattern()
    out = np.zeros((len(captions), len(CLASSNAMES)), dtype=np.uint8)
    for row, caption in enumerate(captions):
        for match in pattern.finditer(caption.lower()):
            out[row, lookup[match.group(1)]] = 1
    return out


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the four IDX files: argument, else $OTCCLIP_FASHION_MNIST, else Debian's."""
    if root is not None:
        chosen, source = Path(root), "the given folder"
    elif os.environ.get(ROOT_ENV):
        chosen, source = Path(os.environ[ROOT_ENV]), f"${ROOT_ENV}"
    else:
        chosen, source = DEFAULT_ROOT, "the default folder"
    if not chosen.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {source} {str(chosen)!r} is not a folder. Install Debian's "
            f"package `{DEBIAN_PACKAGE}` (apt-get install {DEBIAN_PACKAGE}), or pass the folder "
            f"holding the four IDX files with {ROOT_FLAG} DIR (or set ${ROOT_ENV})."
        )
    return chosen


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{stem}[.gz] is missing from {str(root)!r}; Fashion-MNIST needs the four IDX files "
        f"(Debian package `{DEBIAN_PACKAGE}`, or pass another folder with {ROOT_FLAG} DIR)"
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into an array of its shape."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{dtype_code:02x}; expected 0x08 (unsigned byte)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count:
        raise ValueError(
            f"{path}: IDX body has {len(data) - header} bytes; the header promises {count}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of a Fashion-MNIST split ('train'/'test')."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _load_cached(resolve_root(root).resolve(), split)


@functools.lru_cache(maxsize=4)
def _load_cached(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _SPLITS[split]
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{root}: Fashion-MNIST {split} files disagree: "
            f"images {images.shape}, labels {labels.shape}"
        )
    if labels.size and labels.max() >= len(CLASSNAMES):
        raise ValueError(f"{root}: label {labels.max()} out of range 0..{len(CLASSNAMES) - 1}")
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels
