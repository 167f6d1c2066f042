"""Geometry of the synthetic brains: one shared reference anatomy, a smooth transform per brain, and the
per-section fields (distance to the pial surface, thickness, area coordinate, reference coordinates) on a
coarse node grid that the renderer interpolates to pixels.

Model (all lengths in mm):

- **Reference space** ``(u, v, w)``: the anatomy is a function of these coordinates only, so the same
  anatomical location has the same reference coordinate in every brain. The origin lies at the image centre
  of section 0; ``w`` runs along the cutting axis. Nothing depends on how many sections are written, so a
  section is the same whichever stack it belongs to.
- **Outline** of the brain at reference height ``w``: a modulated ellipse
  ``C(t) = f(t) (a cos t, b sin t)``, ``f(t) = 1 + sum_m c_m(w) cos(m t + psi_m)``, m = 2..5.
- **Sulci**: slits of width ``2 * SULCUS_HALF_GAP_MM`` that start 1 mm outside the outline, enter it along
  the inward normal and run inwards on a circular arc to a fundus ``D_k(w)`` mm deep. Mouth positions and
  depths drift smoothly with ``w``; the generator keeps neighbouring sulci and the far side of the brain far
  enough away that every gyrus keeps a white-matter core.
- **Distance to the pial surface** ``d``: the smooth minimum (radius ``SMOOTH_MIN_MM``) of the signed distance
  to the outline and to each slit, so sulcal lips are rounded and iso-depth lines have no kinks.
  ``d < 0`` is outside the brain or inside a sulcus, ``0 <= d < T`` is cortex, ``d >= T`` white matter;
  cortical depth is ``d / T`` (0 at the pial surface, 1 at the white-matter border: an equidistant model).
- **Ribbon coordinate** ``xi``: arc length along the closed pial curve (outline, then down one bank of each
  sulcus, round its fundus and up the other bank), taken at the nearest pial point and blended with the same
  weights as ``d``, so it is continuous in the cortex. Its fraction of the loop length, passed through a
  monotone periodic warp that drifts with ``w``, gives the area coordinate ``eta`` in ``[0, K)``; area
  ``floor(eta)`` is one contiguous stretch of ribbon in every section and its borders move smoothly in 3D.
- **Thickness** ``T = T_brain (1 + small smooth 3D variation)``.
- **Brain transform** (per brain): reference = ``M q + t + warp(q)`` where ``q`` is the brain position
  (image x, image y, cutting axis z) relative to the brain centre, ``M`` rotates and scales in plane and tilts
  the cutting plane, and ``warp`` is a sum of three low-frequency sinusoids (< 0.25 mm). The inverse is a
  fixed-point iteration (:func:`reference_to_brain`). Brains also differ in mean thickness, cell size and
  density scale, and stain (:class:`BrainParams`).
- **Node grid**: every field is evaluated exactly at nodes ``GRID_MM`` apart in the section plane (using the
  node's own reference height, so a tilted cutting plane samples the 3D anatomy correctly) and interpolated
  bilinearly to pixels; ``eta`` is interpolated on its circle.

Entry points: :func:`reference_anatomy`, :func:`brain_params`, :func:`brain_to_reference`,
:func:`reference_to_brain`, :func:`section_nodes` (fields of one section on the node grid) and
:class:`NodeFields` (bilinear sampling at pixels or points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cytonet.config import SynthConfig

#: Spacing of the node grid on which the geometry is evaluated exactly; pixels interpolate bilinearly.
GRID_MM = 0.04
#: Radius of the smooth minimum between outline and sulci (rounds the sulcal lips).
SMOOTH_MIN_MM = 0.6
#: Half width of the gap (CSF) of a sulcus.
SULCUS_HALF_GAP_MM = 0.06
#: Length of a sulcal slit outside the outline (so that it cuts the outline cleanly).
SULCUS_OUTSIDE_MM = 1.0
#: Points of the polyline that approximates a sulcus.
N_SULCUS_POINTS = 9
#: Relative amplitude of the smooth variation of cortical thickness within a brain.
THICKNESS_VARIATION = 0.12
#: Spacing of the reference heights at which sulci and arc lengths are tabulated.
LEVEL_MM = 0.05
#: Samples of the outline parameter in the arc-length tables.
N_THETA = 2048

_TAG_ANATOMY = 101
_TAG_BRAIN = 202
_TAG_FIELDS = 303
_TWO_PI = 2.0 * math.pi


def section_z_mm(cfg: SynthConfig, section_index: int) -> float:
    """Brain z of written section ``section_index`` (its cut number is ``section_index * section_stride``)."""
    return section_index * cfg.section_step_um / 1000.0


def image_shape(cfg: SynthConfig) -> tuple[int, int]:
    """Height and width of every section in pixels."""
    px_mm = cfg.pixel_size_um / 1000.0
    return round(cfg.brain_height_mm / px_mm), round(cfg.brain_width_mm / px_mm)


# ----------------------------------------------------------------------------------------------------------
# Reference anatomy


@dataclass(frozen=True)
class Outline:
    """The outer (pial) outline: a modulated ellipse whose axes and modulation vary slowly with height w."""

    a0: float
    """Semi-axis along u at w = 0."""
    b0: float
    """Semi-axis along v at w = 0."""
    size_amp: float
    """Relative amplitude of the slow change of the brain's size with w."""
    size_period: float
    """Period (mm) of that change."""
    size_phase: float
    m: np.ndarray
    """Harmonic orders (M,)."""
    c0: np.ndarray
    """Mean modulation amplitudes (M,)."""
    c1: np.ndarray
    """Amplitudes of their variation with w (M,)."""
    period: np.ndarray
    """Periods (mm) of that variation (M,)."""
    chi: np.ndarray
    """Phases of that variation (M,)."""
    psi: np.ndarray
    """Angular phases of the harmonics (M,)."""

    def axes(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = 1.0 + self.size_amp * np.sin(_TWO_PI * w / self.size_period + self.size_phase)
        return self.a0 * s, self.b0 * s

    def coefficients(self, w: np.ndarray) -> np.ndarray:
        """Modulation amplitudes c_m(w), shape (M, *w.shape)."""
        return np.stack(
            [self.c0[i] + self.c1[i] * np.sin(_TWO_PI * w / self.period[i] + self.chi[i]) for i in range(self.m.size)]
        )

    def _mod(self, t: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """f, f', f'' at parameter t for coefficients c (M, *t.shape), and cos t, sin t."""
        ct, st = np.cos(t), np.sin(t)
        f = np.ones_like(t)
        f1 = np.zeros_like(t)
        f2 = np.zeros_like(t)
        cm, sm = ct, st  # cos(m t), sin(m t) by the angle-addition recurrence, starting at m = 1
        for m in range(1, int(self.m.max()) + 1):
            if m > 1:
                cm, sm = cm * ct - sm * st, sm * ct + cm * st
            for i in np.flatnonzero(self.m == m):
                cp, sp = math.cos(self.psi[i]), math.sin(self.psi[i])
                cos_a = cm * cp - sm * sp
                sin_a = sm * cp + cm * sp
                f = f + c[i] * cos_a
                f1 = f1 - m * c[i] * sin_a
                f2 = f2 - m * m * c[i] * cos_a
        return f, f1, f2, ct, st

    def point(self, t: np.ndarray, w: np.ndarray, c: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Position, first and second derivative of the outline: (x, y, dx, dy, ddx, ddy)."""
        a, b = self.axes(w)
        f, f1, f2, ct, st = self._mod(t, self.coefficients(w) if c is None else c)
        x, y = f * a * ct, f * b * st
        dx = f1 * a * ct - f * a * st
        dy = f1 * b * st + f * b * ct
        ddx = f2 * a * ct - 2 * f1 * a * st - f * a * ct
        ddy = f2 * b * st + 2 * f1 * b * ct - f * b * st
        return x, y, dx, dy, ddx, ddy

    def nearest(self, px: np.ndarray, py: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance (positive inside) to the outline and the parameter of the nearest outline point.

        Newton's method on ``(C(t) - p) . C'(t) = 0`` from the point's own elliptic angle; exact near the
        outline, where it matters (deep inside the result may overestimate, which only says "white matter").
        """
        a, b = self.axes(w)
        c = self.coefficients(w)
        t0 = np.arctan2(py / b, px / a)
        f0 = self._mod(t0, c)[0]
        rho = np.hypot(px / a, py / b)
        inside = rho < f0
        # p and C(t0) lie on one ray from the centre: their distance bounds the true distance from above.
        dist = np.abs(rho - f0) * np.hypot(a * np.cos(t0), b * np.sin(t0))
        t = t0.copy()
        # Points well outside only need to be "outside" (the renderer shows background there): no Newton.
        todo = np.flatnonzero(inside | (dist < 0.5))
        ts, ws, cs, pxs, pys = t0[todo], w[todo], c[:, todo], px[todo], py[todo]
        for _ in range(6):
            x, y, dx, dy, ddx, ddy = self.point(ts, ws, cs)
            ex, ey = x - pxs, y - pys
            speed2 = dx * dx + dy * dy
            g = ex * dx + ey * dy
            gp = np.maximum(speed2 + ex * ddx + ey * ddy, 0.2 * speed2)
            ts = ts - np.clip(g / gp, -0.3, 0.3)
        x, y = self.point(ts, ws, cs)[:2]
        t[todo] = ts
        dist[todo] = np.hypot(x - pxs, y - pys)
        return np.where(inside, dist, -dist), np.mod(t, _TWO_PI)


@dataclass(frozen=True)
class Sulcus:
    """One sulcus: mouth parameter, depth and curvature, each drifting smoothly with w."""

    t0: float
    """Outline parameter of the mouth at w = 0."""
    t_amp: float
    """Amplitude (radians of outline parameter) of the mouth's drift with w."""
    t_period: float
    t_phase: float
    depth0: float
    """Depth of the fundus below the mouth (mm) at w = 0."""
    depth_amp: float
    """Relative amplitude of the depth's variation with w."""
    depth_period: float
    depth_phase: float
    curvature: float
    """Curvature of the slit (1/mm, signed)."""

    def mouth_t(self, w: np.ndarray) -> np.ndarray:
        return self.t0 + self.t_amp * np.sin(_TWO_PI * w / self.t_period + self.t_phase)

    def depth(self, w: np.ndarray) -> np.ndarray:
        return self.depth0 * (1.0 + self.depth_amp * np.sin(_TWO_PI * w / self.depth_period + self.depth_phase))


@dataclass(frozen=True)
class ReferenceAnatomy:
    """Everything about the synthetic anatomy that all brains share (a function of the seed only)."""

    outline: Outline
    sulci: tuple[Sulcus, ...]
    """Sulci ordered along the loop, starting after the seam."""
    seam_t: float
    """Outline parameter where the ribbon coordinate starts (on a gyral crown, between two sulci)."""
    n_areas: int
    warp_alpha0: np.ndarray
    """Amplitudes (M,) of the monotone warp of the loop fraction that sets the area widths."""
    warp_alpha1: np.ndarray
    warp_period: np.ndarray
    warp_phase: np.ndarray
    warp_psi0: np.ndarray
    warp_psi1: np.ndarray
    shift0: float
    """Loop fraction at which area 0 starts (w = 0); drifts by ``shift1`` with w."""
    shift1: float
    shift_period: float
    thickness_k: np.ndarray
    """Wave vectors (3, 3) of the smooth thickness variation."""
    thickness_amp: np.ndarray
    thickness_phase: np.ndarray

    def sulcus_polylines(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Polylines (n_w, n_sulci, N_SULCUS_POINTS, 2), their arc-length parameters (same, last dim dropped),
        and the mouth parameters (n_w, n_sulci) at heights ``w`` (n_w,)."""
        n_w, n_s = w.shape[0], len(self.sulci)
        pts = np.zeros((n_w, n_s, N_SULCUS_POINTS, 2))
        svals = np.zeros((n_w, n_s, N_SULCUS_POINTS))
        mouths = np.zeros((n_w, n_s))
        for k, s in enumerate(self.sulci):
            tk = s.mouth_t(w)
            mouths[:, k] = tk
            x, y, dx, dy, _, _ = self.outline.point(tk, w)
            speed = np.hypot(dx, dy)
            tx, ty = dx / speed, dy / speed
            nx, ny = -ty, tx  # inward normal of the counter-clockwise outline
            px_, py_ = -ny, nx  # the normal turned by +90 degrees
            depth = s.depth(w)
            sv = np.linspace(0.0, 1.0, N_SULCUS_POINTS)[None, :] * (depth[:, None] + SULCUS_OUTSIDE_MM)
            sv = sv - SULCUS_OUTSIDE_MM
            kappa = s.curvature if abs(s.curvature) > 1e-6 else 1e-6
            along = np.sin(kappa * sv) / kappa
            side = (1.0 - np.cos(kappa * sv)) / kappa
            pts[:, k, :, 0] = x[:, None] + along * nx[:, None] + side * px_[:, None]
            pts[:, k, :, 1] = y[:, None] + along * ny[:, None] + side * py_[:, None]
            svals[:, k] = sv
        return pts, svals, mouths

    def arc_tables(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative outline arc length from parameter 0 on a regular grid of N_THETA + 1 parameters,
        (n_w, N_THETA + 1), and the outline perimeter (n_w,)."""
        t = np.linspace(0.0, _TWO_PI, N_THETA + 1)
        tt, ww = np.meshgrid(t, w)
        _, _, dx, dy, _, _ = self.outline.point(tt, ww)
        speed = np.hypot(dx, dy)
        step = _TWO_PI / N_THETA
        cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(0.5 * (speed[:, 1:] + speed[:, :-1]) * step, 1)], 1)
        return cum, cum[:, -1]

    def area_coordinate(self, frac: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Area coordinate eta in [0, K) from the loop fraction ``frac`` in [0, 1) at heights ``w``."""
        x = frac - (self.shift0 + self.shift1 * np.sin(_TWO_PI * w / self.shift_period))
        y = x.copy()
        for i in range(self.warp_alpha0.shape[0]):
            m = i + 1
            alpha = self.warp_alpha0[i] + self.warp_alpha1[i] * np.sin(_TWO_PI * w / self.warp_period[i])
            psi = self.warp_psi0[i] + self.warp_psi1[i] * np.sin(_TWO_PI * w / self.warp_period[i] + 1.0)
            y = y + alpha * np.sin(_TWO_PI * m * x + psi) / (_TWO_PI * m)
        return self.n_areas * np.mod(y, 1.0)

    def thickness_factor(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Relative cortical thickness (around 1) at reference positions."""
        out = np.ones_like(u)
        for j in range(self.thickness_k.shape[0]):
            k = self.thickness_k[j]
            out = out + self.thickness_amp[j] * np.sin(k[0] * u + k[1] * v + k[2] * w + self.thickness_phase[j])
        return out


def _loop_positions(outline: Outline, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Outline parameters of ``n`` roughly evenly spaced mouths (by arc length at w = 0) and the seam."""
    t = np.linspace(0.0, _TWO_PI, N_THETA + 1)
    _, _, dx, dy, _, _ = outline.point(t, np.zeros_like(t))
    speed = np.hypot(dx, dy)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * (t[1] - t[0]))])
    perim = cum[-1]
    start = rng.uniform(0, perim)
    spacing = perim / n
    arcs = start + spacing * (np.arange(n) + rng.uniform(-0.12, 0.12, n))
    seam_arc = start - 0.5 * spacing
    params = np.interp(np.mod(arcs, perim), cum, t)
    seam = float(np.interp(np.mod(seam_arc, perim), cum, t))
    # Order the sulci along the loop starting at the seam.
    order = np.argsort(np.mod(params - seam, _TWO_PI))
    return params[order], seam


def _sulcus_conflicts(
    anat: ReferenceAnatomy, w_levels: np.ndarray, outline_pts: tuple[np.ndarray, np.ndarray], clearance: float
) -> set[int]:
    """Sulci to make shallower: for every sulcus that comes closer than ``clearance`` mm to its next neighbour
    (the deeper of the two) or whose fundus comes that close to the far side of the outline (itself), at any
    of the heights ``w_levels``. ``outline_pts`` are outline points (n_w, n) at those heights."""
    pts, svals, _ = anat.sulcus_polylines(w_levels)
    n_s = len(anat.sulci)
    ox, oy = outline_pts
    levels = np.arange(len(w_levels))
    shrink = set()
    for k in range(n_s):
        j = (k + 1) % n_s
        if j != k:
            # Only the parts inside the brain (arc parameter >= 0) count.
            own = np.where((svals[:, k] >= 0)[..., None], pts[:, k], np.nan)
            other = np.where((svals[:, j] >= 0)[..., None], pts[:, j], np.inf)
            dist = np.linalg.norm(own[:, :, None, :] - other[:, None, :, :], axis=-1)
            if np.nanmin(dist) < clearance:
                shrink.add(k if anat.sulci[k].depth0 >= anat.sulci[j].depth0 else j)
        fundus = pts[:, k, -1]  # (n_w, 2)
        mouth = pts[levels, k, np.argmin(np.abs(svals[:, k]), axis=1)]
        far = np.hypot(ox - mouth[:, :1], oy - mouth[:, 1:]) > svals[:, k, -1:] + clearance
        d_far = np.where(far, np.hypot(ox - fundus[:, :1], oy - fundus[:, 1:]), np.inf)
        if float(d_far.min()) < clearance:
            shrink.add(k)
    return shrink


def reference_anatomy(cfg: SynthConfig) -> ReferenceAnatomy:
    """The shared anatomy of ``cfg`` (a function of the seed, image size, thickness range and number of areas)."""
    rng = np.random.default_rng([cfg.seed, _TAG_ANATOMY])
    scale = min(cfg.brain_width_mm, cfg.brain_height_mm * 4 / 3) / 24.0
    m = np.arange(2, 6)
    outline = Outline(
        a0=0.41 * cfg.brain_width_mm,
        b0=0.41 * cfg.brain_height_mm,
        size_amp=float(rng.uniform(0.01, 0.04)),
        size_period=float(rng.uniform(20.0, 40.0) * scale),
        size_phase=float(rng.uniform(0, _TWO_PI)),
        m=m.astype(float),
        c0=rng.uniform(-0.03, 0.03, m.size) * 3.0 / m,
        c1=rng.uniform(-0.01, 0.01, m.size),
        period=rng.uniform(8.0, 20.0, m.size) * scale,
        chi=rng.uniform(0, _TWO_PI, m.size),
        psi=rng.uniform(0, _TWO_PI, m.size),
    )
    t_hi = cfg.cortex_thickness_mm[1] * (1.0 + THICKNESS_VARIATION)
    t_mid = 0.5 * sum(cfg.cortex_thickness_mm)
    gyrus_half = t_hi + 1.25 * SMOOTH_MIN_MM + SULCUS_HALF_GAP_MM
    t = np.linspace(0.0, _TWO_PI, N_THETA + 1)
    _, _, dx, dy, _, _ = outline.point(t, np.zeros_like(t))
    perim = float(np.sum(np.hypot(dx, dy)[:-1]) * (t[1] - t[0]))
    n_sulci = int(np.clip(round(perim / (3.2 * gyrus_half)), 2, 80))
    mouths, seam = _loop_positions(outline, n_sulci, rng)
    radius = 0.5 * (outline.a0 + outline.b0)
    sulci = []
    for tk in mouths:
        sulci.append(
            Sulcus(
                t0=float(tk),
                t_amp=float(rng.uniform(0.2, 0.6) * scale / radius),
                t_period=float(rng.uniform(10.0, 25.0) * scale),
                t_phase=float(rng.uniform(0, _TWO_PI)),
                depth0=float(rng.uniform(0.7, 1.2) * min(1.6 * t_mid, 0.5 * outline.b0)),
                depth_amp=float(rng.uniform(0.05, 0.2)),
                depth_period=float(rng.uniform(8.0, 20.0) * scale),
                depth_phase=float(rng.uniform(0, _TWO_PI)),
                curvature=float(rng.uniform(-0.12, 0.12) / scale),
            )
        )
    n_warp = 3
    alpha = rng.uniform(-1.0, 1.0, n_warp) / np.arange(1, n_warp + 1)
    alpha *= 0.55 / max(np.abs(alpha).sum(), 1e-9)
    anat = ReferenceAnatomy(
        outline=outline,
        sulci=tuple(sulci),
        seam_t=seam,
        n_areas=cfg.n_areas,
        warp_alpha0=alpha,
        warp_alpha1=rng.uniform(-0.05, 0.05, n_warp),
        warp_period=rng.uniform(8.0, 20.0, n_warp) * scale,
        warp_phase=rng.uniform(0, _TWO_PI, n_warp),
        warp_psi0=rng.uniform(0, _TWO_PI, n_warp),
        warp_psi1=rng.uniform(-0.3, 0.3, n_warp),
        shift0=float(rng.uniform(0, 1)),
        shift1=float(rng.uniform(0.005, 0.015)),
        shift_period=float(rng.uniform(10.0, 25.0) * scale),
        thickness_k=_random_wavevectors(rng, 3, 12.0 * scale, 24.0 * scale),
        thickness_amp=rng.uniform(0.2, 0.33, 3) * THICKNESS_VARIATION,  # sum < THICKNESS_VARIATION
        thickness_phase=rng.uniform(0, _TWO_PI, 3),
    )
    # Make every sulcus keep its neighbours and the far side of the brain at a distance that leaves white
    # matter between the cortices: shrink the offending sulcus until it fits.
    # Heights checked: the first 60 mm of any stack (section 0 lies near w = 0); every variation with w is
    # periodic with periods up to 25 mm, so this covers their combinations well.
    w_levels = np.arange(-5.0, 60.0, 0.5)
    clearance = 2.0 * (t_hi + 0.25)
    t = np.linspace(0.0, _TWO_PI, 720, endpoint=False)
    tt, ww = np.meshgrid(t, w_levels)
    ox, oy = anat.outline.point(tt, ww)[:2]
    outline_pts = (ox, oy)
    sulci = list(anat.sulci)
    for _ in range(200):
        shrink = _sulcus_conflicts(anat, w_levels, outline_pts, clearance)
        if not shrink:
            break
        for k in shrink:
            sulci[k] = Sulcus(**{**sulci[k].__dict__, "depth0": sulci[k].depth0 * 0.9})
        anat = ReferenceAnatomy(**{**anat.__dict__, "sulci": tuple(sulci)})
    return anat


def _random_wavevectors(rng: np.random.Generator, n: int, lo_mm: float, hi_mm: float) -> np.ndarray:
    """``n`` 3D wave vectors with random directions and wavelengths in [lo_mm, hi_mm]."""
    d = rng.standard_normal((n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d * (_TWO_PI / rng.uniform(lo_mm, hi_mm, n))[:, None]


# ----------------------------------------------------------------------------------------------------------
# Brains


@dataclass(frozen=True)
class BrainParams:
    """Everything that differs between brains: transform to the reference space, thickness, cells, stain."""

    index: int
    name: str
    center: np.ndarray
    """Brain position (x, y, z mm) that maps near the reference origin (image centre, first section)."""
    matrix: np.ndarray
    """Linear part M (3, 3) of the brain -> reference transform."""
    matrix_inv: np.ndarray
    offset: np.ndarray
    """Translation t (3,)."""
    warp_amp: np.ndarray
    """Amplitudes (3 waves, 3 components) of the smooth warp."""
    warp_k: np.ndarray
    """Wave vectors (3, 3) of the warp, 1/mm."""
    warp_phase: np.ndarray
    thickness_mm: float
    """Mean cortical thickness of this brain."""
    cell_scale: float
    """Factor on all cell sizes."""
    density_scale: float
    """Factor on all cell densities."""
    neuropil: float
    """Grey value of cortical neuropil."""
    white_matter: float
    """Grey value of white matter."""
    background: float
    """Grey value outside the tissue."""
    contrast: float
    """Factor on the optical density of cells."""
    noise_sd: float
    """Standard deviation of the pixel noise (grey values)."""
    texture_amp: float
    """Amplitude of the fibrous texture (grey values)."""
    extra: dict[str, float] = field(default_factory=dict)


def brain_name(index: int) -> str:
    """Brain identifier, ``B00``, ``B01``, ..."""
    return f"B{index:02d}"


def brain_params(cfg: SynthConfig, index: int) -> BrainParams:
    """The parameters of brain ``index`` (a function of the seed and the index only)."""
    rng = np.random.default_rng([cfg.seed, _TAG_BRAIN, index])
    scale = min(cfg.brain_width_mm, cfg.brain_height_mm * 4 / 3) / 24.0
    phi = math.radians(rng.uniform(-4.0, 4.0))
    sx, sy = rng.uniform(0.96, 1.04, 2)
    tilt = np.radians(rng.uniform(-1.2, 1.2, 2))
    rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    matrix = np.eye(3)
    matrix[:2, :2] = np.diag([sx, sy]) @ rot
    matrix[2, 0], matrix[2, 1] = np.tan(tilt)
    step_mm = cfg.section_step_um / 1000.0
    offset = np.array(
        [rng.uniform(-0.3, 0.3) * scale, rng.uniform(-0.3, 0.3) * scale, rng.uniform(-0.5, 0.5) * min(step_mm, 1.0)]
    )
    amp = rng.uniform(-0.2, 0.2, (3, 3)) * scale
    amp[:, 2] *= 0.5
    lo, hi = cfg.cortex_thickness_mm
    return BrainParams(
        index=index,
        name=brain_name(index),
        center=np.array([0.5 * cfg.brain_width_mm, 0.5 * cfg.brain_height_mm, 0.0]),
        matrix=matrix,
        matrix_inv=np.linalg.inv(matrix),
        offset=offset,
        warp_amp=amp,
        warp_k=_random_wavevectors(rng, 3, 12.0 * scale, 24.0 * scale),
        warp_phase=rng.uniform(0, _TWO_PI, 3),
        thickness_mm=float(rng.uniform(lo, hi)),
        cell_scale=float(rng.uniform(0.88, 1.12)),
        density_scale=float(rng.uniform(0.88, 1.12)),
        neuropil=float(rng.uniform(158.0, 184.0)),
        white_matter=float(rng.uniform(14.0, 28.0)),
        background=float(rng.uniform(232.0, 244.0)),
        contrast=float(rng.uniform(0.8, 1.2)),
        noise_sd=float(rng.uniform(3.0, 6.0)),
        texture_amp=float(rng.uniform(2.0, 4.5)),
    )


def _warp(p: BrainParams, q: np.ndarray) -> np.ndarray:
    out = np.zeros_like(q)
    for j in range(p.warp_k.shape[0]):
        k = p.warp_k[j]
        s = np.sin(q[..., 0] * k[0] + q[..., 1] * k[1] + q[..., 2] * k[2] + p.warp_phase[j])
        out += s[..., None] * p.warp_amp[j]
    return out


def brain_to_reference(p: BrainParams, xyz: np.ndarray) -> np.ndarray:
    """Reference coordinates (..., 3) of brain positions ``xyz`` (..., 3): image x, image y, z (mm)."""
    q = np.asarray(xyz, dtype=np.float64) - p.center
    return q @ p.matrix.T + p.offset + _warp(p, q)


def reference_to_brain(p: BrainParams, ref: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Brain positions (..., 3) of reference coordinates ``ref`` (..., 3); inverse of :func:`brain_to_reference`.

    Fixed-point iteration ``q <- M^-1 (ref - t - warp(q))``; it contracts because the warp's slope is small.
    """
    r = np.asarray(ref, dtype=np.float64) - p.offset
    q = r @ p.matrix_inv.T
    for _ in range(iterations):
        q = (r - _warp(p, q)) @ p.matrix_inv.T
    return q + p.center


def brain_pixel_of_reference(cfg: SynthConfig, p: BrainParams, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (row, col) pixel position and brain z (mm) of reference coordinates ``ref`` (..., 3) in brain
    ``p``: returns ``(rowcol[..., 2], z[...])``; the nearest written section is the one with the closest z."""
    xyz = reference_to_brain(p, ref)
    px_mm = cfg.pixel_size_um / 1000.0
    rowcol = np.stack([xyz[..., 1] / px_mm - 0.5, xyz[..., 0] / px_mm - 0.5], axis=-1)
    return rowcol, xyz[..., 2]


# ----------------------------------------------------------------------------------------------------------
# Fields of one section on the node grid


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial smooth minimum of a and b (radius k) and the weight h of ``a`` (1: a, 0: b)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h), h


def _blend_cyclic(xa: np.ndarray, xb: np.ndarray, h: np.ndarray, period: np.ndarray) -> np.ndarray:
    """h * xa + (1 - h) * xb on a circle of circumference ``period``."""
    delta = xa - xb
    delta = delta - period * np.round(delta / period)
    return np.mod(xb + h * delta, period)


@dataclass
class NodeFields:
    """Fields of one section on the node grid (spacing :data:`GRID_MM`, node (i, j) at y = i g, x = j g)."""

    fields: dict[str, np.ndarray]
    """float32 (Ny, Nx) arrays: d, thickness, eta, u, v, w, gx, gy (unit depth gradient), stain, jitter."""
    n_areas: int
    loop_mm: float
    """Mean length of the pial loop in this section (mm) — converts area-coordinate units to mm."""

    @property
    def shape(self) -> tuple[int, int]:
        ny, nx = self.fields["d"].shape
        return ny, nx

    def sample_points(self, y_mm: np.ndarray, x_mm: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Bilinear samples at arbitrary points (eta is interpolated on its circle)."""
        ny, nx = self.shape
        fy = np.clip(y_mm / GRID_MM, 0.0, ny - 1.000001)
        fx = np.clip(x_mm / GRID_MM, 0.0, nx - 1.000001)
        i0 = fy.astype(np.int64)
        j0 = fx.astype(np.int64)
        wy = (fy - i0).astype(np.float32)
        wx = (fx - j0).astype(np.float32)
        k00 = i0 * nx + j0
        k10 = k00 + nx
        out = {}
        for name in names:
            f = self.fields[name].reshape(-1)
            v00, v01 = np.take(f, k00), np.take(f, k00 + 1)
            v10, v11 = np.take(f, k10), np.take(f, k10 + 1)
            if name == "eta":
                k = np.float32(self.n_areas)
                v01 = v01 - k * np.round((v01 - v00) / k)
                v10 = v10 - k * np.round((v10 - v00) / k)
                v11 = v11 - k * np.round((v11 - v00) / k)
            top = v00 + (v01 - v00) * wx
            bottom = v10 + (v11 - v10) * wx
            val = top + (bottom - top) * wy
            out[name] = np.mod(val, np.float32(self.n_areas)) if name == "eta" else val
        return out

    def sample_block(
        self, y0: int, y1: int, x0: int, x1: int, px_mm: float, names: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Bilinear samples at the centres of pixels [y0:y1, x0:x1] (separable: columns first, then rows).

        Every output pixel depends only on its own position, so blocks of any size give the same values.
        """
        ny, nx = self.shape
        # Pixels just outside the image (a one-pixel halo) take the values at the grid's edge.
        fy = np.clip((np.arange(y0, y1, dtype=np.float64) + 0.5) * px_mm / GRID_MM, 0.0, ny - 1.000001)
        fx = np.clip((np.arange(x0, x1, dtype=np.float64) + 0.5) * px_mm / GRID_MM, 0.0, nx - 1.000001)
        i0 = fy.astype(np.int64)
        j0 = fx.astype(np.int64)
        wy = (fy - i0).astype(np.float32)[:, None]
        wx = (fx - j0).astype(np.float32)[None, :]
        r0, r1 = int(i0.min()), int(i0.max()) + 2
        ri = i0 - r0
        out = {}
        for name in names:
            f = self.fields[name][r0:r1]
            a, b = f[:, j0], f[:, j0 + 1]
            if name == "eta":
                k = np.float32(self.n_areas)
                b = b - k * np.round((b - a) / k)
            cols = a + (b - a) * wx
            top, bottom = cols[ri], cols[ri + 1]
            if name == "eta":
                bottom = bottom - k * np.round((bottom - top) / k)
            val = top + (bottom - top) * wy
            out[name] = np.mod(val, np.float32(self.n_areas)) if name == "eta" else val
        return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_mm: float) -> np.ndarray:
    """Unit-variance smooth random field on the node grid (white noise on a coarse grid, filtered, upsampled)."""
    coarse_mm = sigma_mm / 3.0
    step = coarse_mm / GRID_MM
    cshape = (int(shape[0] / step) + 4, int(shape[1] / step) + 4)
    noise = ndimage.gaussian_filter(rng.standard_normal(cshape), 3.0, mode="wrap")
    noise /= max(float(noise.std()), 1e-9)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64) / step
    return ndimage.map_coordinates(noise, [yy + 1, xx + 1], order=1, mode="nearest")


def section_nodes(cfg: SynthConfig, anat: ReferenceAnatomy, brain: BrainParams, section_index: int) -> NodeFields:
    """Evaluate the geometry of one section on the node grid."""
    margin = 2.0 * cfg.pixel_size_um / 1000.0  # room for a one-pixel halo below and right of the image
    ny = math.ceil((cfg.brain_height_mm + margin) / GRID_MM) + 2
    nx = math.ceil((cfg.brain_width_mm + margin) / GRID_MM) + 2
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64) * GRID_MM
    z = section_z_mm(cfg, section_index)
    ref = brain_to_reference(brain, np.stack([xx, yy, np.full_like(xx, z)], axis=-1))
    u, v, w = ref[..., 0], ref[..., 1], ref[..., 2]
    flat = (u.ravel(), v.ravel(), w.ravel())
    d, xi, loop = _pial_distance(anat, *flat)
    loop_mm = float(np.mean(loop))
    eta = anat.area_coordinate(xi / loop, flat[2])
    thick = brain.thickness_mm * anat.thickness_factor(*flat)
    d2 = d.reshape(ny, nx)
    gy, gx = np.gradient(d2, GRID_MM)
    norm = np.hypot(gx, gy) + 1e-9
    gx, gy = gx / norm, gy / norm
    rng = np.random.default_rng([cfg.seed, _TAG_FIELDS, brain.index, section_index])
    fields = {
        "d": d2,
        "thickness": thick.reshape(ny, nx),
        "eta": eta.reshape(ny, nx),
        "u": u,
        "v": v,
        "w": w,
        "gx": gx,
        "gy": gy,
        "stain": _smooth_noise(rng, (ny, nx), 2.0),
        "jitter": _smooth_noise(rng, (ny, nx), 0.4),
    }
    return NodeFields(
        fields={k: np.ascontiguousarray(a, dtype=np.float32) for k, a in fields.items()},
        n_areas=anat.n_areas,
        loop_mm=loop_mm,
    )


def _pial_distance(
    anat: ReferenceAnatomy, u: np.ndarray, v: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance to the pial surface (positive in tissue), ribbon coordinate xi (mm along the loop) and
    the loop length, at reference positions (flat arrays)."""
    # Tables over reference heights; each point interpolates linearly between two levels.
    w_lo, w_hi = float(w.min()) - LEVEL_MM, float(w.max()) + LEVEL_MM
    n_lv = max(2, math.ceil((w_hi - w_lo) / LEVEL_MM) + 1)
    levels = np.linspace(w_lo, w_hi, n_lv)
    fl = (w - w_lo) / (levels[1] - levels[0])
    il = np.clip(fl.astype(np.int64), 0, n_lv - 2)
    wl = np.clip(fl - il, 0.0, 1.0)

    def lerp(table: np.ndarray) -> np.ndarray:
        lo, hi = table[il], table[il + 1]
        ww = wl.reshape(wl.shape + (1,) * (lo.ndim - 1))
        return lo * (1.0 - ww) + hi * ww

    cum, perim = anat.arc_tables(levels)
    pts, svals, mouths = anat.sulcus_polylines(levels)
    n_s = len(anat.sulci)
    depth = svals[:, :, -1]  # (n_lv, n_s): fundus arc length from the mouth
    seam_i = anat.seam_t / (_TWO_PI / N_THETA)

    def arc(t_rel_table_pos: np.ndarray, lv: np.ndarray) -> np.ndarray:
        pos = np.clip(t_rel_table_pos, 0.0, N_THETA - 1e-9)
        i0 = pos.astype(np.int64)
        f = pos - i0
        return cum[lv, i0] * (1.0 - f) + cum[lv, i0 + 1] * f

    seam_arc = np.array([np.interp(seam_i, np.arange(N_THETA + 1), cum[i]) for i in range(n_lv)])
    mouth_rel = np.mod(mouths - anat.seam_t, _TWO_PI)  # (n_lv, n_s)
    mouth_arc = np.mod(
        np.stack([np.interp(mouths[i] / (_TWO_PI / N_THETA), np.arange(N_THETA + 1), cum[i]) for i in range(n_lv)])
        - seam_arc[:, None],
        perim[:, None],
    )
    inserted = np.concatenate([np.zeros((n_lv, 1)), np.cumsum(2.0 * depth, axis=1)[:, :-1]], axis=1)
    mouth_xi = mouth_arc + inserted  # (n_lv, n_s)
    loop_tab = perim + 2.0 * depth.sum(axis=1)
    loop = lerp(loop_tab)

    # Outline.
    d_out, t_near = anat.outline.nearest(u, v, w)
    t_rel = np.mod(t_near - anat.seam_t, _TWO_PI)
    pos = t_near / (_TWO_PI / N_THETA)
    a_lo = arc(pos, il) - seam_arc[il]
    a_hi = arc(pos, il + 1) - seam_arc[il + 1]
    xi_out = np.mod(a_lo, perim[il]) * (1.0 - wl) + np.mod(a_hi, perim[il + 1]) * wl
    for k in range(n_s):
        past = t_rel > lerp(mouth_rel[:, k])
        xi_out = xi_out + np.where(past, 2.0 * lerp(depth[:, k]), 0.0)

    # Sulci, combined one after the other with the outline by the smooth minimum. A sulcus changes nothing
    # where it is at least SMOOTH_MIN_MM farther than the current distance (the weight of the current value is
    # then exactly 1), so only points whose distance to its bounding box is below that are evaluated.
    d = d_out
    xi = np.mod(xi_out, loop)
    for k in range(n_s):
        lo, hi = pts[:, k].min(axis=(0, 1)), pts[:, k].max(axis=(0, 1))
        gap = np.hypot(
            np.maximum(np.maximum(lo[0] - u, u - hi[0]), 0.0), np.maximum(np.maximum(lo[1] - v, v - hi[1]), 0.0)
        )
        near = np.flatnonzero(gap - SULCUS_HALF_GAP_MM < d + SMOOTH_MIN_MM)
        if near.size == 0:
            continue
        nu, nv, nil, nwl = u[near], v[near], il[near], wl[near][:, None]
        p = pts[nil, k] * (1.0 - nwl[:, :, None]) + pts[nil + 1, k] * nwl[:, :, None]  # (n, n_pts, 2)
        sv = svals[nil, k] * (1.0 - nwl) + svals[nil + 1, k] * nwl  # (n, n_pts)
        best = np.full(near.shape, np.inf)
        ell = np.zeros(near.shape)
        side = np.zeros(near.shape)
        for j in range(N_SULCUS_POINTS - 1):
            ax, ay = p[:, j, 0], p[:, j, 1]
            ex, ey = p[:, j + 1, 0] - ax, p[:, j + 1, 1] - ay
            tt = np.clip(((nu - ax) * ex + (nv - ay) * ey) / (ex * ex + ey * ey + 1e-12), 0.0, 1.0)
            qx, qy = nu - ax - tt * ex, nv - ay - tt * ey
            dist2 = qx * qx + qy * qy
            better = dist2 < best
            best = np.where(better, dist2, best)
            ell = np.where(better, sv[:, j] + tt * (sv[:, j + 1] - sv[:, j]), ell)
            # cross(segment, point - nearest) > 0: the bank the loop walks down (it arrives from that side).
            side = np.where(better, ex * qy - ey * qx, side)
        dep = depth[nil, k] * (1.0 - nwl[:, 0]) + depth[nil + 1, k] * nwl[:, 0]
        mxi = mouth_xi[nil, k] * (1.0 - nwl[:, 0]) + mouth_xi[nil + 1, k] * nwl[:, 0]
        lp = loop[near]
        xk = np.mod(mxi + np.where(side > 0, ell, 2.0 * dep - ell), lp)
        dk = np.sqrt(best) - SULCUS_HALF_GAP_MM
        dn, h = _smin(d[near], dk, SMOOTH_MIN_MM)
        d = d.copy()
        xi = xi.copy()
        d[near] = dn
        xi[near] = _blend_cyclic(xi[near], xk, h, lp)
    return d, xi, loop
