"""Figures of the analysis as PNG files (matplotlib, Agg backend; nothing is shown on screen).

- :func:`scatter_panels`: a 2D embedding coloured by several labelings side by side (t-SNE by cluster, area
  and brain, seed 002 Fig. 3; UMAP by area and brain, seed 004).
- :func:`section_maps`: scalar maps on the dense grid of a section over a grey thumbnail of the section (NMF
  factor heatmaps, seed 000 Fig. 2C; first UMAP dimension, seed 004).
- :func:`rgb_map`: three maps as the red, green and blue channels of one image (seed 000 Fig. 2B1).
- :func:`label_map`: a categorical map (Gaussian-mixture clusters, seed 000 Fig. 2A2).
- :func:`matrix_heatmap`: a small matrix with row and column names (factor scores per region).
- :func:`section_thumbnail`: a section's image layer, subsampled to at most ``max_px`` per side.

Maps take a :class:`GridGeometry` that places grid point (i, j) at its patch centre in section pixels, so maps
and thumbnails share one extent in mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_CATEGORICAL_LEGEND_MAX = 24


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class GridGeometry:
    """Where the dense grid of a section lies (see :mod:`cytonet.analysis.features`)."""

    shape: tuple[int, int]
    """Grid points (h, w)."""
    stride_px: int
    """Grid step in model pixels."""
    factor: int
    """Section pixels per model pixel."""
    patch_px: int
    """Patch edge in model pixels."""
    section_shape: tuple[int, int]
    """Section size in section pixels."""
    section_pixel_um: float
    """Section pixel size."""

    @classmethod
    def from_attrs(cls, grid: dict[str, Any], section_pixel_um: float) -> GridGeometry:
        return cls(
            shape=(int(grid["shape"][0]), int(grid["shape"][1])),
            stride_px=int(grid["stride_px"]),
            factor=int(grid["factor"]),
            patch_px=int(grid["patch_px"]),
            section_shape=(int(grid["section_shape"][0]), int(grid["section_shape"][1])),
            section_pixel_um=section_pixel_um,
        )

    def extent_mm(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) of the grid cells in mm, for ``imshow(origin="upper")``."""
        mm = self.section_pixel_um / 1000.0
        step = self.stride_px * self.factor
        c0 = (self.patch_px // 2) * self.factor + self.factor / 2.0  # centre of grid point 0 (section px)
        h, w = self.shape
        return (
            (c0 - step / 2) * mm,
            (c0 + (w - 0.5) * step) * mm,
            (c0 + (h - 0.5) * step) * mm,
            (c0 - step / 2) * mm,
        )

    def section_extent_mm(self) -> tuple[float, float, float, float]:
        mm = self.section_pixel_um / 1000.0
        h, w = self.section_shape
        return (0.0, w * mm, h * mm, 0.0)


def section_thumbnail(section_path: str | Path, max_px: int = 800) -> np.ndarray:
    """The image layer subsampled by an integer step so that both sides are at most ``max_px``."""
    from cytonet.data.sections import open_section

    with open_section(section_path) as reader:
        h, w = reader.shape
        step = max(1, int(np.ceil(max(h, w) / max_px)))
        arr = reader.array("image")
        rows = []
        band = step * max(1, 1024 // step)
        for y0 in range(0, h, band):
            # a copy: a strided view would keep the whole full-resolution band alive, and so the whole section
            rows.append(np.asarray(arr[y0 : min(y0 + band, h)])[::step, ::step].copy())
    return np.concatenate(rows)


def _categorical_colors(n: int) -> np.ndarray:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    if n <= 20:
        return np.asarray([cmap(i % cmap.N) for i in range(n)])
    return np.asarray(plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False)))


def scatter_panels(
    path: Path,
    xy: np.ndarray,
    panels: list[tuple[str, np.ndarray, dict[int, str]]],
    title: str,
    point_size: float = 6.0,
) -> Path:
    """One panel per ``(panel title, labels (n,), id -> name)``; points coloured by label, legend when few."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    for ax, (name, labels, names) in zip(axes[0], panels):
        ids = np.unique(labels)
        colors = _categorical_colors(len(ids))
        for c, lab in zip(colors, ids):
            sel = labels == lab
            ax.scatter(xy[sel, 0], xy[sel, 1], s=point_size, color=c, label=names.get(int(lab), str(lab)), lw=0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(ids) <= _CATEGORICAL_LEGEND_MAX:
            ax.legend(fontsize=6, markerscale=2, loc="best", ncol=1 + len(ids) // 12, frameon=False)
    fig.suptitle(title)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write the PNG and free the figure (every figure of this module ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _map_figsize(geom: GridGeometry) -> tuple[float, float]:
    """A 6.5 in wide figure with the section's aspect ratio (plus room for a title)."""
    _, right, bottom, _ = geom.section_extent_mm()
    return 6.5, 6.5 * bottom / right + 0.5


def _underlay(ax: Any, thumb: np.ndarray | None, geom: GridGeometry) -> None:
    if thumb is not None:
        ax.imshow(thumb, cmap="gray", vmin=0, vmax=255, extent=geom.section_extent_mm(), interpolation="bilinear")


def _finish_map_axes(ax: Any, geom: GridGeometry) -> None:
    left, right, bottom, top = geom.section_extent_mm()
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_xticks([])
    ax.set_yticks([])


