"""Keep a node's memory flat: rebuild its model sessions past a resident-set limit.

ONNX Runtime's arenas and the C allocator keep memory they once needed;
images of varied sizes make that grow over thousands of jobs. When the
node's RSS passes the limit, the servicer stops taking inference work,
waits for what runs, loads fresh sessions, drops the old ones and hands
freed heap back to the OS (glibc's malloc_trim). If that does not bring RSS
under the limit, the node says so and waits until it has grown a further
quarter before trying again, instead of recycling after every job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import resource

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best the OS offers
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


# glibc mallopt parameters (malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def tune_allocator(mmap_threshold: int = 1 << 20, arenas: int = 4) -> bool:
    """Keep image-sized buffers out of the heap, so freeing them returns them to the OS.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after
    which decoded images and tensors come from per-thread heap arenas that
    rarely shrink: RSS climbs job after job. A fixed threshold turns that off;
    fewer arenas bound fragmentation across worker threads. Call once, early.
    Returns False where the C library has no mallopt (not glibc).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(libc.mallopt(M_ARENA_MAX, arenas) == 1 and ok)


def give_memory_back() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class RecyclePolicy:
    """Decides when RSS calls for a recycle. limit_bytes 0 turns recycling off."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.floor_bytes = 0  # RSS right after the last recycle
        self.recycles = 0

    def due(self, rss: int) -> bool:
        if not self.limit_bytes or rss <= self.limit_bytes:
            return False
        # A recycle that could not get under the limit: wait for real growth.
        return rss > self.floor_bytes * 1.25

    def recycled(self, before: int, after: int) -> None:
        self.recycles += 1
        self.floor_bytes = after
        level = logging.INFO if after <= self.limit_bytes else logging.WARNING
        log.log(
            level,
            "model sessions recycled",
            extra={
                "rss_before_mb": before // 2**20,
                "rss_after_mb": after // 2**20,
                "limit_mb": self.limit_bytes // 2**20,
            },
        )
