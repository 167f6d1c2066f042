"""Waiting for the real processes a test starts (torchrun agents and their workers), so that a hang fails the
test with evidence instead of a bare timeout.

A distributed run that hangs leaves nothing to go on: the agent's timeout kills it, and its workers may live on
as orphans that slow every later test. :func:`wait_all` and :func:`run` wait with a deadline; past it they
send SIGABRT to every process of each tree, workers first (cytonet's CLI turns on faulthandler, so they print
every thread's Python stack), kill what is left, and fail the test with the tail of each process's stderr,
those stacks kept whole (:func:`tail`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

#: How long the processes get to print their stacks after SIGABRT before they are killed.
DUMP_S = 5.0


def tail(err: str, n: int = 3000) -> str:
    """The end of a process's stderr for an assertion message, with every Python fault dump in it in full
    (faulthandler's "Fatal Python error" and the stacks after it), wherever it is: a rank that aborted prints
    its dump before the launcher's own report, which would push it out of a plain tail."""
    start = err.find("Fatal Python error")
    if start == -1 or start >= len(err) - n:
        return err[-n:]
    return f"{err[start : start + 30000]}\n[...]\n{err[-n:]}"


def descendants(pid: int) -> list[int]:
    """Processes below ``pid``, deepest first (Linux /proc)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.extend(descendants(child))
            found.append(child)
    return found


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_all(procs: Sequence[subprocess.Popen[str]], timeout: float, dump_s: float = DUMP_S) -> list[str]:
    """Wait for every process (their stderr piped, as text); returns each one's stderr. Past ``timeout`` s,
    dumps their stacks, kills them and fails the test (see the module doc)."""
    return [err for _, err in _communicate(procs, timeout, dump_s)]


def run(cmd: Sequence[str | Path], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """:func:`subprocess.run` with stdout and stderr captured as text, and :func:`wait_all`'s deadline."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )
    ((out, err),) = _communicate([proc], timeout, DUMP_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _communicate(procs: Sequence[subprocess.Popen[str]], timeout: float, dump_s: float) -> list[tuple[str, str]]:
    got = [("", "")] * len(procs)

    def drain(i: int, proc: subprocess.Popen[str]) -> None:
        out, err = proc.communicate()
        got[i] = (out or "", err or "")

    readers = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    end = time.monotonic() + timeout
    for t in readers:
        t.join(max(0.0, end - time.monotonic()))
    if not any(t.is_alive() for t in readers):
        return got
    trees = [[*descendants(p.pid), p.pid] for p in procs]
    everyone = [pid for tree in trees for pid in tree]
    _signal_all(everyone, signal.SIGABRT)
    time.sleep(dump_s)
    _signal_all([*everyone, *(pid for p in procs for pid in descendants(p.pid))], signal.SIGKILL)
    for t in readers:
        t.join(30)
    tails = "\n".join(
        f"--- process {i} {procs[i].args!r} stderr (tail):\n{tail(err, 6000)}" for i, (_, err) in enumerate(got)
    )
    pytest.fail(f"still running after {timeout:.0f} s; stacks dumped, processes killed:\n{tails}", pytrace=False)


@contextlib.contextmanager
def read_only_view(src: Path, view: Path) -> Iterator[Path]:
    """``src`` seen read-only at ``view`` (a real read-only bind mount, unmounted on exit); skips the test where
    that cannot be made (not root, no bind mounts)."""
    view.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    if subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(view)], capture_output=True).returncode:
        pytest.skip("mount --bind -o ro is not available here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, check=False)
        probe = view / ".cytonet-write-probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.fail(f"{view} is writable: the read-only bind mount did not take")
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False)
