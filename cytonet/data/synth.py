"""Synthetic brains: serial sections of cell-body stained cortex with known areas, depth and coordinates.

The model has three parts (geometry in :mod:`cytonet.data.synth_geometry`):

1. **Anatomy.** One reference brain shared by all brains: an ellipse-like outline with sulci that are slits
   running inwards, a cortical ribbon of thickness ``T`` (2-4 mm) under the pial surface, white matter inside,
   and ``K`` areas that each own one stretch of the ribbon whose borders drift smoothly from section to
   section. Each brain sees the reference through its own smooth transform (rotation, scale, tilt of the
   cutting plane, low-frequency warp), so the stored reference coordinates of one anatomical point agree
   between brains.
2. **Cytoarchitecture.** Each area has a laminar profile over six layers (:class:`AreaProfiles`): relative
   thickness, cell density, cell size (and its trend within the layer), the mix of pyramidal, fusiform and
   granular cells, their elongation and spread of orientation around the ribbon normal, and staining
   darkness. Profiles are drawn around a typical isocortex from two traits (granularity: layers II
   and IV; pyramidality: size of the layer III and V pyramids) plus per-layer noise; neighbouring areas often
   differ only subtly. Densities are rescaled so that every area has the same expected amount of stained cell
   body per unit of ribbon: areas differ in how cells are distributed across layers, never in overall
   brightness alone.
3. **Rendering.** Cells are individual dark blobs (rounded granule cells, triangular pyramids with an apical
   dendrite pointing to the pial surface, spindle-shaped fusiform cells, small glia, pale vessel profiles)
   drawn with anti-aliased coverage on light neuropil with a fibrous texture, radial cell columns, uneven
   staining and pixel noise; white matter is pale with sparse glia; the background is near white. At coarse
   pixel sizes cells shrink to a few pixels (their integrated darkness is kept) and the laminar density
   pattern carries the signal. Brains differ in stain level, contrast, noise, cell size and density scale,
   cortical thickness and distortion, so an unseen brain is harder than an unseen section.

Sections are generated one band of ``chunk_px`` rows (at most ~4096 columns wide) at a time and never held
whole in memory. Every random number is tied to space, not to the band: cells are drawn per 1 mm tile from
a generator seeded by (seed, brain, section, tile row, tile column), and a band draws the cells of every tile
that can reach it; textures and pixel noise are periodic tiles indexed by the global pixel position; a
pixel's value is elementwise arithmetic on its own position (lookup tables instead of transcendental
functions), and the darkness of overlapping cells is summed in fixed point, so in any order. The bytes
written are therefore the same for any ``chunk_px`` and any number of worker processes.

Stored ground truth: ``labels`` (0 background, 1 white matter, 2..K+1 the areas named by
:func:`label_table`), ``depth`` (0 at the pial surface, 1 at the white matter, NaN elsewhere; steps of
1/4096) and ``coords`` (reference coordinates in mm, rounded to a power-of-two step of at most half a pixel).

Entry points: :func:`generate_dataset` (all brains and sections into section stores; with ``overwrite`` it
also deletes the synthetic stores of an earlier run that it does not write, :func:`stale_outputs`, and refuses
a folder holding anything else), :func:`generate_section` (one store), :class:`SectionGenerator` (any block of a section in memory), :func:`label_table`,
:func:`area_profiles`, :func:`render_preview` (PNG with an area overlay and legend), and from the geometry
module :func:`brain_params`, :func:`brain_to_reference`, :func:`reference_to_brain` and
:func:`brain_pixel_of_reference`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from cytonet.config import SynthConfig
from cytonet.data.patches import remove_path
from cytonet.data.sections import (
    BACKEND_OF_SUFFIX,
    BACKGROUND_ID,
    WHITE_MATTER_ID,
    SectionMeta,
    create_section,
    open_section,
    section_filename,
)
from cytonet.data.synth_geometry import (
    GRID_MM,
    THICKNESS_VARIATION,
    BrainParams,
    NodeFields,
    ReferenceAnatomy,
    brain_name,
    brain_params,
    brain_pixel_of_reference,
    brain_to_reference,
    image_shape,
    reference_anatomy,
    reference_to_brain,
    section_nodes,
    section_z_mm,
)
from cytonet.errors import InputError, OutputExistsError, some_of
from cytonet.workers import worker_pool

__all__ = [
    "AreaProfiles",
    "SectionGenerator",
    "area_profiles",
    "brain_params",
    "brain_pixel_of_reference",
    "brain_to_reference",
    "generate_dataset",
    "generate_section",
    "label_table",
    "planned_section_paths",
    "reference_to_brain",
    "render_preview",
    "section_z_mm",
    "stale_outputs",
]

log = logging.getLogger(__name__)

N_LAYERS = 6
LAYER_NAMES = ("I", "II", "III", "IV", "V", "VI")
#: Edge of the square tiles (mm) from which cells are drawn, each with its own random generator.
CELL_TILE_MM = 1.0
#: Cell densities are given for sections of this thickness; thicker sections show proportionally more profiles.
REFERENCE_SECTION_UM = 20.0
#: Fixed-point scale of optical densities (sums of integers are exact in any order).
OD_SCALE = 4096
#: Edge (px) of the periodic texture tiles, and the number of fibre orientations.
TEXTURE_PX = 256
N_ORIENT = 8
#: Shape of the periodic pixel-noise tile (coprime sides, so the pattern repeats only every ~8 mm at 8 um/px).
_NOISE_ROWS, _NOISE_COLS = 1021, 1019

GRANULE, PYRAMID, FUSIFORM, GLIA, VESSEL = range(5)

Compression = Literal["blosc-zstd", "none"]

_TAG_PROFILES = 404
_TAG_CELLS = 505
_TAG_VESSELS = 506
_TAG_NOISE = 606
_TAG_TEXTURE = 707

# A typical isocortex, layers I-VI: relative thickness, profiles per mm^2 (20 um section), soma radius (um),
# relative size increase from the top to the bottom of the layer, pyramidal and fusiform fractions, and
# optical density of a cell body (cells ~30-60 grey on neuropil ~170).
_BASE_THICKNESS = np.array([0.08, 0.09, 0.27, 0.11, 0.21, 0.24])
_BASE_DENSITY = np.array([150.0, 2800.0, 1500.0, 3300.0, 1050.0, 1650.0])
_BASE_RADIUS = np.array([4.0, 5.0, 6.8, 4.6, 9.0, 6.3])
_BASE_GRADIENT = np.array([0.0, 0.1, 0.6, 0.0, 0.2, -0.1])
_BASE_PYRAMID = np.array([0.0, 0.3, 0.85, 0.15, 0.85, 0.35])
_BASE_FUSIFORM = np.array([0.0, 0.0, 0.03, 0.0, 0.05, 0.45])
_BASE_OD = np.array([1.3, 1.7, 1.55, 1.75, 1.65, 1.5])
_BASE_ELONGATION = np.array([1.35, 1.2, 1.25, 1.15, 1.3, 1.45])
_BASE_ORIENTATION_SD = np.array([30.0, 15.0, 10.0, 20.0, 8.0, 15.0])
_WM_GLIA_DENSITY = 280.0
#: Largest factor by which radial cell columns raise the local density.
_COLUMN_MAX = 1.35
_VESSEL_DENSITY = 14.0


def label_table(n_areas: int) -> dict[int, str]:
    """Label id -> name: 0 background, 1 white_matter, 2..K+1 areas ``A01``, ``A02``, ..."""
    width = max(2, len(str(n_areas)))
    table = {BACKGROUND_ID: "background", WHITE_MATTER_ID: "white_matter"}
    table.update({2 + k: f"A{k + 1:0{width}d}" for k in range(n_areas)})
    return table


# ----------------------------------------------------------------------------------------------------------
# Laminar profiles


@dataclass(frozen=True)
class AreaProfiles:
    """Laminar profile of every area; arrays are (K, 6) over layers I-VI unless noted."""

    bounds: np.ndarray
    """(K, 7) cortical depth of the layer borders, 0 (pial) ... 1 (white matter)."""
    density: np.ndarray
    """Cell profiles per mm^2 in a 20 um section."""
    radius_um: np.ndarray
    """Mean soma radius."""
    size_gradient: np.ndarray
    """Relative size change from the top to the bottom of the layer (layer III pyramids grow with depth)."""
    p_pyramid: np.ndarray
    """Fraction of pyramidal cells."""
    p_fusiform: np.ndarray
    """Fraction of fusiform (spindle) cells; the rest are granule-like round cells."""
    od: np.ndarray
    """Optical density of a cell body (darkness of the stain)."""
    elongation: np.ndarray
    """Mean aspect ratio (long / short axis) of the granule-like cells (randomly oriented)."""
    orientation_sd_deg: np.ndarray
    """Spread of the axis of pyramidal cells around the radial direction (fusiform cells: 1.5 times this)."""
    granularity: np.ndarray
    """(K,) trait in [0, 1]: thickness and density of layers II and IV."""
    pyramidality: np.ndarray
    """(K,) trait in [0, 1]: size of the layer III and V pyramids."""

    def ink(self) -> np.ndarray:
        """(K,) expected fraction of ribbon darkened by cell bodies (density x area x (1 - e^-od)), per area."""
        thick = np.diff(self.bounds, axis=1)
        # Soma area relative to pi r^2: pyramids 1.15 x 0.95 x 0.575, fusiform 1.7 x 0.6, granule-like 1.
        shape = 0.628 * self.p_pyramid + 1.02 * self.p_fusiform + (1.0 - self.p_pyramid - self.p_fusiform)
        area_mm2 = math.pi * (self.radius_um * 1e-3) ** 2 * shape * (1.0 + self.size_gradient**2 / 12.0)
        return np.sum(thick * self.density * area_mm2 * (1.0 - np.exp(-self.od)), axis=1)


def area_profiles(cfg: SynthConfig) -> AreaProfiles:
    """The laminar profiles of the ``cfg.n_areas`` areas (a function of the seed; shared by all brains)."""
    rng = np.random.default_rng([cfg.seed, _TAG_PROFILES])
    k = cfg.n_areas
    gran = np.empty(k)
    pyr = np.empty(k)
    for i in range(k):
        if i > 0 and rng.random() < 0.5:  # a subtle neighbour: traits close to the previous area's
            gran[i] = np.clip(gran[i - 1] + rng.normal(0, 0.12), 0, 1)
            pyr[i] = np.clip(pyr[i - 1] + rng.normal(0, 0.12), 0, 1)
        else:
            gran[i], pyr[i] = rng.uniform(0, 1, 2)
    g = gran[:, None]
    thick = _BASE_THICKNESS * np.exp(rng.normal(0, 0.15, (k, N_LAYERS)))
    thick[:, 1] *= 0.6 + 0.8 * gran
    thick[:, 3] *= 0.15 + 1.5 * gran
    thick[:, 4] *= 0.8 + 0.5 * pyr
    thick /= thick.sum(axis=1, keepdims=True)
    bounds = np.concatenate([np.zeros((k, 1)), np.cumsum(thick, axis=1)], axis=1)
    bounds[:, -1] = 1.0
    density = _BASE_DENSITY * np.exp(rng.normal(0, 0.15, (k, N_LAYERS)))
    density[:, [1, 3]] *= 0.55 + 0.9 * g
    density[:, 4] *= 1.15 - 0.35 * pyr
    radius = _BASE_RADIUS * np.exp(rng.normal(0, 0.08, (k, N_LAYERS)))
    radius[:, 2] *= 0.85 + 0.35 * pyr
    radius[:, 4] *= 0.8 + 0.7 * pyr
    gradient = _BASE_GRADIENT + rng.normal(0, 0.05, (k, N_LAYERS))
    p_pyr = np.clip(_BASE_PYRAMID + rng.normal(0, 0.05, (k, N_LAYERS)), 0, 0.95) * (_BASE_PYRAMID > 0)
    p_fus = np.clip(_BASE_FUSIFORM + rng.normal(0, 0.03, (k, N_LAYERS)), 0, 0.6) * (_BASE_FUSIFORM > 0)
    p_pyr = np.minimum(p_pyr, 1.0 - p_fus)
    od = _BASE_OD * np.exp(rng.normal(0, 0.06, (k, N_LAYERS)))
    elongation = 1.0 + (_BASE_ELONGATION - 1.0) * np.exp(rng.normal(0, 0.25, (k, N_LAYERS)))
    orientation = _BASE_ORIENTATION_SD * np.exp(rng.normal(0, 0.2, (k, N_LAYERS)))
    fields = dict(
        bounds=bounds,
        density=density,
        radius_um=radius,
        size_gradient=gradient,
        p_pyramid=p_pyr,
        p_fusiform=p_fus,
        od=od,
        elongation=elongation,
        orientation_sd_deg=orientation,
        granularity=gran,
        pyramidality=pyr,
    )
    # Same expected stained-cell content per unit of ribbon in every area: rescale each area's densities.
    ink = AreaProfiles(**fields).ink()
    fields["density"] = density * (ink.mean() / ink)[:, None]
    return AreaProfiles(**fields)


# ----------------------------------------------------------------------------------------------------------
# Cells


@dataclass
class _Cells:
    """Cells as arrays of equal length (structure of arrays)."""

    cy: np.ndarray
    """Centre row in pixels (fractional; pixel i covers [i - 0.5, i + 0.5))."""
    cx: np.ndarray
    wy: np.ndarray
    """Centre pixel (row) of the window that holds the cell (the soma centre, shifted along the dendrite)."""
    wx: np.ndarray
    a_um: np.ndarray
    """Half length along the axis."""
    b_um: np.ndarray
    """Half width across the axis (at the base, for pyramids)."""
    apical_um: np.ndarray
    """Length of the apical dendrite beyond the apex (pyramids; 0 otherwise)."""
    ax: np.ndarray
    """Unit axis (x, y) in image coordinates; for pyramids it points from the base to the apex."""
    ay: np.ndarray
    kind: np.ndarray
    od: np.ndarray
    half_px: np.ndarray
    """Half edge of the square window that holds the cell, px; 0 for cells drawn as a four-pixel splat."""
    pyramid: np.ndarray
    """True for pyramidal cells (drawn with a tapered body and a dendrite)."""
    irregular: np.ndarray
    """(n, 4) amplitudes of cos 2phi, sin 2phi, cos 3phi, sin 3phi in the cell's outline radius."""

    @staticmethod
    def concat(parts: list[_Cells]) -> _Cells:
        names = list(_Cells.__dataclass_fields__)
        if not parts:
            return _Cells.empty()
        return _Cells(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})

    @staticmethod
    def empty() -> _Cells:
        return _Cells(**{n: np.zeros((0, 4) if n == "irregular" else 0) for n in _Cells.__dataclass_fields__})

    def take(self, idx: np.ndarray) -> _Cells:
        return _Cells(**{n: getattr(self, n)[idx] for n in _Cells.__dataclass_fields__})

    def __len__(self) -> int:
        return int(self.cy.shape[0])


