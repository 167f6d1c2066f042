"""Samplers for sharded patch stores under DDP: shard-local, reshuffled per epoch, resumable mid-epoch.

Both samplers see a split as a list of shard id ranges (``PatchStore.shard_ranges(split)``) and build each
epoch's order from ``(seed, epoch)`` alone (:func:`epoch_order`): the shard order is shuffled, then the samples
within consecutive blocks of ``block_shards`` shards. A reader thus works through a few shard files at a time
(few open handles, sequential-ish I/O) while every epoch still mixes areas and sections. Randomness comes from
hashing (seed, epoch, position) (:mod:`cytonet.data.rng`), so the order is the same on every platform and
numpy version.

- :class:`ShardSampler` (``Sampler[int]``): rank ``r`` of ``W`` takes the ``r``-th contiguous segment of the
  epoch order (``N // W`` samples, the ``N % W`` left over are dropped and differ per epoch), so ranks are
  disjoint and each rank's segment covers its own shards.
- :class:`ClassAwareBatchSampler` (``Sampler[list[int]]``, a DataLoader ``batch_sampler``): walks the same
  order, collecting samples of each area into groups of ``samples_per_class``; consecutive groups fill a
  global batch of ``batch_size_per_rank * W`` samples, of which rank ``r`` takes the ``r``-th slice. Every
  area present in a global batch then appears a multiple of ``samples_per_class`` times, so the supervised
  contrastive loss (seed 002 eq. 2) has positives for each sample. An area's last samples of an epoch that do
  not fill a group are completed by repeating them; an incomplete last global batch is dropped.

Both yield the same sequence whatever the DataLoader's ``num_workers`` (the sampler runs in the main process
and the DataLoader keeps its order). Resuming: ``state_dict(consumed)`` records ``(epoch, position)``, where
``consumed`` is how many items of this epoch the training loop has used (indices for :class:`ShardSampler`,
batches for :class:`ClassAwareBatchSampler`); after ``load_state_dict`` the next iteration of that epoch
starts exactly there, so a resumed run sees the samples the uninterrupted run would have seen. The sampler
cannot count consumption itself because the DataLoader prefetches; :class:`cytonet.data.loader.PatchLoader`
does the counting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from cytonet.data import rng

_TAG_SHARDS, _TAG_BLOCK = 21, 22
STATE_VERSION = 1


def epoch_order(shard_ranges: Sequence[tuple[int, int]], seed: int, epoch: int, block_shards: int) -> np.ndarray:
    """The epoch's order of all ids: shards shuffled, then samples shuffled within blocks of ``block_shards``."""
    if not shard_ranges:
        return np.zeros(0, dtype=np.int64)
    shard_perm = np.argsort(rng.hash_words((seed, _TAG_SHARDS, epoch), np.arange(len(shard_ranges))), kind="stable")
    parts = []
    for b, start in enumerate(range(0, len(shard_perm), block_shards)):
        ids = np.concatenate(
            [np.arange(*shard_ranges[k], dtype=np.int64) for k in shard_perm[start : start + block_shards]]
        )
        perm = np.argsort(rng.hash_words((seed, _TAG_BLOCK, epoch, b), np.arange(len(ids))), kind="stable")
        parts.append(ids[perm])
    return np.concatenate(parts)


