"""kNN clean-up of area label maps (seed 001, Balwani et al., "Algorithm 1", extended to 3D).

For every area i, the points predicted as i form connected components; only the ``m`` largest are kept as
*seeds* (seed 001: "we only maintain the set of points in the m_i largest components predicted with the label
i"; one m for all areas, or m_i per area). Every other labelled point is relabelled by a k-nearest-neighbour
vote among the seeds, with positions as features: 2D positions within a section, or 3D positions across a
stack of sections (a brain), where components connect through neighbouring sections.

Entry point: :func:`knn_cleanup` (pure: label arrays and their axes' coordinates in, label arrays out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


#: Points relabelled per kNN query: bounds the memory of the query and the vote, (points, k) and (points, areas).
QUERY_BATCH = 1 << 18
#: Cells of the vote's counts per batch, (points, areas): fewer points at a time where there are many areas.
VOTE_CELLS = 1 << 22


def knn_cleanup(
    labels: np.ndarray,
    axes_um: Sequence[np.ndarray],
    k: int,
    components: int,
    per_area: Mapping[int, int] | None = None,
    *,
    batch: int = QUERY_BATCH,
) -> np.ndarray:
    """Relabel the non-seed points of ``labels`` by a majority vote of their ``k`` nearest seeds
    (:func:`seed_mask` with ``components`` and ``per_area``).

    ``labels``: (h, w) or (z, h, w) integer area ids, 0 = not labelled (left as is); ``axes_um``: the
    coordinate of each index along each axis of ``labels`` (um or mm, any unit shared by all axes; e.g.
    :func:`grid_axes`): a point's position is its coordinates on all axes. Votes are weighted equally; a tie
    goes to the smallest area id. Returns a new array; seeds keep their labels.

    Memory: the positions of the seeds (for the k-d tree) and, ``batch`` points at a time, of the points to
    relabel; never of the whole grid, which is most of a section's output pixels at 8-24 bytes each.
    """
    if len(axes_um) != labels.ndim or any(len(a) != n for a, n in zip(axes_um, labels.shape)):
        raise ValueError(f"axes of lengths {[len(a) for a in axes_um]} do not match labels {labels.shape}")
    axes = [np.asarray(a, dtype=np.float64) for a in axes_um]

    def positions(index: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.stack([a[i] for a, i in zip(axes, index)], axis=1)

    seeds = seed_mask(labels, components, per_area)
    out = labels.copy()
    todo = np.nonzero((labels != 0) & ~seeds)
    if not len(todo[0]) or not seeds.any():
        return out
    where = np.nonzero(seeds)
    seed_lab = labels[where]
    tree = cKDTree(positions(where))
    del where
    areas, seed_code = np.unique(seed_lab, return_inverse=True)
    kk = min(k, len(seed_lab))
    step = max(1, min(batch, VOTE_CELLS // len(areas)))  # the vote's (points, areas) counts stay small too
    for start in range(0, len(todo[0]), step):
        part = tuple(i[start : start + step] for i in todo)
        _, idx = tree.query(positions(part), k=kk)
        votes = seed_code[idx.reshape(-1, kk)]  # (n, kk) indices into areas
        n = len(votes)
        counts = np.bincount((np.arange(n)[:, None] * len(areas) + votes).ravel(), minlength=n * len(areas))
        out[part] = areas[counts.reshape(n, len(areas)).argmax(axis=1)]  # the first (smallest id) among ties
    return out


def grid_axes(shape: tuple[int, ...], pixel_um: float) -> list[np.ndarray]:
    """The coordinates (um) along each axis of a label map with square ``pixel_um`` pixels."""
    return [np.arange(n) * pixel_um for n in shape]


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
    for slot, i in enumerate(order):
        m = label_maps[i]
        vol[slot, : m.shape[0], : m.shape[1]] = m
    z_axis = np.asarray(z_um, dtype=np.float64)[order]
    cleaned = knn_cleanup(vol, [z_axis, *grid_axes((h, w), pixel_um)], k, components, per_area)
    out: list[np.ndarray] = [np.empty(0)] * len(label_maps)
    for slot, i in enumerate(order):
        m = label_maps[i]
        out[i] = cleaned[slot, : m.shape[0], : m.shape[1]]
    return out
