"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A crash, a full disk or SIGKILL in the middle of a write leaves the previous
file in place and at most a stray temporary file beside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over `path` on success.

    For writers that insist on a file name (pyarrow, safetensors, matplotlib).
    The temporary file is removed if the body raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def file_target_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot take an output file (None when it can), checked before any work.

    Catches what used to surface only after a whole run, as a traceback: the path is a
    folder, a parent "folder" is a file, or a folder on the way cannot be written.
    Missing folders are fine (they are created).
    """
    target = Path(path)
    if target.is_dir():
        return f"{target} is a directory; give a file name"
    parent = target.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"{parent} is a file, so {target} cannot be created under it"
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (after resolving links and `..`)."""
    return Path(a).resolve() == Path(b).resolve()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    # mkstemp creates 0600 files; outputs should get the permissions `open` would give.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
