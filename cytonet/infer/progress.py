"""Progress of one inference worker: blocks done, section megapixels per second and time left.

A SLURM job mapping a brain's sections runs for hours with its output in a log file, so progress is a log
line at most every :data:`EVERY_S` seconds (INFO: rank 0's console shows it, the log of every worker records
it), plus a tqdm bar when stderr is a terminal.

Entry point: :class:`BlockProgress` (``done`` from any thread once per written block, ``close`` at the end).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cytonet.infer.run")

#: Seconds between two progress lines of one worker.
EVERY_S = 60.0


class BlockProgress:
    """Counts a worker's written blocks and their section megapixels (thread safe)."""

    def __init__(
        self,
        total_blocks: int,
        total_mpix: float,
        bar: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``bar``: a tqdm bar (None: when stderr is a terminal); ``clock``: seconds, monotonic."""
        self.clock = clock
        self.total_blocks = total_blocks
        self.total_mpix = total_mpix
        self.blocks = 0
        self.mpix = 0.0
        self._lock = threading.Lock()
        self._started = clock()
        self._last_line = self._started
        self._bar: Any = None
        if (sys.stderr.isatty() if bar is None else bar) and total_blocks:
            from tqdm import tqdm

            self._bar = tqdm(total=total_blocks, desc="infer", unit="block", dynamic_ncols=True)

    def done(self, mpix: float) -> None:
        """One more block written, covering ``mpix`` section megapixels."""
        with self._lock:
            self.blocks += 1
            self.mpix += mpix
            now = self.clock()
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix_str(f"{self.rate(now):.1f} MP/s")
            if now - self._last_line >= EVERY_S and self.blocks < self.total_blocks:
                self._last_line = now
                log.info("infer: %s", self.line(now))

    def rate(self, now: float | None = None) -> float:
        """Section megapixels per second so far."""
        seconds = (self.clock() if now is None else now) - self._started
        return self.mpix / seconds if seconds > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """``12/48 blocks (25%), 35.2 MP/s, about 4 min left``."""
        now = self.clock() if now is None else now
        share = self.blocks / self.total_blocks if self.total_blocks else 1.0
        rate = self.rate(now)
        text = f"{self.blocks}/{self.total_blocks} blocks ({100 * share:.0f}%), {rate:.1f} MP/s"
        if rate > 0 and self.mpix < self.total_mpix:
            left = (self.total_mpix - self.mpix) / rate
            text += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