class _Resumable:
    """Epoch and resume-position bookkeeping shared by both samplers."""

    kind = ""

    def __init__(self, shard_ranges: Sequence[tuple[int, int]], seed: int, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must lie in 0..{num_replicas - 1} (num_replicas {num_replicas})")
        self.shard_ranges = [(int(a), int(b)) for a, b in shard_ranges]
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.n_total = sum(b - a for a, b in self.shard_ranges)
        self.epoch = 0
        self._start = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a position loaded for this epoch is kept, otherwise it starts at 0."""
        self.epoch = epoch
        self._start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """State after the loop used ``consumed`` items of the current epoch (plain dict, weights_only-safe)."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "epoch": int(self.epoch),
            "position": int(consumed),
            "seed": int(self.seed),
            "num_replicas": int(self.num_replicas),
            "n_total": int(self.n_total),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state['epoch']`` starts at ``state['position']``."""
        for key in ("kind", "seed", "num_replicas", "n_total"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this sampler has {getattr(self, key)!r}; "
                    "a mid-epoch resume needs the same data, seed and world size"
                )
        self._resume = (int(state["epoch"]), int(state["position"]))
        self.set_epoch(int(state["epoch"]))

    @property
    def start_position(self) -> int:
        """Where the next iteration starts within the epoch (non-zero only after a resume)."""
        return self._start

    def _take_start(self) -> int:
        start, self._start, self._resume = self._start, 0, None
        return start


class ShardSampler(_Resumable, Sampler[int]):
    """Per-rank index stream with shard locality; see the module docstring."""

    kind = "shard"

    def __init__(
        self,
        shard_ranges: Sequence[tuple[int, int]],
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        block_shards: int = 4,
    ) -> None:
        _Resumable.__init__(self, shard_ranges, seed, num_replicas, rank)
        self.block_shards = block_shards
        self.per_rank = self.n_total // num_replicas

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's full index stream for ``epoch``."""
        order = epoch_order(self.shard_ranges, self.seed, epoch, self.block_shards)
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __iter__(self) -> Iterator[int]:
        start = self._take_start()
        yield from self.rank_order(self.epoch)[start:].tolist()

    def __len__(self) -> int:
        return self.per_rank - self._start


class ClassAwareBatchSampler(_Resumable, Sampler[list[int]]):
    """Per-rank batches whose global batch holds groups of ``samples_per_class`` same-area samples."""

    kind = "class_aware"

    def __init__(
        self,
        shard_ranges: Sequence[tuple[int, int]],
        labels: np.ndarray,
        *,
        batch_size_per_rank: int,
        samples_per_class: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        block_shards: int = 4,
    ) -> None:
        _Resumable.__init__(self, shard_ranges, seed, num_replicas, rank)
        if batch_size_per_rank % samples_per_class:
            raise ValueError(
                f"samples_per_class {samples_per_class} must divide batch_size_per_rank {batch_size_per_rank}"
            )
        self.labels = np.asarray(labels)
        self.batch_size = batch_size_per_rank
        self.m = samples_per_class
        self.block_shards = block_shards
        self.global_batch = batch_size_per_rank * num_replicas
        ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.shard_ranges] or [np.zeros(0, np.int64)])
        _, per_label = np.unique(self.labels[ids], return_counts=True)
        # Every area forms ceil(n / m) groups whatever the order, so the number of batches is the same each epoch.
        self.n_groups = int(sum(-(-int(c) // samples_per_class) for c in per_label))
        self.n_batches = self.n_groups // (self.global_batch // samples_per_class)

    def global_batches(self, epoch: int) -> np.ndarray:
        """All global batches of ``epoch``, shape (n_batches, batch_size_per_rank * num_replicas)."""
        order = epoch_order(self.shard_ranges, self.seed, epoch, self.block_shards)
        pending: dict[int, list[int]] = {}
        groups: list[list[int]] = []
        for i, label in zip(order.tolist(), self.labels[order].tolist()):
            bucket = pending.setdefault(label, [])
            bucket.append(i)
            if len(bucket) == self.m:
                groups.append(bucket)
                pending[label] = []
        for label in sorted(pending):
            rest = pending[label]
            if rest:  # complete the last group of this area by repeating its samples
                groups.append([rest[k % len(rest)] for k in range(self.m)])
        per_batch = self.global_batch // self.m
        n = len(groups) // per_batch
        flat = np.array([i for g in groups[: n * per_batch] for i in g], dtype=np.int64)
        return flat.reshape(n, self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        start = self._take_start()
        batches = self.global_batches(self.epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in batches[start:]:
            yield batch[lo:hi].tolist()

    def __len__(self) -> int:
        return self.n_batches - self._start
