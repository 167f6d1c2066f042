"""``cytonet extract``: sample patch centres from section stores and write a sharded patch store.

Entry point: :func:`run_extract` (the CLI calls it once per process: per SLURM array task, and per rank when
several processes run one task, e.g. ``mpiexec -n N cytonet extract``).

Workers. ``T`` array tasks of ``R`` ranks each are ``T * R`` workers: rank ``r`` of task ``t`` is worker
``t * R + r``. Workers need no communication: the plan below is computed by each from the same inputs, every
worker writes its own shards, and finalizing needs no one to wait (step 5), so a slow or dead rank holds up no
collective (a barrier after the shards would also hit ``dist.timeout_s`` when ranks finish far apart).

Steps, each deterministic from the config and the section stores alone:

1. **Splits.** Sections are grouped by brain. The held-out brains (``extract.heldout_brains``, or the last
   ``n_heldout_brains`` in sorted order) form the ``unseen`` split; within every other brain a fraction
   ``test_fraction`` of the sections (chosen by a hash of seed, brain and section) forms ``test``; the rest is
   ``train`` (seed 004: 80/20 sections, held-out brain).
2. **Survey** (one pass over each section's labels and depth, in row bands, bounded memory). Candidate centres
   are cortical pixels (area id >= 2) on the centre line of the ribbon (|depth - 0.5| <= tolerance, seed 002)
   or anywhere in the cortex (depth in [0, 1], seed 004). Each candidate gets a 64-bit key hashed from (seed,
   brain, section, pixel); per area the section keeps its count and the candidates with the smallest keys (a
   bottom-k sample, the same whatever the band size). Results are cached in ``OUT/.survey/`` (one file per
   section, written atomically), so workers share the work: each walks the sections from its own offset
   and skips those already surveyed by another.
3. **Plan.** Per split and area, the candidates with the smallest keys over all the split's sections are a
   uniform sample without replacement of that area's candidates: ``patches_per_area`` for ``train``,
   ``eval_patches_per_area`` for ``test``/``unseen``. A training area with fewer candidates than wanted is
   oversampled (the rest drawn with replacement by hash), which balances the classes. The patches of a split
   are put in a hashed order and cut into shards of ``patches_per_shard``; shards are numbered train, test,
   unseen. The plan depends on the seed and the data only, not on the number of tasks or processes. A plan
   without training patches is refused (:func:`check_plan`, naming what the sections hold) rather than
   written as an empty store; one area id must have one name in all sections (:func:`area_names`).
4. **Shards.** Worker ``w`` of ``W`` owns the shards ``i`` with ``i % W == w`` and writes them with ``workers``
   processes, each process whole shards (never two writers in one file: PLATFORM.md shows silent loss for
   shared zarr shards and HDF5 files). A shard is written to ``<name>.partial`` and renamed when complete, so
   a rerun skips shards that exist under their final name (untouched) and redoes partial ones.
5. **Manifest.** The worker that finds every shard complete after its own work writes ``metadata.npy`` and
   ``manifest.json`` (atomically; the last worker to finish always sees all shards, and two finalizing at once
   write identical bytes). Rerunning any task after all are done writes it too.

Reruns trust what ``OUT/extract.json`` records: the settings and, per section, its name, split, shape, pixel
size and identity (seed, source, writer version and :func:`~cytonet.data.sections.store_stamp`, which changes
when a store is written anew). A rerun with other settings or sections, a section re-made under its old name
included, is refused; ``--overwrite`` (one process) deletes the extraction's own files and refuses, deleting
nothing, a folder that holds anything else or the sections themselves.

Patches are stored with a margin for rotation, shift and blur (see :mod:`cytonet.data.patches`); with
``extract.pixel_size_um`` an integer multiple of the sections' pixel size, patches are block-averaged down.

Testing hook: ``CYTONET_EXTRACT_CRASH=<shard>:<patches>`` makes the process exit abruptly (``os._exit``) after
writing that many patches of that shard, leaving a ``.partial`` shard as a killed job would; a value of another
form is refused (:mod:`cytonet.testhooks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytonet.config import Config, ExtractConfig, config_to_dict, config_to_yaml, diff_keys, lookup
from cytonet.data import rng
from cytonet.data.patches import (
    COLUMNS,
    MANIFEST,
    META_DTYPE,
    METADATA,
    READERS_LOCK,
    SPLITS,
    PatchGeometry,
    ShardWriter,
    finalize_store,
    lock_held,
    partial_path,
    remove_path,
    require_folder,
    rewriting_store,
    shard_name,
    step_lock,
    try_exclusive_lock,
    unfinished_step,
    write_bytes_atomic,
    write_json_atomic,
)
from cytonet.data.sections import (
    WHITE_MATTER_ID,
    block_factor,
    block_mean_uint8,
    list_sections,
    open_section,
    store_stamp,
)
from cytonet.errors import InputError, OutputExistsError, UsageError
from cytonet.testhooks import read_hook
from cytonet.workers import worker_pool

log = logging.getLogger(__name__)

SETTINGS_FILE = "extract.json"
SURVEY_DIR = ".survey"
CRASH_ENV = "CYTONET_EXTRACT_CRASH"
_TAG_SURVEY, _TAG_TEST, _TAG_OVERSAMPLE, _TAG_SHUFFLE = 11, 12, 13, 14

#: One planned patch; ``section`` indexes the section list, ``dup`` > 0 marks an oversampled repeat.
PLAN_DTYPE = np.dtype(
    [
        ("area", np.int32),
        ("section", np.int32),
        ("y", np.int32),
        ("x", np.int32),
        ("depth", np.float32),
        ("key", np.uint64),
        ("dup", np.int32),
    ]
)


@dataclass(frozen=True)
class SectionEntry:
    """A section store as extraction sees it."""

    path: str
    name: str
    brain: str
    section_index: int
    shape: tuple[int, int]
    pixel_size_um: float
    label_table: dict[int, str]
    split: str = "train"
    identity: dict[str, Any] = field(default_factory=dict)
    """What the store's content is: its seed, source and writer version, and :func:`store_stamp` (changes when
    the store is written anew), so that a re-made section with the same name and shape invalidates what was
    extracted from the old one."""


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs to write one shard."""

    out: str
    index: int
    split: str
    first: int
    records: np.ndarray
    #: the sections its records name, by their index in the store: only those (a worker process is sent every
    #: job, and a whole brain's list in each was O(shards x sections))
    sections: dict[int, SectionEntry]
    brains: tuple[str, ...]
    factor: int
    geometry: PatchGeometry
    backend: str
    compression: str

    @property
    def name(self) -> str:
        return shard_name(self.index, self.backend)


