"""Output grid, blocks with read and write boxes, and the split of blocks over workers.

Coordinates, per section (all integers):

- section pixels (the store's), model pixels (block means of ``factor`` section pixels: the pixel size the
  model was trained at) and output pixels (one per ``stride`` model pixels).
- Output pixel (i, j) covers model pixels [i s, (i+1) s) x [j s, (j+1) s); its prediction is the model's
  output on the P x P patch centred on model pixel (i s + s // 2, j s + s // 2), i.e. the patch whose top-left
  corner is (i s + s // 2 - P // 2, ...). The grid has ceil(H_model / s) x ceil(W_model / s) points.
- A block is one output chunk (or one shard when sharded): its *write box* is a rectangle of output pixels
  it owns at every pyramid level (chunk edges halve per level, so a block owns whole chunks everywhere), its
  *read box* the model pixels its patches cover: write box times the stride plus the receptive-field context.

Block ids are ``"<by>.<bx>"`` within a section; the global order is (section name, by, bx). Work units are
blocks (zarr output: one writer per chunk or shard) or whole sections (HDF5: one writer per file), dealt to W
workers in a few stretches each (:func:`assign`), where worker = task * world_size + rank and W = num_tasks *
world_size.

Entry points: :class:`Grid`, :class:`Block`, :func:`section_grid`, :func:`assign`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    """One block of one section's output grid."""

    section: str
    by: int
    bx: int
    y0: int
    y1: int
    x0: int
    x1: int
    """Write box at full resolution: output rows [y0, y1), columns [x0, x1)."""

    @property
    def id(self) -> str:
        return f"{self.by}.{self.bx}"

    @property
    def key(self) -> str:
        """Globally unique name: ``<section>/<by>.<bx>``."""
        return f"{self.section}/{self.id}"

    def at_level(self, level: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """Write box (y0, y1, x0, x1) at pyramid ``level`` of an array whose level shape is ``shape``."""
        f = 2**level
        return self.y0 // f, min(shape[0], -(-self.y1 // f)), self.x0 // f, min(shape[1], -(-self.x1 // f))


@dataclass(frozen=True)
class Grid:
    """The output grid of one section."""

    section: str
    model_shape: tuple[int, int]
    """(H, W) of the section in model pixels."""
    stride: int
    patch: int
    block: int
    """Block edge in output pixels (chunk, or shard, edge)."""

    @property
    def shape(self) -> tuple[int, int]:
        """Output pixels (rows, columns) at full resolution."""
        return -(-self.model_shape[0] // self.stride), -(-self.model_shape[1] // self.stride)

    def level_shape(self, level: int) -> tuple[int, int]:
        f = 2**level
        return -(-self.shape[0] // f), -(-self.shape[1] // f)

    @property
    def n_blocks(self) -> tuple[int, int]:
        return -(-self.shape[0] // self.block), -(-self.shape[1] // self.block)

    def blocks(self) -> list[Block]:
        """Every block in (by, bx) order."""
        h, w = self.shape
        nby, nbx = self.n_blocks
        b = self.block
        return [
            Block(self.section, by, bx, by * b, min(h, (by + 1) * b), bx * b, min(w, (bx + 1) * b))
            for by in range(nby)
            for bx in range(nbx)
        ]

    def first_patch_corner(self, i: int) -> int:
        """Model-pixel coordinate of the top-left corner of output pixel i's patch (along either axis)."""
        return i * self.stride + self.stride // 2 - self.patch // 2

    def read_box(self, block: Block) -> tuple[int, int, int, int]:
        """Model pixels (y0, y1, x0, x1) whose patches cover ``block``; may extend beyond the section."""
        ry0, rx0 = self.first_patch_corner(block.y0), self.first_patch_corner(block.x0)
        ry1 = self.first_patch_corner(block.y1 - 1) + self.patch
        rx1 = self.first_patch_corner(block.x1 - 1) + self.patch
        return ry0, ry1, rx0, rx1

    def patch_centre_um(self, i: int, model_pixel_um: float, factor: int) -> float:
        """Position (um, along either axis) of the centre of output pixel i's patch in the section's frame, where
        section pixel j's centre lies at j times the section's pixel size (NGFF's convention for an image with
        no translation). The patch covers section pixels [c f, (c + P) f) with c = :meth:`first_patch_corner`
        and f = ``factor`` (``model_pixel_um`` / f: the section's pixel size); its centre is their mean
        position, (c + P/2) * model_pixel_um - (section pixel size) / 2."""
        return (self.first_patch_corner(i) + self.patch / 2) * model_pixel_um - model_pixel_um / factor / 2

    def centre_px(self, i: int) -> int:
        """Model pixel at the centre of output pixel i's patch."""
        return i * self.stride + self.stride // 2

    def centre_section_px(self, lo: int, hi: int, factor: int) -> np.ndarray:
        """Section pixels (along either axis) at the patch centres of output pixels lo..hi-1: the centre model
        pixel's middle section pixel, where masks and ground truth are looked up."""
        return (np.arange(lo, hi) * self.stride + self.stride // 2) * factor + factor // 2


def section_grid(section: str, model_shape: tuple[int, int], stride: int, patch: int, block: int) -> Grid:
    if min(model_shape) < 1:
        raise ValueError(f"section {section}: empty at the model's pixel size {model_shape}")
    return Grid(section, model_shape, stride, patch, block)


#: Contiguous runs of units each worker takes (:func:`assign`).
RUNS_PER_WORKER = 4


def assign(n_units: int, worker: int, n_workers: int) -> list[int]:
    """Indices of the units this worker owns. The units (a section's blocks one after the other, section after
    section) are cut into ``RUNS_PER_WORKER`` runs per worker of sizes within one, dealt round robin: a worker
    maps a few stretches of neighbouring blocks (each section it touches is opened, and its context chunks
    decoded, by few workers; dealt one by one, every task of a large array touched nearly every section),
    spread over the sections so that stretches of background and of tissue even out."""
    if not 0 <= worker < n_workers:
        raise ValueError(f"worker {worker} is outside 0..{n_workers - 1}")
    runs = n_workers * RUNS_PER_WORKER
    return [i for r in range(worker, runs, n_workers) for i in range(r * n_units // runs, (r + 1) * n_units // runs)]


def worker_of(task_id: int, num_tasks: int, rank: int, world_size: int) -> tuple[int, int]:
    """(worker index, number of workers) of rank ``rank`` in array task ``task_id``."""
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task id {task_id} is outside 0..{num_tasks - 1}")
    return task_id * world_size + rank, num_tasks * world_size


def _pool2(x: np.ndarray) -> np.ndarray:
    """Sums over 2 x 2 windows of the last two axes (both even), as four strided adds."""
    return x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]


def pyramid_mean(a: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level 0 = ``a`` (C, h, w); level l = means over 2^l x 2^l windows, partial windows at the far edges
    averaging only the pixels they hold (so a block's levels equal those of the whole array cut to the block,
    because blocks start at multiples of 2^(levels-1)). Computed in float64, level by level."""
    out = [a]
    cur = a.astype(np.float64)
    weight: np.ndarray | None = None  # pixels per window so far; None while every window is full
    for _ in range(1, levels):
        ph, pw = cur.shape[-2] % 2, cur.shape[-1] % 2
        if weight is None and not (ph or pw):
            cur = _pool2(cur) / 4.0  # the common case: whole windows only
        else:
            if weight is None:
                weight = np.ones(cur.shape[-2:], dtype=np.float64)
            cur = np.pad(cur * weight, [(0, 0)] * (cur.ndim - 2) + [(0, ph), (0, pw)])
            weight = _pool2(np.pad(weight, [(0, ph), (0, pw)]))
            cur = _pool2(cur) / weight
        out.append(cur.astype(a.dtype))
    return out