def section_maps(
    path: Path,
    maps: list[tuple[str, np.ndarray]],
    geom: GridGeometry,
    thumb: np.ndarray | None,
    title: str,
    cmap: str = "magma",
) -> Path:
    """Scalar maps (h, w) over the section thumbnail, one panel each; NaN cells are transparent."""
    plt = _plt()
    n = len(maps)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    h_mm, w_mm = geom.section_extent_mm()[2], geom.section_extent_mm()[1]
    panel_w = 4.2 if cols > 1 else 6.5
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, panel_w * rows * h_mm / w_mm + 0.6), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.ravel(), maps):
        _underlay(ax, thumb, geom)
        finite = m[np.isfinite(m)]
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        im = ax.imshow(
            np.ma.masked_invalid(m),
            cmap=cmap,
            vmin=lo,
            vmax=hi if hi > lo else lo + 1e-6,
            extent=geom.extent_mm(),
            interpolation="nearest",
            alpha=0.85,
        )
        fig.colorbar(im, ax=ax, fraction=0.035)
        ax.set_title(name, fontsize=9)
        _finish_map_axes(ax, geom)
    fig.suptitle(title)
    return _save(plt, fig, path)


def rgb_map(
    path: Path, maps: list[tuple[str, np.ndarray]], geom: GridGeometry, thumb: np.ndarray | None, title: str
) -> Path:
    """Up to three maps as the R, G, B channels (each scaled to its 99th percentile); NaN cells transparent."""
    plt = _plt()
    h, w = geom.shape
    rgba = np.zeros((h, w, 4), np.float32)
    valid = np.zeros((h, w), bool)
    for c, (_, m) in enumerate(maps[:3]):
        finite = m[np.isfinite(m)]
        top = float(np.percentile(finite, 99)) if finite.size else 1.0
        rgba[..., c] = np.clip(np.nan_to_num(m, nan=0.0) / (top if top > 0 else 1.0), 0, 1)
        valid |= np.isfinite(m)
    rgba[..., 3] = valid
    fig, ax = plt.subplots(figsize=_map_figsize(geom))
    _underlay(ax, thumb, geom)
    ax.imshow(rgba, extent=geom.extent_mm(), interpolation="nearest")
    names = [f"{ch}: {name}" for ch, (name, _) in zip(("R", "G", "B"), maps[:3])]
    ax.set_title(f"{title}\n" + ", ".join(names), fontsize=9)
    _finish_map_axes(ax, geom)
    return _save(plt, fig, path)


def label_map(
    path: Path, labels: np.ndarray, names: dict[int, str], geom: GridGeometry, thumb: np.ndarray | None, title: str
) -> Path:
    """A categorical map (h, w) of ids; cells with id < 0 are transparent."""
    plt = _plt()
    ids = [int(i) for i in np.unique(labels) if i >= 0]
    colors = _categorical_colors(max(len(ids), 1))
    rgba = np.zeros((*labels.shape, 4), np.float32)
    for c, i in zip(colors, ids):
        rgba[labels == i] = c
    fig, ax = plt.subplots(figsize=_map_figsize(geom))
    _underlay(ax, thumb, geom)
    ax.imshow(rgba, extent=geom.extent_mm(), interpolation="nearest", alpha=0.85)
    handles = [plt.Line2D([], [], ls="", marker="s", color=c, label=names.get(i, str(i))) for c, i in zip(colors, ids)]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="upper right", frameon=True)
    ax.set_title(title, fontsize=10)
    _finish_map_axes(ax, geom)
    return _save(plt, fig, path)


def matrix_heatmap(
    path: Path,
    matrix: np.ndarray,
    row_names: list[str],
    col_names: list[str],
    title: str,
    cmap: str = "viridis",
    marks: list[tuple[int, int]] | None = None,
    centre: float | None = None,
) -> Path:
    """A (rows, cols) matrix as an image with named axes; ``marks`` outlines the (row, col) cells given;
    ``centre`` makes the colour scale symmetric around that value (diverging maps)."""
    plt = _plt()
    r, c = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * c + 2.5), max(3.0, 0.32 * r + 1.5)))
    lim: dict[str, float] = {}
    if centre is not None:
        half = float(np.nanmax(np.abs(matrix - centre))) or 1.0
        lim = {"vmin": centre - half, "vmax": centre + half}
    im = ax.imshow(matrix, cmap=cmap, aspect="auto", **lim)
    ax.set_xticks(range(c), col_names, rotation=90, fontsize=7)
    ax.set_yticks(range(r), row_names, fontsize=7)
    for i, j in marks or []:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def png_is_blank(path: Path) -> bool:
    """True when a PNG has (almost) no content: one colour, or no variation of its pixels."""
    plt = _plt()
    img = np.asarray(plt.imread(path))
    flat = img.reshape(-1, img.shape[-1]) if img.ndim == 3 else img.reshape(-1, 1)
    q = (flat[:, :4] * 255).round().astype(np.uint32)
    packed = np.zeros(len(q), np.uint32)
    for c in range(q.shape[1]):  # one integer per colour: np.unique over rows is much slower
        packed = (packed << np.uint32(8)) | q[:, c]
    return len(np.unique(packed)) < 8 or float(flat.std()) < 1e-3
