"""The analysis steps on feature sets: what `cytonet analyze` computes and draws (orchestrated by
:mod:`cytonet.analysis.run`).

- :func:`analyse_patches` (patch features of the analysed splits): Ward clusters and their seed 002 Table 1
  composition by area and brain, agreement with the areas, t-SNE and UMAP figures, NMF with the seed 000
  coverage/leakage selection over the areas, a Gaussian mixture of the factors, one CSV row per patch.
- :func:`analyse_sections` (dense grids over sections): NMF over the tissue with the selection over the
  section's regions (white matter and areas), factor heatmaps, RGB composite, mixture clusters of the cortex,
  the first UMAP dimension, and the maps as arrays (``section-<name>-maps.npz``).

Both add the paths they write and the metrics they compute to an :class:`AnalysisResult`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytonet.analysis import cluster, embed, factors, figures
from cytonet.analysis.features import FeatureSet
from cytonet.config import AnalysisConfig, Config
from cytonet.errors import InputError

log = logging.getLogger(__name__)

#: Most patches clustered at once (Ward's distance matrix: 8 n^2 bytes, 20 GB here).
WARD_MAX = 50_000


@dataclass
class AnalysisResult:
    """What :func:`run_analysis` wrote."""

    out: Path
    figures: dict[str, Path] = field(default_factory=dict)
    """Figure name (e.g. ``tsne``) -> PNG path."""
    tables: dict[str, Path] = field(default_factory=dict)
    """Table name (e.g. ``clusters``) -> CSV path."""
    maps: dict[str, Path] = field(default_factory=dict)
    """Dense section name -> ``section-<name>-maps.npz``: the grid maps as arrays (see :func:`analyse_sections`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Agreement of the clusterings with the areas (ARI, NMI, ARI against shuffled areas)."""
    report: Path | None = None
    notes: list[str] = field(default_factory=list)
    """Steps skipped and why (e.g. UMAP without umap-learn)."""


def names_of(attrs: dict[str, Any], key: str) -> dict[int, str]:
    value = attrs[key]
    if isinstance(value, dict):
        return {int(k): str(v) for k, v in value.items()}
    return {i: str(v) for i, v in enumerate(value)}


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _selection_rows(sel: list[factors.Selection], roi_names: list[str]) -> list[list[Any]]:
    return [
        [order + 1, s.factor + 1, roi_names[s.roi], int(s.coverage), int(s.leakage), f"{s.score:.1f}"]
        for order, s in enumerate(sel)
    ]


SELECTION_HEADER = ["pick", "factor", "region", "coverage", "leakage", "total_score"]


def _factor_analysis(
    v_raw: np.ndarray, roi_of: np.ndarray, rois: list[int], roi_names: list[str], cfg: Config
) -> tuple[np.ndarray, np.ndarray, list[factors.Selection]]:
    """Coverage, leakage (k, r) and the greedy picks for the coefficients ``v_raw`` (n, k)."""
    acfg = cfg.analysis
    v = factors.active_coefficients(v_raw, acfg.nmf_active_threshold)
    cov, leak = factors.coverage_leakage(v, roi_of, rois)
    p = acfg.nmf_select or None
    p = min(p, len(rois)) if p else None
    sel = factors.greedy_factor_selection(cov, leak, acfg.selection_lambda, p)
    log.info(
        "analysis: NMF picks %s",
        ", ".join(f"F{s.factor + 1}->{roi_names[s.roi]} ({s.coverage:.0f}/{s.leakage:.0f})" for s in sel),
    )
    return cov, leak, sel


def _layer_selection(
    coeffs: np.ndarray, depth: np.ndarray, label: np.ndarray, cfg: Config
) -> tuple[list[factors.Selection], list[str]]:
    """Seed 000 Fig. 2B1: the greedy picks of the NMF factors over the cortical layers (the depth bands of
    ``analysis.layer_borders``) on the cortex points (label >= 2, with a depth), and the names of the layers
    (I-VI for six); no picks where too few points have a depth (sections without a depth map)."""
    borders = cfg.analysis.layer_borders
    n = len(borders) - 1
    names = ["I", "II", "III", "IV", "V", "VI"] if n == 6 else [f"L{i + 1}" for i in range(n)]
    cortex = (label >= 2) & np.isfinite(depth)
    if cortex.sum() < max(4, n):
        return [], names
    layer = np.clip(np.searchsorted(borders, depth[cortex], side="right") - 1, 0, n - 1)
    rois = sorted(int(v) for v in np.unique(layer))
    _, _, sel = _factor_analysis(coeffs[cortex], layer, rois, [names[r] for r in rois], cfg)
    # Selections index ``rois``; name them by layer.
    return sel, [names[r] for r in rois]


def _gmm_input(coeffs: np.ndarray, sel: list[factors.Selection], cfg: Config) -> np.ndarray:
    if cfg.analysis.gmm_factors == "selected":
        return coeffs[:, [s.factor for s in sel]]
    return coeffs


def thread_limit(threads: int) -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS and OpenMP pools to ``threads`` (0: leave them) for the scikit-learn and umap steps."""
    if threads <= 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def check_patch_count(n: int, acfg: AnalysisConfig) -> None:
    """Refuse ``n`` patches that Ward clustering cannot take: too many for its memory, fewer than its clusters."""
    if n > WARD_MAX:
        raise InputError(
            f"{n} patches to analyse: Ward clustering needs O(n^2) memory ({8e-9 * n * n:.0f} GB); "
            f"set analysis.max_patches_per_split so that at most {WARD_MAX} remain"
        )
    if n < max(acfg.n_clusters, 4):
        raise InputError(f"only {n} patches to analyse; need at least analysis.n_clusters={acfg.n_clusters}")


def analyse_patches(fs: FeatureSet, cfg: Config, out: Path, result: AnalysisResult, split_of: np.ndarray) -> None:
    """Ward clustering, t-SNE, UMAP, NMF and mixture of the patch features; fills ``result``.

    Runs with ``analysis.threads`` BLAS/OpenMP threads. ``split_of`` (N,) holds each row's split code.
    """
    with thread_limit(cfg.analysis.threads):
        _analyse_patches(fs, cfg, out, result, split_of)


def _analyse_patches(fs: FeatureSet, cfg: Config, out: Path, result: AnalysisResult, split_of: np.ndarray) -> None:
    acfg = cfg.analysis
    x = fs.features
    area = fs.columns["area"].astype(np.int64)
    brain = fs.columns["brain"].astype(np.int64)
    area_names = names_of(fs.attrs, "areas")
    brain_names = names_of(fs.attrs, "brains")
    n = len(fs)
    check_patch_count(n, acfg)

    t0 = time.perf_counter()
    clusters = cluster.ward_clusters(x, acfg.n_clusters)
    rows = cluster.composition_table(clusters, area, area_names, acfg.table_top_areas)
    result.tables["clusters"] = cluster.write_composition_csv(out / "clusters.csv", rows, acfg.table_top_areas)
    rows_b = cluster.composition_table(clusters, brain, brain_names, min(acfg.table_top_areas, len(brain_names)))
    result.tables["cluster-brains"] = cluster.write_composition_csv(
        out / "cluster-brains.csv", rows_b, min(acfg.table_top_areas, len(brain_names)), what="brain"
    )
    agree = cluster.agreement(clusters, area, seed=acfg.seed)
    result.metrics.update({f"ward_{k}": v for k, v in agree.items()})
    log.info(
        "analysis: Ward %d clusters of %d patches: ARI with areas %.3f (shuffled areas %.3f) in %.1f s",
        acfg.n_clusters,
        n,
        agree["ari"],
        agree["ari_shuffled"],
        time.perf_counter() - t0,
    )

    t0 = time.perf_counter()
    xy = embed.tsne(x, acfg.tsne_perplexity, acfg.seed)
    cluster_names = {int(c): f"cluster {c}" for c in np.unique(clusters)}
    result.figures["tsne"] = figures.scatter_panels(
        out / "tsne.png",
        xy,
        [("Ward clusters", clusters, cluster_names), ("area", area, area_names), ("brain", brain, brain_names)],
        f"t-SNE of {n} patch features ({', '.join(acfg.splits)})",
    )
    log.info("analysis: t-SNE in %.1f s", time.perf_counter() - t0)

    if embed.umap_available():
        t0 = time.perf_counter()
        idx = embed.every_nth_subsample(n, acfg.umap_subsample, acfg.seed, acfg.umap_min_points)
        if len(idx) < 4:
            result.notes.append(f"UMAP skipped: {n} patches are too few to embed")
        else:
            emb = embed.fit_umap(x[idx], n_neighbors=acfg.umap_neighbors, min_dist=acfg.umap_min_dist, seed=acfg.seed)
            result.figures["umap"] = figures.scatter_panels(
                out / "umap.png",
                emb,
                [("area", area[idx], area_names), ("brain", brain[idx], brain_names)],
                f"UMAP of {len(idx)} of {n} patch features",
            )
            log.info("analysis: UMAP of %d patches in %.1f s", len(idx), time.perf_counter() - t0)
    else:
        result.notes.append(
            "UMAP skipped: umap-learn is not installed (install the umap extra with the constraints file that pins torch: pip install -c .venv/constraints.txt -e '.[umap]')"
        )

    t0 = time.perf_counter()
    k = min(acfg.nmf_components, x.shape[1], n)
    res = factors.nmf(x, k, seed=acfg.seed, max_iter=acfg.nmf_max_iter)
    rois = sorted(int(a) for a in np.unique(area))
    roi_names = [area_names.get(a, str(a)) for a in rois]
    cov, leak, sel = _factor_analysis(res.coefficients, area, rois, roi_names, cfg)
    total = factors.total_scores(cov, leak, acfg.selection_lambda)
    score_rows = [
        [i + 1, roi_names[a], int(cov[i, a]), int(leak[i, a]), f"{total[i, a]:.1f}"]
        for i in range(k)
        for a in range(len(rois))
    ]
    result.tables["nmf-scores"] = write_csv(
        out / "nmf-scores.csv", ["factor", "area", "coverage", "leakage", "total_score"], score_rows
    )
    result.tables["nmf-selection"] = write_csv(
        out / "nmf-selection.csv", SELECTION_HEADER, _selection_rows(sel, roi_names)
    )
    means = np.stack([res.coefficients[area == a].mean(axis=0) for a in rois], axis=1)  # (k, r)
    means /= np.maximum(means.max(axis=1, keepdims=True), 1e-12)  # factors differ in scale: each to its max
    factor_names = [f"F{i + 1}" for i in range(k)]
    marks = [(s.factor, s.roi) for s in sel]
    result.figures["nmf-areas"] = figures.matrix_heatmap(
        out / "nmf-areas.png",
        means,
        factor_names,
        roi_names,
        f"mean NMF coefficient per area, each factor scaled to its maximum (k={k}; picks outlined)",
        marks=marks,
    )
    result.figures["nmf-scores"] = figures.matrix_heatmap(
        out / "nmf-scores.png",
        total,
        factor_names,
        roi_names,
        f"total score s_t = coverage - {acfg.selection_lambda:g} x leakage (seed 000); greedy picks outlined",
        cmap="RdBu_r",
        marks=marks,
        centre=0.0,
    )
    result.metrics["nmf_relative_error"] = res.relative_error
    result.metrics["nmf_picks_coverage_gt_leakage"] = float(sum(s.coverage > s.leakage for s in sel))

    g = factors.gmm_clusters(_gmm_input(res.coefficients, sel, cfg), acfg.gmm_components, seed=acfg.seed)
    g_rows = cluster.composition_table(g + 1, area, area_names, acfg.table_top_areas)
    result.tables["gmm-clusters"] = cluster.write_composition_csv(
        out / "gmm-clusters.csv", g_rows, acfg.table_top_areas
    )
    g_agree = cluster.agreement(g, area, seed=acfg.seed)
    result.metrics.update({f"gmm_{key}": v for key, v in g_agree.items()})
    log.info("analysis: NMF k=%d and mixture in %.1f s", k, time.perf_counter() - t0)

    split_names = {i: s for i, s in enumerate(("train", "test", "unseen"))}
    patch_rows = [
        [
            int(fs.columns["patch_id"][i]),
            split_names.get(int(split_of[i]), "?"),
            area_names.get(int(area[i]), str(area[i])),
            brain_names.get(int(brain[i]), str(brain[i])),
            int(clusters[i]),
            int(g[i]) + 1,
            f"{xy[i, 0]:.3f}",
            f"{xy[i, 1]:.3f}",
        ]
        for i in range(n)
    ]
    result.tables["patches"] = write_csv(
        out / "patches.csv",
        ["patch_id", "split", "area", "brain", "cluster", "gmm_cluster", "tsne_x", "tsne_y"],
        patch_rows,
    )


def analyse_sections(
    sets: list[FeatureSet], section_paths: list[Path], cfg: Config, out: Path, result: AnalysisResult
) -> None:
    """NMF over the tissue of the dense sections, factor maps, RGB composite, mixture map, UMAP dimension 1.

    Besides the figures, ``section-<name>-maps.npz`` holds the maps as (h, w) arrays on the grid: ``area``
    (label at the grid point; 0 background), ``depth``, ``gmm`` (mixture component, -1 outside the cortex),
    ``factors`` (k, h, w) NMF coefficients (NaN outside the tissue), ``selected`` (the picked factor indices, in
    pick order) and ``umap1`` when umap-learn is installed. Runs with ``analysis.threads`` BLAS/OpenMP threads.
    """
    with thread_limit(cfg.analysis.threads):
        _analyse_sections(sets, section_paths, cfg, out, result)


def _analyse_sections(
    sets: list[FeatureSet], section_paths: list[Path], cfg: Config, out: Path, result: AnalysisResult
) -> None:
    acfg = cfg.analysis
    fs = FeatureSet.concat(sets)
    label = fs.columns["area"].astype(np.int64)
    tissue = label > 0  # background (0) is not tissue; white matter (1) and areas (>= 2) are
    if tissue.sum() < max(acfg.nmf_components, acfg.gmm_components, 4):
        result.notes.append("section maps skipped: the dense grid holds too few tissue points")
        return
    names = names_of(sets[0].attrs, "areas")
    t0 = time.perf_counter()
    x = fs.features[tissue]
    k = min(acfg.nmf_components, x.shape[1], len(x))
    res = factors.nmf(x, k, seed=acfg.seed, max_iter=acfg.nmf_max_iter)
    rois = sorted(int(a) for a in np.unique(label[tissue]))
    roi_names = [names.get(a, str(a)) for a in rois]
    _, _, sel = _factor_analysis(res.coefficients, label[tissue], rois, roi_names, cfg)
    result.tables["section-nmf-selection"] = write_csv(
        out / "section-nmf-selection.csv", SELECTION_HEADER, _selection_rows(sel, roi_names)
    )
    layer_sel, layer_names = _layer_selection(res.coefficients, fs.columns["depth"][tissue], label[tissue], cfg)
    if layer_sel:
        result.tables["section-nmf-layer-selection"] = write_csv(
            out / "section-nmf-layer-selection.csv", SELECTION_HEADER, _selection_rows(layer_sel, layer_names)
        )
    coeffs = np.full((len(fs), k), np.nan, np.float32)
    coeffs[tissue] = res.coefficients
    cortex = label >= 2
    gmm = np.full(len(fs), -1, np.int64)
    if cortex.sum() >= acfg.gmm_components:
        gmm[cortex] = factors.gmm_clusters(_gmm_input(coeffs[cortex], sel, cfg), acfg.gmm_components, seed=acfg.seed)
    log.info("analysis: section NMF (k=%d, %d points) and mixture in %.1f s", k, len(x), time.perf_counter() - t0)

    umap1 = None
    if embed.umap_available():
        t0 = time.perf_counter()
        idx_t = np.flatnonzero(tissue)
        sub = idx_t[embed.every_nth_subsample(len(idx_t), acfg.umap_subsample, acfg.seed, acfg.umap_min_points)]
        emb = embed.fit_umap(
            fs.features[sub], n_neighbors=acfg.umap_neighbors, min_dist=acfg.umap_min_dist, seed=acfg.seed
        )
        umap1 = np.full(len(fs), np.nan, np.float32)
        umap1[sub] = emb[:, 0]
        rest = np.setdiff1d(idx_t, sub)
        if len(rest):
            placed = embed.place_by_neighbours(fs.features[sub], emb, fs.features[rest], acfg.umap_neighbors)
            umap1[rest] = placed[:, 0]
        log.info(
            "analysis: section UMAP (%d fitted, %d placed) in %.1f s", len(sub), len(rest), time.perf_counter() - t0
        )

    for sid, (part, path) in enumerate(zip(sets, section_paths)):
        rows = fs.columns["section"] == sid
        grid = part.attrs["grids"][0]
        sec = str(grid["section"])
        geom = figures.GridGeometry.from_attrs(grid, float(part.attrs["pixel_size_um"]) / int(grid["factor"]))
        h, w = geom.shape
        thumb = figures.section_thumbnail(path)

        def as_map(values: np.ndarray, rows: np.ndarray = rows, h: int = h, w: int = w) -> np.ndarray:
            return values[rows].reshape(h, w)

        lab_map = as_map(label).copy()
        lab_map[lab_map == 0] = -1
        result.figures[f"section-{sec}-areas"] = figures.label_map(
            out / f"section-{sec}-areas.png", lab_map, names, geom, thumb, f"{sec}: area labels on the grid"
        )
        maps = [(f"F{s.factor + 1} ({roi_names[s.roi]})", as_map(coeffs[:, s.factor])) for s in sel]
        result.figures[f"section-{sec}-factors"] = figures.section_maps(
            out / f"section-{sec}-factors.png", maps, geom, thumb, f"{sec}: selected NMF factors (seed 000)"
        )
        if layer_sel:  # seed 000 Fig. 2B1: three factors selected across the layers, on the cortex
            rgb = [(f"F{s.factor + 1} ({layer_names[s.roi]})", as_map(coeffs[:, s.factor])) for s in layer_sel[:3]]
            rgb = [(name, np.where(as_map(cortex), m, np.nan)) for name, m in rgb]
            title = f"{sec}: three factors selected across the cortical layers as RGB"
        else:
            rgb, title = maps[:3], f"{sec}: three selected factors as RGB"
        result.figures[f"section-{sec}-rgb"] = figures.rgb_map(out / f"section-{sec}-rgb.png", rgb, geom, thumb, title)
        if (gmm[rows] >= 0).any():
            result.figures[f"section-{sec}-gmm"] = figures.label_map(
                out / f"section-{sec}-gmm.png",
                as_map(gmm),
                {i: f"component {i + 1}" for i in range(acfg.gmm_components)},
                geom,
                thumb,
                f"{sec}: Gaussian-mixture clusters of the cortex factors",
            )
        arrays = {
            "area": as_map(label),
            "depth": as_map(fs.columns["depth"]),
            "gmm": as_map(gmm),
            "factors": np.stack([as_map(coeffs[:, i]) for i in range(k)]),
            "selected": np.array([s.factor for s in sel], np.int32),
        }
        if umap1 is not None:
            arrays["umap1"] = as_map(umap1)
        result.maps[sec] = out / f"section-{sec}-maps.npz"
        np.savez_compressed(result.maps[sec], allow_pickle=False, **arrays)
        if umap1 is not None:
            result.figures[f"section-{sec}-umap1"] = figures.section_maps(
                out / f"section-{sec}-umap1.png",
                [("UMAP dimension 1", as_map(umap1))],
                geom,
                thumb,
                f"{sec}: first UMAP dimension (seed 004)",
                cmap="viridis",
            )
    if umap1 is None:
        result.notes.append("section UMAP map skipped: umap-learn is not installed")


_FIGURE_CAPTIONS = {
    "tsne": "t-SNE of the patch features coloured by Ward cluster, area and brain (seed 002 Fig. 3)",
    "umap": "UMAP of a subsample of the patch features coloured by area and brain (seed 004)",
    "nmf-areas": "Mean NMF coefficient per factor and area; the greedy coverage/leakage picks outlined (seed 000)",
    "nmf-scores": "Total score coverage - lambda x leakage per factor and area, searched greedily (seed 000)",
}


def caption(name: str) -> str:
    if name in _FIGURE_CAPTIONS:
        return _FIGURE_CAPTIONS[name]
    for suffix, text in (
        ("-areas", "area labels on the dense grid"),
        ("-factors", "heatmaps of the selected NMF factors (seed 000 Fig. 2C)"),
        ("-rgb", "three selected NMF factors as an RGB composite (seed 000 Fig. 2B1)"),
        ("-gmm", "Gaussian-mixture clusters of the cortex factors (seed 000 Fig. 2A2)"),
        ("-umap1", "first UMAP dimension painted onto the section (seed 004)"),
    ):
        if name.endswith(suffix):
            return f"{name.removeprefix('section-').removesuffix(suffix)}: {text}"
    return name
