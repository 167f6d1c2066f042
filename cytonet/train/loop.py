"""Training stages: contrastive pretraining, linear probe and scratch baseline, one loop for all three.

Pretraining optimises ``loss.kind``: SupCon (seed 002), the distance-weighted contrastive loss (seed 004) or
the siamese distance task (:mod:`cytonet.losses.siamese`). Scratch trains encoder and linear head end to end
from random weights, or with ``scratch.init_from`` from a pretraining's encoder (seed 002's ``distance``
baseline: the siamese task's encoder).

Entry point: :func:`run_stage` (``kind`` = ``pretrain`` / ``probe`` / ``scratch``), called by the CLI with the
:class:`~cytonet.distributed.DistEnv` that ``hpc/`` built. The same code runs as one process and under torchrun
(DDP over gloo on CPU, nccl on GPUs, one GPU per rank).

Per step: the loader yields this rank's augmented batch; the loss is this rank's share of the global loss
(embeddings gathered from all ranks with gradient), multiplied by the world size because DDP averages
gradients; LARS steps at ``base_lr * global_batch / 128``. Every step all ranks agree on two flags in one
collective: a non-finite loss anywhere (every rank stops with the same message) and a preemption signal
anywhere (every rank takes part in the checkpoint, then all exit with ``requeue_exit_code``).

Resuming: the newest checkpoint in the run folder is loaded automatically (``resume=False`` refuses a folder
that holds one). Model, optimiser, scaler, loader position and every rank's RNG states are restored, so on
the CPU a run killed at any step and resumed ends with weights bitwise identical to an uninterrupted run.

Outputs in the run folder: ``config.resolved.yaml``, ``ckpt-*.pt``, ``encoder.pt`` (final encoder weights, the
input of the probe), ``model.pt`` (probe and scratch: encoder, classifier and area table, the input of
``cytonet infer``), ``metrics-<split>.json``, ``per-area-<split>.csv``, ``confusion-<split>.png``
(probe and scratch), ``train-log.csv`` (per step; also TensorBoard scalars in ``tensorboard/`` when tensorboard
is installed) and ``DONE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import logging
import math
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cytonet import distributed
from cytonet.config import Config, TrainConfig, config_to_dict, save_config
from cytonet.data.loader import PatchLoader, build_loader
from cytonet.data.patches import (
    STEP_LOCK,
    PatchStore,
    file_sha256,
    reading_store,
    require_folder,
    step_lock,
    write_json_atomic,
)
from cytonet.distributed import DistEnv
from cytonet.errors import CytonetError, some_of
from cytonet.hostmem import reuse_freed_memory
from cytonet.losses.classification import CrossEntropyLoss
from cytonet.losses.contrastive import build_loss
from cytonet.losses.siamese import SiameseLoss
from cytonet.models.build import (
    MODEL_FILE,
    MODEL_FORMAT,
    build_classifier,
    build_contrastive_model,
    build_siamese_model,
)
from cytonet.optim.build import build_optimizer
from cytonet.optim.schedule import lr_at, set_lr
from cytonet.precision import MixedPrecision
from cytonet.train import checkpoint as ckpt
from cytonet.train.metrics import predict, write_report
from cytonet.train.preempt import Preempted, PreemptionFlag
from cytonet.train.progress import Progress

log = logging.getLogger(__name__)

Kind = Literal["pretrain", "probe", "scratch"]
ENCODER_FILE = "encoder.pt"
DONE_FILE = "DONE"
EVAL_SPLITS = ("test", "unseen")


class NonFiniteLossError(CytonetError):
    """The loss became NaN or infinite on some rank; every rank stops with this error."""


@dataclass
class StageResult:
    """What a finished stage reports (rank 0 holds the metrics)."""

    out: Path
    steps: int
    metrics: dict[str, dict[str, float]]


def stage_config(cfg: Config, kind: Kind) -> TrainConfig:
    return {"pretrain": cfg.pretrain, "probe": cfg.probe, "scratch": cfg.scratch}[kind]


def stage_dir(cfg: Config, kind: Kind) -> Path:
    return cfg.resolve_path(stage_config(cfg, kind).out_dir)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def load_encoder_file(path: Path, key: str = "probe.encoder_from", sha256: str | None = None) -> dict[str, Any]:
    """An ``encoder.pt`` written by a finished stage: ``encoder`` (state dict), ``config``, and from this
    version on ``patch_store`` (the manifest hash of the store it was trained on). ``key``: the setting that
    names it, for the error when it is missing. ``sha256``: the hash the run recorded for it; the bytes loaded
    must have it (the file may have been replaced since it was hashed)."""
    _require_encoder(path, key)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CytonetError(f"{path} was replaced while this stage started (a pretraining finishing?); run it again")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CytonetError(f"{path} cannot be read as an encoder file: {ckpt.load_error(exc)}") from None
    if not isinstance(state, dict) or "encoder" not in state:
        raise CytonetError(f"{path} is not a cytonet encoder file")
    return state


def _require_encoder(path: Path, key: str) -> None:
    """Refuse a missing ``encoder.pt`` (``key``: the setting that names it)."""
    if not path.is_file():
        raise CytonetError(f"{path} does not exist: run `cytonet pretrain` to the end first ({key})")


def load_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """The encoder state dict saved by a finished pretraining (``encoder.pt``)."""
    weights: dict[str, torch.Tensor] = load_encoder_file(path)["encoder"]
    return weights


def check_encoder_store(path: Path, state: dict[str, Any], store: PatchStore) -> None:
    """Refuse an encoder trained on another patch store than ``store``.

    Its held-out sections and brain would then not be held out: pretraining sees the labels (SupCon) or the
    coordinates of whatever its store's training split held, and the probe's or analysis's test numbers would
    be inflated without a sign. Encoders written before stores were recorded are accepted with a warning.
    """
    trained_on = state.get("patch_store")
    if trained_on is None:
        log.warning(
            "%s does not record its patch store: cannot check that %s's test splits were held out", path, store.path
        )
    elif trained_on != store.manifest_sha256:
        raise CytonetError(
            f"the encoder {path} was trained on another patch store than {store.path} (manifest "
            f"{trained_on[:12]} vs {store.manifest_sha256[:12]}): its held-out sections or brains may have been "
            "in that store's training split; pretrain again on this store, or use the store it was trained on"
        )


def training_identity(cfg: Config, kind: Kind, store: PatchStore, encoder_sha256: str | None = None) -> dict[str, Any]:
    """What determines a stage's trained weights, flat ``{key: value}``; checkpoints and ``DONE`` record it.

    A run resumes, and a finished run counts as done, only under the same identity. Settings outside it
    (logging, checkpoint cadence and retention, preemption signals, loader workers, timeouts, and the synth,
    extract, infer and analysis sections, which act through the patch store) may change in between.
    """
    tcfg = stage_config(cfg, kind)
    sections: dict[str, Any] = {
        "model": cfg.model,
        "optim": cfg.optim,
        "augment": cfg.augment,
    }
    if kind == "pretrain":
        sections["loss"] = cfg.loss
    identity: dict[str, Any] = {
        f"{name}.{k}": v for name, sec in sections.items() for k, v in dataclasses.asdict(sec).items()
    }
    if kind == "pretrain" and cfg.loss.kind != "siamese":
        # Only the siamese task reads it; runs made before it existed (supcon, distance) must resume and stay done.
        identity.pop("loss.scale_mm")
    identity.update(
        {
            "kind": kind,
            "patch_store": store.manifest_sha256,
            "run.seed": cfg.run.seed,
            "loader.seed": cfg.loader.seed,
            "loader.shard_block": cfg.loader.shard_block,
            "loader.class_aware": cfg.loader.class_aware,
            "loader.samples_per_class": cfg.loader.samples_per_class,
            f"{kind}.epochs": cfg.scratch_epochs if kind == "scratch" else tcfg.epochs,
            f"{kind}.max_steps": tcfg.max_steps,
            f"{kind}.global_batch_size": tcfg.global_batch_size,
        }
    )
    if encoder_sha256 is not None:  # the probe's encoder, or the one scratch.init_from starts from
        identity["encoder"] = encoder_sha256
    if kind != "probe":  # the probe's encoder is frozen: no BatchNorm statistics to synchronise
        identity["dist.sync_batchnorm"] = cfg.dist.sync_batchnorm
    return identity


def _build_model(cfg: Config, kind: Kind, n_classes: int, store: PatchStore, encoder_sha256: str | None) -> nn.Module:
    """The stage's model; for a probe or scratch.init_from, with the encoder file of hash ``encoder_sha256`` (the
    run's identity: the weights loaded are the ones it names)."""
    if kind == "pretrain":
        return build_siamese_model(cfg.model) if cfg.loss.kind == "siamese" else build_contrastive_model(cfg.model)
    model = build_classifier(cfg.model, n_classes, freeze_encoder=kind == "probe")
    path = _encoder_path(cfg, kind)
    if path is not None:
        state = load_encoder_file(path, _ENCODER_KEYS[kind], encoder_sha256)
        check_encoder_store(path, state, store)
        weights = state["encoder"]
        try:
            model.encoder.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CytonetError(
                f"the encoder in {path.parent} ({_ENCODER_KEYS[kind]}) does not fit model settings {cfg.model}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    return model


#: The key that names the encoder a stage starts from.
_ENCODER_KEYS = {"probe": "probe.encoder_from", "scratch": "scratch.init_from"}


def _encoder_path(cfg: Config, kind: Kind) -> Path | None:
    """The ``encoder.pt`` the stage starts from: the probe's, scratch's with ``scratch.init_from``, else None."""
    if kind == "probe":
        return cfg.resolve_path(cfg.probe.encoder_from) / ENCODER_FILE
    if kind == "scratch" and cfg.scratch.init_from:
        return cfg.resolve_path(cfg.scratch.init_from) / ENCODER_FILE
    return None


def _finished(out: Path) -> dict[str, Any] | None:
    """The contents of ``out/DONE``, or None when the stage has not finished there."""
    path = out / DONE_FILE
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CytonetError(f"{path} cannot be read ({exc}); pass --overwrite to train again") from None
    if not isinstance(done, dict) or not isinstance(done.get("identity", {}), dict):
        raise CytonetError(f"{path} is not a cytonet DONE file; pass --overwrite to train again")
    return done


def _shared_view(
    cfg: Config, kind: Kind, store: PatchStore, out: Path, fresh: bool = False
) -> tuple[dict[str, Any], str | None, dict[str, Any] | None, str | None]:
    """(the run's identity, newest checkpoint's name, DONE's contents, error message), as rank 0 sees them;
    ``fresh`` (--overwrite): the old run's checkpoints and DONE are not looked at (they are to go)."""
    try:
        encoder = _encoder_path(cfg, kind)
        if encoder is not None:  # a missing one said as such, not as "other settings (encoder: ... -> None)"
            _require_encoder(encoder, _ENCODER_KEYS[kind])
        identity = training_identity(cfg, kind, store, file_sha256(encoder) if encoder is not None else None)
        if fresh:
            return identity, None, None, None
        done = _finished(out)
        results = (ENCODER_FILE,) if kind == "pretrain" else (ENCODER_FILE, MODEL_FILE)
        missing = [name for name in results if not (out / name).is_file()] if done is not None else []
        # A finished run needs no checkpoint read (its checkpoints may be gone or damaged); others resume from one.
        found = ckpt.latest_checkpoint(out) if done is not None and not missing else ckpt.readable_checkpoint(out)
        if missing and found is None:
            raise CytonetError(
                f"{out} holds a finished {kind} run (DONE) without its {' and '.join(missing)}, and no checkpoint "
                "to write them again from; pass --overwrite to train again"
            )
        if missing:  # a partial copy of the folder: the last checkpoint gives them again, without training
            log.warning(
                "%s: %s holds a finished run without its %s: writing them again from %s",
                kind,
                out,
                " and ".join(missing),
                found.name if found else None,
            )
            done = None
        return identity, (found.name if found else None), done, None
    except (CytonetError, OSError) as exc:
        return {}, None, None, str(exc)


def _check_coordinates(store: PatchStore, loss: str) -> None:
    """The distance-weighted loss and the siamese task need every training patch's 3D coordinate: refuse NaN
    ones (sections without a coordinate map) before training, which would otherwise give NaN weights with a
    loss of 0 (distance) or a NaN loss at some step (siamese)."""
    meta = store.metadata
    start, stop = store.split_range("train")
    coords = meta["coords"][start:stop]
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        sections = sorted({str(store.manifest["sections"][i]["name"]) for i in meta["section"][start:stop][bad]})
        raise CytonetError(
            f"loss.kind={loss} needs 3D coordinates, but {int(bad.sum())} training patches of {store.path} have "
            f"none (sections without a coordinate map: {', '.join(sections[:3])}"
            f"{', ...' if len(sections) > 3 else ''}); import them with importer.coords, or use loss.kind=supcon"
        )


def _forget_new_folder(out: Path, failed: bool) -> bool:
    """Remove the run folder this stage created, while it holds its lock, when the stage failed before writing
    anything else there (settings refused as the run set up, ``--resume`` into a new folder): it is left as it
    was found, not holding a lock file alone. Returns False: the exception goes on."""
    if failed and [p.name for p in out.iterdir()] == [STEP_LOCK]:
        with contextlib.suppress(OSError):  # another run came in meanwhile: its folder now, and the error goes on
            (out / STEP_LOCK).unlink()
            out.rmdir()
    return False


def run_stage(
    cfg: Config,
    env: DistEnv,
    kind: Kind,
    *,
    out: Path | None = None,
    resume: bool | None = None,
    fresh: bool = False,
) -> StageResult:
    """Train one stage to the end (or until preempted: raises :class:`Preempted` after the checkpoint).

    ``resume``: None resumes when the run folder holds a checkpoint, True requires one, False refuses one.
    ``fresh`` (``--overwrite``) deletes the folder's checkpoints and results, once the new run has set up (its
    patch store, encoder, model and loader): an --overwrite that is refused for its inputs deletes nothing.
    """
    tcfg = stage_config(cfg, kind)
    out = out or stage_dir(cfg, kind)
    if cfg.run.reuse_host_memory:
        reuse_freed_memory()  # before the process group's and the loader's threads start
    # The preemption signals are caught for the whole stage, not only its steps, instead of killing a rank by the
    # signal's default action: one that comes while the stage sets up is acted on at the first step boundary,
    # one after the last step before each evaluation (checkpoint, requeue status); while the results are written
    # (seconds), the stage finishes.
    with PreemptionFlag(tcfg.preempt_signals) as flag:
        device = distributed.init_distributed(env, cfg.dist)
        try:
            with contextlib.ExitStack() as held:
                # Rank 0 judges the folder and takes its lock for the run (another run into the same folder at the
                # same time is refused), before anything is written there; every rank fails with its message, none is
                # left waiting in a collective.
                error = None
                if env.is_main:
                    try:
                        check_run_folder(cfg, kind, out)
                        new_folder = not out.exists()
                        held.enter_context(step_lock(out, kind, "trained"))
                        if new_folder:  # runs before the lock is released
                            held.push(lambda failed, *_: _forget_new_folder(out, failed is not None))
                        # The ranks read the patch store from here on: no extraction may replace it meanwhile (rank
                        # 0's shared lock is enough to keep one out; ranks on other nodes may not share flocks).
                        held.enter_context(reading_store(cfg.resolve_path(cfg.extract.out_dir), kind))
                    except (CytonetError, OSError) as exc:
                        error = str(exc)
                error = distributed.all_gather_object(error)[0]
                if error:
                    raise CytonetError(error)
                return _run(cfg, env, kind, tcfg, out, device, resume, fresh, flag)
        except BaseException as exc:
            # Free the stage's model (DDP holds the process group), loader and buffers now, while the group is up:
            # the exception's traceback would keep them alive past destroy_process_group, and gloo threads torn
            # down in interpreter finalization can abort the process (SIGABRT instead of the requeue status, seen
            # once after a preemption of a 2-rank run).
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            # On every path, also the one that returns: objects in reference cycles (a DDP model's) would otherwise
            # live until a later collection or interpreter finalization (a finished 2-rank run's rank 1 aborted
            # once at exit, "terminate called without an active exception", in a fresh-clone CI run).
            gc.collect()
            distributed.destroy_distributed()


def _run(
    cfg: Config,
    env: DistEnv,
    kind: Kind,
    tcfg: TrainConfig,
    out: Path,
    device: torch.device,
    resume: bool | None,
    fresh: bool,
    flag: PreemptionFlag,
) -> StageResult:
    config_dict = config_to_dict(cfg)
    store = PatchStore(cfg.resolve_path(cfg.extract.out_dir))
    # Rank 0 looks at the folder and the inputs, and every rank acts on what it saw: on a shared file system with
    # attribute caching, ranks looking themselves right after a requeue could see different files and decide
    # differently (resume from different steps, or one finished and one refused).
    shared = _shared_view(cfg, kind, store, out, fresh) if env.is_main else None
    identity, latest_name, done, error = distributed.all_gather_object(shared)[0]
    if error:
        raise CytonetError(error)  # on every rank: none is left waiting in a collective
    latest = out / latest_name if latest_name else None
    if latest is not None and resume is False:
        raise CytonetError(
            f"{out} holds checkpoint {latest.name}; resume it (drop --no-resume), pass --overwrite to start again, "
            "or choose another --out"
        )
    if done is not None:
        if "identity" in done:
            diff = ckpt.identity_diff(done["identity"], identity)
        elif latest is not None:  # a DONE of an older cytonet: its checkpoint tells the settings
            ckpt.load_checkpoint(latest, kind=kind, identity=identity, config=config_dict)
            diff = ""
        else:
            diff = "written by an older cytonet, whose checkpoints are gone"
        if diff:
            raise CytonetError(
                f"{out} holds a finished {kind} run under other settings ({diff}); pass --overwrite to train "
                "again, or choose another --out"
            )
        log.info("%s: %s already holds a finished run; nothing to do", kind, out)
        return StageResult(out, int(done.get("step", 0)), done.get("metrics", {}))
    if latest is None and resume is True:
        raise CytonetError(f"--resume: {out} holds no checkpoint to resume from")

    if kind == "pretrain" and cfg.loss.needs_coords:
        _check_coordinates(store, cfg.loss.kind)
    class_names = [store.areas[a] for a in store.area_ids]
    per_rank = tcfg.per_rank_batch(env.world_size, kind, cfg.loader.samples_per_class if cfg.loader.class_aware else 1)

    def make_loader(split: str, train: bool) -> PatchLoader:
        return build_loader(
            cfg,
            store,
            split,
            batch_size_per_rank=per_rank,
            rank=env.rank,
            world_size=env.world_size,
            device=device,
            train=train,
        )

    loader = make_loader("train", train=True)
    steps_per_epoch = len(loader)  # full epoch: computed before any resume position is loaded
    if steps_per_epoch == 0:
        raise CytonetError(
            f"{kind}: the training split has fewer samples than one global batch ({tcfg.global_batch_size}); "
            f"lower {kind}.global_batch_size or extract more patches"
        )
    epochs = cfg.scratch_epochs if kind == "scratch" else tcfg.epochs
    total_steps = epochs * steps_per_epoch
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    # Each rank loads the encoder file itself: all learn whether any failed (it may have been replaced between
    # two ranks' reads), so that none goes on into DDP's collectives alone.
    built: nn.Module | None = None
    failed: CytonetError | None = None
    try:
        built = _build_model(cfg, kind, len(class_names), store, identity.get("encoder"))
    except CytonetError as exc:
        failed = exc
    problems = distributed.all_gather_object(None if failed is None else str(failed))
    if failed is not None:
        raise failed
    problem = next((p for p in problems if p), None)
    if problem is not None:
        raise CytonetError(problem)
    assert built is not None
    model = built.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if env.is_distributed and cfg.dist.sync_batchnorm and kind != "probe":
        model = distributed.convert_sync_batchnorm(model, env, cfg.dist, device)
    if env.is_distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raw_model = _unwrap(model)
    optimizer = build_optimizer(raw_model, cfg.optim, tcfg.global_batch_size)
    mp = MixedPrecision(cfg.optim.precision, device)
    loss_fn: nn.Module = CrossEntropyLoss()
    if kind == "pretrain":
        loss_fn = SiameseLoss(cfg.loss.scale_mm) if cfg.loss.kind == "siamese" else build_loss(cfg.loss)

    if fresh:  # --overwrite: everything above is set up, so the old run goes now (rank 0 holds the lock)
        if env.is_main:
            _clear_run(out)
        distributed.barrier()
    step, epoch = 0, 0
    if latest is not None:
        state, problem = None, None
        try:
            state = ckpt.load_checkpoint(latest, kind=kind, identity=identity, config=config_dict)
        except CytonetError as exc:
            problem = str(exc)
        # Every rank learns every rank's outcome, so that all raise together (none waits in a collective).
        outcomes = distributed.all_gather_object((problem, None if state is None else int(state["step"])))
        problem = next((p for p, _ in outcomes if p), None)
        if problem:
            raise ckpt.CheckpointError(problem)
        if len({step for _, step in outcomes}) > 1:
            raise ckpt.CheckpointError(
                f"{latest}: the ranks read different steps {[s for _, s in outcomes]} (a file system lag?)"
            )
        assert state is not None
        rngs = state["rng"]
        if len(rngs) != env.world_size:  # before the loader, whose position is per rank
            raise ckpt.CheckpointError(
                f"{latest} was written by {len(rngs)} rank{'s' if len(rngs) > 1 else ''}, this run has "
                f"{env.world_size}; resume with the same number of processes"
            )
        raw_model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        mp.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(rngs[env.rank])
        step, epoch = int(state["step"]), int(state["epoch"])
        log.info("%s: resumed from %s at step %d (epoch %d)", kind, latest.name, step, epoch)
    if env.is_main:  # after any resume was accepted: a refused one leaves the record of the run it refused
        save_config(cfg, out)

    def save(at_step: int, at_epoch: int) -> None:
        rngs = distributed.all_gather_object(ckpt.rng_state())
        if env.is_main:
            ckpt.save_checkpoint(
                out,
                {
                    "format_version": ckpt.FORMAT_VERSION,
                    "kind": kind,
                    "step": at_step,
                    "epoch": at_epoch,
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": mp.state_dict(),
                    "loader": loader.state_dict(),
                    "rng": rngs,
                    "config": config_dict,
                    "identity": identity,
                    "fingerprint": ckpt.fingerprint(identity),
                },
                at_step,
                tcfg.keep_checkpoints,
            )
        distributed.barrier()

    model.train()
    started, seen = time.perf_counter(), 0
    progress = Progress(out, kind, total_steps, step, active=env.is_main)
    with contextlib.closing(progress):
        while step < total_steps:
            loader.set_epoch(epoch)
            for batch in loader:
                lr = lr_at(step, cfg.optim, tcfg.global_batch_size, total_steps)
                set_lr(optimizer, lr)
                with mp.autocast():
                    outputs = model(batch.images)
                targets = batch.labels
                if kind == "pretrain" and cfg.loss.needs_coords:
                    targets = batch.coords
                share = loss_fn(outputs, targets)
                optimizer.zero_grad(set_to_none=True)
                mp.backward(share * env.world_size)  # DDP averages gradients; the shares already sum
                # One collective for both decisions: the global loss, non-finite anywhere, a signal anywhere.
                flags = distributed.all_reduce_sum(
                    torch.stack(
                        [
                            share.detach().float(),
                            (~torch.isfinite(share.detach())).float(),
                            torch.tensor(float(flag.requested), device=share.device),
                        ]
                    )
                )
                loss_value, bad, stop = (float(v) for v in flags.cpu())  # a host sync point per step
                if bad > 0:
                    raise NonFiniteLossError(
                        f"{kind}: the loss is not finite at step {step} on {int(bad)} rank(s); "
                        "lower optim.base_lr or use optim.precision=fp32"
                        + (" (or a patch's 3D coordinate is not finite)" if cfg.loss.needs_coords else "")
                    )
                mp.step(optimizer)
                step += 1
                if cfg.dist.check_replicas and env.is_distributed:
                    differ = distributed.replicas_differ(raw_model)
                    if differ:
                        raise CytonetError(
                            f"{kind}: after step {step} the weights of rank(s) {differ} differ from rank 0"
                        )
                seen += batch.images.shape[0] * env.world_size
                rate = seen / max(time.perf_counter() - started, 1e-9)
                progress.update(step, epoch, loss_value, lr, rate)
                if step % tcfg.log_every_steps == 0 or step == total_steps:
                    log.info(
                        "%s step %d/%d epoch %d loss %.4f (%.0f img/s)",
                        kind,
                        step,
                        total_steps,
                        epoch,
                        loss_value,
                        rate,
                    )
                if stop > 0:
                    save(step, epoch)
                    raise Preempted(tcfg.requeue_exit_code, step)
                if step % tcfg.checkpoint_every_steps == 0 and step < total_steps:
                    save(step, epoch)
                if step >= total_steps:
                    break
            else:
                epoch += 1  # the epoch ran out (a checkpoint taken on its last batch resumes right here)

    save(step, epoch)

    def stop_if_preempted() -> None:
        """After the last step, between checkpoint and evaluations: stop for requeue if any rank saw a signal
        (the requeued job resumes from the final checkpoint, runs no step, and evaluates)."""
        requested = torch.tensor([float(flag.requested)], device=device)
        if float(distributed.all_reduce_sum(requested).item()) > 0:
            raise Preempted(tcfg.requeue_exit_code, step)

    stop_if_preempted()
    metrics: dict[str, dict[str, float]] = {}
    if kind != "pretrain":
        if env.is_distributed:
            # Without synced BatchNorm each rank ends with its own running statistics (DDP copies rank 0's
            # only at the start of each forward): evaluate, as model.pt saves, with rank 0's on every rank.
            distributed.broadcast_buffers(raw_model)
        for split in EVAL_SPLITS:
            if split not in store.splits:
                continue
            stop_if_preempted()
            scores, labels, _ = predict(raw_model, make_loader(split, train=False), mp.autocast)
            bad = int((~np.isfinite(scores).all(axis=1)).sum())  # the same gathered scores on every rank
            if bad:
                raise CytonetError(
                    f"{kind}: {bad} of {len(scores)} {split} patches have non-finite scores "
                    f"(optim.precision={cfg.optim.precision}; fp32 avoids overflow)"
                )
            if env.is_main:
                metrics[split] = write_report(out, split, scores, labels, class_names)
                log.info("%s %s: %s", kind, split, _fmt(metrics[split]))
    if env.is_main:
        encoder = raw_model.get_submodule("encoder")
        ckpt.torch_save_atomic(
            {"encoder": encoder.state_dict(), "config": config_dict, "patch_store": identity["patch_store"]},
            out / ENCODER_FILE,
        )
        if kind != "pretrain":
            # Everything inference needs: encoder, linear head, and which area each class is.
            ckpt.torch_save_atomic(
                {
                    "format": MODEL_FORMAT,
                    "encoder": encoder.state_dict(),
                    "classifier": raw_model.get_submodule("classifier").state_dict(),
                    "area_ids": list(store.area_ids),
                    "area_names": class_names,
                    "patch_pixel_size_um": float(store.geometry.pixel_size_um),
                    "sections": list(store.manifest.get("sections", [])),
                    "config": config_dict,
                },
                out / MODEL_FILE,
            )
        # Last, and whole or not at all: DONE vouches for everything above.
        write_json_atomic(out / DONE_FILE, {"step": step, "metrics": metrics, "identity": identity})
    distributed.barrier()
    return StageResult(out, step, metrics)


#: Names of what a training stage writes into its run folder; temporary files' names hold ".tmp".
_OWN_PREFIXES = ("ckpt-", "metrics-", "per-area-", "confusion-")
#: The results a run leaves, which --overwrite removes with the prefixed files; then everything else it writes.
_RESULT_NAMES = (DONE_FILE, ENCODER_FILE, MODEL_FILE, "train-log.csv")
_OWN_NAMES = (*_RESULT_NAMES, "config.resolved.yaml", "tensorboard", STEP_LOCK)


def _own(name: str) -> bool:
    return name.startswith(_OWN_PREFIXES) or name in _OWN_NAMES or ".tmp" in name


def _run_kind(out: Path) -> str | None:
    """The stage of the run in ``out``, as its DONE or newest checkpoint says (None: neither tells)."""
    try:
        done = _finished(out)
    except CytonetError:
        done = None
    if done is not None and isinstance(done.get("identity"), dict):
        return str(done["identity"].get("kind"))
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return None
    try:  # memory-mapped: only the small "kind" entry is read
        state = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged checkpoint: loading it later says so
        return None
    return str(state.get("kind")) if isinstance(state, dict) and "kind" in state else None


def check_run_folder(cfg: Config, kind: Kind, out: Path) -> None:
    """Refuse ``out`` as the run folder of a ``kind`` stage (before anything is written or, for --overwrite,
    removed there) when it is not one: a file; a folder holding anything a training stage does not write (a
    patch store, another step's outputs), or files of such names without a run's traces (its config, a
    checkpoint or DONE); the run of another stage (its DONE or checkpoints); or the folder of the encoder the
    stage starts from, whose ``encoder.pt`` the stage would replace. The lock file alone does not count."""
    require_folder(out, kind)
    encoder = _encoder_path(cfg, kind)
    if encoder is not None and encoder.parent.resolve() == out.resolve():
        raise CytonetError(
            f"{kind}: the output folder {out} is the folder of the encoder it starts from ({_ENCODER_KEYS[kind]}), "
            f"whose {ENCODER_FILE} it would replace; choose another --out"
        )
    # the lock file and temporary files alone: a run that ended (or was killed, or found the disk full) before
    # writing anything
    entries = sorted(p.name for p in out.iterdir() if p.name != STEP_LOCK) if out.is_dir() else []
    if all(".tmp" in name for name in entries):
        return
    foreign = [name for name in entries if not _own(name)]
    # a run's traces: its config (written first), a checkpoint (also one copied in to resume), its DONE
    traces = "config.resolved.yaml" in entries or DONE_FILE in entries or ckpt.latest_checkpoint(out) is not None
    if foreign or not traces:
        shown = foreign or entries
        raise CytonetError(
            f"{kind}: {out} holds {some_of(shown)} but no cytonet {kind} run"
            + (f" ({shown[0]} is not written by training)" if foreign else " (no config, checkpoint or DONE)")
            + "; choose another --out (--overwrite removes only a training run's own files)"
        )
    other = _run_kind(out)
    if other is not None and other != kind:
        raise CytonetError(
            f"{kind}: {out} holds a {other} run; choose another --out (--overwrite removes only a {kind} run)"
        )


def _clear_run(out: Path) -> None:
    """Remove what a previous run of the stage left in ``out`` (``--overwrite``; :func:`check_run_folder` has
    found it this stage's run folder)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_file() and (p.name.startswith(_OWN_PREFIXES) or p.name in _RESULT_NAMES):
            p.unlink()
        elif p.is_dir() and p.name == "tensorboard":  # the old run's curves would mix with the new run's
            shutil.rmtree(p)


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}" for k, v in m.items())
