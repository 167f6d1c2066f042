"""kNN clean-up of area label maps (seed 001, Balwani et al., "Algorithm 1", extended to 3D).

For every area i, the points predicted as i form connected components; only the ``m`` largest are kept as
*seeds* (seed 001: "we only maintain the set of points in the m_i largest components predicted with the label
i"; one m for all areas, or m_i per area). Every other labelled point is relabelled by a k-nearest-neighbour vote among the seeds, with positions
as features: 2D positions within a section, or 3D positions across a stack of sections (a brain), where
components connect through neighbouring sections.

Entry point: :func:`knn_cleanup` (pure: label arrays and positions in, label arrays out).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def seed_mask(labels: np.ndarray, components: int, per_area: Mapping[int, int] | None = None) -> np.ndarray:
    """Boolean mask of the points in the m_i largest connected components of each area i: ``per_area[i]``,
    else ``components``.

    ``labels``: (h, w) or (z, h, w) integer area ids, 0 = unlabelled (never a seed). Connectivity: all
    neighbours including diagonals (8 in 2D, 26 in 3D). Ties in size are broken by the component's first
    point in C order, so the result is deterministic.
    """
    seeds = np.zeros(labels.shape, dtype=bool)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for area in np.unique(labels):
        if area == 0:
            continue
        comp, n = ndimage.label(labels == area, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        m = (per_area or {}).get(int(area), components)
        keep = np.argsort(-sizes, kind="stable")[:m] + 1
        seeds |= np.isin(comp, keep)
    return seeds


def knn_cleanup(
    labels: np.ndarray, positions: np.ndarray, k: int, components: int, per_area: Mapping[int, int] | None = None
) -> np.ndarray:
    """Relabel the non-seed points of ``labels`` by a majority vote of their ``k`` nearest seeds
    (:func:`seed_mask` with ``components`` and ``per_area``).

    ``labels``: (..., ) integer area ids, 0 = not labelled (left as is); ``positions``: (..., d) coordinates of
    every point (um or mm, any unit shared by all axes). Votes are weighted equally; a tie goes to the smallest
    area id. Returns a new array; seeds keep their labels.
    """
    if positions.shape[:-1] != labels.shape:
        raise ValueError(f"positions {positions.shape} do not match labels {labels.shape} (+ one axis of coordinates)")
    seeds = seed_mask(labels, components, per_area)
    out = labels.copy()
    todo = (labels != 0) & ~seeds
    if not todo.any() or not seeds.any():
        return out
    seed_pos = positions[seeds].astype(np.float64)
    seed_lab = labels[seeds]
    kk = min(k, len(seed_pos))
    _, idx = cKDTree(seed_pos).query(positions[todo].astype(np.float64), k=kk)
    votes = seed_lab[idx.reshape(len(idx), kk)]
    areas = np.unique(seed_lab)
    counts = (votes[:, :, None] == areas[None, None, :]).sum(axis=1)
    out[todo] = areas[np.argmax(counts, axis=1)]  # argmax takes the first (smallest id) among ties
    return out


def grid_positions(shape: tuple[int, int], pixel_um: float, z_um: float | None = None) -> np.ndarray:
    """(h, w, 2) in-plane positions (um) of a label map's pixels, or (h, w, 3) with the section's z first."""
    yy, xx = np.meshgrid(np.arange(shape[0]) * pixel_um, np.arange(shape[1]) * pixel_um, indexing="ij")
    planes = [yy, xx] if z_um is None else [np.full(shape, z_um), yy, xx]
    return np.stack(planes, axis=-1)


def stack_cleanup(
    label_maps: list[np.ndarray],
    z_um: list[float],
    pixel_um: float,
    k: int,
    components: int,
    per_area: Mapping[int, int] | None = None,
) -> list[np.ndarray]:
    """3D clean-up of a brain's sections: the maps are stacked in z order (padded to a common shape with 0)."""
    if not label_maps:
        return []
    order = np.argsort(z_um, kind="stable")
    h = max(m.shape[0] for m in label_maps)
    w = max(m.shape[1] for m in label_maps)
    vol = np.zeros((len(label_maps), h, w), dtype=label_maps[0].dtype)
    pos = np.zeros((len(label_maps), h, w, 3))
    for slot, i in enumerate(order):
        m = label_maps[i]
        vol[slot, : m.shape[0], : m.shape[1]] = m
        pos[slot] = grid_positions((h, w), pixel_um, z_um[i])
    cleaned = knn_cleanup(vol, pos, k, components, per_area)
    out: list[np.ndarray] = [np.empty(0)] * len(label_maps)
    for slot, i in enumerate(order):
        m = label_maps[i]
        out[i] = cleaned[slot, : m.shape[0], : m.shape[1]]
    return out
