"""Pools of worker processes for the steps that spread sections over cores (synth, extract), and
:func:`die_with_parent`, which the training loader's workers also call.

Workers are spawned, not forked: zarr runs an event-loop thread and h5py holds library state, which a forked
child would inherit without the thread (and hang). On Linux each worker asks the kernel to kill it when the
process that started it dies (``PR_SET_PDEATHSIG``): after a ``kill -9`` of a step (a job's time limit, a user's
Ctrl-\\) its workers would otherwise go on writing into the output folder behind a rerun's back, then wait
forever for a parent that is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

#: prctl option: the signal the calling process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Worker initializer: be killed when process ``parent`` ends (Linux; elsewhere nothing), and end now if it
    already has (it died before the request took effect)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that die with this one."""
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=die_with_parent, initargs=(os.getpid(),)
    )
