"""cytonet.hostmem: with the settings applied, freed large buffers are reused instead of mapped afresh.

Each case runs in its own interpreter (the settings are process-wide and cannot be undone) and counts the
minor page faults of three forward passes of a small convolutional net over a 1024^2 image, after two to warm
up: with the C library's defaults every activation is a fresh mapping whose pages fault on first touch (about
430 MB per pass), with the settings the heap's freed memory is reused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cytonet.config import load_config
from cytonet.hostmem import BufferPool

SCRIPT = """
import resource, sys, torch
from cytonet.hostmem import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "1" else None
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3)
).eval()
x = torch.rand(1, 1, 1024, 1024)
with torch.no_grad():
    for _ in range(2):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
#: Pages of the activations of one pass: 1022^2 x 16 + 1020^2 x 16 + 510^2 x 16 + 508^2 x 32 floats.
PASS_PAGES = (1022**2 * 16 + 1020**2 * 16 + 510**2 * 16 + 508**2 * 32) * 4 // 4096


def _faults(apply: bool) -> tuple[str, int]:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}  # torch's huge-page option would hide the page count
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if apply else "0"], capture_output=True, text=True, env=env, check=True
    )
    applied, faults = out.stdout.split()
    return applied, int(faults)


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="the settings are glibc's")
def test_freed_memory_is_reused_only_with_the_settings() -> None:
    applied, with_settings = _faults(True)
    _, without = _faults(False)
    assert applied == "True"
    assert without > 3 * 0.5 * PASS_PAGES  # the C library's default: fresh mappings every pass
    assert with_settings < 0.02 * without


def test_setting_is_on_by_default_and_can_be_turned_off() -> None:
    assert load_config(None, []).run.reuse_host_memory is True
    assert load_config(None, ["run.reuse_host_memory=false"]).run.reuse_host_memory is False


def test_buffer_pool_reuses_the_smallest_fit_and_keeps_at_most_keep() -> None:
    pool = BufferPool(2, torch.float32)
    a = pool.take((10, 10))
    ptr_a = a.data_ptr()
    pool.give(a)
    b = pool.take((5, 4))  # fits in a's buffer: the same memory, shaped as asked
    assert b.data_ptr() == ptr_a and b.shape == (5, 4) and b.is_contiguous()
    c = pool.take((20, 20))  # nothing free fits: new memory
    assert c.data_ptr() != ptr_a
    pool.give(b)
    pool.give(c)
    assert pool.take((3, 3)).data_ptr() == ptr_a  # the smallest that fits, not the largest
    d, e, f = pool.take((30,)), pool.take((40,)), pool.take((50,))
    for t in (d, e, f):
        pool.give(t)
    kept = sorted(int(t.numel()) for t in pool._free)
    assert kept == [50, 400]  # d had the 400 buffer, e and f new ones: the largest two are kept


def test_buffer_pool_ignores_tensors_it_did_not_lend() -> None:
    pool = BufferPool(4, torch.uint8)
    pool.give(torch.empty(100, dtype=torch.uint8))
    x = pool.take((8,))
    pool.give(x)
    pool.give(x)  # twice: the second is ignored, so the buffer is never lent to two takers
    assert len(pool._free) == 1
    assert pool.take((8,)).data_ptr() == x.data_ptr()
    assert pool.take((8,)).data_ptr() != x.data_ptr()


RESERVE_SCRIPT = """
import resource, sys, threading, torch
from cytonet.hostmem import BufferPool, reuse_freed_memory
assert reuse_freed_memory()
N = 32 << 20  # floats: 128 MB, above what a thread's arena holds
torch.empty(3 * N).fill_(1.0)  # freed at once: warm memory in the main heap, as the model's activations leave
pool = BufferPool(2, torch.float32)
if sys.argv[1] == "1":
    pool.reserve(N, 2)
faults = []
def reader():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = pool.take((N,)), pool.take((N // 2,))  # two blocks in flight, then two more
    a.fill_(2.0); b.fill_(2.0); pool.give(a); pool.give(b)
    a, b = pool.take((N // 4,)), pool.take((N,))
    a.fill_(3.0); b.fill_(3.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=reader)
t.start(); t.join()
print(faults[0])
"""


@pytest.mark.skipif(not _glibc(), reason="the settings are glibc's")
def test_reserved_buffers_reuse_the_main_heap_for_reader_threads() -> None:
    """Buffers a reader thread allocates for itself are fresh mappings (a thread's arena holds at most 64 MiB)
    whose pages fault on first touch, block after block of different sizes; reserved on the main thread, they
    are the main heap's freed memory, already mapped."""
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    counts = {}
    for reserve in ("0", "1"):
        out = subprocess.run(
            [sys.executable, "-c", RESERVE_SCRIPT, reserve], capture_output=True, text=True, env=env, check=True
        )
        counts[reserve] = int(out.stdout)
    pages = (32 << 20) * 4 // 4096
    assert counts["0"] > 1.2 * pages  # the first block's buffer, and the later larger block's again
    assert counts["1"] < 0.02 * pages


def test_reserve_holds_buffers_as_large_as_asked() -> None:
    pool = BufferPool(3, torch.float32)
    small = pool.take((10,))
    pool.give(small)
    pool.reserve(100, 5)  # at most keep = 3; the kept 10-element buffer is too small for the blocks to come
    assert sorted(int(b.numel()) for b in pool._free) == [100, 100, 100]
    held = {b.data_ptr() for b in pool._free}
    views = [pool.take((10, 10)), pool.take((7,)), pool.take((100,))]
    assert {v.data_ptr() for v in views} == held  # every take is served from the reserved buffers
    assert pool.take((100,)).data_ptr() not in held  # a fourth at once: new memory, as before
    for v in views:
        pool.give(v)
    pool.reserve(50, 2)  # already held
    assert sorted(int(b.numel()) for b in pool._free) == [100, 100, 100]
