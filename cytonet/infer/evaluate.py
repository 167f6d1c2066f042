"""Inference outputs against ground truth: pixel-wise accuracy of the label maps and PNG overlays.

The truth of output pixel (i, j) is the section's ``labels`` layer at the centre of its patch (model pixel
i s + s // 2, i.e. section pixel (i s + s // 2) f + f // 2). Accuracy counts the output pixels whose truth is
one of the model's areas and which the argmax map labels (inside the tissue mask and ``infer.roi``): the same
pixels before and after the clean-up. ``coverage`` is the share of the truth's area pixels that were labelled.

Entry points: :func:`evaluate_outputs` (per section and pooled, for ``argmax`` and ``cleaned``),
:func:`write_overlay`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cytonet.config import Config
from cytonet.data.sections import open_section
from cytonet.infer import writers
from cytonet.infer.run import Classifier, SectionJob, infer_settings, load_classifier, select_sections


@dataclass
class SectionScore:
    section: str
    n: int
    """Output pixels with an area as truth and a label in the argmax map."""
    n_truth: int
    """Output pixels with an area as truth."""
    correct: dict[str, int]
    """Label image name -> correctly labelled pixels among the n."""

    def accuracy(self, name: str) -> float:
        return 100.0 * self.correct[name] / self.n if self.n else float("nan")


def truth_at_grid(path: str, job: SectionJob) -> np.ndarray:
    """(h, w) ground-truth label of every output pixel (0 where the centre falls outside the section)."""
    g = job.grid
    ys = g.centre_section_px(0, g.shape[0], job.factor)
    xs = g.centre_section_px(0, g.shape[1], job.factor)
    with open_section(path) as r:
        if not r.has("labels"):
            raise ValueError(f"{path} has no labels layer to evaluate against")
        return r.read_points("labels", ys, xs)  # the labels' fill value, 0, past the section's edge


def _open(cfg: Config, clf: Classifier, out: Path, job: SectionJob) -> writers.Volume:
    settings = infer_settings(cfg, clf, job)
    path = writers.volume_path(out, job.name, cfg.infer.format)
    if cfg.infer.format == "hdf5":
        return writers.HDF5Volume(path, job.grid, settings, writable=False)
    return writers.ZarrVolume(path, job.grid, settings)


def evaluate_outputs(cfg: Config, out: Path) -> list[SectionScore]:
    """Accuracy of every mapped section's label images against its ``labels`` layer."""
    clf = load_classifier(cfg.resolve_path(cfg.infer.model_from))
    areas = np.asarray(clf.area_ids)
    names = cfg.infer.label_images
    scores = []
    for job in select_sections(cfg, clf):
        truth = truth_at_grid(job.path, job)
        vol = _open(cfg, clf, out, job)
        try:
            cortex = np.isin(truth, areas)
            keep = cortex & (vol.read_labels("argmax") > 0)
            correct = {name: int((vol.read_labels(name)[keep] == truth[keep]).sum()) for name in names}
        finally:
            vol.close()
        scores.append(SectionScore(job.name, int(keep.sum()), int(cortex.sum()), correct))
    return scores


def pooled_accuracy(scores: list[SectionScore], name: str) -> float:
    n = sum(s.n for s in scores)
    return 100.0 * sum(s.correct[name] for s in scores) / n if n else float("nan")


def coverage(scores: list[SectionScore]) -> float:
    n = sum(s.n_truth for s in scores)
    return 100.0 * sum(s.n for s in scores) / n if n else float("nan")


def write_overlay(cfg: Config, out: Path, sections: list[str], png: Path) -> Path:
    """One row per section: section image with truth, argmax and cleaned label maps over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    clf = load_classifier(cfg.resolve_path(cfg.infer.model_from))
    jobs = {j.name: j for j in select_sections(cfg, clf)}
    names = cfg.infer.label_images
    colours = matplotlib.colormaps["tab20"](np.arange(len(clf.area_ids)) % 20)
    lut = np.zeros(int(max(clf.area_ids)) + 1, dtype=int)
    lut[clf.area_ids] = np.arange(len(clf.area_ids)) + 1
    cmap = ListedColormap(np.vstack([[0, 0, 0, 0], colours]))
    fig, axes = plt.subplots(len(sections), 1 + len(names), figsize=(4 * (1 + len(names)), 3.2 * len(sections)))
    axes = np.atleast_2d(axes)
    for row, name in enumerate(sections):
        job = jobs[name]
        g = job.grid
        with open_section(job.path) as r:
            ys = g.centre_section_px(0, g.shape[0], job.factor)
            xs = g.centre_section_px(0, g.shape[1], job.factor)
            h, w = r.shape
            img = r.read_points("image", np.minimum(ys, h - 1), np.minimum(xs, w - 1))
        truth = truth_at_grid(job.path, job)
        vol = _open(cfg, clf, out, job)
        try:
            maps = {"truth": truth, **{n: vol.read_labels(n) for n in names}}
        finally:
            vol.close()
        for col, (title, lab) in enumerate(maps.items()):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            idx = np.where(np.isin(lab, clf.area_ids), lut[np.minimum(lab, len(lut) - 1)], 0)
            ax.imshow(idx, cmap=cmap, vmin=0, vmax=len(clf.area_ids), alpha=0.55, interpolation="nearest")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
