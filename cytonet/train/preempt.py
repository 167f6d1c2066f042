"""Preemption requests: signal handlers that only set a flag; the training loop acts at a step boundary.

A handler never checkpoints or exits itself: a rank that left on its own would leave the others hanging in
a collective. Instead the loop asks every step whether any rank saw a signal (one tiny all-reduce) and all
ranks then checkpoint and exit together with the requeue status.

Entry point: :class:`PreemptionFlag` (a context manager that installs and restores the handlers).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised by the training loop after the preemption checkpoint; the CLI exits with the requeue status."""

    def __init__(self, exit_code: int, step: int) -> None:
        super().__init__(f"preempted at step {step}: checkpoint written, exiting with {exit_code} for requeue")
        self.exit_code = exit_code
        self.step = step


class PreemptionFlag:
    """Sets :attr:`requested` when one of ``signal_names`` arrives (main thread only; elsewhere a no-op)."""

    def __init__(self, signal_names: list[str]) -> None:
        self.signals = [getattr(signal, name) for name in signal_names]
        self.requested = False
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.received = signal.Signals(signum).name
        # Logging from a signal handler is safe enough here: it only formats and writes one line.
        log.warning("received %s: will checkpoint and exit at the next step boundary", self.received)

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