@dataclass
class ExtractResult:
    """What one call of :func:`run_extract` did."""

    out: Path
    n_shards: int
    written: int
    skipped: int
    manifest: Path | None
    """The manifest path when the store is complete (written now or earlier), else None."""


# ----------------------------------------------------------------------------------------------------------
# Sections and splits


def discover_sections(sections_dir: Path) -> list[SectionEntry]:
    """Every section store below ``sections_dir``, sorted by (brain, section index); refused while a step
    (synth) is writing the folder or after one stopped half-way: a store built from the sections that happen
    to be there would pass for complete."""
    why = unfinished_step(sections_dir)
    if why:
        raise InputError(f"extract: the sections folder {sections_dir} is not finished: {why}")
    paths = list_sections(sections_dir)
    if not paths:
        raise InputError(f"no section stores (.zarr / .h5) found below {sections_dir}; run `cytonet synth` first")
    entries = []
    for p in paths:
        with open_section(p) as r:
            m = r.meta
            if not r.has("labels"):
                raise InputError(f"section store {p} has no labels layer: extraction needs area labels")
            entries.append(
                SectionEntry(
                    path=str(p),
                    name=f"{m.brain}_s{m.section_index:04d}",
                    brain=m.brain,
                    section_index=m.section_index,
                    shape=m.shape,
                    pixel_size_um=m.pixel_size_um,
                    label_table=dict(m.label_table),
                    identity={
                        "seed": m.seed,
                        "source": m.source,
                        "cytonet_version": m.cytonet_version,
                        "stamp": store_stamp(p),
                    },
                )
            )
    entries.sort(key=lambda e: (e.brain, e.section_index))
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise InputError(
                f"two section stores hold brain {e.brain} section {e.section_index}: {seen[e.name]}, {e.path}"
            )
        seen[e.name] = e.path
    return entries


def _is_placeholder(area: int, name: str) -> bool:
    """The name ``cytonet import`` gives an id that has none (``area_<id>``): compatible with any real name."""
    return name == f"area_{area}"


def area_names(entries: list[SectionEntry]) -> dict[int, str]:
    """Area id -> name over the sections' label tables (ids >= 2); one id must mean one area everywhere.

    A placeholder ``area_<id>`` gives way to a real name; two real names for one id raise :class:`InputError`
    naming both sections, since merging them would train one class on two areas."""
    names: dict[int, str] = {}
    where: dict[int, str] = {}
    for e in entries:
        for a, name in sorted(e.label_table.items()):
            if a <= WHITE_MATTER_ID:
                continue
            old = names.get(a)
            if old is None or (_is_placeholder(a, old) and not _is_placeholder(a, name)):
                names[a], where[a] = name, e.path
            elif name != old and not _is_placeholder(a, name):
                raise InputError(
                    f"area id {a} is {old!r} in {where[a]} but {name!r} in {e.path}: the sections' label tables "
                    "disagree; relabel the sections so one id names one area, or extract them separately"
                )
    return names


def heldout_brains(brains: list[str], ecfg: ExtractConfig) -> set[str]:
    """The brains of ``brains`` (sorted) that ``ecfg`` holds out, leaving at least one to train on; raises
    :class:`InputError` naming the key otherwise (the demo asks before it makes the brains)."""
    if ecfg.heldout_brains:
        unknown = [b for b in ecfg.heldout_brains if b not in brains]
        if unknown:
            raise InputError(f"extract.heldout_brains names {unknown}, not among the brains found: {brains}")
        heldout = set(ecfg.heldout_brains)
    else:
        if ecfg.n_heldout_brains > len(brains):  # brains[len - n:] would wrap around to the last few brains
            raise InputError(
                f"extract.n_heldout_brains={ecfg.n_heldout_brains} exceeds the {len(brains)} brains found "
                f"({brains}); lower it (at most {len(brains) - 1} leaves a training brain)"
            )
        heldout = set(brains[len(brains) - ecfg.n_heldout_brains :]) if ecfg.n_heldout_brains else set()
    if len(heldout) >= len(brains):
        raise InputError(
            f"extract: holding out {sorted(heldout)} leaves no training brain (brains found: {brains}); "
            "lower extract.n_heldout_brains or list fewer extract.heldout_brains"
        )
    return heldout


