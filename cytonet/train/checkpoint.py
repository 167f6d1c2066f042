"""Checkpoints that resume exactly: atomic writes, the last k kept, refused when they do not fit the run.

A checkpoint is a plain dict of tensors and builtins, loadable with ``torch.load(weights_only=True)``:

=================  =====================================================================================
key                content
=================  =====================================================================================
format_version     :data:`FORMAT_VERSION`; another version is refused
kind               ``pretrain`` / ``probe`` / ``scratch``
step, epoch        optimisation steps done; epoch the next step belongs to
model, optimizer   ``state_dict()`` of the (unwrapped) model and the optimiser
scaler             gradient-scaler state (empty dict without fp16)
loader             the loader/sampler position (resumes mid-epoch)
rng                one entry per rank: torch CPU (and CUDA) generator state, Python ``random`` and NumPy states
config             the resolved config as a plain dict; resuming under another config is refused
fingerprint        hash of the config keys that change what is trained (see :func:`config_fingerprint`)
=================  =====================================================================================

Writing: rank 0 writes ``ckpt-<step>.pt`` through a temporary file, ``fsync`` and ``os.replace``, then fsyncs the
folder and deletes all but the newest ``keep`` checkpoints. Reading: :func:`latest_checkpoint` finds the newest
complete one; :func:`load_checkpoint` checks version, kind and fingerprint before anything is loaded into the
model, so a wrong checkpoint is refused whole, never loaded half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytonet.errors import CytonetError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")

#: Config sections that do not change the trained weights: a resumed run may differ in these.
NEUTRAL_SECTIONS = ("run", "dist")


class CheckpointError(CytonetError):
    """A checkpoint is unreadable or does not belong to this run (names the file and the mismatch)."""


def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of the config sections that determine the training trajectory (all but :data:`NEUTRAL_SECTIONS`)."""
    relevant = {k: v for k, v in config.items() if k not in NEUTRAL_SECTIONS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and builtins (``weights_only``-loadable)."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (temporary files are ignored)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<step>.pt`` and keep only the newest ``keep`` checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())  # the rename below must never expose a file whose bytes are still in flight
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    log.info("checkpoint %s written", final)
    return final


def load_checkpoint(path: Path, *, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """Load and check a checkpoint: format version, kind and config fingerprint must match this run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a cytonet checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, this cytonet reads format {FORMAT_VERSION}"
        )
    if state.get("kind") != kind:
        raise CheckpointError(f"{path} is a {state.get('kind')!r} checkpoint, this run is {kind!r}")
    expected = config_fingerprint(config)
    if state.get("fingerprint") != expected:
        diff = _config_diff(state.get("config", {}), config)
        raise CheckpointError(
            f"{path} was written under another config ({diff}); use another run folder or the same config"
        )
    return state


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = []
    for section in sorted(set(old) | set(new)):
        if section in NEUTRAL_SECTIONS:
            continue
        a, b = old.get(section, {}), new.get(section, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                changed.append(section)
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                changed.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return "; ".join(changed[:5]) or "config differs"
