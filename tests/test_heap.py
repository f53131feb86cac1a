"""otcclip.heap: freed heap pages go back to the system."""

from __future__ import annotations

import gc
import os

import pytest

from otcclip import heap


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(heap._malloc_trim() is None, reason="malloc_trim is glibc's")
def test_trimming_returns_the_pages_of_freed_buffers_held_between_live_ones():
    # 200 MiB of 64 KiB buffers (below glibc's mmap threshold: they live on the heap), then
    # every buffer freed but one in 64: the live ones pin the heap, so glibc keeps the holes
    buffers = [bytearray(64 * 1024) for _ in range(3200)]
    for b in buffers:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    pinned = buffers[::64]
    del buffers
    gc.collect()
    before = _resident_mib()
    heap.trim_heap()
    after = _resident_mib()
    assert before - after > 100, f"{before:.0f} -> {after:.0f} MiB"
    assert len(pinned) == 50
