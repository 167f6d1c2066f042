"""Evaluation of classifiers: weighted F1, top-1 and top-3 (seed 002 Fig. 2), per-area report, confusion matrix.

Entry points: :func:`predict` (logits of one split, gathered from all ranks in patch-id order),
:func:`classification_metrics` (pure function of scores and labels), :func:`write_report` (JSON, CSV and PNG
into a run folder, rank 0 only).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cytonet import distributed

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: nn.Module, batches: Any, autocast: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N, K), labels (N,) and patch ids (N,) of every rank's batches, gathered and sorted by id.

    ``batches`` yields :class:`cytonet.data.loader.Batch`; each rank may hold a different number of samples.
    """
    was_training = model.training
    model.eval()
    scores, labels, ids = [], [], []
    for batch in batches:
        with autocast():
            logits = model(batch.images)
        scores.append(logits.float())
        labels.append(batch.labels)
        ids.append(batch.index)
    model.train(was_training)
    device = next(model.parameters()).device
    k = _n_classes(model)
    s = torch.cat(scores) if scores else torch.zeros(0, k, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    i = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64, device=device)
    sizes = distributed.all_gather_sizes(s.shape[0], device)
    s, y, i = (distributed.all_gather_nograd(t, sizes) for t in (s, y, i))
    order = torch.argsort(i)
    return s[order].cpu().numpy(), y[order].cpu().numpy(), i[order].cpu().numpy()


def _n_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """Weighted F1 (by label frequency), top-1 and top-3 accuracy, in percent (seed 002 Fig. 2)."""
    from sklearn.metrics import f1_score

    if len(labels) == 0:
        return {"f1": float("nan"), "top1": float("nan"), "top3": float("nan"), "n": 0}
    ranked = ranked_classes(scores, 3)
    pred = ranked[:, 0]
    hits = ranked == np.asarray(labels).reshape(-1, 1)
    return {
        "f1": 100.0 * float(f1_score(labels, pred, average="weighted", labels=np.arange(n_classes), zero_division=0)),
        "top1": 100.0 * float(hits[:, 0].mean()),
        "top3": 100.0 * float(hits.any(axis=1).mean()),  # with 3 classes or fewer every label is in the top 3
        "n": len(labels),
    }


def ranked_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, min(k, K)) class indices by descending score, ties to the lower index: one order, so top-1 is always
    the first column of top-k (argmax and a reversed argsort break ties in opposite directions)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def write_report(
    out: Path, split: str, scores: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> dict[str, float]:
    """Write ``metrics-<split>.json``, ``per-area-<split>.csv`` and ``confusion-<split>.png``; return the metrics."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    k = len(class_names)
    metrics = classification_metrics(scores, labels, k)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"metrics-{split}.json").write_text(json.dumps(metrics, indent=1))
    if len(labels) == 0:
        return metrics
    pred = ranked_classes(scores, 1)[:, 0]
    p, r, f, support = precision_recall_fscore_support(labels, pred, labels=np.arange(k), zero_division=0)
    with open(out / f"per-area-{split}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["area", "precision", "recall", "f1", "support"])
        for name, row in zip(class_names, zip(p, r, f, support)):
            w.writerow([name, *(f"{v:.4f}" for v in row[:3]), int(row[3])])
    cm = confusion_matrix(labels, pred, labels=np.arange(k))
    _confusion_png(out / f"confusion-{split}.png", cm, class_names, f"{split}: F1 {metrics['f1']:.1f}")
    return metrics


def _confusion_png(path: Path, cm: np.ndarray, names: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
