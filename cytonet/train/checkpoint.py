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
config             the resolved config as a plain dict (for the record)
identity           what determines the trained weights, flat ``{key: value}`` (``training_identity`` in
                   :mod:`cytonet.train.loop`: the patch store's manifest hash, model, optimiser, augmentation,
                   batch and length settings, the probed encoder's hash); resuming under another is refused
fingerprint        hash of ``identity``
=================  =====================================================================================

Writing: rank 0 writes ``ckpt-<step>.pt`` through a temporary file, ``fsync`` and ``os.replace``, then fsyncs the
folder and deletes all but the newest ``keep`` checkpoints. Reading: :func:`readable_checkpoint` finds the newest
one that can be read; :func:`load_checkpoint` checks version, kind and identity before anything is loaded into the
model, so a wrong checkpoint is refused whole, never loaded half. Settings outside the identity (logging,
checkpoint cadence, loader workers, the inference and analysis sections) may change between a run and its
resumption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytonet.data.patches import fsync_dir
from cytonet.errors import CytonetError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")

#: Config sections left out of the fingerprint of checkpoints written before ``identity`` existed.
LEGACY_NEUTRAL_SECTIONS = ("run", "dist")


class CheckpointError(CytonetError):
    """A checkpoint is unreadable or does not belong to this run (names the file and the mismatch)."""


def fingerprint(identity: dict[str, Any]) -> str:
    """Hash of a run's identity (a flat dict of JSON-able values)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The keys that differ between two identities, ``key: old -> new``, the first five; empty when equal."""
    norm_old, norm_new = (json.loads(json.dumps(d, default=str)) for d in (old, new))
    changed = [
        f"{k}: {_short(norm_old.get(k))} -> {_short(norm_new.get(k))}"
        for k in sorted(set(norm_old) | set(norm_new))
        if norm_old.get(k) != norm_new.get(k)
    ]
    return "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "..."


def legacy_fingerprint(config: dict[str, Any]) -> str:
    """The fingerprint of checkpoints written before ``identity``: every section but the legacy neutral ones."""
    relevant = {k: v for k, v in config.items() if k not in LEGACY_NEUTRAL_SECTIONS}
    return fingerprint(relevant)


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


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint (its structure read, memory-mapped: the tensors are not), or None."""
    try:
        if path.stat().st_size == 0:
            return "an empty file"
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        if "mmap" not in str(exc):
            return load_error(exc)
        try:  # not a zip archive, which mmap needs: a plain load says what it is instead
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as plain:
            return load_error(plain)
    return None if isinstance(state, dict) and "format_version" in state else "not a cytonet checkpoint"


def load_error(exc: Exception) -> str:
    """``Class: first line`` of an exception from ``torch.load`` (for a file that cannot be read)."""
    first = (str(exc).strip().splitlines() or [""])[0]  # torch's unpickling errors run to a page
    return f"{exc.__class__.__name__}: {first or 'an empty or cut-short file'}"


#: Suffix a damaged checkpoint is renamed with (kept for a look, out of the way of the run's checkpoints).
DAMAGED_SUFFIX = ".damaged"


def readable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that can be read: one damaged since it was written (they are written
    atomically: a disk error, a copy cut short) is passed over, with a warning, for the one before it, and set
    aside as ``<name>.damaged`` (the caller holds the run folder's lock): left in place, it would count among
    the newest checkpoints kept and get the new ones pruned. Raises :class:`CheckpointError` when there are
    checkpoints and none can be read."""
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        why = _unreadable(path)
        if why is None:
            return path
        log.warning("checkpoint %s cannot be read (%s): resuming from an older one, if any", path, why)
        if path != found[0]:  # the oldest stays, for the message below if none can be read
            try:
                path.replace(path.with_name(path.name + DAMAGED_SUFFIX))
            except OSError as exc:  # a read-only folder: the run cannot write there anyway
                log.warning("could not set %s aside: %s", path, exc)
    if found:
        raise CheckpointError(
            f"no checkpoint in {run_dir} can be read ({found[0].name}: {_unreadable(found[0])}); "
            "pass --overwrite to train again"
        )
    return None


def torch_save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file (``<name>.tmp<pid>``), fsync, rename and a folder fsync: a reader
    sees the whole file or none, after a killed process or a lost node alike."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the rename below must never expose a file whose bytes are still in flight
    except (OSError, RuntimeError) as exc:
        # torch's writer reports a short write (a full disk, a quota) as "unexpected pos ...": say what failed
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise CytonetError(
            f"writing {path} failed ({first}); {free / 2**20:.0f} MiB are free on its file system: if it is "
            "full or over quota, free space and rerun (the run resumes from its last checkpoint)"
        ) from None
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<step>.pt`` and keep only the newest ``keep`` checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    torch_save_atomic(state, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    for stale in run_dir.glob("ckpt-*.pt.tmp*"):  # left by a writer killed mid-write (one writer per folder)
        stale.unlink(missing_ok=True)
    log.info("checkpoint %s written", final)
    return final


def load_checkpoint(path: Path, *, kind: str, identity: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Load and check a checkpoint: format version, kind and identity must match this run's.

    ``config`` (the resolved config as a plain dict) checks checkpoints written before ``identity`` existed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read: {load_error(exc)}") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a cytonet checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, this cytonet reads format {FORMAT_VERSION}"
        )
    if state.get("kind") != kind:
        raise CheckpointError(f"{path} is a {state.get('kind')!r} checkpoint, this run is {kind!r}")
    if "identity" in state:
        diff = identity_diff(state["identity"], identity)
    elif state.get("fingerprint") != legacy_fingerprint(config):
        diff = _config_diff(state.get("config", {}), config)
    else:
        diff = ""
    if diff:
        raise CheckpointError(
            f"{path} was written under other settings ({diff}); use another run folder, the same settings, "
            "or --overwrite to start again"
        )
    return state


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = []
    for section in sorted(set(old) | set(new)):
        if section in LEGACY_NEUTRAL_SECTIONS:
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
