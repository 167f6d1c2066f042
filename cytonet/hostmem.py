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

Those requests above 64 MiB in a thread's arena are what :class:`BufferPool` is for: it lends out views of
flat tensors and keeps them when they come back. Inference's reader threads take their decode buffer and
the model's float input from pools: a paper-encoder block (a 9257^2 px read box: 86 MB of bytes, 343 MB of
floats) converted into fresh memory took 150 ms to over 1 s on 2 cores, into a reused buffer 40-50 ms.
:meth:`BufferPool.reserve` allocates a pool's buffers up front on the calling thread (from the main thread,
they come from the main heap), each as large as the largest block to come, so that none is dropped for a
larger one and mapped afresh. With the settings applied, inference takes its pools from
:func:`process_pool`: they outlive a run, as the heap does, so that a process mapping sections run after
run (a worker loop, bench_infer) reuses them instead of mapping 1.4 GB afresh per run for the paper
encoder, or, reserved anew per run, fragmenting the heap so that it grew by that much every other run.
bench_infer, paper encoder, all cores: a run's 250 000-280 000 page faults (0.5-3 s of system time) went
to none.

Entry points: :func:`reuse_freed_memory` (idempotent; called by training and inference before they start
threads), :class:`BufferPool`, :func:`process_pool`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import threading

import torch

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


class BufferPool:
    """Host tensors lent out and taken back for reuse, thread safe. Not a limit: :meth:`take` allocates when
    no kept buffer is large enough, and :meth:`give` keeps at most ``keep`` buffers (dropping the smallest),
    so a buffer never given back (an exception, a caller that keeps it) costs only its reuse."""

    def __init__(self, keep: int, dtype: torch.dtype) -> None:
        self.keep = keep
        self.dtype = dtype
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def reserve(self, numel: int, count: int) -> None:
        """Hold ``count`` (at most ``keep``) buffers of at least ``numel`` elements: allocated now, on the
        calling thread (see the module doc), as far as the kept ones fall short."""
        with self._lock:
            self._free = [b for b in self._free if b.numel() >= numel]
            while len(self._free) < min(count, self.keep):
                self._free.append(torch.empty(max(numel, 1), dtype=self.dtype))
            self._free.sort(key=torch.Tensor.numel, reverse=True)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (contents undefined): a view of a kept buffer when one is large
        enough (the smallest such), else of a new one."""
        n = math.prod(shape)
        with self._lock:
            # The smallest that fits; removed by position (list.remove would compare tensors elementwise).
            fits = [i for i, b in enumerate(self._free) if b.numel() >= n]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if base is None:
            base = torch.empty(max(n, 1), dtype=self.dtype)
        view = base[:n].view(shape)
        with self._lock:
            self._lent[view.data_ptr()] = base
        return view

    def give(self, view: torch.Tensor) -> None:
        """Take back a tensor from :meth:`take` (anything else is ignored); the caller must not use it again."""
        with self._lock:
            base = self._lent.pop(view.data_ptr(), None)
            if base is None:
                return
            self._free.append(base)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.keep :]


_pools: dict[torch.dtype, BufferPool] = {}
_pools_lock = threading.Lock()


def process_pool(dtype: torch.dtype, keep: int) -> BufferPool:
    """This process's pool of ``dtype`` buffers, keeping at least ``keep`` of them (the most any caller asked
    for). Its buffers are never freed: for callers that keep freed memory anyway (:func:`reuse_freed_memory`)."""
    with _pools_lock:
        pool = _pools.setdefault(dtype, BufferPool(keep, dtype))
        pool.keep = max(pool.keep, keep)
        return pool
