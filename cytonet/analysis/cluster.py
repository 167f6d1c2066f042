"""Seed 002 cluster analysis: Ward hierarchical clustering of representation vectors and the Table 1 summary.

Seed 002 ("Evaluation"): the representation vectors of the held-out sections are clustered "into 10 clusters
using Ward hierarchical clustering", and Table 1 lists, per cluster, the most common areas with the
percentage of the cluster's features that come from each ("only most common areas are listed, therefore the
fractions do not sum to 100%"). The text also notes clusters dominated by specific brains, so the brain
composition is tabulated the same way.

Entry points: :func:`ward_clusters`, :func:`composition_table` (rows of the Table 1 form),
:func:`write_composition_csv`, :func:`read_composition_csv`, :func:`agreement` (adjusted Rand index against
a label, with the same index for shuffled labels as the chance baseline).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np


def ward_clusters(x: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster labels 1..n_clusters (numbered as in seed 002 Table 1) of Ward agglomerative clustering of rows.

    Ward linkage merges the pair of clusters whose union least increases the within-cluster sum of squares
    (Ward 1963). Memory is O(n^2): subsample beyond some ten thousand rows.
    """
    from sklearn.cluster import AgglomerativeClustering

    n = len(x)
    if n < n_clusters:
        raise ValueError(f"{n} samples cannot form analysis.n_clusters={n_clusters} clusters")
    model = AgglomerativeClustering(n_clusters=n_clusters, linkage="ward")
    return model.fit_predict(np.asarray(x, dtype=np.float64)).astype(np.int32) + 1


def composition_table(
    clusters: np.ndarray, groups: np.ndarray, names: dict[int, str], top: int
) -> list[dict[str, Any]]:
    """Per cluster (ascending id): its size and its ``top`` most frequent groups with their percentage.

    Each row: ``{"cluster": c, "n": size, "top": [(name, percent), ...]}``, percentages of the cluster's
    members, the most frequent first (ties: lower group id first).
    """
    rows = []
    for c in np.unique(clusters):
        members = groups[clusters == c]
        ids, counts = np.unique(members, return_counts=True)
        order = np.lexsort((ids, -counts))[:top]
        rows.append(
            {
                "cluster": int(c),
                "n": len(members),
                "top": [(names.get(int(ids[j]), str(ids[j])), 100.0 * counts[j] / len(members)) for j in order],
            }
        )
    return rows


def write_composition_csv(path: Path, rows: list[dict[str, Any]], top: int, what: str = "area") -> Path:
    """CSV of :func:`composition_table` rows: ``cluster, n_patches, <what>_1, percent_1, ...``."""
    header = ["cluster", "n_patches"]
    for j in range(1, top + 1):
        header += [f"{what}_{j}", f"percent_{j}"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            cells: list[Any] = [row["cluster"], row["n"]]
            for j in range(top):
                if j < len(row["top"]):
                    name, pct = row["top"][j]
                    cells += [name, f"{pct:.1f}"]
                else:
                    cells += ["", ""]
            w.writerow(cells)
    return path


def read_composition_csv(path: Path) -> list[list[str]]:
    """The rows of a CSV as lists of strings, header first."""
    with open(path, newline="") as fh:
        return [list(r) for r in csv.reader(fh)]


def agreement(pred: np.ndarray, truth: np.ndarray, seed: int = 0, repeats: int = 20) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information of ``pred`` against ``truth``, and the ARI of
    ``pred`` against ``truth`` randomly permuted (mean over ``repeats`` shuffles: the chance level, ~0)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng([seed, 2002])
    shuffled = [adjusted_rand_score(rng.permutation(truth), pred) for _ in range(repeats)]
    return {
        "ari": float(adjusted_rand_score(truth, pred)),
        "nmi": float(normalized_mutual_info_score(truth, pred)),
        "ari_shuffled": float(np.mean(shuffled)),
        "ari_shuffled_max": float(np.max(shuffled)),
    }
