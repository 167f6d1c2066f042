"""Training progress on rank 0: a CSV log, TensorBoard scalars when tensorboard is installed, and a progress bar
when stderr is a terminal. Other ranks get a no-op :class:`Progress`, so the loop calls it unconditionally.

Entry point: :class:`Progress` (``update`` once per step, ``close`` at the end or on preemption).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any

from cytonet.data.patches import write_bytes_atomic

log = logging.getLogger(__name__)


HEADER = ["step", "epoch", "loss", "lr", "images_per_s"]


def _truncate_log(path: Path, start_step: int) -> None:
    """Keep the rows of steps up to ``start_step`` (where the run resumes) of an existing log, dropping later
    ones and a line cut short by a kill; rewritten through a temporary file."""
    if not path.exists():
        return
    text = path.read_text()
    rows = list(csv.reader(text.splitlines()))
    kept = [r for r in rows[1:] if len(r) == len(HEADER) and r[0].isdigit() and int(r[0]) <= start_step]
    # Rewritten unless every row is kept and the file ends its last line (a row cut short by a kill without its
    # newline would have the next step's row glued onto it).
    if rows and rows[0] == HEADER and len(kept) == len(rows) - 1 and text.endswith("\n"):
        return
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(HEADER)
    writer.writerows(kept)
    write_bytes_atomic(path, buf.getvalue().encode(), fsync=False)  # a log: atomic against a kill is enough


class Progress:
    """Per-step sink for loss, learning rate and throughput (rank 0 only; no-op elsewhere)."""

    def __init__(self, out: Path, kind: str, total_steps: int, start_step: int, active: bool) -> None:
        self.active = active
        self._csv: Any = None
        self._tb: Any = None
        self._bar: Any = None
        if not active:
            return
        path = out / "train-log.csv"
        _truncate_log(path, start_step)
        new = not path.exists()
        # Line-buffered: a killed run loses no logged step; the steps after its last checkpoint are run again
        # on resumption, and _truncate_log drops their first logging so that each step appears once.
        self._csv_file = open(path, "a", newline="", buffering=1)
        self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(HEADER)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=kind, unit="step", dynamic_ncols=True)
        self.kind = kind

    def update(self, step: int, epoch: int, loss: float, lr: float, rate: float) -> None:
        if not self.active:
            return
        self._csv.writerow([step, epoch, f"{loss:.6f}", f"{lr:.6g}", f"{rate:.1f}"])
        if self._tb is not None:
            self._tb.add_scalar(f"{self.kind}/loss", loss, step)
            self._tb.add_scalar(f"{self.kind}/lr", lr, step)
            self._tb.add_scalar(f"{self.kind}/images_per_s", rate, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)

    def close(self) -> None:
        if not self.active:
            return
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self.active = False
