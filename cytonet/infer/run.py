"""``cytonet infer``: per-area probability maps and label maps of whole sections, block by block.

Plan: the sections (``infer.sections`` or those of ``infer.splits``), each cut into blocks of one output
chunk or shard (:mod:`cytonet.infer.blocks`). Work units (blocks for OME-Zarr, whole sections for HDF5) are
dealt in a few stretches each to the workers of this job (:func:`assign`): ``worker = task_id * world_size +
rank`` over ``num_tasks * world_size`` workers, so torchrun or mpiexec ranks and SLURM array tasks combine. Workers do
not talk to each other: every unit has one owner, volumes are created once under a lock, and done markers
say what is finished. A rerun (any worker layout) skips done blocks, so a crash followed by a rerun gives the
same bytes as an uninterrupted run.

Per block, in three stages on three threads: read the read box at the model's pixel size and mark the output
pixels whose footprint is tissue (and in the region of interest); evaluate the encoder densely (or per
patch), apply the linear classifier and softmax; zero the pixels outside the mask, take the argmax area,
build the block's pyramid levels, write them, then the done marker.

Clean-up (``infer.cleanup``): once all blocks of a section (2D) or of a brain's sections (3D) are done, the
first worker to notice takes a lock and writes ``labels/cleaned``; the others see its markers and skip. A
marker names the sections cleaned together: a group whose sections are not all marked as cleaned together with
at least this run's group (a brain mapped with more sections than before) is cleaned again.

Entry points: :func:`run_infer`, :func:`load_classifier`, :func:`select_sections`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from cytonet import __version__
from cytonet.config import Config, config_from_dict, config_to_dict, save_config
from cytonet.data.patches import file_sha256, require_folder, write_json_atomic
from cytonet.data.sections import (
    WHITE_MATTER_ID,
    SectionReader,
    block_factor,
    block_sums,
    list_sections,
    open_section,
)
from cytonet.distributed import DistEnv
from cytonet.errors import ConfigError, InputError, OutputExistsError, some_of
from cytonet.hostmem import BufferPool, process_pool, reuse_freed_memory
from cytonet.infer import writers
from cytonet.infer.blocks import Block, Grid, assign, pyramid_mean, section_grid, worker_of
from cytonet.infer.cleanup import grid_axes, knn_cleanup, stack_cleanup
from cytonet.infer.dense import DenseEncoder, PerPatchEncoder, check_dense, dense_classifier_logits
from cytonet.infer.progress import BlockProgress
from cytonet.models.base import Encoder
from cytonet.models.build import MODEL_FILE, MODEL_FORMAT, build_encoder
from cytonet.models.heads import LinearClassifier
from cytonet.precision import autocast_dtype, check_precision, ieee_fp32
from cytonet.testhooks import read_hook

log = logging.getLogger(__name__)

#: Test hook: ``N:before`` / ``N:after`` makes the process exit (status 3) when writing its (N+1)-th block,
#: before its data or after its data but before its done marker.
CRASH_ENV = "CYTONET_INFER_CRASH"
#: The configuration of the last run that wrote to an output folder, in that folder.
CONFIG_FILE = "infer.config.yaml"
#: Label ids from here on are areas in a section store's labels layer (0 background, 1 white matter).
FIRST_AREA_ID = WHITE_MATTER_ID + 1


@dataclass
class Classifier:
    """A trained encoder and linear head, with what inference needs to know about them."""

    encoder: Encoder
    head: LinearClassifier
    area_ids: list[int]
    area_names: list[str]
    patch_size_px: int
    patch_pixel_size_um: float
    sha256: str
    path: Path
    sections: list[dict[str, Any]]
    """Sections of the patch store the model was trained on, with their split."""


def load_classifier(path: Path) -> Classifier:
    """Encoder and classifier from a probe or scratch run's ``model.pt`` (eval mode, fp32, CPU)."""
    if path.is_dir() or path.suffix != ".pt":
        path = path / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist: run `cytonet probe` (or scratch) to the end first (infer.model_from)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise InputError(f"{path}: cannot load the model ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise InputError(f"{path} is not a cytonet classifier file (format {MODEL_FORMAT})")
    mcfg = config_from_dict(state["config"]).model
    encoder = build_encoder(mcfg)
    head = LinearClassifier(encoder.out_dim, len(state["area_ids"]))
    try:
        encoder.load_state_dict(state["encoder"], strict=True)
        head.load_state_dict(state["classifier"], strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the model settings stored with them: {exc}") from None
    encoder.eval()
    head.eval()
    return Classifier(
        encoder=encoder,
        head=head,
        area_ids=[int(a) for a in state["area_ids"]],
        area_names=[str(n) for n in state["area_names"]],
        patch_size_px=mcfg.patch_size_px,
        patch_pixel_size_um=float(state["patch_pixel_size_um"]),
        sha256=file_sha256(path),
        path=path,
        sections=list(state.get("sections", [])),
    )


@dataclass(frozen=True)
class SectionJob:
    name: str
    path: str
    brain: str
    z_mm: float
    factor: int
    grid: Grid


def _section_name(reader: SectionReader) -> str:
    m = reader.meta
    return f"{m.brain}_s{m.section_index:04d}"  # the name patch extraction gives sections


def _open_sections(paths: list[Path], wanted: set[str]) -> dict[str, tuple[Path, SectionReader]]:
    """The stores at ``paths`` by section name. With ``wanted`` names, the stores whose file names are those
    names (as cytonet names stores) are opened first and the others only if one is missing: a worker of an
    array job mapping a few sections of a brain then opens those, not the thousands of stores beside them
    (every open reads metadata, a burden on a cluster's shared file system when hundreds of tasks start)."""
    found: dict[str, tuple[Path, SectionReader]] = {}

    def open_all(group: list[Path]) -> None:
        for path in group:
            r = open_section(path)
            name = _section_name(r)
            if name in found:
                raise InputError(f"two section stores hold section {name}: {found[name][0]} and {path}")
            found[name] = (path, r)

    first = [p for p in paths if p.stem in wanted]
    open_all(first)
    if not wanted or not wanted <= found.keys():
        opened = set(first)
        open_all([p for p in paths if p not in opened])
    return found


def select_sections(cfg: Config, clf: Classifier) -> list[SectionJob]:
    """The sections to map, sorted by name, with their output grids."""
    icfg = cfg.infer
    root = cfg.resolve_path(icfg.sections_dir or cfg.extract.sections_dir)
    paths = list_sections(root)
    if not paths:
        raise InputError(f"no section stores (.zarr / .h5) below {root} (infer.sections_dir)")
    wanted: set[str] = set()
    if icfg.sections:
        wanted = set(icfg.sections)
    elif icfg.splits and clf.sections:
        wanted = {s["name"] for s in clf.sections if s.get("split") in icfg.splits}
    found = _open_sections(paths, wanted)
    if icfg.sections:
        missing = [s for s in icfg.sections if s not in found]
        if missing:
            raise InputError(f"infer.sections names {missing}, not found below {root}; found: {sorted(found)}")
        names = list(icfg.sections)
    elif icfg.splits and clf.sections:
        names = [n for n in found if n in wanted]
        if not names:
            raise InputError(
                f"no section below {root} is in the splits {icfg.splits} recorded in {clf.path}; "
                "set infer.sections or infer.splits=[]"
            )
        missing = sorted(wanted - set(names))
        if missing:  # a partial copy of the sections would otherwise give a partial map, silently
            raise InputError(
                f"{len(missing)} of the {len(wanted)} sections of the splits {icfg.splits} recorded in {clf.path} "
                f"are not below {root}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; copy them "
                "there, or name the sections to map with infer.sections"
            )
    else:
        names = list(found)
    block = icfg.chunk_px * max(1, icfg.shard_chunks)
    jobs = []
    for name in sorted(set(names)):
        p, r = found[name]
        factor = block_factor(clf.patch_pixel_size_um, r.meta.pixel_size_um)
        if factor is None:
            raise InputError(
                f"{p}: pixel size {r.meta.pixel_size_um} um does not divide the model's {clf.patch_pixel_size_um} um "
                "(the model sees block means of an integer number of section pixels)"
            )
        h, w = r.meta.shape
        grid = section_grid(name, (h // factor, w // factor), icfg.stride_px, clf.patch_size_px, block)
        jobs.append(SectionJob(name, str(p), r.meta.brain, r.meta.z_mm, factor, grid))
    return jobs


def _read_px(job: SectionJob, block: Block) -> int:
    """Pixels of the block's read box."""
    y0, y1, x0, x1 = job.grid.read_box(block)
    return (y1 - y0) * (x1 - x0)


class BlockReader:
    """Stage 1 of 3 (the reader threads): a block's model input and the mask of its output pixels to predict.
    Needs no model, so the first block is read while the model is set up (:class:`BlockEvaluator`)."""

    def __init__(self, cfg: Config, device: torch.device, in_flight: int = 1, shared: bool = False) -> None:
        self.device = device
        self.tissue_max = cfg.infer.tissue_max_intensity
        self.roi = cfg.infer.roi
        self.band = cfg.extract.centerline_tolerance
        # For a CPU model: the decoded bytes (one per reader at a time) and the float inputs (``in_flight``:
        # read or queued, and the one the model is on, which :meth:`give_back` returns) in reused memory;
        # ``shared``: the process's pools, which outlive this reader (cytonet.hostmem).
        self._bytes = process_pool(torch.uint8, in_flight) if shared else BufferPool(in_flight, torch.uint8)
        self._floats = process_pool(torch.float32, in_flight) if shared else BufferPool(in_flight, torch.float32)
        self._out: dict[int, torch.Tensor] = {}  # inputs lent out and not yet given back (:meth:`release`)
        self._out_lock = threading.Lock()

    def tissue(self, img: np.ndarray, grid: Grid, block: Block, box: tuple[int, int, int, int]) -> np.ndarray:
        """(h, w) bool: output pixels whose footprint (its part inside the section) has a mean grey value below
        the threshold. Pixels outside the section read as 0 and add nothing to the sums."""
        s = grid.stride
        fy0, fx0 = block.y0 * s - box[0], block.x0 * s - box[2]
        ny, nx = block.y1 - block.y0, block.x1 - block.x0
        foot = img[fy0 : fy0 + ny * s, fx0 : fx0 + nx * s]
        sums = block_sums(foot, s)
        cy = np.clip(grid.model_shape[0] - (block.y0 + np.arange(ny)) * s, 0, s)
        cx = np.clip(grid.model_shape[1] - (block.x0 + np.arange(nx)) * s, 0, s)
        return sums < self.tissue_max * np.outer(cy, cx)

    def read(
        self, reader: SectionReader, job: SectionJob, block: Block, threads: int = 1
    ) -> tuple[torch.Tensor | None, np.ndarray]:
        """The model's input for the block's read box (None when nothing in it is to be predicted) and the
        (h, w) mask of the output pixels to predict: tissue and, unless ``infer.roi=tissue``, the region of
        interest at their patch centres (see ``InferConfig.roi``). ``threads`` decode strips of the box side by
        side.

        The input is the read box at the model's pixel size, as float32 in [0, 1] for a CPU model (converted
        here, off the model's thread, in memory reused from block to block: :meth:`give_back`) and as uint8
        for an accelerator (a quarter of the bytes to copy; converted on the device), decoded straight into
        page-locked memory for a CUDA device."""
        box = job.grid.read_box(block)
        shape = (box[1] - box[0], box[3] - box[2])
        cpu = self.device.type == "cpu"
        if cpu:
            buf = self._bytes.take(shape)
        else:
            pin = self.device.type == "cuda" and torch.cuda.is_available()
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        try:
            img = reader.read_image(job.factor, *box, threads=threads, out=buf.numpy())
            mask = self.tissue(img, job.grid, block, box)
            if mask.any() and self.roi != "tissue":
                mask &= self._roi(reader, job, block)
            if not mask.any():
                return None, mask
            if not cpu:
                return buf[None, None], mask
            x = self._floats.take((1, 1, *shape))
            with self._out_lock:
                self._out[x.data_ptr()] = x
            x.copy_(buf).div_(255.0)  # = buf.float() / 255, without a fresh 4-byte copy of the box
            return x, mask
        finally:
            self._bytes.give(buf)

    def reserve(self, todo: list[tuple[SectionJob, Block]], readers: int) -> None:
        """For a CPU model: allocate the buffers for ``todo``'s blocks now, on the calling thread (the main one:
        see :mod:`cytonet.hostmem`), each as large as its largest read box: ``readers`` for the bytes being
        decoded, and the pool's float inputs, as far as there are blocks to fill them."""
        if self.device.type != "cpu" or not todo:
            return
        largest = max(_read_px(job, b) for job, b in todo)
        self._bytes.reserve(largest, min(readers, len(todo)))
        self._floats.reserve(largest, len(todo))

    def give_back(self, x: torch.Tensor | None) -> None:
        """Return an input from :meth:`read` once the model is done with it, for the reads to come to reuse."""
        if x is not None:
            with self._out_lock:
                self._out.pop(x.data_ptr(), None)
            self._floats.give(x)

    def release(self) -> None:
        """Give back the inputs read and never given back (a run that failed or stopped with reads queued), so
        that a process pool does not lose them. The readers must have stopped, and nothing may use them."""
        with self._out_lock:
            out, self._out = list(self._out.values()), {}
        for x in out:
            self._floats.give(x)

    def _roi(self, reader: SectionReader, job: SectionJob, block: Block) -> np.ndarray:
        """(h, w) bool: the output pixels whose patch centre is in the region of interest."""
        layer = "labels" if self.roi == "cortex" else "depth"
        if not reader.has(layer):
            raise InputError(f"{reader.path} has no {layer} layer: infer.roi={self.roi} needs one (or use roi=tissue)")
        ys = job.grid.centre_section_px(block.y0, block.y1, job.factor)
        xs = job.grid.centre_section_px(block.x0, block.x1, job.factor)
        at = reader.read_points(layer, ys, xs)
        if self.roi == "cortex":
            return at >= FIRST_AREA_ID
        with np.errstate(invalid="ignore"):
            return np.abs(at - 0.5) <= self.band  # NaN (outside the cortex) compares False


class BlockEvaluator:
    """Stages 2 and 3 of 3: probabilities and labels of a block read by :class:`BlockReader` (see module doc)."""

    def __init__(self, cfg: Config, clf: Classifier, device: torch.device) -> None:
        icfg = cfg.infer
        check_precision(icfg.precision, device, "infer.precision")
        self.dtype = autocast_dtype(icfg.precision)
        if self.dtype is None:
            ieee_fp32(device)
        self.device = device
        net: nn.Module
        if icfg.mode == "dense":
            net = DenseEncoder(clf.encoder, clf.patch_size_px, icfg.stride_px, channels_last=icfg.channels_last)
        else:
            net = PerPatchEncoder(clf.encoder, clf.patch_size_px, icfg.stride_px, icfg.batch_size)
        self.net = net.to(device).eval()
        self.head = clf.head.to(device).eval()
        self.area_ids = np.asarray(clf.area_ids, dtype=np.uint16)
        self.levels = icfg.pyramid_levels

    @torch.no_grad()
    def forward(self, data: tuple[torch.Tensor | None, np.ndarray]) -> np.ndarray | None:
        """(K, h, w) float32 probabilities of a block read by :meth:`BlockReader.read`, None when its mask is
        empty. Stage 2 of 3 (the main thread: the only one that runs the model)."""
        x = data[0]
        if x is None:
            return None
        if x.dtype == torch.uint8:
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            feats = self.net(x)
        logits = dense_classifier_logits(feats.float(), self.head.fc)
        return torch.softmax(logits, dim=1)[0].cpu().numpy().astype(np.float32, copy=False)  # a device sync

    def finish(self, probs: np.ndarray | None, mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """(probability levels (K, h_l, w_l), label levels (h_l, w_l), predicted pixels): masked pixels zeroed,
        pyramid and argmax labels. Stage 3 of 3 (the writer thread, overlapping the next forward pass)."""
        if probs is None:
            probs = np.zeros((len(self.area_ids), *mask.shape), dtype=np.float32)
        else:
            probs *= mask[None]
        levels = pyramid_mean(probs, self.levels)
        return levels, [self._argmax(p) for p in levels], int(mask.sum())

    def _argmax(self, probs: np.ndarray) -> np.ndarray:
        lab = self.area_ids[np.argmax(probs, axis=0)]
        lab[probs.sum(axis=0) <= 0] = 0
        return lab


@dataclass
class InferResult:
    out: Path
    sections: list[str]
    written: int
    skipped: int
    cleaned: list[str]
    complete: bool
    """Every block of every section is done (by this worker or others)."""
    stage_seconds: dict[str, float]
    """Seconds this worker spent per stage: ``read``, ``evaluate`` (the model), ``write`` and ``wait`` (the
    model's thread waiting for a read or a write slot). Stages run on their own threads, so they overlap."""


def _crash_point() -> tuple[int, str] | None:
    """(block, ``before`` or ``after``) of the test hook :data:`CRASH_ENV`, None when it is off."""
    hook = read_hook(CRASH_ENV, r"([0-9]{1,9}):(before|after)", "<N>:before or <N>:after, such as 5:after")
    return None if hook is None else (int(hook[0]), hook[1])


def infer_settings(cfg: Config, clf: Classifier, job: SectionJob) -> dict[str, Any]:
    """What the output's content depends on: two runs may share a volume only when these agree."""
    icfg = cfg.infer
    settings: dict[str, Any] = {
        "format": icfg.format,
        "stride_px": icfg.stride_px,
        "chunk_px": icfg.chunk_px,
        "shard_chunks": icfg.shard_chunks,
        "pyramid_levels": icfg.pyramid_levels,
        "mode": icfg.mode,
        "precision": icfg.precision,
        "channels_last": icfg.channels_last,
        "tissue_max_intensity": icfg.tissue_max_intensity,
        "roi": icfg.roi,
        "centerline_tolerance": cfg.extract.centerline_tolerance if icfg.roi == "centerline" else None,
        "compression": icfg.compression,
        "cleanup": icfg.cleanup,
        "cleanup_k": icfg.cleanup_k,
        "cleanup_components": icfg.cleanup_components,
        "model_sha256": clf.sha256,
        "area_ids": clf.area_ids,
        "area_names": clf.area_names,
        "model_pixel_size_um": clf.patch_pixel_size_um,
        "output_pixel_size_um": clf.patch_pixel_size_um * icfg.stride_px,
        "section_factor": job.factor,
        "grid_shape": list(job.grid.shape),
        "label_images": icfg.label_images,
    }
    per_area = cleanup_per_area(cfg, clf)
    if per_area:  # only when set: the volumes written before the key existed stay valid
        settings["cleanup_components_per_area"] = {str(a): m for a, m in sorted(per_area.items())}
    return settings


def _attrs(cfg: Config, clf: Classifier, job: SectionJob, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "cytonet_version": __version__,
        "checkpoint": {"path": str(clf.path), "sha256": clf.sha256},
        "stride_px": cfg.infer.stride_px,
        "pixel_size_um": settings["output_pixel_size_um"],
        "model_pixel_size_um": clf.patch_pixel_size_um,
        "section": {"name": job.name, "store": job.path, "brain": job.brain, "z_mm": job.z_mm},
        "grid": "output pixel (i, j) covers model pixels [i*s, (i+1)*s) x [j*s, (j+1)*s); its patch is centred on "
        "model pixel (i*s + s//2, j*s + s//2); model pixel m covers section pixels [m*f, (m+1)*f); output pixel "
        "(i, j) lies at origin_um + (i, j) * pixel_size_um, the centre of its patch, in um with section pixel (y, x) "
        "centred at (y, x) * the section's pixel size",
        "origin_um": job.grid.patch_centre_um(0, clf.patch_pixel_size_um, job.factor),
        "config": config_to_dict(cfg),
    }


def _complete(out: Path, job: SectionJob, fmt: str) -> bool:
    if fmt == "hdf5":
        return (writers.state_dir(out, job.name) / "complete.json").is_file()
    done = writers.DoneMarkers(out, job.name).done_ids()
    return all(b.id in done for b in job.grid.blocks())


def check_out_folder(out: Path) -> None:
    """Refuse an output that is not a folder, or a folder that holds anything but inference's outputs (its
    state folder, or its config where the state is gone): a run, a patch store, the sections folder, a
    section, a folder of the user's files. Also with --overwrite, which removes only the sections' volumes."""
    require_folder(out, "infer")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and writers.STATE_DIR not in entries and CONFIG_FILE not in entries:
        raise OutputExistsError(
            f"infer: output folder {out} holds {some_of(entries)} but no inference outputs (no {writers.STATE_DIR}/ "
            f"or {CONFIG_FILE}); choose another --out (a new or empty folder, or an earlier inference's)"
        )


def run_infer(
    cfg: Config,
    env: DistEnv,
    out: Path | None = None,
    *,
    task_id: int = 0,
    num_tasks: int = 1,
    overwrite: bool = False,
    device: torch.device | None = None,
) -> InferResult:
    """Map this worker's share of the sections; clean up what became complete. See the module doc."""
    icfg = cfg.infer
    # before the reader and writer threads start (cytonet.hostmem); the input buffers then outlive the run
    reused = cfg.run.reuse_host_memory and reuse_freed_memory()
    out = out or cfg.resolve_path(icfg.out_dir)
    worker, n_workers = worker_of(task_id, num_tasks, env.rank, env.world_size)
    if overwrite and n_workers > 1:
        raise ConfigError(
            "--overwrite with several workers (ranks or array tasks) would let one worker delete another's output; "
            "remove the output folder first, or run once with one process and --overwrite"
        )
    check_out_folder(out)
    device = device or torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device, made explicit for set_device and the workers
            device = torch.device("cuda", torch.cuda.current_device())
        # Before any reader thread allocates pinned memory: the pinned allocator, like every CUDA call without
        # a device, uses the current device, and a rank with local rank > 0 would open a context on GPU 0.
        torch.cuda.set_device(device)
    check_precision(icfg.precision, device, "infer.precision")  # before --overwrite removes anything
    clf = load_classifier(cfg.resolve_path(icfg.model_from))
    check_model_settings(cfg, clf)  # before --overwrite removes anything, and before anything is written
    jobs = select_sections(cfg, clf)
    # The state folder first, before any volume: a worker starting beside this one then finds the folder empty
    # or with it, never with volumes alone (:func:`check_out_folder`).
    (out / writers.STATE_DIR).mkdir(parents=True, exist_ok=True)
    if overwrite:
        writers.remove_outputs(out, [job.name for job in jobs], icfg.format)

    units: list[tuple[SectionJob, list[Block]]]
    if icfg.format == "hdf5":
        units = [(job, job.grid.blocks()) for job in jobs]
    else:
        units = [(job, [b]) for job in jobs for b in job.grid.blocks()]
    mine = [units[i] for i in assign(len(units), worker, n_workers)]
    log.info(
        "infer: %d sections, %d units; worker %d of %d takes %d", len(jobs), len(units), worker, n_workers, len(mine)
    )
    done: dict[str, set[str]] = {}  # per section: its blocks marked done, one listing each
    skipped = 0
    todo: list[tuple[SectionJob, Block]] = []
    for job, blocks in mine:
        if job.name not in done:  # before trusting any done marker of this section
            writers.check_existing(out, job.name, infer_settings(cfg, clf, job))
            done[job.name] = writers.DoneMarkers(out, job.name).done_ids()
        for block in blocks:
            if block.id in done[job.name]:
                skipped += 1
            else:
                todo.append((job, block))
        complete_marker = writers.state_dir(out, job.name) / "complete.json"
        if icfg.format == "hdf5" and not any(j is job for j, _ in todo) and not complete_marker.is_file():
            write_json_atomic(complete_marker, {"worker": worker})  # a crash came between its last marker and this
    n_io = io_threads(cfg, device, env.local_world_size)
    stage1 = BlockReader(cfg, device, n_io + 2, shared=reused)
    stage1.reserve(todo, n_io)
    started = time.perf_counter()
    written, spent, mpix = _process(
        cfg,
        clf,
        out,
        _smallest_first(todo),
        stage1,
        lambda: BlockEvaluator(cfg, clf, device),
        {"worker": worker, "n_workers": n_workers, "task_id": task_id, "rank": env.rank},
        n_io,
    )
    seconds = time.perf_counter() - started
    if worker == 0 and (written or not (out / CONFIG_FILE).is_file()):
        # Once this worker's blocks are written into volumes of these settings: a run refused by the volumes
        # of another (one started at the same time into the same folder) must not leave its settings here. A
        # rerun that wrote nothing keeps the file (its outputs may be on a read-only mount).
        save_config(cfg, out, name=CONFIG_FILE)
    log.info(
        "infer: worker %d wrote %d blocks (%.0f MP of sections, %.1f MP/s), skipped %d done, in %.1f s",
        worker,
        written,
        mpix,
        mpix / seconds if seconds > 0 else 0.0,
        skipped,
        seconds,
    )
    # One look at the markers of the sections this worker had blocks of (with the rest of their brain for a 3D
    # clean-up): the last of their workers to finish cleans them up. Whether the whole output is complete is
    # asked of the others only if these are, and stops at the first that is not: every task of a large array
    # listed every section's markers.
    groups = {_cleanup_key(icfg.cleanup, j) for j, _ in mine}
    own = [j for j in jobs if _cleanup_key(icfg.cleanup, j) in groups]
    complete = {job.name: _complete(out, job, icfg.format) for job in own}
    cleaned = _cleanup_ready(cfg, out, own, clf, complete)
    whole = all(complete.values()) and all(_complete(out, j, icfg.format) for j in jobs if j.name not in complete)
    return InferResult(out, [j.name for j in jobs], written, skipped, cleaned, whole, spent)


def check_model_settings(cfg: Config, clf: Classifier) -> None:
    """Refuse ``infer`` settings that the loaded model cannot run with (the config alone cannot tell):

    - ``infer.stride_px`` at most the model's patch size: an output pixel's footprint (the stride x stride model
      pixels whose tissue decides whether it is predicted) must lie inside its patch's read box, which holds
      [i s + s//2 - P//2, ... + P) and so the footprint [i s, (i+1) s) exactly when s <= P;
    - ``infer.mode=dense``: an encoder that dense evaluation reproduces exactly (:func:`check_dense`)."""
    icfg = cfg.infer
    if icfg.stride_px > clf.patch_size_px:
        raise ConfigError(
            f"infer.stride_px={icfg.stride_px} is larger than the patch of the model {clf.path} "
            f"({clf.patch_size_px} px): use infer.stride_px <= {clf.patch_size_px} (predictions whose patches "
            "leave no gaps)"
        )
    if icfg.mode == "dense":
        check_dense(clf.encoder, clf.patch_size_px)
    cleanup_per_area(cfg, clf)


def cleanup_per_area(cfg: Config, clf: Classifier) -> dict[int, int]:
    """``infer.cleanup_components_per_area`` by area id (the names are the model's areas)."""
    ids = dict(zip(clf.area_names, clf.area_ids))
    unknown = sorted(set(cfg.infer.cleanup_components_per_area) - set(ids))
    if unknown:
        raise ConfigError(
            f"infer.cleanup_components_per_area names {unknown}, which are not areas of the model {clf.path} "
            f"(its areas: {', '.join(clf.area_names)})"
        )
    return {int(ids[name]): m for name, m in cfg.infer.cleanup_components_per_area.items()}


def _smallest_first(todo: list[tuple[SectionJob, Block]]) -> list[tuple[SectionJob, Block]]:
    """``todo`` with the block of its first section whose read box is smallest moved to the front. Every
    block waits for the first read, which nothing overlaps, so it is best made small: the edge blocks of a
    section are partial (the paper encoder's 2 x 2 blocks of bench_infer's section: the corner block reads
    half the pixels of the first). The rest keeps its order; a section's blocks stay together."""
    if not todo:
        return todo
    first = todo[0][0]
    k = min((i for i, (job, _) in enumerate(todo) if job is first), key=lambda i: _read_px(*todo[i]))
    return [todo[k], *todo[:k], *todo[k + 1 :]]


def _section_mpix(job: SectionJob, block: Block) -> float:
    """Section megapixels under a block's write box (its share of the section's pixels)."""
    edge = job.grid.stride * job.factor  # section pixels per output pixel, along each axis
    return (block.y1 - block.y0) * (block.x1 - block.x0) * edge * edge / 1e6


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: Python thread switch interval while inference runs (seconds; CPython's default is 0.005). The model's
#: thread needs the GIL between any two torch calls; with reader and writer threads running Python code, it
#: would wait up to a whole interval each time. bench_infer, 2 cores, one model thread: the model ran 12% (demo)
#: and 7% (medium) slower than alone at the default, 6% and 4% at 0.2 ms.
SWITCH_INTERVAL_S = 0.0002
#: Most reader threads the automatic ``infer.io_threads`` gives a worker with an accelerator.
MAX_AUTO_IO_THREADS = 32


def io_threads(cfg: Config, device: torch.device, local_world_size: int = 1) -> int:
    """Reader threads and writer threads of this worker (``infer.io_threads``; see there for 0).

    The automatic choice starts from this worker's share of the cores: the cores it may run on, divided among
    the node's workers when its affinity is the whole node (torchrun does not bind ranks; ``srun`` does).

    - On an accelerator: that share less two (the model's thread, and one for the system), at most 32. Reading
      is the bottleneck there: one reader decodes and masks 0.1-0.5 GP/s of full-resolution image
      (bench_infer, 2 cores), while the paper encoder needs about 1600 flop per section pixel, so a GPU
      sustaining 15 TFLOP/s maps about 10 GP/s.
    - On the CPU: a quarter of the share (at least one). The model's threads take the cores; one reader (and
      one writer) keeps about three of them busy: in bench_infer, reading, masking and writing take 0.3
      (paper encoder) to 0.7 (demo encoder) of the model's own time on one core. A single reader would leave
      most of a 64-core node waiting."""
    if cfg.infer.io_threads:
        return cfg.infer.io_threads
    node = os.cpu_count() or 1
    cores = usable_cores()
    if cores >= node:  # not bound to a subset: the node's workers share its cores
        cores //= max(1, local_world_size)
    if device.type == "cpu":
        return max(1, min(MAX_AUTO_IO_THREADS, cores // 4))
    return max(1, min(MAX_AUTO_IO_THREADS, cores - 2))


def _in_flight(writes: Iterable[tuple[Future[None], bool]]) -> int:
    """The writes of probabilities (the second item of each pair) not yet ended."""
    return sum(holds and not future.done() for future, holds in writes)


def _process(
    cfg: Config,
    clf: Classifier,
    out: Path,
    todo: list[tuple[SectionJob, Block]],
    stage1: BlockReader,
    make_evaluator: Callable[[], BlockEvaluator],
    who: dict[str, int],
    n_io: int,
) -> tuple[int, dict[str, float], float]:
    """Evaluate and write ``todo`` in order; returns the number of blocks written, the seconds per stage
    (:attr:`InferResult.stage_seconds`) and the section megapixels the written blocks cover.

    Three stages overlap (:class:`BlockReader`, :class:`BlockEvaluator`): ``n_io`` reader threads
    (:func:`io_threads`) read the read boxes and masks of the next ``n_io + 1`` blocks, not counting those found
    empty (the first block on all cores,
    before the others, while the main thread sets up the model with ``make_evaluator``: device, BatchNorm
    folding), the main thread runs the model on the current one
    (torch releases the GIL), writer threads zero the masked pixels of earlier ones, build their pyramids and
    labels, write them and then their done markers. Everything but the model is off the main thread, so the
    model never waits for numpy work. At most ``n_io`` writes of probabilities are in flight (one for HDF5,
    whose volumes are closed and marked complete once their last block is written), which bounds the memory in
    flight; empty blocks' writes queue behind them without holding up the model.
    """
    from collections import Counter, deque
    from concurrent.futures import ThreadPoolExecutor
    from threading import Lock, RLock

    fmt = cfg.infer.format
    n_write = 1 if fmt == "hdf5" else n_io
    crash = _crash_point()
    volumes: dict[str, writers.Volume] = {}
    readers: dict[str, SectionReader] = {}
    last_block = {job.name: i for i, (job, _) in enumerate(todo)}
    read_boxes: dict[str, list[tuple[int, int, int, int]]] = {}  # section -> its blocks' read boxes, in order
    for job, block in todo:
        read_boxes.setdefault(job.name, []).append(job.grid.read_box(block))
    count = 0
    lock = Lock()  # guards count, volumes and spent across writer threads
    spent = {"read": 0.0, "evaluate": 0.0, "write": 0.0, "wait": 0.0}  # seconds per stage (threads overlap)
    progress = BlockProgress(
        len(todo), sum(_section_mpix(job, b) for job, b in todo), bar=None if who["rank"] == 0 else False
    )

    # The read window (see the main loop below): the main thread pops finished reads, the readers' callbacks
    # submit new ones, and both open and close section readers.
    window = RLock()
    reading: Counter[str] = Counter()  # section -> reads submitted and not yet ended

    def read(
        reader: SectionReader, job: SectionJob, block: Block, threads: int = 1
    ) -> tuple[torch.Tensor | None, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return stage1.read(reader, job, block, threads)
        finally:
            with lock:
                spent["read"] += time.perf_counter() - t0
            with window:
                reading[job.name] -= 1

    def submit_read(job: SectionJob, block: Block, threads: int = 1) -> Future[tuple[torch.Tensor | None, np.ndarray]]:
        """Start reading a block (holding ``window``). Blocks come section by section: the readers of sections
        with no read going on are closed, so that a worker mapping thousands of sections holds a chunk cache or
        two, not thousands."""
        for name in [n for n in readers if reading[n] <= 0 and n != job.name]:
            readers.pop(name).close()
        if job.name not in readers:
            readers[job.name] = open_section(job.path)
            # The section's blocks read their context from their neighbours' chunks: decode each once.
            readers[job.name].expect_image(job.factor, read_boxes[job.name])
        reading[job.name] += 1
        return rpool.submit(read, readers[job.name], job, block, threads)

    def volume_of(job: SectionJob) -> writers.Volume:
        with lock:
            if job.name not in volumes:
                settings = infer_settings(cfg, clf, job)
                volumes[job.name] = writers.open_volume(out, job.grid, settings, _attrs(cfg, clf, job, settings))
            return volumes[job.name]

    def write(
        i: int, job: SectionJob, block: Block, probs: np.ndarray | None, mask: np.ndarray, seconds: float
    ) -> None:
        nonlocal count
        t0 = time.perf_counter()
        result = evaluator.finish(probs, mask)
        volume = volume_of(job)
        with lock:  # this is the (nth + 1)-th block this process writes, whichever thread writes it
            nth, count = count, count + 1
        if crash and nth == crash[0] and crash[1] == "before":
            os._exit(3)
        volume.write_block(block, result[0], result[1])
        if crash and nth == crash[0]:
            os._exit(3)
        info = {**who, "tissue_px": result[2], "seconds": round(seconds, 4)}
        writers.DoneMarkers(out, job.name).mark(block, info)
        progress.done(_section_mpix(job, block))
        if last_block[job.name] == i and fmt == "hdf5":  # one writer: every block of the section is written
            with lock:
                volumes.pop(job.name).close()
            write_json_atomic(writers.state_dir(out, job.name) / "complete.json", {"worker": who["worker"]})
        with lock:
            spent["write"] += time.perf_counter() - t0

    reads: deque[Future[tuple[torch.Tensor | None, np.ndarray]]] = deque()  # submitted, not yet taken
    writes: deque[tuple[Future[None], bool]] = deque()  # and whether it holds probabilities
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with (
            ThreadPoolExecutor(n_io, thread_name_prefix="infer-read") as rpool,
            ThreadPoolExecutor(n_write, thread_name_prefix="infer-write") as wpool,
        ):
            # Reads ahead: while block i is evaluated, the next n_io + 1 blocks that may hold tissue are read or
            # queued, so a reader that finishes finds the next block waiting instead of idling until the model
            # moves on (block sizes vary: a small block's forward pass hides less than a large read). A block
            # found empty holds no input, so its slot goes at once, from the reader's thread, to the next block:
            # otherwise a run of empty blocks (the background around a section) leaves the readers idle and the
            # model waiting for the block after it. Guarded by `window`: the main thread pops and the readers'
            # callbacks submit.
            ahead = 1  # the next block of todo to submit
            filling = False  # a read_ahead call is submitting (a read that ends at once calls back re-entrantly)
            stopped = False  # no more reads: the loop ended or failed

            def empty(future: Future[tuple[torch.Tensor | None, np.ndarray]]) -> bool:
                return future.done() and future.exception() is None and future.result()[0] is None

            def read_ahead(done: Future[tuple[torch.Tensor | None, np.ndarray]] | None = None) -> None:
                """Submit reads while the window has room: from the main thread (``done`` None) or as a read's
                callback. A callback that fails (a section store that does not open) leaves the block to the
                main thread's next call, which fails with the error, instead of losing it in a log line."""
                nonlocal ahead, filling
                with window:
                    if filling:
                        return
                    filling = True
                    try:
                        while not stopped and ahead < len(todo) and sum(not empty(f) for f in reads) <= n_io:
                            future = submit_read(*todo[ahead])
                            reads.append(future)
                            ahead += 1
                            future.add_done_callback(read_ahead)
                    except Exception:
                        if done is None:
                            raise
                    finally:
                        filling = False

            try:
                if todo:
                    # Everything waits for the first block: it is read on all of this worker's cores while this
                    # thread sets up the model, and the reads ahead start after it (the paper encoder's 9257^2 px
                    # read box: 0.3 s on one core).
                    job, block = todo[0]
                    with window:
                        reads.append(submit_read(job, block, usable_cores()))
                    evaluator = make_evaluator()
                for i, (job, block) in enumerate(todo):
                    t0 = time.perf_counter()
                    with window:
                        future = reads.popleft()
                    data = future.result()
                    read_ahead()
                    spent["wait"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    probs = evaluator.forward(data)
                    stage1.give_back(data[0])
                    seconds = time.perf_counter() - t0
                    spent["evaluate"] += seconds
                    t0 = time.perf_counter()
                    # At most n_write writes of probabilities in flight (the memory they hold); an empty block's
                    # write holds none, so the model goes on without waiting for a slot.
                    holds = probs is not None
                    while writes and (writes[0][0].done() or (holds and _in_flight(writes) >= n_write)):
                        writes.popleft()[0].result()  # re-raises a failed write
                    spent["wait"] += time.perf_counter() - t0
                    writes.append((wpool.submit(write, i, job, block, probs, data[1], seconds), holds))
                while writes:
                    writes.popleft()[0].result()
            finally:
                with window:
                    stopped = True  # a read ending during the shutdown submits nothing
    finally:
        sys.setswitchinterval(switch_interval)
        stage1.release()  # the readers have stopped (the pools were shut down)
        progress.close()
        for v in volumes.values():
            v.close()
        for r in readers.values():
            r.close()
    if count:
        log.info(
            "infer: %d reader and %d writer thread(s); stage seconds (overlapping): %s",
            n_io,
            n_write,
            ", ".join(f"{k} {v:.2f}" for k, v in spent.items()),
        )
    return count, spent, progress.mpix


def _cleanup_key(cleanup: str, job: SectionJob) -> str:
    """The group a section is cleaned up with: its brain for a 3D clean-up, else itself."""
    return job.brain if cleanup == "knn3d" else job.name


def _cleanup_ready(
    cfg: Config, out: Path, jobs: list[SectionJob], clf: Classifier, complete: dict[str, bool]
) -> list[str]:
    """Clean up every section (2D) or brain (3D) whose blocks are all done (``complete``, by section) and that
    nobody cleaned yet."""
    icfg = cfg.infer
    if icfg.cleanup == "none":
        return []
    groups: dict[str, list[SectionJob]] = {}
    for job in jobs:
        groups.setdefault(_cleanup_key(icfg.cleanup, job), []).append(job)
    done_here = []
    for key, members in sorted(groups.items()):
        if not all(complete[j.name] for j in members):
            continue
        names = sorted(j.name for j in members)

        def cleaned(members: list[SectionJob] = members, names: list[str] = names) -> bool:
            # Cleaned already if every member says it was cleaned together with (at least) all of this group: a
            # brain that gained a section since (an earlier run over fewer of its sections), or a crash between
            # two members' markers, is cleaned again, as one run over the whole group would have cleaned it; a
            # later run over some of a brain's sections keeps their brain-wide clean-up.
            return all(set(names) <= set(_cleaned_with(out, j.name) or ()) for j in members)

        if cleaned():  # looked at first without the lock, which a read-only mount cannot hold
            continue
        lock = out / writers.STATE_DIR / f"cleanup-{key}.lock"
        with writers.exclusive_lock(lock):
            if cleaned():  # by another worker meanwhile
                continue
            _clean_group(cfg, out, members, clf)
            for j in members:
                write_json_atomic(writers.state_dir(out, j.name) / "cleaned.json", {"group": key, "members": names})
        done_here += [j.name for j in members]
    return done_here


def _cleaned_with(out: Path, section: str) -> list[str] | None:
    """The sections cleaned together with ``section`` (its ``cleaned.json``), None if it was not cleaned (or
    by a version that did not record them)."""
    marker = writers.state_dir(out, section) / "cleaned.json"
    try:
        members = json.loads(marker.read_text()).get("members")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return [str(m) for m in members] if isinstance(members, list) else None


def _clean_group(cfg: Config, out: Path, members: list[SectionJob], clf: Classifier) -> None:
    icfg = cfg.infer
    pixel_um = clf.patch_pixel_size_um * icfg.stride_px
    vols = []
    for j in members:
        settings = infer_settings(cfg, clf, j)
        vols.append(writers.open_volume(out, j.grid, settings, _attrs(cfg, clf, j, settings)))
    try:
        maps = [v.read_labels("argmax", 0) for v in vols]
        per_area = cleanup_per_area(cfg, clf)
        if icfg.cleanup == "knn3d":
            z_um = [j.z_mm * 1000.0 for j in members]
            cleaned = stack_cleanup(maps, z_um, pixel_um, icfg.cleanup_k, icfg.cleanup_components, per_area)
        else:
            cleaned = [
                knn_cleanup(m, grid_axes(m.shape, pixel_um), icfg.cleanup_k, icfg.cleanup_components, per_area)
                for m in maps
            ]
        for v, lab in zip(vols, cleaned):
            v.write_labels("cleaned", label_pyramid(v, lab))
    finally:
        for v in vols:
            v.close()


def label_pyramid(vol: writers.Volume, labels: np.ndarray) -> list[np.ndarray]:
    """Levels of a cleaned label map: level l takes, per 2^l window, the most frequent non-zero label (the
    smallest id among ties). One area at a time, over the windows of its bounding box: memory of a few copies of
    the map, and time about that of a pass over it, whatever the number of areas."""
    out = [labels]
    boxes = ndimage.find_objects(labels)  # boxes[i - 1]: area i's rows and columns, None if absent
    for lvl in range(1, vol.levels):
        h, w = vol.grid.level_shape(lvl)
        f = 2**lvl
        padded = np.zeros((h * f, w * f), dtype=labels.dtype)
        padded[: labels.shape[0], : labels.shape[1]] = labels
        windows = padded.reshape(h, f, w, f)
        lab = np.zeros((h, w), dtype=labels.dtype)
        best = np.zeros((h, w), dtype=np.int32)
        for i, box in enumerate(boxes, start=1):  # ascending: a later id takes a window only with more pixels
            if box is None:
                continue
            rows, cols = slice(box[0].start // f, -(-box[0].stop // f)), slice(box[1].start // f, -(-box[1].stop // f))
            count = np.count_nonzero(windows[rows, :, cols, :] == i, axis=(1, 3))
            more = count > best[rows, cols]
            lab[rows, cols][more] = i
            best[rows, cols][more] = count[more]
        out.append(lab)
    return out
