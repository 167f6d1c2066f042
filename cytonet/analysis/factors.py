"""Seed 000 (Balwani & Dyer 2020): NMF of the features, greedy factor selection, Gaussian-mixture clustering.

Section 2, "Decomposing Network Representations via Matrix Factorization": the features X (d x n, here stored
n x d) are factorised as X ~ U V with U (d x k) >= 0 the basis and V (k x n) >= 0 the coefficients, minimising
||X - U V||_F (k = 15 in section 3). In scikit-learn's orientation X^T ~ W H, W = V^T (n x k), H = U^T (k x d).

Section 2, "Selecting Predictive Non-Negative Factors", for factor i and region of interest (ROI) a with point
set A:

- coverage  s_c(i, a) = sum 1_A . 1_{v'_i > 0}         (positive coefficients of factor i inside A)
- leakage   s_l(i, a) = lambda sum 1_{A^c} . 1_{v'_i > 0}  (positive coefficients outside A, scaled by lambda)
- total     s_t(i, a) = s_c(i, a) - s_l(i, a)             (lambda = 0.5 by default)

The (k, r) matrix of total scores is searched greedily: take the (factor, ROI) pair of highest score, then
repeatedly the highest pair whose factor and whose ROI are both not yet taken, until p factors are chosen.
Here :func:`coverage_leakage` returns the two counts without lambda (leakage = sum 1_{A^c} 1_{v'_i > 0}) and
:func:`total_scores` applies it, so s_l = lambda * leakage.

Section 3, cortex experiment: a Gaussian mixture fitted to the factor coefficients of the cortex samples
clusters them (:func:`gmm_clusters`).

Entry points: :func:`check_nonnegative`, :func:`nmf`, :func:`active_coefficients`, :func:`coverage_leakage`, :func:`total_scores`,
:func:`greedy_factor_selection`, :func:`gmm_clusters`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cytonet.errors import InputError


@dataclass
class NMFResult:
    """X (n, d) ~ coefficients (n, k) @ basis (k, d); seed 000's V^T and U^T."""

    coefficients: np.ndarray
    """(n, k) non-negative coefficients v_i of every sample (column i: factor i over the samples)."""
    basis: np.ndarray
    """(k, d) non-negative basis vectors (rows)."""
    relative_error: float
    """||X - W H||_F / ||X||_F."""


@dataclass(frozen=True)
class Selection:
    """One pick of the greedy selection."""

    factor: int
    """Factor index i (0-based column of the coefficients)."""
    roi: int
    """Column index of the ROI in the score matrix."""
    coverage: float
    leakage: float
    """Unscaled leakage count; the score used lambda times this."""
    score: float
    """s_t = coverage - lambda * leakage."""


def check_nonnegative(x: np.ndarray, what: str = "features") -> None:
    """Raise :class:`InputError` when ``x`` has negative or non-finite entries (NMF needs X >= 0)."""
    if not np.all(np.isfinite(x)):
        raise InputError(f"{what} hold NaN or infinite values; NMF needs finite, non-negative input")
    lo = float(x.min()) if x.size else 0.0
    if lo < 0:
        raise InputError(
            f"{what} have negative entries (minimum {lo:.4g}); NMF needs non-negative features such as the "
            "paper encoder's pooled ReLU output (before the projection head)"
        )


def nmf(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 400) -> NMFResult:
    """Factorise ``x`` (n, d) >= 0 with rank ``k`` (Frobenius loss, NNDSVD-a initialisation, coordinate descent)."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    check_nonnegative(x)
    n, d = x.shape
    if k > min(n, d):
        raise InputError(f"analysis.nmf_components={k} exceeds min(samples, feature width) = {min(n, d)}")
    model = NMF(n_components=k, init="nndsvda", solver="cd", max_iter=max_iter, random_state=seed)
    x64 = x.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = model.fit_transform(x64)
    h = model.components_
    norm = float(np.linalg.norm(x64))
    err = float(np.linalg.norm(x64 - w @ h)) / max(norm, 1e-30)
    return NMFResult(w.astype(np.float32), h.astype(np.float32), err)


def active_coefficients(coefficients: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Coefficients with those at or below ``threshold`` times their factor's maximum set to 0.

    ``threshold=0`` returns the coefficients unchanged: seed 000 counts every strictly positive one. A small
    fraction ignores the faint, nearly everywhere positive tail that dense NMF coefficients often have.
    """
    v = np.asarray(coefficients)
    if threshold <= 0:
        return v
    return np.where(v > threshold * v.max(axis=0, keepdims=True), v, 0).astype(v.dtype)