def assign_splits(entries: list[SectionEntry], cfg: Config) -> list[SectionEntry]:
    """Give every section its split: held-out brains -> unseen; a hashed fraction of the others' -> test."""
    ecfg = cfg.extract
    brains = sorted({e.brain for e in entries})
    heldout = heldout_brains(brains, ecfg)
    out = []
    for brain in brains:
        mine = [e for e in entries if e.brain == brain]
        if brain in heldout:
            out += [dataclasses.replace(e, split="unseen") for e in mine]
            continue
        n_test = 0
        if ecfg.test_fraction > 0 and len(mine) >= 2:
            n_test = min(len(mine) - 1, max(1, round(ecfg.test_fraction * len(mine))))
        keys = [int(rng.hash_words((ecfg.seed, _TAG_TEST, rng.string_word(brain)), e.section_index)) for e in mine]
        test = {mine[i].section_index for i in sorted(range(len(mine)), key=lambda i: keys[i])[:n_test]}
        out += [dataclasses.replace(e, split="test" if e.section_index in test else "train") for e in mine]
    return out


def _pixel_factor(entries: list[SectionEntry], target_um: float | None) -> tuple[float, int]:
    """(patch pixel size, integer downsampling factor) shared by all sections."""
    sizes = sorted({e.pixel_size_um for e in entries})
    if len(sizes) > 1 and not all(math.isclose(s, sizes[0], rel_tol=1e-6) for s in sizes):
        raise InputError(f"sections have different pixel sizes {sizes} um; extract them into separate stores")
    native = sizes[0]
    if target_um is None:
        return native, 1
    factor = block_factor(target_um, native)
    if factor is None:
        raise InputError(
            f"extract.pixel_size_um={target_um} is not an integer multiple of the sections' {native} um/px; "
            f"use {native:g}, {2 * native:g}, {4 * native:g}, ... or null"
        )
    return native * factor, factor


# ----------------------------------------------------------------------------------------------------------
# Survey: candidate centres per section and area


def _survey_settings(cfg: Config, entry: SectionEntry) -> dict[str, Any]:
    e = cfg.extract
    return {
        "sampling": e.sampling,
        "centerline_tolerance": e.centerline_tolerance,
        "candidate_stride_px": e.candidate_stride_px,
        "keep": max(e.patches_per_area, e.eval_patches_per_area),
        "seed": e.seed,
        "section": entry.name,
        "shape": list(entry.shape),
        "store": entry.identity,
    }


def survey_section(path: str, name: str, out_file: str, settings: dict[str, Any]) -> str:
    """Survey one section into ``out_file`` (skipped when a survey with the same settings exists)."""
    target = Path(out_file)
    if _survey_matches(target, settings):
        return "cached"
    keep = int(settings["keep"])
    stride = int(settings["candidate_stride_px"])
    tol = float(settings["centerline_tolerance"])
    centerline = settings["sampling"] == "centerline"
    reader = open_section(path)
    h, w = reader.shape
    brain, index = reader.meta.brain, reader.meta.section_index
    salt = (int(settings["seed"]), _TAG_SURVEY, rng.string_word(brain), index)
    has_depth = reader.has("depth")
    if centerline and not has_depth:
        raise InputError(f"section store {path} has no depth layer: centre-line sampling needs cortical depth")
    # Chunk-aligned tiles, not full-width bands: a band of a section 100k px wide was gigabytes with its
    # temporaries. The candidates kept (the `keep` smallest keys per area) do not depend on the tiling.
    band = max(256, reader.chunk_shape("labels")[0])
    counts: dict[int, int] = {}
    kept: dict[int, np.ndarray] = {}
    for y0, x0 in itertools.product(range(0, h, band), range(0, w, band)):
        y1, x1 = min(h, y0 + band), min(w, x0 + band)
        labels = reader.read("labels", y0, y1, x0, x1)
        depth = reader.read("depth", y0, y1, x0, x1) if has_depth else np.full(labels.shape, np.nan, np.float32)
        r0, c0 = (-y0) % stride, (-x0) % stride  # on the section's grid of candidates, whatever the tile
        labels, depth = labels[r0::stride, c0::stride], depth[r0::stride, c0::stride]
        mask = labels > WHITE_MATTER_ID
        with np.errstate(invalid="ignore"):
            if centerline:
                mask &= np.abs(depth - 0.5) <= tol
            elif has_depth:
                mask &= (depth >= 0) & (depth <= 1)
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            continue
        ys = (y0 + r0 + rows * stride).astype(np.int32)
        xs = (x0 + c0 + cols * stride).astype(np.int32)
        cand = np.zeros(len(ys), dtype=PLAN_DTYPE)
        cand["area"], cand["y"], cand["x"] = labels[rows, cols], ys, xs
        cand["depth"] = depth[rows, cols]
        cand["key"] = rng.hash_words(salt, ys.astype(np.int64) * w + xs)
        cand = cand[np.argsort(cand["area"], kind="stable")]
        areas, starts = np.unique(cand["area"], return_index=True)
        for a, block in zip(areas.tolist(), np.split(cand, starts[1:])):
            counts[a] = counts.get(a, 0) + len(block)
            merged = block if a not in kept else np.concatenate([kept[a], block])
            if len(merged) > keep:
                merged = merged[np.argpartition(merged["key"], keep - 1)[:keep]]
            kept[a] = merged
    reader.close()
    areas_sorted = sorted(kept)
    blocks = [np.sort(kept[a], order="key") for a in areas_sorted]
    data = np.concatenate(blocks) if blocks else np.zeros(0, dtype=PLAN_DTYPE)
    buf = io.BytesIO()
    np.savez(
        buf,
        settings=np.array(json.dumps(settings, sort_keys=True)),
        areas=np.array(areas_sorted, dtype=np.int64),
        counts=np.array([counts[a] for a in areas_sorted], dtype=np.int64),
        candidates=data,
    )
    write_bytes_atomic(target, buf.getvalue())
    return "surveyed"


