"""Training and evaluation input: patch store -> Dataset -> DataLoader -> augmented batches on the device.

Division of work: DataLoader workers only read and decompress stored patches (uint8 with margin, so a batch
crosses the process boundary and the host-to-device copy at a quarter of the float size); the augmentation
(:mod:`cytonet.data.augment`) runs batched on the training device after collation. The store opens its shard
files lazily in each worker (never before the fork), and :class:`PatchLoader` closes the main process's
handles before workers start.

Entry points:

- :class:`PatchDataset`: map-style dataset indexed by global patch id; item = (patch (S, S) uint8, label
  (class number 0..K-1 over the store's areas), coords (3,) float32 mm, patch id).
- :class:`PatchLoader`: sampler + DataLoader + augmenter for one split and rank; iterating yields
  :class:`Batch` objects on the device. ``set_epoch(e)``, ``state_dict()`` / ``load_state_dict()`` (epoch and
  batches consumed, so a resumed run continues with exactly the batches the uninterrupted run would have seen).
- :func:`build_loader`: a :class:`PatchLoader` from a :class:`cytonet.config.Config`.

Training loaders use :class:`cytonet.data.sampler.ClassAwareBatchSampler` (``loader.class_aware``) or
:class:`cytonet.data.sampler.ShardSampler`, drop incomplete batches and augment; evaluation loaders
(``train=False``) read the split in order, each rank a contiguous part, keep the last partial batch and apply
only the centre crop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cytonet.config import AugmentConfig, Config, LoaderConfig
from cytonet.data.augment import BatchAugmenter
from cytonet.data.patches import PatchStore
from cytonet.data.sampler import ClassAwareBatchSampler, ShardSampler
from cytonet.workers import die_with_parent

Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class PatchDataset(Dataset[Item]):
    """Stored patches by global id: ``(patch (S, S) uint8, label int64, coords (3,) float32, id int64)``."""

    def __init__(self, store: PatchStore | str | Path) -> None:
        self.store = store if isinstance(store, PatchStore) else PatchStore(store)
        meta = self.store.metadata
        self.labels = self.store.class_index(meta["area"])
        self.coords = np.ascontiguousarray(meta["coords"], dtype=np.float32)

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, i: int) -> Item:
        patch = torch.from_numpy(self.store.read(int(i)))
        return (
            patch,
            torch.tensor(self.labels[i], dtype=torch.int64),
            torch.from_numpy(self.coords[i]),
            torch.tensor(i, dtype=torch.int64),
        )


@dataclass
class Batch:
    """One batch on the device."""

    images: torch.Tensor
    """(B, 1, P, P) float32: augmented crops (training) or centre crops (evaluation)."""
    labels: torch.Tensor
    """(B,) int64 class numbers 0..K-1 (``store.area_ids[k]`` is the area id of class k)."""
    coords: torch.Tensor
    """(B, 3) float32 reference coordinates, mm."""
    index: torch.Tensor
    """(B,) int64 global patch ids."""


class _RangeSampler(Sampler[int]):
    """Evaluation order: this rank's contiguous part of ``[start, stop)``."""

    def __init__(self, start: int, stop: int, rank: int, world_size: int) -> None:
        n = stop - start
        lo = start + (n * rank) // world_size
        hi = start + (n * (rank + 1)) // world_size
        self.ids = range(lo, hi)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _leave_preemption_to_the_trainer(parent: int, worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGUSR1: on clusters that signal every process of a step (SLURM
    with cgroup process tracking, ``scancel --signal``), a worker killed by the preemption signal would make the
    next batch fail before the training process could checkpoint. The trainer handles the signal; workers end
    with it, at once also when it is killed (``kill -9``, the OOM killer): torch's own check of the parent takes
    seconds, during which a forked worker kept the run folder's lock (an inherited descriptor), and an
    immediate rerun was refused as "being trained by another process"."""
    del worker_id
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent(parent)


class PatchLoader:
    """Batches of one split for one rank, augmented on ``device``; resumable mid-epoch."""

    def __init__(
        self,
        store: PatchStore | str | Path,
        split: str,
        *,
        loader_cfg: LoaderConfig,
        augment_cfg: AugmentConfig,
        crop_px: int,
        batch_size_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        train: bool = True,
    ) -> None:
        self.dataset = PatchDataset(store)
        self.store = self.dataset.store
        self.split = split
        self.cfg = loader_cfg
        self.train = train
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._done = 0
        ranges = self.store.shard_ranges(split)
        self.store.split_range(split)  # raises when the split is empty or unknown
        self.batch_size_per_rank = b = batch_size_per_rank
        kwargs: dict[str, Any] = {}
        self.sampler: ShardSampler | ClassAwareBatchSampler | _RangeSampler
        if not train:
            start, stop = self.store.split_range(split)
            self.sampler = _RangeSampler(start, stop, rank, world_size)
            kwargs.update(sampler=self.sampler, batch_size=b, drop_last=False)
        elif loader_cfg.class_aware:
            self.sampler = ClassAwareBatchSampler(
                ranges,
                self.dataset.labels,
                batch_size_per_rank=b,
                samples_per_class=loader_cfg.samples_per_class,
                num_replicas=world_size,
                rank=rank,
                seed=loader_cfg.seed,
                block_shards=loader_cfg.shard_block,
            )
            kwargs.update(batch_sampler=self.sampler)
        else:
            self.sampler = ShardSampler(
                ranges, num_replicas=world_size, rank=rank, seed=loader_cfg.seed, block_shards=loader_cfg.shard_block
            )
            kwargs.update(sampler=self.sampler, batch_size=b, drop_last=True)
        if loader_cfg.workers > 0:
            kwargs.update(prefetch_factor=loader_cfg.prefetch_factor, persistent_workers=True)
        self.loader = DataLoader(
            self.dataset,
            num_workers=loader_cfg.workers,
            worker_init_fn=functools.partial(_leave_preemption_to_the_trainer, os.getpid()),
            pin_memory=loader_cfg.pin_memory and self.device.type == "cuda",
            **kwargs,
        )
        aug = augment_cfg if train else dataclasses.replace(augment_cfg, enabled=False)
        self.augmenter = BatchAugmenter(aug, self.store.geometry, crop_px)

    # -- epochs and resume ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle and augmentation); keeps a position loaded for this epoch."""
        if isinstance(self.sampler, ShardSampler | ClassAwareBatchSampler):
            self.sampler.set_epoch(epoch)
            self._done = self.sampler.start_position // self._unit()
        self.epoch = epoch

    def _unit(self) -> int:
        """Sampler items per batch: indices for the shard sampler, 1 for the batch sampler."""
        return self.batch_size_per_rank if isinstance(self.sampler, ShardSampler) else 1

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches consumed so far in it (plain dict; save it in the checkpoint)."""
        if not isinstance(self.sampler, ShardSampler | ClassAwareBatchSampler):
            return {"epoch": self.epoch, "batches_done": self._done}
        return {
            "epoch": self.epoch,
            "batches_done": self._done,
            "sampler": self.sampler.state_dict(self._done * self._unit()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` starts after its ``batches_done`` batches."""
        if "sampler" in state and isinstance(self.sampler, ShardSampler | ClassAwareBatchSampler):
            self.sampler.load_state_dict(state["sampler"])
        self.epoch = int(state["epoch"])
        self._done = int(state["batches_done"])

    def __len__(self) -> int:
        """Batches left in the current epoch's next iteration."""
        return len(self.loader)

    # -- iteration --------------------------------------------------------------------------------------
    def raw_batches(self) -> Iterator[Sequence[torch.Tensor]]:
        """Collated batches as the workers deliver them (uint8 patches, CPU), without augmentation."""
        self.store.close()  # no open shard handles in the main process when workers fork
        if isinstance(self.sampler, ShardSampler | ClassAwareBatchSampler):
            self._done = self.sampler.start_position // self._unit()
        else:
            self._done = 0
        yield from self.loader

    def __iter__(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        for patches, labels, coords, index in self.raw_batches():
            patches = patches.to(self.device, non_blocking=non_blocking)
            images = self.augmenter(patches, index, self.epoch)
            self._done += 1
            yield Batch(
                images=images,
                labels=labels.to(self.device, non_blocking=non_blocking),
                coords=coords.to(self.device, non_blocking=non_blocking),
                index=index.to(self.device, non_blocking=non_blocking),
            )


def build_loader(
    cfg: Config,
    store: PatchStore | str | Path,
    split: str = "train",
    *,
    batch_size_per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    train: bool = True,
) -> PatchLoader:
    """A :class:`PatchLoader` for ``split`` with the config's loader and augmentation settings and
    ``model.patch_size_px`` crops; the batch comes from the training stage (global batch / world size)."""
    return PatchLoader(
        store,
        split,
        loader_cfg=cfg.loader,
        augment_cfg=cfg.augment,
        crop_px=cfg.model.patch_size_px,
        batch_size_per_rank=batch_size_per_rank,
        rank=rank,
        world_size=world_size,
        device=device,
        train=train,
    )