def _texture_tiles(rng: np.random.Generator, pixel_um: float) -> np.ndarray:
    """Periodic fibre textures (N_ORIENT, TEXTURE_PX, TEXTURE_PX) with fibres at angles i * 180 / N_ORIENT
    degrees in image coordinates (x right, y down), unit variance: white noise filtered by an elongated
    Gaussian in Fourier space."""
    n = TEXTURE_PX
    along = max(40.0 / pixel_um, 1.0)
    across = max(1.5 / pixel_um, 0.6)
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    tiles = np.empty((N_ORIENT, n, n))
    for i in range(N_ORIENT):
        ang = math.pi * i / N_ORIENT
        ex, ey = math.cos(ang), math.sin(ang)
        f_along = fx * ex + fy * ey
        f_across = -fx * ey + fy * ex
        transfer = np.exp(-2 * math.pi**2 * ((along * f_along) ** 2 + (across * f_across) ** 2))
        t = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * transfer))
        tiles[i] = t / max(float(t.std()), 1e-9)
    return tiles.astype(np.float32)


_SHARED: dict[tuple[Any, ...], tuple[ReferenceAnatomy, AreaProfiles]] = {}


def _shared_model(cfg: SynthConfig) -> tuple[ReferenceAnatomy, AreaProfiles]:
    """Reference anatomy and area profiles of ``cfg``, computed once per process (they are the same for every
    section of a dataset)."""
    key = dataclasses.astuple(cfg)
    if key not in _SHARED:
        if len(_SHARED) >= 4:
            _SHARED.clear()
        _SHARED[key] = (reference_anatomy(cfg), area_profiles(cfg))
    return _SHARED[key]


