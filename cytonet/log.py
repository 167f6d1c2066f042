"""Logging set-up: one format with the rank in it; INFO on rank 0, WARNING and above elsewhere.

Entry point: :func:`setup_logging`, called once per process by the CLI (and by launched workers).
Nothing replaces ``print``: modules log through ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", rank: int = 0, world_size: int = 1) -> None:
    """Configure the root logger for this process; safe to call again (replaces the handler)."""
    effective = getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    tag = f"rank {rank}/{world_size}" if world_size > 1 else "cytonet"
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{tag}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(effective)
    # Third-party libraries log at INFO about things users do not need (e.g. numcodecs, matplotlib).
    for noisy in ("matplotlib", "numcodecs", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
