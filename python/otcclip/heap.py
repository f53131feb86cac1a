"""Hand the heap's freed pages back to the operating system (glibc's malloc_trim).

Why this module exists: glibc keeps the memory a process frees on its heap for later
allocations, but numpy's large arrays are mapped afresh and cannot reuse it. A phase that
frees many mid-sized buffers (the encoders' batches, a training epoch's autograd
buffers) and is followed by one that maps large arrays (a matching round) then holds
both: the resident size grows by what the first phase no longer uses. Trimming between
them keeps the peak near what each phase really holds (at 50,000 captions the
encoders alone grew the resident size by 3 to 4 times the pool's features). Elsewhere
than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

__all__ = ["trim_heap"]


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def trim_heap() -> None:
    """Return the heap's free pages to the operating system (a few ms; glibc only)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