class SectionGenerator:
    """Renders one section block by block: ``render(y0, y1, x0, x1)`` returns the four layers of that box.

    Holds the node-grid geometry, texture tiles and a cache of cells by tile row; memory is bounded by the
    block size and one band of tiles, not by the section size.
    """

    def __init__(self, cfg: SynthConfig, brain_index: int, section_index: int) -> None:
        self.cfg = cfg
        self.brain_index = brain_index
        self.section_index = section_index
        self.shape = image_shape(cfg)
        self.px_um = cfg.pixel_size_um
        self.px_mm = cfg.pixel_size_um / 1000.0
        self.brain: BrainParams = brain_params(cfg, brain_index)
        self.anatomy, self.profiles = _shared_model(cfg)
        self.nodes: NodeFields = section_nodes(cfg, self.anatomy, self.brain, section_index)
        key = (cfg.seed, brain_index, section_index)
        self._key = key
        rng = np.random.default_rng([*key, _TAG_TEXTURE])
        self.textures = _texture_tiles(rng, self.px_um).ravel()
        nf = self.nodes.fields
        # Fibres run radially (along the depth gradient) except in layer I, where they run along the surface.
        layer_one = (nf["d"] >= 0) & (nf["d"] < 0.08 * nf["thickness"])
        angle = np.mod(np.arctan2(nf["gy"], nf["gx"]) + np.where(layer_one, 0.5 * math.pi, 0.0), math.pi)
        orient = np.mod(np.floor(angle / (math.pi / N_ORIENT) + 0.5), N_ORIENT).astype(np.int64)
        self._orient = (orient * TEXTURE_PX * TEXTURE_PX).ravel()  # offset of each node's tile in ``textures``
        self._noise = (rng.standard_normal(_NOISE_ROWS * _NOISE_COLS) * self.brain.noise_sd).astype(np.float32)
        # exp(-od) for od = i / OD_SCALE - 1, i = 0 .. 10 * OD_SCALE (od in [-1, 9]).
        self._transmission = np.exp(-(np.arange(10 * OD_SCALE + 1) / OD_SCALE - 1.0)).astype(np.float32)
        self._section_factor = (cfg.section_thickness_um + 10.0) / (REFERENCE_SECTION_UM + 10.0)
        self._lambda_max = (
            float(self.profiles.density.max()) * self._section_factor * self.brain.density_scale * _COLUMN_MAX
        )
        #: Quantisation step of the stored reference coordinates: the power of two at or below half a pixel.
        self.coords_step_mm = 2.0 ** math.floor(math.log2(self.px_mm / 2.0))
        self._blur_um = max(self.px_um, 1.2)  # optical blur: about a micrometre, or the pixel
        self._lambda_wm = _WM_GLIA_DENSITY * self._section_factor * self.brain.density_scale
        self._t_max = self.brain.thickness_mm * (1.0 + THICKNESS_VARIATION)
        self._stain_offset = float(np.random.default_rng([*key, _TAG_NOISE]).normal(0, 2.0))
        self._tile_rows: dict[int, _Cells] = {}
        # Largest half extent of any cell window: the biggest soma (size noise is clipped at 3 sd) with half of
        # its dendrite, or a vessel. Cells are gathered from tile rows this far beyond a block.
        prof = self.profiles
        max_radius = float(np.max(prof.radius_um * (1.0 + 0.5 * np.abs(prof.size_gradient))))
        self._extent_max_um = max(30.0, 2.3 * max_radius * self.brain.cell_scale * math.exp(0.18 * 3))
        self._margin_mm = (self._extent_max_um + 3 * self.px_um) / 1000.0

    # -- cells ------------------------------------------------------------------------------------------
    def _texture_at(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """Fibre texture at pixels (iy, ix) (broadcastable integer arrays): the tile whose fibres run closest to
        the local depth gradient at the nearest node (radial fibres in cortex and gyral white matter)."""
        ny, nx = self.nodes.shape
        ni = np.minimum(np.floor((iy + 0.5) * (self.px_mm / GRID_MM) + 0.5).astype(np.int64), ny - 1)
        nj = np.minimum(np.floor((ix + 0.5) * (self.px_mm / GRID_MM) + 0.5).astype(np.int64), nx - 1)
        tile = np.take(self._orient, ni * nx + nj)
        return np.take(self.textures, tile + (iy % TEXTURE_PX) * TEXTURE_PX + ix % TEXTURE_PX)

    def _row_cells(self, row: int) -> _Cells:
        """The cells of tile row ``row``: each tile's random numbers come from its own generator, seeded by
        (seed, brain, section, row, col); the row is then processed as a whole (always the same arrays)."""
        h_mm, w_mm = self.shape[0] * self.px_mm, self.shape[1] * self.px_mm
        n_cols = math.ceil(w_mm / CELL_TILE_MM)
        y_lo = row * CELL_TILE_MM
        # Skip tiles far outside the brain (their 3 x 3 probe points are all > 1 tile outside).
        grid = (np.arange(3) * 0.5 * CELL_TILE_MM)[None, :, None]
        py = np.broadcast_to(y_lo + grid, (n_cols, 3, 3))
        px = np.broadcast_to(
            (np.arange(n_cols) * CELL_TILE_MM)[:, None, None] + grid.transpose(0, 2, 1), (n_cols, 3, 3)
        )
        probe = self.nodes.sample_points(py.ravel(), px.ravel(), ("d",))["d"].reshape(n_cols, 9)
        cols = [c for c in range(n_cols) if float(probe[c].max()) > -CELL_TILE_MM]
        # Candidates are thinned to the local density; a tile that cannot hold cortex (every point of it is
        # more than the thickest cortex from the pial surface: d changes by at most 0.36 mm between a point and
        # its nearest probe) needs only as many candidates as white matter has glia.
        lam = np.array(
            [self._lambda_max if probe[c].min() < self._t_max + 0.45 else self._lambda_wm for c in cols], dtype=float
        )
        rngs = [np.random.default_rng([*self._key, _TAG_CELLS, row, c]) for c in cols]
        counts = [int(r.poisson(lt * CELL_TILE_MM**2)) for r, lt in zip(rngs, lam)]
        uni = [r.random((n, 3)) for r, n in zip(rngs, counts)]
        nor = [r.standard_normal((n, 2)) for r, n in zip(rngs, counts)]
        tile_of = np.repeat(np.arange(len(cols)), counts)
        u3 = np.concatenate([np.zeros((0, 3)), *uni])
        n2 = np.concatenate([np.zeros((0, 2)), *nor])
        y = y_lo + u3[:, 0] * CELL_TILE_MM
        x = (np.asarray(cols, dtype=np.float64)[tile_of] + u3[:, 1]) * CELL_TILE_MM
        f = self.nodes.sample_points(y, x, ("d", "thickness", "eta", "jitter"))
        prof = self.profiles
        n_areas = self.cfg.n_areas
        depth = f["d"] / f["thickness"] + 0.015 * f["jitter"] + 0.006 * n2[:, 0]
        sigma_eta = 0.05 * n_areas / self.nodes.loop_mm  # area borders are fuzzy over ~50 um
        area = np.clip(np.floor(np.mod(f["eta"] + sigma_eta * n2[:, 1], n_areas)), 0, n_areas - 1).astype(np.int64)
        layer = np.zeros(y.shape, dtype=np.int64)
        for j in range(1, N_LAYERS):
            layer += depth > prof.bounds[area, j]
        cortex = (f["d"] >= 0) & (depth < 1.0)
        white = (f["d"] >= 0) & ~cortex
        iy = np.floor(y / self.px_mm).astype(np.int64)
        ix = np.floor(x / self.px_mm).astype(np.int64)
        # Radial cell columns: density modulated by the radially oriented fibre texture.
        columns = np.clip(1.0 + 0.3 * self._texture_at(iy, ix), 0.4, _COLUMN_MAX)
        rho = np.where(cortex, prof.density[area, layer] * columns, np.where(white, _WM_GLIA_DENSITY, 0.0))
        rho = rho * self._section_factor * self.brain.density_scale
        keep = (u3[:, 2] * lam[tile_of] < rho) & (y < h_mm) & (x < w_mm)
        idx = np.flatnonzero(keep)
        kept_per_tile = np.bincount(tile_of[idx], minlength=len(cols))
        # Attributes of the kept cells, again drawn from each tile's generator.
        att_u = np.concatenate([np.zeros((0, 8)), *(r.random((int(m), 8)) for r, m in zip(rngs, kept_per_tile))])
        att_n = np.concatenate(
            [np.zeros((0, 3)), *(np.clip(r.standard_normal((int(m), 3)), -3, 3) for r, m in zip(rngs, kept_per_tile))]
        )
        area, layer, cortex_k = area[idx], layer[idx], cortex[idx]
        p_pyr = prof.p_pyramid[area, layer]
        p_fus = prof.p_fusiform[area, layer]
        kind = np.where(att_u[:, 0] < p_pyr, PYRAMID, np.where(att_u[:, 0] < p_pyr + p_fus, FUSIFORM, GRANULE))
        kind = np.where(cortex_k, kind, GLIA)
        lo = prof.bounds[area, layer]
        hi = prof.bounds[area, layer + 1]
        within = np.clip((depth[idx] - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
        radius = prof.radius_um[area, layer] * (1.0 + prof.size_gradient[area, layer] * (within - 0.5))
        radius = np.where(cortex_k, radius, 2.8) * self.brain.cell_scale * np.exp(0.18 * att_n[:, 0])
        elong = np.sqrt(prof.elongation[area, layer] * (0.85 + 0.3 * att_u[:, 1]))  # sqrt of the aspect ratio
        a = np.select([kind == PYRAMID, kind == FUSIFORM], [1.15 * radius, 1.7 * radius], radius * elong)
        b = np.select([kind == PYRAMID, kind == FUSIFORM], [0.95 * radius, 0.6 * radius], radius / elong)
        apical = np.where(kind == PYRAMID, radius * (0.8 + 1.4 * att_u[:, 2]), 0.0)
        # Pyramids and fusiform cells point to the pial surface (against the depth gradient), others anywhere.
        g = self.nodes.sample_points(y[idx], x[idx], ("gx", "gy"))
        base = np.arctan2(-g["gy"], -g["gx"])
        spread = np.radians(prof.orientation_sd_deg[area, layer]) * np.where(kind == PYRAMID, 1.0, 1.5)
        angle = np.where((kind == PYRAMID) | (kind == FUSIFORM), base + spread * att_n[:, 1], 2 * math.pi * att_u[:, 3])
        od = np.where(cortex_k, prof.od[area, layer], 1.9) * self.brain.contrast * np.exp(0.12 * att_n[:, 2])
        # Irregular outlines only where a cell spans several pixels (elsewhere they would not show).
        irregular = (att_u[:, 4:8] - 0.5) * 0.16 * (b >= 2.0 * self.px_um)[:, None]
        cells = [self._make_cells(y[idx], x[idx], a, b, apical, angle, kind, od, irregular)]
        # Vessels: sparse elongated pale profiles in all tissue.
        vrngs = [np.random.default_rng([*self._key, _TAG_VESSELS, row, c]) for c in cols]
        vcounts = [int(r.poisson(_VESSEL_DENSITY * CELL_TILE_MM**2)) for r in vrngs]
        v = np.concatenate([np.zeros((0, 5)), *(r.random((n, 5)) for r, n in zip(vrngs, vcounts))])
        vy = y_lo + v[:, 0] * CELL_TILE_MM
        vx = (np.asarray(cols, dtype=np.float64)[np.repeat(np.arange(len(cols)), vcounts)] + v[:, 1]) * CELL_TILE_MM
        vk = (self.nodes.sample_points(vy, vx, ("d",))["d"] > 0.05) & (vy < h_mm) & (vx < w_mm)
        nv = int(vk.sum())
        cells.append(
            self._make_cells(
                vy[vk],
                vx[vk],
                10.0 + 20.0 * v[vk, 2],
                3.5 + 3.5 * v[vk, 3],
                np.zeros(nv),
                2 * math.pi * v[vk, 4],
                np.full(nv, VESSEL),
                np.full(nv, -0.2),
                np.zeros((nv, 4)),
            )
        )
        return _Cells.concat(cells)

    def _make_cells(
        self,
        y_mm: np.ndarray,
        x_mm: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        apical: np.ndarray,
        angle: np.ndarray,
        kind: np.ndarray,
        od: np.ndarray,
        irregular: np.ndarray,
    ) -> _Cells:
        ax, ay = np.cos(angle), np.sin(angle)
        cy, cx = y_mm / self.px_mm - 0.5, x_mm / self.px_mm - 0.5
        # The window is centred between the base of the soma and the tip of the dendrite.
        shift = 0.5 * apical / self.px_um
        # Half extent of the drawn shape around the window centre (irregular outlines reach 32 % further).
        extent = np.maximum(b, a + 0.5 * apical) * np.where(np.abs(irregular).sum(axis=1) > 0, 1.32, 1.0)
        extent = np.minimum(extent, self._extent_max_um)
        # A pixel has coverage only if its centre lies within extent + blur / 2 of the cell: with the window
        # centred on the pixel nearest to the cell, offsets up to ceil((extent + blur / 2) / px + 0.5) - 1.
        half = np.ceil((extent + 0.5 * self._blur_um) / self.px_um + 0.5) - 1
        return _Cells(
            cy=cy,
            cx=cx,
            wy=np.floor(cy + shift * ay + 0.5).astype(np.int64),
            wx=np.floor(cx + shift * ax + 0.5).astype(np.int64),
            a_um=a.astype(np.float64),
            b_um=b.astype(np.float64),
            apical_um=apical.astype(np.float64),
            ax=ax,
            ay=ay,
            kind=kind.astype(np.int64),
            od=od.astype(np.float64),
            # 0: smaller than ~half a pixel, splatted onto the four nearest pixels.
            half_px=np.where(extent < 0.3 * self.px_um, 0, np.maximum(half, 1)).astype(np.int64),
            pyramid=kind == PYRAMID,
            irregular=irregular.astype(np.float64),
        )

    def _cells_for_rows(self, y0: int, y1: int) -> _Cells:
        """All cells whose windows can reach pixel rows [y0, y1); tile rows are cached until passed."""
        lo = math.floor((y0 * self.px_mm - self._margin_mm) / CELL_TILE_MM)
        hi = math.floor((y1 * self.px_mm + self._margin_mm) / CELL_TILE_MM)
        for r in [r for r in self._tile_rows if r < lo]:
            del self._tile_rows[r]
        parts = []
        for r in range(max(lo, 0), hi + 1):
            if r * CELL_TILE_MM >= self.shape[0] * self.px_mm:
                break
            if r not in self._tile_rows:
                self._tile_rows[r] = self._row_cells(r)
            parts.append(self._tile_rows[r])
        return _Cells.concat(parts)

    def _cell_density(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Optical density of all cells on pixels [y0:y1, x0:x1] in fixed point (multiples of 1/OD_SCALE, so
        that the sum over overlapping cells is exact whatever the order)."""
        h, w = y1 - y0, x1 - x0
        cells = self._cells_for_rows(y0, y1)
        hp = cells.half_px
        reach = np.maximum(hp, 1)  # a splat reaches one pixel beyond its window centre
        hit = (cells.wy + reach >= y0) & (cells.wy - reach < y1) & (cells.wx + reach >= x0) & (cells.wx - reach < x1)
        index: list[np.ndarray] = []
        value: list[np.ndarray] = []

        def add(py: np.ndarray, px: np.ndarray, val: np.ndarray) -> None:
            inside = (py >= y0) & (py < y1) & (px >= x0) & (px < x1)
            index.append((py[inside] - y0) * w + (px[inside] - x0))
            value.append(np.rint(val[inside] * np.float32(OD_SCALE)).astype(np.float64))

        # Cells smaller than a pixel: their darkness (area x od) goes to the four nearest pixels, bilinearly.
        tiny = hit & (hp == 0)
        if tiny.any():
            c = cells.take(np.flatnonzero(tiny))
            fy, fx = np.floor(c.cy), np.floor(c.cx)
            wy, wx = (c.cy - fy).astype(np.float32), (c.cx - fx).astype(np.float32)
            mass = (np.minimum(1.0, math.pi * c.a_um * c.b_um / self.px_um**2) * c.od).astype(np.float32)
            iy, ix = fy.astype(np.int64), fx.astype(np.int64)
            one = np.float32(1)
            for dy, dx, wgt in (
                (0, 0, (one - wy) * (one - wx)),
                (0, 1, (one - wy) * wx),
                (1, 0, wy * (one - wx)),
                (1, 1, wy * wx),
            ):
                add(iy + dy, ix + dx, wgt * mass)
        blur = self._blur_um
        for pyramid in (False, True):
            group = hit & (cells.pyramid == pyramid) & (hp > 0)
            for half in np.unique(hp[group]):
                sel = np.flatnonzero(group & (hp == half))
                side = 2 * int(half) + 1
                off = np.arange(-int(half), int(half) + 1)
                oy = np.repeat(off, side)[None, :]
                ox = np.tile(off, side)[None, :]
                batch = max(1, 2_000_000 // (side * side))
                for s0 in range(0, sel.size, batch):
                    c = cells.take(sel[s0 : s0 + batch])
                    py = c.wy[:, None] + oy
                    px = c.wx[:, None] + ox
                    add(py, px, _coverage(c, py, px, self.px_um, blur, pyramid))
        if not index:
            return np.zeros((h, w))
        return np.bincount(np.concatenate(index), np.concatenate(value), minlength=h * w).reshape(h, w)

    def _labels(self, d: np.ndarray, thick: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (uint16) and depth (float32, NaN outside the cortex; steps of 1/4096) of a block, from the
        fields d, thickness and eta sampled on the block plus a one-pixel halo.

        Where an area border meets the white-matter border on a diagonal, rasterisation can leave a single
        pixel of an area touching its area only at a corner. Such pixels (no edge-neighbour of their own area)
        take the area of an edge-neighbour, so every area is one edge-connected region. The decision uses a
        one-pixel halo, so it does not depend on the block.
        """
        f32 = np.float32
        tissue = d >= 0
        cortex = tissue & (d < thick)
        area = np.minimum(eta.astype(np.uint16), np.uint16(self.cfg.n_areas - 1)) + np.uint16(2)
        lab = np.where(cortex, area, tissue.astype(np.uint16))
        core = lab[1:-1, 1:-1]
        up, down, left, right = lab[:-2, 1:-1], lab[2:, 1:-1], lab[1:-1, :-2], lab[1:-1, 2:]
        lonely = (core >= 2) & (core != up) & (core != down) & (core != left) & (core != right)
        labels = core.copy()
        if lonely.any():
            ys, xs = np.nonzero(lonely)
            nb = np.stack([up[ys, xs], down[ys, xs], left[ys, xs], right[ys, xs]], axis=1)
            # The largest neighbouring area id (deterministic); background or white matter if none.
            area_nb = np.where(nb >= 2, nb, 0).max(axis=1)
            labels[ys, xs] = np.where(area_nb >= 2, area_nb, nb.max(axis=1)).astype(np.uint16)
        inner = cortex[1:-1, 1:-1] & (labels >= 2)
        dd, tt = d[1:-1, 1:-1], thick[1:-1, 1:-1]
        depth = np.where(inner, np.round(dd / tt * f32(4096)) * f32(1 / 4096), f32(np.nan))
        return labels, depth

    def render(self, y0: int, y1: int, x0: int, x1: int) -> dict[str, np.ndarray]:
        """Layers ``image`` (uint8), ``labels`` (uint16), ``depth`` (float32) and ``coords`` (float32, h x w x 3)
        of pixels [y0:y1, x0:x1]. Depth is stored in steps of 1/4096 and coordinates in power-of-two steps of at
        most half a pixel (:attr:`coords_step_mm`), which makes them compress 5-10 times better (and faster)
        than raw interpolated floats."""
        f32 = np.float32
        halo = self.nodes.sample_block(y0 - 1, y1 + 1, x0 - 1, x1 + 1, self.px_mm, ("d", "thickness", "eta", "stain"))
        labels, depth = self._labels(halo["d"], halo["thickness"], halo["eta"])
        d, thick, stain = (halo[k][1:-1, 1:-1] for k in ("d", "thickness", "stain"))
        f = self.nodes.sample_block(y0, y1, x0, x1, self.px_mm, ("u", "v", "w"))
        q = f32(1.0 / self.coords_step_mm)
        coords = np.stack([np.round(f[k] * q) * f32(self.coords_step_mm) for k in ("u", "v", "w")], axis=-1)

        br = self.brain
        one = f32(1.0)
        cover = np.clip(f32(0.5) + d * f32(1.0 / self.px_mm), f32(0), one)  # anti-aliased pial edge
        t = np.clip((d - thick) * f32(1 / 0.3) + f32(0.5), f32(0), one)
        wm = t * t * (f32(3.0) - f32(2.0) * t)  # smooth grey -> white matter transition
        texture = self._texture_at(np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :])
        neuropil = (
            f32(br.neuropil + self._stain_offset)
            + f32(br.white_matter) * wm
            + f32(3.5) * stain
            + f32(br.texture_amp) * (one - f32(0.7) * wm) * texture
        )
        od = self._cell_density(y0, y1, x0, x1)
        trans = np.take(self._transmission, np.clip(od + OD_SCALE, 0, 10 * OD_SCALE).astype(np.int64))
        # Cells only on tissue; the background shows through where the pixel straddles the pial edge.
        value = cover * (neuropil * (one + (trans - one) * cover) - f32(br.background)) + f32(br.background)
        rows = (np.arange(y0, y1) % _NOISE_ROWS) * _NOISE_COLS
        cols = np.arange(x0, x1) % _NOISE_COLS
        value += np.take(self._noise, rows[:, None] + cols[None, :])
        image = np.clip(np.floor(value + f32(0.5)), 0, 255).astype(np.uint8)
        return {"image": image, "labels": labels, "depth": depth, "coords": coords}


def _coverage(c: _Cells, py: np.ndarray, px: np.ndarray, px_um: float, blur: float, pyramid: bool) -> np.ndarray:
    """Optical density contributed by each cell (rows) to the pixels (py, px) of its window (columns).

    Coverage is ``clip(0.5 - signed_distance / blur)`` with a first-order signed distance to the shape (exact
    for circles), scaled so that a cell never darkens more than its own area: small cells at coarse pixel
    sizes keep their integrated darkness. Elementwise float32 arithmetic only, so a pixel's value never
    depends on the batch it is computed in.
    """
    f32 = np.float32
    ry = ((py - c.cy[:, None]) * px_um).astype(f32)
    rx = ((px - c.cx[:, None]) * px_um).astype(f32)
    ax, ay = c.ax.astype(f32)[:, None], c.ay.astype(f32)[:, None]
    u = rx * ax + ry * ay  # along the axis
    v = ry * ax - rx * ay  # across
    a, b = c.a_um.astype(f32)[:, None], c.b_um.astype(f32)[:, None]
    tt = u / a
    if pyramid:  # a tapered body: full width at the base, narrow at the apex
        width = b * np.clip(f32(0.575) - f32(0.425) * tt, f32(0.12), f32(1.0))
        area_um2 = 0.575 * math.pi * c.a_um * c.b_um
    else:
        width = b
        area_um2 = math.pi * c.a_um * c.b_um
    vw = v / width
    q = tt * tt + vw * vw
    grad = f32(2.0) * np.sqrt((tt / a) ** 2 + (vw / width) ** 2) + f32(1e-9)
    sq = np.sqrt(q)
    reach = f32(2.0) * sq / grad  # first-order distance per unit of the normalised radius sqrt(q)
    if c.irregular.any():
        # Irregular outline (zero amplitudes for unresolved cells, which then get exactly the plain result):
        # the radius is modulated by the 2nd and 3rd angular harmonics.
        inv = f32(1.0) / np.maximum(sq, f32(1e-6))
        cs, sn = tt * inv, vw * inv
        c2, s2 = cs * cs - sn * sn, f32(2.0) * cs * sn
        c3, s3 = cs * (c2 - f32(2.0) * sn * sn), sn * (f32(2.0) * cs * cs + c2)
        irr = c.irregular.astype(f32)
        mod = f32(1.0) + irr[:, 0:1] * c2 + irr[:, 1:2] * s2 + irr[:, 2:3] * c3 + irr[:, 3:4] * s3
        body = np.clip(f32(0.5) - (sq / mod - f32(1.0)) * reach * f32(1.0 / blur), f32(0), f32(1))
    else:
        body = np.clip(f32(0.5) - (sq - f32(1.0)) * reach * f32(1.0 / blur), f32(0), f32(1))
    norm = np.minimum(1.0, area_um2 / (px_um * px_um) / np.maximum(body.sum(axis=1, dtype=np.float64), 1e-9))
    scale = (norm * c.od).astype(f32)[:, None]
    # Pale nucleus with a dark nucleolus, where the soma spans a few pixels (not in vessels).
    big = ((np.minimum(c.a_um, c.b_um) / px_um >= 2.0) & (c.kind != VESSEL))[:, None]
    if big.any():
        nucleus = (
            f32(1.0)
            - f32(0.45) * np.clip(f32(1.0) - q * f32(1 / 0.55**2), f32(0), f32(1))
            + f32(0.9) * np.clip(f32(1.0) - q * f32(1 / 0.16**2), f32(0), f32(1))
        )
        body = np.where(big, body * nucleus, body)
    if pyramid:  # apical dendrite: a thin process from the apex towards the pial surface, tapering and paler
        length = c.apical_um.astype(f32)[:, None]
        half_width = f32(1.2) * np.clip(f32(1.0) - f32(0.6) * (u - a) / length, f32(0.4), f32(1.0))
        sd = np.maximum(np.abs(v) - half_width, np.maximum(f32(0.6) * a - u, u - a - length))
        thin = np.minimum(f32(1.0), f32(2.0 / blur) * half_width)  # a line thinner than the blur is fainter
        body = np.maximum(body, f32(0.45) * thin * np.clip(f32(0.5) - sd / f32(blur), f32(0), f32(1)))
    return body * scale


# ----------------------------------------------------------------------------------------------------------
# Sections and datasets


def generate_section(
    cfg: SynthConfig,
    brain_index: int,
    section_index: int,
    path: str | Path,
    *,
    chunk_px: int,
    compression: Compression = "blosc-zstd",
    overwrite: bool = False,
    extra_attrs: dict[str, Any] | None = None,
    image_levels: tuple[int, ...] = (),
) -> Path:
    """Generate one section into a store at ``path`` (suffix picks the backend), band by band."""
    started = time.perf_counter()
    gen = SectionGenerator(cfg, brain_index, section_index)
    h, w = gen.shape
    meta = SectionMeta(
        brain=brain_name(brain_index),
        section_index=section_index,
        z_mm=section_z_mm(cfg, section_index),
        pixel_size_um=cfg.pixel_size_um,
        shape=(h, w),
        label_table=label_table(cfg.n_areas),
        seed=cfg.seed,
        source="synthetic",
        extra=dict(extra_attrs or {}),
    )
    # Blocks are whole chunks: one band of chunk rows, at most ~4096 px wide, so memory stays bounded.
    block_w = chunk_px * max(1, 4096 // chunk_px)
    with create_section(
        path, meta, chunk_px=chunk_px, compression=compression, overwrite=overwrite, image_levels=image_levels
    ) as writer:
        for y0 in range(0, h, chunk_px):
            y1 = min(y0 + chunk_px, h)
            for x0 in range(0, w, block_w):
                x1 = min(x0 + block_w, w)
                for layer, data in gen.render(y0, y1, x0, x1).items():
                    writer.write(layer, y0, x0, data)
    log.info(
        "synth: %s section %d (%d x %d px) in %.1f s", meta.brain, section_index, h, w, time.perf_counter() - started
    )
    return Path(path)


def _section_job(
    args: tuple[SynthConfig, int, int, Path, int, Compression, bool, dict[str, Any] | None, tuple[int, ...]],
) -> Path:
    cfg, b, s, path, chunk_px, compression, overwrite, extra, levels = args
    return generate_section(
        cfg,
        b,
        s,
        path,
        chunk_px=chunk_px,
        compression=compression,
        overwrite=overwrite,
        extra_attrs=extra,
        image_levels=levels,
    )


def planned_section_paths(cfg: SynthConfig, out_dir: Path, backend: str) -> list[tuple[int, int, Path]]:
    """(brain index, section index, store path) of every section :func:`generate_dataset` writes, in order."""
    return [
        (b, s, Path(out_dir) / brain_name(b) / section_filename(brain_name(b), s, backend))
        for b in range(cfg.n_brains)
        for s in range(cfg.sections_per_brain)
    ]


def _is_synthetic_store(path: Path) -> bool:
    """Whether ``path`` is a section store this generator wrote (one it can write again)."""
    try:
        with open_section(path) as reader:
            return reader.meta.source == "synthetic"
    except InputError:
        return False


def stale_outputs(cfg: SynthConfig, out_dir: Path, backend: str, own_files: Collection[str] = ()) -> list[Path]:
    """What rewriting ``out_dir`` with ``cfg`` and ``backend`` must delete so that the folder holds exactly the
    new plan: the synthetic section stores the plan does not write (brains or sections beyond the new counts,
    the other backend's files) and partial stores left by a killed run.

    Anything else below ``out_dir`` is foreign, and then nothing may be deleted: raises
    :class:`OutputExistsError` naming the folder and one foreign entry. Foreign is every file or link other than
    a section store and ``own_files`` (names directly in ``out_dir``, e.g. the pipeline's config and done
    marker), and every section store not written by this generator (an imported one), planned path or not.
    """
    out_dir = Path(out_dir)
    planned = {p for _, _, p in planned_section_paths(cfg, out_dir, backend)}
    stale: list[Path] = []
    foreign: list[Path] = []

    def walk(folder: Path) -> None:
        for p in sorted(folder.iterdir()):
            if folder == out_dir and p.name in own_files:
                continue
            if p.is_symlink():
                foreign.append(p)
            elif p.name.endswith(".partial") and Path(p.name[: -len(".partial")]).suffix.lower() in BACKEND_OF_SUFFIX:
                stale.append(p)  # a store being written when its job was killed; never complete
            elif p.suffix.lower() in BACKEND_OF_SUFFIX:
                if not _is_synthetic_store(p):
                    foreign.append(p)
                elif p not in planned:
                    stale.append(p)
            elif p.is_dir():
                walk(p)
            else:
                foreign.append(p)

    if out_dir.is_dir():
        walk(out_dir)
    if foreign:
        raise OutputExistsError(
            f"synth: output folder {out_dir} holds {some_of([str(p.relative_to(out_dir)) for p in foreign])}, which "
            "synth did not write; --overwrite deletes only synthetic section stores and synth's own files: move the "
            "others away or choose another --out"
        )
    return stale


def _remove_stale(out_dir: Path, stale: list[Path]) -> None:
    """Delete the stale stores, then the folders below ``out_dir`` that this left empty."""
    for p in stale:
        remove_path(p)
        parent = p.parent
        while parent != out_dir and out_dir in parent.parents and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    partial = sum(p.name.endswith(".partial") for p in stale)
    if partial:
        log.info("synth: removed %d partly written section store(s) of an interrupted run", partial)
    if len(stale) > partial:
        log.info(
            "synth: removed %d section store(s) of an earlier run that the new plan does not write",
            len(stale) - partial,
        )


def generate_dataset(
    cfg: SynthConfig,
    out_dir: Path,
    *,
    backend: str,
    chunk_px: int,
    compression: str,
    overwrite: bool,
    workers: int = 1,
    extra_attrs: dict[str, Any] | None = None,
    image_levels: tuple[int, ...] = (),
    own_files: Collection[str] = (),
) -> list[Path]:
    """Write every section of every brain to ``out_dir/<brain>/<section file>``; returns the paths in order.

    ``workers > 1`` generates sections in parallel processes; the bytes do not depend on it. ``overwrite``
    replaces existing stores and then deletes the synthetic stores of an earlier run that this one does not
    write (:func:`stale_outputs`; refused, before anything is written, when ``out_dir`` holds anything but
    synthetic section stores and the top-level ``own_files``), so the folder holds exactly this dataset.
    """
    if compression not in ("blosc-zstd", "none"):
        raise ValueError(f"compression={compression!r} is invalid: use 'blosc-zstd' or 'none'")
    if backend not in ("zarr", "hdf5"):
        raise ValueError(f"backend={backend!r} is invalid: use 'zarr' or 'hdf5'")
    codec = cast(Compression, compression)
    out_dir = Path(out_dir)
    stale = stale_outputs(cfg, out_dir, backend, own_files) if overwrite else []
    jobs = [
        (cfg, b, s, path, chunk_px, codec, overwrite, extra_attrs, tuple(image_levels))
        for b, s, path in planned_section_paths(cfg, out_dir, backend)
    ]
    started = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        paths = []
        with worker_pool(min(workers, len(jobs))) as pool:  # spawned, dying with this process (cytonet.workers)
            for i, path in enumerate(pool.map(_section_job, jobs)):
                paths.append(path)
                log.info("synth: %d/%d sections done (%.0f s)", i + 1, len(jobs), time.perf_counter() - started)
    else:
        paths = [_section_job(job) for job in jobs]
    _remove_stale(out_dir, stale)  # only now: a failed run leaves the old stores for the next --overwrite
    return paths


# ----------------------------------------------------------------------------------------------------------
# Preview


def render_preview(section_path: str | Path, png_path: str | Path, max_px: int = 1200) -> Path:
    """PNG of a section: the image (subsampled to at most ``max_px`` on its long side), areas as a coloured
    semi-transparent overlay, and a legend of the area names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from cytonet.data.sections import open_section

    with open_section(section_path) as reader:
        h, w = reader.shape
        step = max(1, math.ceil(max(h, w) / max_px))
        rows = max(step, (1024 // step) * step)
        has_labels = reader.has("labels")
        img_parts, lab_parts = [], []
        for y0 in range(0, h, rows):
            y1 = min(y0 + rows, h)
            # copies: a strided view would keep the whole full-resolution band alive, and so the whole section
            img_parts.append(reader.read("image", y0, y1)[::step, ::step].copy())
            if has_labels:
                lab_parts.append(reader.read("labels", y0, y1)[::step, ::step].copy())
        meta = reader.meta
    image = np.concatenate(img_parts)
    fig_w = 12.0
    fig_h = fig_w * image.shape[0] / image.shape[1]
    fig, ax = plt.subplots(figsize=(fig_w + 2.5, fig_h))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    handles = []
    if has_labels:
        labels = np.concatenate(lab_parts)
        cmap = plt.get_cmap("tab20")
        overlay = np.zeros((*labels.shape, 4))
        for lab in sorted(int(v) for v in np.unique(labels) if v >= 2):
            color = cmap((lab - 2) % 20)
            overlay[labels == lab] = (*color[:3], 0.35)
            handles.append(Patch(color=color[:3], label=meta.label_table.get(lab, str(lab))))
        ax.imshow(overlay, interpolation="nearest")
    ax.set_title(
        f"{meta.brain} section {meta.section_index}  z={meta.z_mm:.2f} mm  {meta.pixel_size_um:g} um/px  {w} x {h} px"
    )
    ax.set_axis_off()
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png