def coverage_leakage(
    coefficients: np.ndarray, roi_of_sample: np.ndarray, rois: np.ndarray | list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and (unscaled) leakage counts, each (k, r), of seed 000 section 2.

    ``coefficients`` (n, k); ``roi_of_sample`` (n,) the ROI id of every sample; ``rois`` (r,) the ROI ids,
    one column each. coverage[i, a] = #{samples in A with v_i > 0}; leakage[i, a] = #{samples not in A with
    v_i > 0}. Samples whose id is not among ``rois`` count as outside every ROI.
    """
    v = np.asarray(coefficients)
    positive = (v > 0).astype(np.int64)  # 1_{v'_i > 0}, (n, k)
    member = np.stack([np.asarray(roi_of_sample) == a for a in rois], axis=1).astype(np.int64)  # 1_A, (n, r)
    coverage = positive.T @ member  # sum over samples of 1_A 1_{v_i > 0}
    leakage = positive.sum(axis=0)[:, None] - coverage  # sum of 1_{A^c} 1_{v_i > 0}
    return coverage.astype(np.float64), leakage.astype(np.float64)


def total_scores(coverage: np.ndarray, leakage: np.ndarray, lam: float) -> np.ndarray:
    """s_t = s_c - s_l with s_l = lambda * leakage, (k, r)."""
    return np.asarray(coverage, dtype=np.float64) - lam * np.asarray(leakage, dtype=np.float64)


def greedy_factor_selection(
    coverage: np.ndarray, leakage: np.ndarray, lam: float = 0.5, p: int | None = None
) -> list[Selection]:
    """Seed 000's greedy selection of ``p`` factors from the (k, r) coverage and leakage counts.

    Repeatedly takes the (factor, ROI) pair with the highest total score s_t among the pairs whose factor and
    ROI were not taken before. ``p`` defaults to min(k, r), one factor per ROI (each pick uses up one ROI, so
    at most min(k, r) can be made). Ties go to the lower factor index, then the lower ROI index.
    """
    scores = total_scores(coverage, leakage, lam)
    k, r = scores.shape
    limit = min(k, r)
    p = limit if p is None or p <= 0 else p
    if p > limit:
        raise ValueError(f"cannot select {p} factors: each pick needs its own factor and ROI (k={k}, r={r})")
    free = np.ones((k, r), dtype=bool)
    picks = []
    for _ in range(p):
        masked = np.where(free, scores, -np.inf)
        i, a = np.unravel_index(int(np.argmax(masked)), masked.shape)  # argmax: first maximum in row-major order
        picks.append(Selection(int(i), int(a), float(coverage[i, a]), float(leakage[i, a]), float(scores[i, a])))
        free[i, :] = False
        free[:, a] = False
    return picks


def gmm_clusters(x: np.ndarray, n_components: int, *, seed: int = 0) -> np.ndarray:
    """Labels 0..n_components-1 of a Gaussian mixture (full covariances) fitted to the rows of ``x``."""
    from sklearn.mixture import GaussianMixture

    n = len(x)
    if n < n_components:
        raise InputError(f"{n} samples cannot fit analysis.gmm_components={n_components} mixture components")
    gmm = GaussianMixture(n_components=n_components, covariance_type="full", reg_covar=1e-4, random_state=seed)
    return gmm.fit_predict(np.asarray(x, dtype=np.float64)).astype(np.int32)
