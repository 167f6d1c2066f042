"""Training stages: contrastive pretraining, linear probe and scratch baseline, one loop for all three.

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
import gc
import json
import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cytonet import distributed
from cytonet.config import Config, TrainConfig, config_to_dict, save_config
from cytonet.data.loader import PatchLoader, build_loader
from cytonet.data.patches import PatchStore
from cytonet.distributed import DistEnv
from cytonet.errors import CytonetError
from cytonet.hostmem import reuse_freed_memory
from cytonet.losses.classification import CrossEntropyLoss
from cytonet.losses.contrastive import build_loss
from cytonet.models.build import MODEL_FILE, MODEL_FORMAT, build_classifier, build_contrastive_model
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


def load_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """The encoder state dict saved by a finished pretraining (``encoder.pt``)."""
    if not path.is_file():
        raise CytonetError(f"{path} does not exist: run `cytonet pretrain` to the end first (probe.encoder_from)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "encoder" not in state:
        raise CytonetError(f"{path} is not a cytonet encoder file")
    return state["encoder"]


def _build_model(cfg: Config, kind: Kind, n_classes: int) -> nn.Module:
    if kind == "pretrain":
        return build_contrastive_model(cfg.model)
    model = build_classifier(cfg.model, n_classes, freeze_encoder=kind == "probe")
    if kind == "probe":
        weights = load_encoder_weights(cfg.resolve_path(cfg.probe.encoder_from) / ENCODER_FILE)
        try:
            model.encoder.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CytonetError(
                f"the encoder in {cfg.probe.encoder_from} does not fit model settings {cfg.model}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    return model


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
    ``fresh`` (``--overwrite``) deletes the folder's checkpoints and results first.
    """
    tcfg = stage_config(cfg, kind)
    out = out or stage_dir(cfg, kind)
    if cfg.run.reuse_host_memory:
        reuse_freed_memory()  # before the process group's and the loader's threads start
    device = distributed.init_distributed(env, cfg.dist)
    try:
        if fresh:
            if env.is_main:
                _clear_run(out)
            distributed.barrier()
        return _run(cfg, env, kind, tcfg, out, device, resume)
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
    cfg: Config, env: DistEnv, kind: Kind, tcfg: TrainConfig, out: Path, device: torch.device, resume: bool | None
) -> StageResult:
    config_dict = config_to_dict(cfg)
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and resume is False:
        raise CytonetError(
            f"{out} holds checkpoint {latest.name}; resume it (drop --no-resume), pass --overwrite to start again, "
            "or choose another --out"
        )
    if (out / DONE_FILE).is_file() and latest is not None:
        state = ckpt.load_checkpoint(latest, kind=kind, config=config_dict)
        log.info("%s: %s already holds a finished run; nothing to do", kind, out)
        return StageResult(out, int(state["step"]), json.loads((out / DONE_FILE).read_text()).get("metrics", {}))
    if latest is None and resume is True:
        raise CytonetError(f"--resume: {out} holds no checkpoint to resume from")
    if env.is_main:
        save_config(cfg, out)

    store = PatchStore(cfg.resolve_path(cfg.extract.out_dir))
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
    model = _build_model(cfg, kind, len(class_names)).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if env.is_distributed and cfg.dist.sync_batchnorm and kind != "probe":
        model = distributed.convert_sync_batchnorm(model, env, cfg.dist, device)
    if env.is_distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raw_model = _unwrap(model)
    optimizer = build_optimizer(raw_model, cfg.optim, tcfg.global_batch_size)
    mp = MixedPrecision(cfg.optim.precision, device)
    loss_fn: nn.Module = build_loss(cfg.loss) if kind == "pretrain" else CrossEntropyLoss()

    step, epoch = 0, 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, kind=kind, config=config_dict)
        raw_model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        mp.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        if len(rngs) != env.world_size:
            raise ckpt.CheckpointError(
                f"{latest} was written by {len(rngs)} ranks, this run has {env.world_size}; "
                "resume with the same number of processes"
            )
        ckpt.set_rng_state(rngs[env.rank])
        step, epoch = int(state["step"]), int(state["epoch"])
        log.info("%s: resumed from %s at step %d (epoch %d)", kind, latest.name, step, epoch)

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
                    "fingerprint": ckpt.config_fingerprint(config_dict),
                },
                at_step,
                tcfg.keep_checkpoints,
            )
        distributed.barrier()

    model.train()
    started, seen = time.perf_counter(), 0
    progress = Progress(out, kind, total_steps, step, active=env.is_main)
    with PreemptionFlag(tcfg.preempt_signals) as flag, contextlib.closing(progress):
        while step < total_steps:
            loader.set_epoch(epoch)
            for batch in loader:
                lr = lr_at(step, cfg.optim, tcfg.global_batch_size, total_steps)
                set_lr(optimizer, lr)
                with mp.autocast():
                    outputs = model(batch.images)
                targets = batch.labels
                if kind == "pretrain" and cfg.loss.kind == "distance":
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
    metrics: dict[str, dict[str, float]] = {}
    if kind != "pretrain":
        for split in EVAL_SPLITS:
            if split not in store.splits:
                continue
            scores, labels, _ = predict(raw_model, make_loader(split, train=False), mp.autocast)
            if env.is_main:
                metrics[split] = write_report(out, split, scores, labels, class_names)
                log.info("%s %s: %s", kind, split, _fmt(metrics[split]))
    if env.is_main:
        encoder = raw_model.get_submodule("encoder")
        torch.save({"encoder": encoder.state_dict(), "config": config_dict}, out / ENCODER_FILE)
        if kind != "pretrain":
            # Everything inference needs: encoder, linear head, and which area each class is.
            torch.save(
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
        (out / DONE_FILE).write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))
    distributed.barrier()
    return StageResult(out, step, metrics)


def _clear_run(out: Path) -> None:
    """Remove what a previous run of the stage left in ``out`` (``--overwrite``)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_file() and (
            p.name.startswith(("ckpt-", "metrics-", "per-area-", "confusion-"))
            or p.name in (DONE_FILE, ENCODER_FILE, MODEL_FILE, "train-log.csv")
        ):
            p.unlink()


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}" for k, v in m.items())
