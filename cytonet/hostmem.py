"""Host memory: keep freed memory in the process for reuse instead of handing every large buffer back to the OS.

glibc's malloc serves requests above its mmap threshold (128 KiB to 32 MiB, adapting) with a fresh ``mmap``
and returns them with ``munmap`` when freed. torch's CPU allocator has no cache of its own, so every large
tensor (a convolution's output, a block's float input) is new memory, and the kernel zeroes each 4 KiB page on
first touch. For whole-section inference with the paper encoder on CPU that page work cost more than the
arithmetic: 47 s of system time in a 64 x 48 mm section, and a forward pass 2.5x slower than with the memory
reused (``benchmarks/bench_dense_cpu.py``; training gains 5-15%). Allocators such as jemalloc or tcmalloc
avoid it by caching; glibc does the same through ``mallopt``:

- ``M_MMAP_THRESHOLD`` at its maximum: large requests come from the heap, whose freed space is reused;
- ``M_TRIM_THRESHOLD`` at its maximum: freed space at the top of the heap is not returned to the OS;
- ``M_TOP_PAD`` 64 MiB: the heap grows in steps of at least that, so fewer ``brk`` calls.

Threads keep their own arenas. A thread's arena cannot hold a request above 64 MiB, which still gets a fresh
``mmap`` (a paper-encoder block read by a reader thread), but forcing every thread onto the main heap
(``M_ARENA_MAX`` 1) serialised their allocations: two reader threads then read 1.15x as fast as one instead
of 1.8-2x, which a GPU node with many readers cannot afford.

The cost: the process keeps its peak heap until it exits, instead of shrinking between blocks or epochs. Set
``run.reuse_host_memory=false`` where that matters more than speed. Other C libraries (musl, macOS) are left
as they are.

Entry point: :func:`reuse_freed_memory` (idempotent; called by training and inference before they start
threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: The largest value mallopt takes (its value argument is a C int).
INT_MAX = 2**31 - 1
SETTINGS = (
    (M_MMAP_THRESHOLD, INT_MAX),
    (M_TRIM_THRESHOLD, INT_MAX),
    (M_TOP_PAD, 64 << 20),
)

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def reuse_freed_memory() -> bool:
    """Apply the settings of the module doc once per process; True when they are in effect (glibc only)."""
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None:
        log.debug("host memory: not glibc, malloc left as it is")
        _applied = False
        return False
    failed = [param for param, value in SETTINGS if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1]
    if failed:
        log.debug("host memory: mallopt refused parameters %s", failed)
    _applied = not failed
    return _applied
