"""Give memory back to the system once the load that needed it is gone.

glibc's allocator keeps freed memory for reuse: a burst of connections (each TLS connection has
a 256 KiB read buffer) or of huge objects would leave a long-running webhook at its peak size.
Two settings and one call fix that, where glibc is the allocator:

* a fixed mmap threshold: large blocks (TLS buffers, big request bodies) are mapped on their
  own and unmapped when freed, instead of glibc raising the threshold after the first free and
  serving them from heaps that never shrink;
* at most two malloc arenas: every thread (name lookups, big bodies on worker threads) would
  otherwise get a heap of its own to keep;
* ``malloc_trim`` every half minute: free heap pages are returned (a short walk of the heap,
  on a worker thread).

And one for Python's collector. What importing pinhook made (modules, classes, functions:
about 96,000 objects) lives as long as the process, yet every full collection walks all of
it: 65-90 ms on the 2-core benchmark machine, in which no admission is answered. Under
reviews that all differ one came every ten to fifty thousand admissions, as the objects of
requests in flight when a younger generation is collected are promoted and add up to the
next full one. ``serve`` freezes them out of every later collection (``gc.freeze``) before
it reads the settings, so that nothing that can be replaced later (the settings, a runtime,
its caches) is frozen: a full collection then walks only what came after, 2-4 ms.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2
TRIM_INTERVAL_SECONDS = 30.0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_allocator() -> bool:
    """Apply the settings above; False where the allocator is not glibc's."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
    return True


def freeze_imported_objects() -> int:
    """Collect what importing left behind, so that no garbage is frozen for good, then freeze
    the rest out of later collections (see above); how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


async def trim_periodically(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """Every ``interval`` seconds, give free memory back; runs until cancelled."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(trim)
