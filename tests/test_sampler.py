"""DDP samplers and the loader: disjoint rank streams, shard locality, per-epoch reshuffle, class-aware batches,
independence from the number of DataLoader workers, and exact mid-epoch resume."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from ringdata import make_sections

from cytonet.config import load_config
from cytonet.data.extract import run_extract
from cytonet.data.loader import PatchLoader
from cytonet.data.sampler import ClassAwareBatchSampler, ShardSampler, epoch_order

# 13 shards of 16 (the last one of 5): ids 0..196 with shard i = [16 i, 16 i + 16).
RANGES = [(16 * i, min(16 * i + 16, 197)) for i in range(13)]
N = 197


def shard_of(i: int) -> int:
    return i // 16


def test_epoch_order_is_a_permutation_with_shard_locality() -> None:
    order = epoch_order(RANGES, seed=3, epoch=0, block_shards=3)
    assert sorted(order.tolist()) == list(range(N))
    # Blocks of 3 shards: every run of the order that covers one block touches at most 3 shards.
    pos = 0
    perm_blocks = []
    while pos < N:
        shards = set()
        start = pos
        while pos < N and (len(shards | {shard_of(int(order[pos]))}) <= 3):
            shards.add(shard_of(int(order[pos])))
            pos += 1
        perm_blocks.append(pos - start)
    assert len(perm_blocks) <= 5  # ceil(13 / 3) blocks
    # Reshuffled per epoch, identical for the same (seed, epoch).
    assert np.array_equal(order, epoch_order(RANGES, seed=3, epoch=0, block_shards=3))
    assert not np.array_equal(order, epoch_order(RANGES, seed=3, epoch=1, block_shards=3))
    assert not np.array_equal(order, epoch_order(RANGES, seed=4, epoch=0, block_shards=3))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_sampler_ranks_are_disjoint(world: int) -> None:
    streams = []
    for rank in range(world):
        s = ShardSampler(RANGES, num_replicas=world, rank=rank, seed=1, block_shards=2)
        s.set_epoch(5)
        streams.append(list(s))
        assert len(streams[-1]) == N // world == len(s) + 0
    flat = [i for st in streams for i in st]
    assert len(flat) == len(set(flat)) == (N // world) * world
    # Each rank reads its own shards: with 2+ ranks a rank touches well under all 13 shards.
    if world > 1:
        assert all(len({shard_of(i) for i in st}) < 13 for st in streams)


def test_shard_sampler_resumes_mid_epoch() -> None:
    full = ShardSampler(RANGES, num_replicas=2, rank=1, seed=7)
    full.set_epoch(2)
    expected = list(full)
    consumed = 37
    state = full.state_dict(consumed)
    assert state["epoch"] == 2 and state["position"] == 37
    resumed = ShardSampler(RANGES, num_replicas=2, rank=1, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop sets the epoch again: the loaded position is kept
    assert len(resumed) == len(expected) - consumed
    assert list(resumed) == expected[consumed:]
    resumed.set_epoch(3)  # the next epoch starts at 0
    assert len(list(resumed)) == len(expected)
    with pytest.raises(ValueError, match="num_replicas"):
        ShardSampler(RANGES, num_replicas=4, rank=1, seed=7).load_state_dict(state)


def labels_for(n: int) -> np.ndarray:
    # Unbalanced areas: 0 is frequent, 4 rare.
    r = np.arange(n)
    return np.select([r % 10 < 5, r % 10 < 8, r % 10 < 9], [0, 1, 2], default=3 + (r % 20 == 19))


@pytest.mark.parametrize(("world", "b", "m"), [(1, 8, 4), (2, 8, 2), (3, 4, 4)])
def test_class_aware_batches_hold_groups_of_each_area(world: int, b: int, m: int) -> None:
    labels = labels_for(N)
    samplers = [
        ClassAwareBatchSampler(
            RANGES, labels, batch_size_per_rank=b, samples_per_class=m, num_replicas=world, rank=r, seed=2
        )
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(1)
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(samplers[0]) == samplers[0].n_batches > 0 for p in per_rank)
    seen: set[int] = set()
    for k in range(len(per_rank[0])):
        global_batch = [i for p in per_rank for i in p[k]]
        assert len(global_batch) == b * world
        counts = Counter(labels[global_batch].tolist())
        assert all(c % m == 0 and c >= m for c in counts.values()), counts
        # Each rank's slice holds whole groups too (m divides the per-rank batch).
        for p in per_rank:
            assert all(c % m == 0 for c in Counter(labels[p[k]].tolist()).values())
        seen |= set(global_batch)
    # An epoch uses nearly every sample (only the incomplete last global batch is dropped).
    assert len(seen) >= N - b * world - 5 * m
    # Resume mid-epoch.
    s = samplers[-1]
    state = s.state_dict(2)
    fresh = ClassAwareBatchSampler(
        RANGES, labels, batch_size_per_rank=b, samples_per_class=m, num_replicas=world, rank=world - 1, seed=2
    )
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert list(fresh) == per_rank[-1][2:]


def test_class_aware_rejects_bad_group_size() -> None:
    with pytest.raises(ValueError, match="divide"):
        ClassAwareBatchSampler(RANGES, labels_for(N), batch_size_per_rank=6, samples_per_class=4)


# ----------------------------------------------------------------------------------------------------------
# The loader on a real (tiny) store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_sections(root / "sections", {"B00": 2, "B01": 1})
    cfg = load_config(
        None,
        [
            "extract.patch_size_px=33",
            "augment.shift_max_mm=0.04",
            "extract.patches_per_area=24",
            "extract.eval_patches_per_area=6",
            "extract.patches_per_shard=8",
        ],
    )
    run_extract(cfg, root / "patches", sections_dir=root / "sections")
    return root / "patches"


def make_loader(store: Path, workers: int, class_aware: bool = True, train: bool = True) -> PatchLoader:
    cfg = load_config(None, ["augment.shift_max_mm=0.04"])
    return PatchLoader(
        store,
        "train" if train else "test",
        loader_cfg=dataclasses.replace(cfg.loader, workers=workers, class_aware=class_aware),
        augment_cfg=cfg.augment,
        crop_px=33,
        batch_size_per_rank=8,
        train=train,
    )


@pytest.mark.parametrize("class_aware", [True, False])
def test_loader_identical_for_any_number_of_workers(store: Path, class_aware: bool) -> None:
    runs = []
    for workers in (0, 2):
        loader = make_loader(store, workers, class_aware)
        loader.set_epoch(3)
        runs.append([(b.index.clone(), b.images.clone()) for b in loader])
    assert len(runs[0]) == len(runs[1]) > 2
    for (i0, x0), (i1, x1) in zip(*runs):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)
    first = runs[0][0][1]
    assert first.shape == (8, 1, 33, 33) and first.dtype == torch.float32


def test_loader_resume_sees_the_same_batches(store: Path) -> None:
    loader = make_loader(store, 0)
    loader.set_epoch(1)
    batches, state = [], None
    for k, b in enumerate(loader):
        batches.append((b.index.clone(), b.images.clone(), b.labels.clone()))
        if k == 1:
            state = loader.state_dict()  # saved in the checkpoint after the 2nd step
    assert state is not None and state["batches_done"] == 2
    resumed = make_loader(store, 2)  # another process, with workers this time
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = [(b.index, b.images, b.labels) for b in resumed]
    assert len(rest) == len(batches) - 2
    for (i0, x0, y0), (i1, x1, y1) in zip(batches[2:], rest):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert resumed.state_dict()["batches_done"] == len(batches)


def _child_pids() -> set[int]:
    import glob
    import os

    pids: set[int] = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as fh:
            pids.update(int(p) for p in fh.read().split())
    return pids


def test_loader_workers_survive_the_preemption_signals(store: Path) -> None:
    """SLURM may signal every process of a step: workers leave SIGUSR1 and SIGTERM to the trainer."""
    import os
    import signal

    before = _child_pids()
    loader = make_loader(store, 2, class_aware=False)
    loader.set_epoch(0)
    batches = iter(loader)
    first = next(batches)
    workers = _child_pids() - before
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGTERM)
    rest = list(batches)  # a killed worker would raise "DataLoader worker ... exited unexpectedly"
    assert len(rest) >= 2 and first.images.shape[0] == 8


def test_eval_loader_reads_the_split_in_order_without_augmentation(store: Path) -> None:
    loader = make_loader(store, 0, train=False)
    ids = torch.cat([b.index for b in loader])
    start, stop = loader.store.split_range("test")
    assert ids.tolist() == list(range(start, stop))
    b = next(iter(loader))
    raw = torch.from_numpy(loader.store.read(int(b.index[0])))
    s, c = raw.shape[0], 33
    lo = (s - c) // 2
    assert torch.equal(b.images[0, 0], raw[lo : lo + c, lo : lo + c].float() / 255.0)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("loader.samples_per_class=3", r"must divide pretrain\.global_batch_size \(64\)"),
        ("loader.workers=-1", "loader.workers=-1 is invalid"),
        ("extract.test_fraction=1.0", "extract.test_fraction"),
        ("extract.pixel_size_um=-2", "extract.pixel_size_um"),
        ("augment.sharpen_p=0.9", "blur_p \\+ sharpen_p"),
        ("augment.gamma_z_max=0.8", "augment.gamma_z_max"),
        ("extract.sampling=ribbon", "'centerline', 'cortex'"),
    ],
)
def test_config_checks_name_the_key(override: str, fragment: str) -> None:
    from cytonet.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])