def _survey_matches(path: Path, settings: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return bool(json.loads(str(z["settings"])) == json.loads(json.dumps(settings)))
    except (OSError, ValueError, KeyError):
        return False


@dataclass
class Survey:
    counts: dict[int, int]
    """Candidate pixels per area."""
    candidates: dict[int, np.ndarray]
    """Per area the kept candidates (PLAN_DTYPE), sorted by key."""


def load_survey(path: Path) -> Survey:
    with np.load(path, allow_pickle=False) as z:
        areas = z["areas"].tolist()
        counts = dict(zip(areas, z["counts"].tolist()))
        data = z["candidates"]
    cands: dict[int, np.ndarray] = {}
    if len(data):
        order_areas, starts = np.unique(data["area"], return_index=True)
        for a, block in zip(order_areas.tolist(), np.split(data, starts[1:])):
            cands[a] = block
    return Survey(counts, cands)


# ----------------------------------------------------------------------------------------------------------
# Plan


def build_plan(entries: list[SectionEntry], surveys: list[Survey], cfg: Config) -> dict[str, np.ndarray]:
    """Planned patches per split (PLAN_DTYPE, in shard order): class-balanced, hashed, task-independent."""
    e = cfg.extract
    plan: dict[str, np.ndarray] = {}
    for code, split in enumerate(SPLITS):
        ids = [i for i, s in enumerate(entries) if s.split == split]
        want = e.patches_per_area if split == "train" else e.eval_patches_per_area
        areas = sorted({a for i in ids for a in surveys[i].counts})
        chosen = []
        for area in areas:
            blocks = []
            for i in ids:
                block = surveys[i].candidates.get(area)
                if block is not None and len(block):
                    block = block.copy()
                    block["section"] = i
                    blocks.append(block)
            if not blocks:
                continue
            pool = np.concatenate(blocks)
            pool = pool[np.lexsort((pool["x"], pool["y"], pool["section"], pool["key"]))]
            total = sum(surveys[i].counts.get(area, 0) for i in ids)
            take = pool[: min(want, len(pool))]
            chosen.append(take)
            if split == "train" and total < want:
                # Oversampling: fewer candidate pixels than wanted; every candidate is kept (total < want <=
                # keep), so repeats are drawn from the whole area with replacement.
                extra_n = want - total
                u = rng.uniform(rng.hash_words((e.seed, _TAG_OVERSAMPLE, area), np.arange(extra_n)))
                extra = pool[np.minimum((u * len(pool)).astype(np.int64), len(pool) - 1)].copy()
                extra["dup"] = np.arange(1, extra_n + 1)
                chosen.append(extra)
        recs = np.concatenate(chosen) if chosen else np.zeros(0, dtype=PLAN_DTYPE)
        order = np.argsort(rng.hash_words((e.seed, _TAG_SHUFFLE, code), np.arange(len(recs))), kind="stable")
        plan[split] = recs[order]
    return plan


def _labels_and_depth(entries: list[SectionEntry], stride: int) -> tuple[list[int], tuple[float, float] | None]:
    """The label ids and the finite depth range of the sections, every ``stride`` px, read in row bands (for
    the message of an extraction that finds no candidate); depth None when no section has finite depth."""
    ids: set[int] = set()
    lo, hi = math.inf, -math.inf
    for e in entries:
        with open_section(e.path) as reader:
            h = reader.shape[0]
            band = max(stride, (1024 // stride) * stride)
            for y0 in range(0, h, band):
                y1 = min(h, y0 + band)
                ids.update(np.unique(reader.read("labels", y0, y1)[::stride, ::stride]).tolist())
                if reader.has("depth"):
                    d = reader.read("depth", y0, y1)[::stride, ::stride]
                    d = d[np.isfinite(d)]
                    if d.size:
                        lo, hi = min(lo, float(d.min())), max(hi, float(d.max()))
    return sorted(ids), ((lo, hi) if lo <= hi else None)


def check_plan(
    entries: list[SectionEntry], surveys: list[Survey], plan: dict[str, np.ndarray], names: dict[int, str], cfg: Config
) -> None:
    """Refuse a plan without training patches (it would make a 'complete' empty store) with what the training
    sections hold instead; warn about areas found in test / unseen sections but not in the training ones."""
    e = cfg.extract
    train = [s for s in entries if s.split == "train"]
    if len(plan["train"]) == 0:
        rule = (
            f"|depth - 0.5| <= extract.centerline_tolerance={e.centerline_tolerance}"
            if e.sampling == "centerline"
            else "depth in [0, 1] (where a depth layer exists)"
        )
        shown = train[:3]  # read again for the message: a few sections tell what is wrong, all could take long
        ids, depth = _labels_and_depth(shown, e.candidate_stride_px)
        found = f"depth {depth[0]:g} .. {depth[1]:g}" if depth is not None else "no finite depth"
        which = "it holds" if len(shown) == 1 else f"{'the first ' if len(train) > len(shown) else ''}{len(shown)} hold"
        raise InputError(
            f"extract: no patch centre in the {len(train)} training section(s) "
            f"({', '.join(s.path for s in shown)}{', ...' if len(train) > len(shown) else ''}): extract.sampling="
            f"{e.sampling} takes pixels with an area id >= {WHITE_MATTER_ID + 1} and {rule}, every "
            f"extract.candidate_stride_px={e.candidate_stride_px} px; {which} label ids {ids} and {found} "
            "(depth must run from 0 at the pial surface to 1 at the white matter)"
        )
    in_train = set(np.unique(plan["train"]["area"]).tolist())
    missing: dict[int, set[str]] = {}
    for entry, survey in zip(entries, surveys):
        for a in survey.counts:
            if a not in in_train:
                missing.setdefault(a, set()).add(entry.split)
    if missing:
        log.warning(
            "extract: areas found in the sections but not in the training split (no training patch; a classifier "
            "never learns them): %s",
            ", ".join(f"{a} ({names.get(a, f'area{a}')}, in {'/'.join(sorted(missing[a]))})" for a in sorted(missing)),
        )


def plan_shards(plan: dict[str, np.ndarray], per_shard: int, backend: str) -> list[dict[str, Any]]:
    """Shard list (name, split, n, first) over the splits in order train, test, unseen."""
    shards: list[dict[str, Any]] = []
    first = 0
    for split in SPLITS:
        n = len(plan[split])
        for start in range(0, n, per_shard):
            k = min(per_shard, n - start)
            shards.append({"name": shard_name(len(shards), backend), "split": split, "n": k, "first": first})
            first += k
    return shards


# ----------------------------------------------------------------------------------------------------------
# Writing shards


class _PointReader:
    """Reads single pixels of a layer, keeping the last few chunks decoded (a shard's patch centres come sorted
    by section, y, x): an HDF5 store's chunk cache (1 MiB) holds no coordinate chunk (3 MiB at 512 px)."""

    def __init__(self, reader: Any, layer: str, max_blocks: int = 16) -> None:
        self.reader = reader
        self.layer = layer
        self.chunk = reader.chunk_shape(layer)
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        self.max_blocks = max_blocks

    def __call__(self, y: int, x: int) -> np.ndarray:
        cy, cx = y // self.chunk[0], x // self.chunk[1]
        block = self.blocks.get((cy, cx))
        if block is None:
            h, w = self.reader.shape
            y0, x0 = cy * self.chunk[0], cx * self.chunk[1]
            block = self.reader.read(self.layer, y0, min(h, y0 + self.chunk[0]), x0, min(w, x0 + self.chunk[1]))
            if len(self.blocks) >= self.max_blocks:
                self.blocks.pop(next(iter(self.blocks)))
            self.blocks[(cy, cx)] = block
        return np.asarray(block[y - cy * self.chunk[0], x - cx * self.chunk[1]])


def read_patch(reader: Any, y: int, x: int, edge: int, factor: int) -> np.ndarray:
    """The ``edge`` x ``edge`` patch whose pixel ``edge // 2`` covers section pixel (y, x); zero outside."""
    span = edge * factor
    y0 = y - (edge // 2) * factor - factor // 2
    x0 = x - (edge // 2) * factor - factor // 2
    return block_mean_uint8(reader.read_padded("image", y0, y0 + span, x0, x0 + span), factor)


def _crash_point() -> tuple[int, int] | None:
    """(shard, patches written) of the test hook :data:`CRASH_ENV`, None when it is off."""
    hook = read_hook(CRASH_ENV, r"([0-9]{1,9}):([0-9]{1,9})", "<shard>:<patches>, two whole numbers such as 3:5")
    return None if hook is None else (int(hook[0]), int(hook[1]))


def write_shard(job: ShardJob) -> str:
    """Write one shard (skip it when it already exists under its final name); runs in a worker process.

    Its writer holds the shard's lock (:func:`shard_lock_name`) while it writes: arrays of different sizes
    deal the shards out differently, so two of them running at once may both be given a shard; the second
    finds it ``busy`` and leaves it (and its ``.partial``) to the first. Only a writer holding the lock removes
    a ``.partial``, which a killed writer left. The lock file goes once the shard is there under its name."""
    out = Path(job.out)
    path = out / job.name
    if path.exists():
        return "skipped"
    lock = out / shard_lock_name(job.name)
    with try_exclusive_lock(lock) as mine:
        if not mine:
            return "busy"
        if path.exists():  # finished by the writer that held the lock before
            return "skipped"
        remove_path(partial_path(path))
        _write_shard(job, path)
        lock.unlink(missing_ok=True)  # under the lock: a later writer checks the shard first, and finds it
    return "written"


def shard_lock_name(shard: str) -> str:
    """The lock file of a shard's writer."""
    return f".{shard}.lock"


def _write_shard(job: ShardJob, path: Path) -> None:
    crash = _crash_point()
    recs = job.records
    n = len(recs)
    s_px = job.geometry.stored_px
    readers: dict[int, Any] = {}
    points: dict[int, _PointReader | None] = {}
    cols: dict[str, np.ndarray] = {name: np.zeros(n, dtype=META_DTYPE[name].base) for name in COLUMNS}
    cols["coords"] = np.full((n, 3), np.nan, dtype=np.float32)
    brain_index = {b: i for i, b in enumerate(job.brains)}
    attrs = {
        "shard": job.index,
        "split": job.split,
        "first": job.first,
        "geometry": job.geometry.to_dict(),
        "brains": list(job.brains),
    }
    order = np.lexsort((recs["x"], recs["y"], recs["section"]))  # read locality; stored order stays planned
    with ShardWriter(path, n, s_px, job.compression, attrs) as writer:
        for count, j in enumerate(order.tolist()):
            if crash is not None and crash == (job.index, count):
                os._exit(17)  # simulate a killed job: the .partial shard stays behind
            r = recs[j]
            sec_i = int(r["section"])
            entry = job.sections[sec_i]
            if sec_i not in readers:
                readers[sec_i] = open_section(entry.path)
                points[sec_i] = _PointReader(readers[sec_i], "coords") if readers[sec_i].has("coords") else None
            y, x = int(r["y"]), int(r["x"])
            writer.write(j, read_patch(readers[sec_i], y, x, s_px, job.factor))
            point = points[sec_i]
            if point is not None:
                cols["coords"][j] = point(y, x)
            cols["area"][j] = r["area"]
            cols["brain"][j] = brain_index[entry.brain]
            cols["section"][j] = sec_i
            cols["section_index"][j] = entry.section_index
            cols["y"][j], cols["x"][j] = y, x
            cols["depth"][j] = r["depth"]
        cols["patch_id"] = np.arange(job.first, job.first + n, dtype=np.int64)
        cols["split"][:] = SPLITS.index(job.split)
        writer.close(cols)
    for reader in readers.values():
        reader.close()


def _run_jobs(fn: Callable[..., str], jobs: list[tuple[Any, ...]], workers: int) -> list[str]:
    """Run ``fn(*job)`` for every job, in this process (workers <= 1) or in a pool of spawned processes.

    Spawn, not fork: zarr runs an event-loop thread and h5py holds library state; a fresh interpreter
    inherits neither.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    with worker_pool(min(workers, len(jobs))) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------------------------------------
# The command


_OURS = (SETTINGS_FILE, MANIFEST, METADATA, "config.resolved.yaml", SURVEY_DIR, READERS_LOCK)
#: What an extraction writes into its folder besides ``_OURS``: shards (and their ``.partial`` while written)
#: and the temp files of :func:`write_bytes_atomic` (``.<name>.<pid>.<thread>.tmp``).
_OURS_PATTERN = re.compile(
    r"shard-\d{5,}\.(h5|zarr)(\.partial)?|\.(" + "|".join(re.escape(n) for n in _OURS) + r")\.\d+\.\d+\.tmp"
    r"|\.worker-\d+-of-\d+\.lock|\.shard-\d{5,}\.(h5|zarr)\.lock"
)


def _is_ours(p: Path) -> bool:
    """Whether ``p`` (an entry of the output folder) is one an extraction writes; only those are ever deleted."""
    return p.name in _OURS or _OURS_PATTERN.fullmatch(p.name) is not None


def _extracted_any(out: Path) -> bool:
    """Whether ``out`` holds a shard (finished or being written) or a finished store's files."""
    return any(p.name in (MANIFEST, METADATA) or p.name.startswith("shard-") for p in out.iterdir())


def _legacy_sections(old: Any) -> bool:
    """Whether recorded settings come from a cytonet that did not record each section's identity ("store")."""
    sections = old.get("sections") if isinstance(old, dict) else None
    return (
        isinstance(sections, list)
        and bool(sections)
        and all(isinstance(s, dict) and "store" not in s for s in sections)
    )


def _changed_sections(old: Any, new: list[dict[str, Any]]) -> list[str]:
    """Names of the sections in ``new`` that are absent from, or differ in, the old settings' list."""
    before = {s.get("name"): s for s in old if isinstance(s, dict)} if isinstance(old, list) else {}
    return [s["name"] for s in new if before.get(s["name"]) != s]


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool, sections_dir: Path) -> None:
    """Refuse to mix extractions: ``out`` must be new, hold this extraction, or hold only an extraction's own
    files, which ``overwrite`` deletes. Anything else in ``out`` (and the input sections) is never deleted."""
    require_folder(out, "extract")
    src, dst = sections_dir.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise OutputExistsError(
            f"extract: the sections folder {sections_dir} lies inside the output folder {out}; "
            "choose an --out outside it"
        )
    settings_path = out / SETTINGS_FILE
    plain = json.loads(json.dumps(settings))
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p)) if out.is_dir() else []
    if overwrite and foreign:
        raise OutputExistsError(
            f"extract: output folder {out} holds files that are not an extraction's ({foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); --overwrite deletes only an "
            "extraction's own files: move the others away or choose another --out"
        )
    if overwrite and out.exists():
        # workers' and shards' locks (the readers' lock is this rewrite's own)
        busy = [p.name for p in sorted(out.glob(".*.lock")) if p.name != READERS_LOCK and lock_held(p)]
        if busy:
            raise OutputExistsError(
                f"extract: {out} is being written by another process right now (it holds {out / busy[0]}); "
                "--overwrite would delete its files: wait for it to finish, or choose another --out"
            )
        for p in out.iterdir():
            if p.name != READERS_LOCK:  # held by this rewrite (run_extract): a new file would not exclude readers
                remove_path(p)  # every entry is an extraction's own (checked above)
    elif settings_path.is_file():
        unreadable = ""
        try:
            old = json.loads(settings_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            old, unreadable = None, str(exc)
        if (unreadable or not isinstance(old, dict)) and _extracted_any(out):
            raise OutputExistsError(
                f"extract: {settings_path} cannot be read ({unreadable or 'not a JSON object'}): it records the "
                f"settings of the extraction in {out}, which cannot be checked without it; pass --overwrite to "
                "extract again, or choose another --out"
            )
        if _legacy_sections(old):
            # Written before sections had an identity: compare without it rather than refuse every old store.
            log.warning("extract: %s predates section identities: cannot tell whether its sections were re-made", out)
            plain = {**plain, "sections": [{k: v for k, v in s.items() if k != "store"} for s in plain["sections"]]}
        if old != plain and not _extracted_any(out):
            # An earlier attempt stopped before writing a shard (an input error, a kill): nothing to keep.
            log.info("extract: %s holds no shard of its earlier settings: starting with these", out)
            write_json_atomic(settings_path, plain)
            return
        if old != plain:
            diff = sorted(k for k in plain if not isinstance(old, dict) or old.get(k) != plain[k])
            what = ", ".join(
                f"{key}: {lookup(old, key)[1]!r} -> {lookup(plain, key)[1]!r}" if "." in key else key
                for key in diff_keys(old, plain)
            )
            if "sections" in diff:
                changed = _changed_sections(old.get("sections") if isinstance(old, dict) else None, plain["sections"])
                if changed:
                    what += f"; sections new or changed since: {', '.join(changed[:3])}"
                    what += f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            hint = (
                f"choose another --out (the folder also holds other files, e.g. {foreign[0]}, which --overwrite refuses)"
                if foreign
                else "pass --overwrite (single task) or choose another --out"
            )
            raise OutputExistsError(
                f"extract: {out} holds an extraction with other settings (differing: {what}); {hint}"
            )
        return
    elif foreign:
        raise OutputExistsError(
            f"extract: output folder {out} holds other files ({', '.join(foreign[:3])}); choose another --out "
            "(--overwrite would delete only an extraction's own files, and refuses these)"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, plain)


def extraction_settings(cfg: Config, entries: list[SectionEntry], geometry: PatchGeometry) -> dict[str, Any]:
    """Everything the store's content depends on (saved in extract.json and the manifest)."""
    ecfg = config_to_dict(cfg)["extract"]
    for key in ("out_dir", "sections_dir"):
        ecfg.pop(key)
    return {
        "extract": ecfg,
        "geometry": geometry.to_dict(),
        "sections": [
            {
                "name": e.name,
                "split": e.split,
                "shape": list(e.shape),
                "pixel_size_um": e.pixel_size_um,
                "store": e.identity,
            }
            for e in entries
        ],
    }


def _rotated(items: list[Any], task_id: int, num_tasks: int) -> list[Any]:
    start = (task_id * len(items)) // max(num_tasks, 1)
    return items[start:] + items[:start]


def run_extract(
    cfg: Config,
    out: Path,
    *,
    sections_dir: Path | None = None,
    overwrite: bool = False,
    task_id: int = 0,
    num_tasks: int = 1,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> ExtractResult:
    """Extract (this process's share of) the patch store of ``cfg`` into ``out``; see the module docstring.

    ``task_id`` of ``num_tasks``: this array task; ``rank`` of ``world_size``: this process among those running
    the task (from the launcher, handed in by the CLI); ``workers``: processes this one starts for its shards.
    """
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise UsageError(f"--task-id {task_id} must lie in 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} must lie in 0..{world_size - 1} (world size {world_size})")
    if overwrite and num_tasks * world_size > 1:
        raise UsageError(
            f"--overwrite with several processes ({num_tasks} tasks x {world_size} ranks) would let one delete "
            "another's shards; delete the output folder first or run one process with --overwrite"
        )
    _crash_point()  # a malformed test hook is refused before anything is read or written
    worker, n_workers = task_id * world_size + rank, num_tasks * world_size
    started = time.perf_counter()
    who = f"task {task_id}/{num_tasks}, rank {rank}/{world_size}"
    ecfg = cfg.extract
    src = sections_dir if sections_dir is not None else cfg.resolve_path(ecfg.sections_dir)
    entries = assign_splits(discover_sections(src), cfg)
    names = area_names(entries)
    pixel_um, factor = _pixel_factor(entries, ecfg.pixel_size_um)
    crop = ecfg.patch_size_px if ecfg.patch_size_px is not None else cfg.model.patch_size_px
    geometry = PatchGeometry.for_crop(crop, pixel_um, cfg.augment.shift_max_mm, cfg.augment.blur_radius_px)
    settings = extraction_settings(cfg, entries, geometry)
    with contextlib.ExitStack() as rewriting:
        if overwrite and out.is_dir() and all(_is_ours(p) for p in out.iterdir()):  # (else refused below)
            # No training run may read the store while it is deleted and rewritten.
            rewriting.enter_context(rewriting_store(out, "extract --overwrite"))
        _prepare_out(out, settings, overwrite, src)
        done = _complete_store(out)
        if done is not None:  # these settings (checked above), every shard there: write nothing (a read-only mount)
            log.info("extract: %s already holds the complete store with these settings; nothing to do", out)
            return ExtractResult(out, done, 0, done, out / MANIFEST)
        # This worker's share has one writer: the same task launched twice (an array resubmitted while it runs)
        # is refused instead of both writing the same shards.
        with step_lock(out, f"extract worker {worker} of {n_workers}", name=worker_lock_name(worker, n_workers)):
            return _extract(
                cfg, out, src, entries, names, factor, geometry, settings, worker, n_workers, workers, who, started
            )


def _complete_store(out: Path) -> int | None:
    """The number of shards when ``out`` holds a finished store (its manifest and every shard it lists),
    else None (a shard deleted since is written again)."""
    try:
        shards = json.loads((out / MANIFEST).read_text())["shards"]
        complete = all((out / s["name"]).exists() for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return len(shards) if complete else None


def worker_lock_name(worker: int, n_workers: int) -> str:
    """The lock file of one worker's share of an extraction."""
    return f".worker-{worker}-of-{n_workers}.lock"


def _extract(
    cfg: Config,
    out: Path,
    src: Path,
    entries: list[SectionEntry],
    names: dict[int, str],
    factor: int,
    geometry: PatchGeometry,
    settings: dict[str, Any],
    worker: int,
    n_workers: int,
    workers: int,
    who: str,
    started: float,
) -> ExtractResult:
    """Survey, plan and write this worker's shards (``who``: its task and rank, for the log), and the manifest
    when every shard is there."""
    ecfg = cfg.extract
    write_bytes_atomic(out / "config.resolved.yaml", config_to_yaml(cfg).encode())

    # Survey: shared cache, each worker starting at its own offset.
    survey_dir = out / SURVEY_DIR
    survey_dir.mkdir(exist_ok=True)
    files = [survey_dir / f"{e.name}.npz" for e in entries]
    jobs = [(e.path, e.name, str(f), _survey_settings(cfg, e)) for e, f in zip(entries, files)]
    done = _run_jobs(survey_section, _rotated(jobs, worker, n_workers), workers)
    log.info("extract: surveyed %d sections (%d from cache)", len(done), done.count("cached"))
    surveys = [load_survey(f) for f in files]

    plan = build_plan(entries, surveys, cfg)
    check_plan(entries, surveys, plan, names, cfg)
    shards = plan_shards(plan, ecfg.patches_per_shard, ecfg.backend)
    crash = _crash_point()
    if crash is not None and not (crash[0] < len(shards) and crash[1] < shards[crash[0]]["n"]):
        # A crash point past the store would never be reached: the test asking for it would pass without a crash.
        held = f"shard {crash[0]} holds {shards[crash[0]]['n']} patches" if crash[0] < len(shards) else "no such shard"
        raise UsageError(
            f"{CRASH_ENV}={crash[0]}:{crash[1]} is never reached: the store has {len(shards)} shards ({held})"
        )
    brains = tuple(sorted({e.brain for e in entries}))
    offsets = {split: 0 for split in SPLITS}
    shard_jobs = []
    for i, s in enumerate(shards):
        k = offsets[s["split"]]
        offsets[s["split"]] += s["n"]
        if i % n_workers != worker:
            continue
        if (out / s["name"]).exists():
            continue
        records = plan[s["split"]][k : k + s["n"]]
        shard_jobs.append(
            ShardJob(
                out=str(out),
                index=i,
                split=s["split"],
                first=s["first"],
                records=records,
                sections={int(j): entries[j] for j in np.unique(records["section"])},
                brains=brains,
                factor=factor,
                geometry=geometry,
                backend=ecfg.backend,
                compression=ecfg.compression,
            )
        )
    mine = sum(1 for i in range(len(shards)) if i % n_workers == worker)
    results = _run_jobs(write_shard, [(job,) for job in shard_jobs], workers)
    written, busy = results.count("written"), results.count("busy")
    log.info(
        "extract: %s wrote %d of its %d shards (%d already complete%s) in %.1f s",
        who,
        written,
        mine,
        mine - len(shard_jobs) + results.count("skipped"),
        f", {busy} being written by another process" if busy else "",
        time.perf_counter() - started,
    )
    manifest: Path | None = None
    missing = [s["name"] for s in shards if not (out / s["name"]).exists()]
    if not missing:
        plan_areas = {int(a) for recs in plan.values() for a in np.unique(recs["area"])}
        manifest = _finalize(out, cfg, entries, brains, geometry, settings, shards, names, plan_areas)
    else:
        log.info(
            "extract: %d of %d shards still missing (other tasks or ranks); the one that completes the last "
            "shard writes the manifest (or rerun any task)",
            len(missing),
            len(shards),
        )
    return ExtractResult(out, len(shards), written, mine - written, manifest)


def _finalize(
    out: Path,
    cfg: Config,
    entries: list[SectionEntry],
    brains: tuple[str, ...],
    geometry: PatchGeometry,
    settings: dict[str, Any],
    shards: list[dict[str, Any]],
    table: dict[int, str],
    plan_areas: set[int],
) -> Path:
    # Classes: the areas of the sections' label tables (area_names) plus any area id found without a name.
    names = dict(table)
    for a in plan_areas:
        names.setdefault(a, f"area{a}")
    areas = {str(a): names[a] for a in sorted(names)}
    header = {
        "backend": cfg.extract.backend,
        "compression": cfg.extract.compression,
        "geometry": geometry.to_dict(),
        "extract": settings["extract"],
        "areas": areas,
        "brains": list(brains),
        "sections": [
            {"name": e.name, "brain": e.brain, "section_index": e.section_index, "split": e.split} for e in entries
        ],
    }
    path = finalize_store(out, header, shards)
    with open(path) as fh:
        n = json.load(fh)["n_patches"]
    log.info("extract: store complete: %d patches in %d shards, manifest %s", n, len(shards), path)
    return path
