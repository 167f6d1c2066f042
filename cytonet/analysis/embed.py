"""Two-dimensional embeddings of features: t-SNE (seed 002 Fig. 3) and UMAP (seed 004, optional dependency).

UMAP comes from umap-learn, installed with the ``umap`` extra (``pip install -c constraints.txt
'cytonet[umap]'``); without it :func:`umap_available` is False and the callers skip the UMAP figures with a
logged message. Seed 004 fits UMAP to a subsample ("subsample 50": one sample in 50,
:func:`every_nth_subsample`) and paints the first UMAP dimension onto a brain's surface; samples left out of
the fit are placed by their nearest fitted neighbours (:func:`place_by_neighbours`).

Entry points: :func:`tsne`, :func:`umap_available`, :func:`fit_umap`, :func:`place_by_neighbours`,
:func:`every_nth_subsample`.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)


def tsne(x: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """(n, 2) t-SNE embedding (PCA initialisation); the perplexity is capped at (n - 1) / 3 for small n."""
    from sklearn.manifold import TSNE

    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {n}")
    perp = min(perplexity, (n - 1) / 3.0)
    model = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed)
    return model.fit_transform(np.asarray(x, dtype=np.float32)).astype(np.float32)


def umap_available() -> bool:
    """True when umap-learn can be imported."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def every_nth_subsample(n: int, every: int, seed: int = 0, min_keep: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random ~1/``every`` of ``n`` samples (at least ``min_keep``, at most n)."""
    keep = min(n, max(min_keep, int(np.ceil(n / max(every, 1)))))
    if keep >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 4004])
    return np.sort(rng.choice(n, size=keep, replace=False))


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), each (n, k), of the k nearest rows of every row (itself first), Euclidean."""
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return idx.astype(np.int32), dist.astype(np.float32)


def fit_umap(x: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """(n, 2) UMAP embedding of the rows of ``x``; raises ImportError when umap-learn is missing.

    The k-nearest-neighbour graph is computed exactly with scikit-learn and handed to umap
    (``precomputed_knn``): below 4096 rows umap would otherwise evaluate its numba metric once per pair from
    Python (measured: 30 s for 3.7k rows), and its approximate search compiles for a minute on first use.
    ``n_neighbors`` is capped at n - 1.
    """
    import umap

    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 samples, got {n}")
    k = max(2, min(n_neighbors, n - 1))
    knn = exact_knn(x, k)
    model = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=min_dist,
        random_state=seed,
        n_jobs=1,  # with random_state umap runs single-threaded anyway; saying so silences its warning
        precomputed_knn=(knn[0], knn[1], None),
        force_approximation_algorithm=True,  # use the precomputed graph even for small inputs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / sparse-graph warnings on small inputs
        model.fit(x)
    return np.asarray(model.embedding_, dtype=np.float32)


def place_by_neighbours(x_fit: np.ndarray, emb_fit: np.ndarray, x_new: np.ndarray, k: int = 15) -> np.ndarray:
    """Positions (m, 2) of new rows: the mean embedding of their ``k`` nearest fitted rows, weighted by
    exp(-(d - d_min) / sigma) with sigma the mean neighbour distance (how umap's ``transform`` initialises new
    points; its refinement epochs are left out, they need umap's search index)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x_fit))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x_fit).kneighbors(np.asarray(x_new, dtype=np.float32))
    sigma = np.maximum(dist.mean(axis=1, keepdims=True), 1e-12)
    w = np.exp(-(dist - dist[:, :1]) / sigma)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("mk,mkc->mc", w, emb_fit[idx]).astype(np.float32)
