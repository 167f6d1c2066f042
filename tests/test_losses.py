"""Losses against plain NumPy versions written from the papers' formulas, closed-form cases and invariances.

References: seed 002 eq. (1)-(2) (supervised contrastive loss), seed 004 distance-weighted contrastive loss
as corrected in seeds/README.md. The multi-process equality with the single-process loss is in
tests/test_distributed.py; here the per-rank sharding (offsets, global normaliser) is checked in one process.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cytonet.config import LossConfig
from cytonet.losses import (
    ContrastiveLoss,
    CrossEntropyLoss,
    DistanceWeightedLoss,
    SiameseLoss,
    SupConLoss,
    build_loss,
    cross_entropy,
    distance_weighted,
    distance_weights,
    label_weights,
    siamese_distance,
    siamese_share,
    soft_target_contrastive,
    supcon,
    transfer_weights,
)

# ----------------------------------------------------------------------------------------------------------
# NumPy references, written term by term from the formulas (loops, no vectorisation tricks)


def np_supcon(z: np.ndarray, y: np.ndarray, tau: float) -> float:
    """Seed 002 eq. (1)-(2); anchors without positives (N_{y_i} = 0) are left out of the mean."""
    n = len(z)
    losses = []
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        positives = [j for j in range(n) if j != i and y[j] == y[i]]
        if not positives:
            continue
        li = -sum(math.log(math.exp(float(z[i] @ z[j]) / tau) / denom) for j in positives) / len(positives)
        losses.append(li)
    return float(np.mean(losses)) if losses else 0.0


def np_transfer(d: float, kind: str, r: float) -> float:
    if kind == "gaussian":
        return math.exp(-(d**2) / (2 * r**2))
    if kind == "step":
        return 1.0 if d <= r else 0.0
    return r / (r + d)


def np_distance_loss(z: np.ndarray, c: np.ndarray, tau: float, kind: str, r: float) -> float:
    """seeds/README.md: L_i = -(sum_{k!=i} w_ik log p_ik) / sum_{k!=i} w_ik, w_ik = g(||c_i - c_k||)."""
    n = len(z)
    losses = []
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[l_]) / tau) for l_ in range(n) if l_ != i)
        num, wsum = 0.0, 0.0
        for k in range(n):
            if k == i:
                continue
            w = np_transfer(float(np.sqrt(((c[i] - c[k]) ** 2).sum())), kind, r)
            num += w * math.log(math.exp(float(z[i] @ z[k]) / tau) / denom)
            wsum += w
        if wsum > 0:
            losses.append(-num / wsum)
    return float(np.mean(losses)) if losses else 0.0


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ----------------------------------------------------------------------------------------------------------
# SupCon


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_supcon_matches_numpy(tau: float) -> None:
    z = unit(12, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 1, 2, 4])  # labels 3 and 4 have no positive
    got = supcon(z, y, tau).item()
    assert got == pytest.approx(np_supcon(z.numpy(), y.numpy(), tau), rel=1e-12)


def test_supcon_identical_embeddings_is_log_n_minus_1() -> None:
    # All p_ik = 1/(N-1): L_i = log(N - 1) for every anchor.
    z = F.normalize(torch.ones(7, 4, dtype=torch.float64), dim=1)
    y = torch.zeros(7, dtype=torch.long)
    assert supcon(z, y, 0.07).item() == pytest.approx(math.log(6), rel=1e-12)


def test_supcon_two_separated_classes_closed_form() -> None:
    # Classes on orthogonal axes: each anchor has 1 positive (s = 1/tau) and 2 negatives (s = 0), so
    # L_i = -log(e^{1/tau} / (e^{1/tau} + 2)) = log(1 + 2 e^{-1/tau}).
    tau = 0.5
    z = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert supcon(z, y, tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-12)


def test_supcon_without_positives_is_zero_and_finite() -> None:
    z = unit(5, 3).requires_grad_(True)
    loss = supcon(z, torch.arange(5), 0.07)
    loss.backward()
    assert loss.item() == 0.0
    assert z.grad is not None and torch.all(z.grad == 0)


def test_supcon_permutation_invariant() -> None:
    z, y = unit(10, 6, seed=3), torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 0])
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    assert supcon(z[perm], y[perm], 0.1).item() == pytest.approx(supcon(z, y, 0.1).item(), rel=1e-12)


def test_stable_at_tiny_temperature() -> None:
    # exp(1/1e-4) overflows any float; the log-sum-exp form stays finite, in fp32 too.
    z = unit(8, 4, seed=5).float().requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = supcon(z, y, 1e-4)
    loss.backward()
    assert torch.isfinite(loss) and z.grad is not None and torch.isfinite(z.grad).all()


def test_gradcheck_soft_target() -> None:
    z = unit(6, 3, seed=7).requires_grad_(True)
    w = torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda t: soft_target_contrastive(t, t, w, 0.3), (z,))


def test_fp32_under_bf16_autocast() -> None:
    z = unit(16, 8).float()
    y = torch.arange(16) % 4
    ref = supcon(z, y, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = supcon(z.bfloat16(), y, 0.07)
    assert out.dtype == torch.float32
    # Only the inputs were rounded to bf16; the loss itself ran in fp32.
    assert out.item() == pytest.approx(supcon(z.bfloat16().float(), y, 0.07).item(), rel=1e-6)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


# ----------------------------------------------------------------------------------------------------------
# Distance-weighted (seed 004)


def test_transfer_functions() -> None:
    r = 2.0
    d = torch.tensor([0.0, 2.0, 2.0001, 4.0], dtype=torch.float64)
    assert transfer_weights(d, "gaussian", r).tolist() == pytest.approx([np_transfer(x, "gaussian", r) for x in d])
    assert transfer_weights(d, "step", r).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert transfer_weights(d, "inverse", r).tolist() == pytest.approx([1.0, 0.5, 2 / 4.0001, 1 / 3])
    with pytest.raises(ValueError, match="radius"):
        transfer_weights(d, "step", 0.0)


@pytest.mark.parametrize("kind", ["gaussian", "step", "inverse"])
def test_distance_loss_matches_numpy(kind: str) -> None:
    z = unit(10, 6, seed=11)
    c = torch.rand(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 5.0
    got = distance_weighted(z, c, 0.1, kind, radius=1.5).item()  # type: ignore[arg-type]
    assert got == pytest.approx(np_distance_loss(z.numpy(), c.numpy(), 0.1, kind, 1.5), rel=1e-12)


def test_distance_loss_with_label_weights_is_supcon_eq2() -> None:
    # Points of one label share a location, labels lie 10 mm apart: a step at r = 1 mm gives w_ik = 1 for equal
    # labels and 0 otherwise, which is exactly seed 002 eq. (2).
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 1])
    c = torch.stack([y * 10.0, torch.zeros(10), torch.zeros(10)], dim=1).double()
    z = unit(10, 5, seed=4)
    got = distance_weighted(z, c, 0.07, "step", radius=1.0).item()
    assert got == pytest.approx(supcon(z, y, 0.07).item(), rel=1e-14)
    assert got == pytest.approx(np_supcon(z.numpy(), y.numpy(), 0.07), rel=1e-12)
    assert torch.equal(distance_weights(c, c, "step", 1.0), label_weights(y, y).double())


def test_distance_all_at_one_point_is_log_n_minus_1_for_equal_embeddings() -> None:
    z = F.normalize(torch.ones(5, 3, dtype=torch.float64), dim=1)
    c = torch.zeros(5, 3, dtype=torch.float64)
    assert distance_weighted(z, c, 0.07, "inverse", 1.0).item() == pytest.approx(math.log(4), rel=1e-12)


def test_distance_loss_with_a_nan_coordinate_is_nan_not_zero() -> None:
    # Sections without a coordinate map give NaN coordinates: every weight sum is then NaN. The loss must say so
    # (the training loop stops on a non-finite loss); a 0 would train on NaN gradients unnoticed.
    z = unit(6, 4, seed=3).requires_grad_(True)
    c = torch.rand(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c[2] = float("nan")
    loss = distance_weighted(z, c, 0.1, "gaussian", radius=1.0)
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------------------------------------
# Sharding over ranks, simulated in one process


@pytest.mark.parametrize("kind", ["supcon", "distance"])
def test_rank_shares_sum_to_full_loss_and_gradient(kind: str) -> None:
    n, sizes = 11, [4, 0, 5, 2]  # unequal, one empty rank
    z = unit(n, 6, seed=21).requires_grad_(True)
    y = torch.tensor([0, 1, 1, 0, 2, 2, 1, 3, 0, 2, 4])
    c = torch.rand(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 4.0

    def weights(rows: slice) -> torch.Tensor:
        if kind == "supcon":
            return label_weights(y[rows], y)
        return distance_weights(c[rows], c, "gaussian", 1.0)

    full = soft_target_contrastive(z, z, weights(slice(None)), 0.2)
    (g_full,) = torch.autograd.grad(full, z)
    n_valid = sum(
        int((weights(slice(None))[i].sum() - weights(slice(None))[i, i]) > 0) for i in range(n)
    )  # global count of anchors with a positive weight
    shares, offset = [], 0
    for size in sizes:
        rows = slice(offset, offset + size)
        shares.append(soft_target_contrastive(z[rows], z, weights(rows), 0.2, offset, n_valid))
        offset += size
    total = torch.stack(shares).sum()
    (g_sum,) = torch.autograd.grad(total, z)
    assert total.item() == pytest.approx(full.item(), rel=1e-13)
    torch.testing.assert_close(g_sum, g_full, rtol=1e-12, atol=1e-14)


def test_memory_is_local_by_global() -> None:
    # 3 anchors against 5000 candidates: only (3, 5000) matrices, never 5000 x 5000.
    z_all = unit(5000, 16, seed=1).float()
    w = torch.ones(3, 5000)
    loss = soft_target_contrastive(z_all[100:103], z_all, w, 0.07, offset=100, n_valid=5000)
    assert torch.isfinite(loss)


def test_bad_shapes_raise() -> None:
    z = unit(4, 3)
    with pytest.raises(ValueError, match="weights"):
        soft_target_contrastive(z, z, torch.ones(4, 3), 0.1)
    with pytest.raises(ValueError, match="offset"):
        soft_target_contrastive(z[:2], z, torch.ones(2, 4), 0.1, offset=3)
    with pytest.raises(ValueError, match="coordinates"):
        DistanceWeightedLoss()(z, torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()(z, torch.zeros(4, 3))


# ----------------------------------------------------------------------------------------------------------
# Modules on one process


def test_modules_equal_functions() -> None:
    z, y = unit(9, 4, seed=2), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 5])
    c = torch.rand(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert SupConLoss(0.1)(z, y).item() == pytest.approx(supcon(z, y, 0.1).item(), rel=1e-14)
    dw = DistanceWeightedLoss(0.1, "step", 0.5)(z, c).item()
    assert dw == pytest.approx(distance_weighted(z, c, 0.1, "step", 0.5).item(), rel=1e-14)
    loss = build_loss(LossConfig(kind="distance", temperature=0.1, transfer="inverse", radius_mm=0.3))
    assert isinstance(loss, ContrastiveLoss)
    assert loss(z, c).item() == pytest.approx(distance_weighted(z, c, 0.1, "inverse", 0.3).item(), rel=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy


def test_cross_entropy_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    x = logits.numpy()
    ref = np.mean([-(x[i, t[i]] - math.log(np.exp(x[i]).sum())) for i in range(7)])
    assert cross_entropy(logits, t).item() == pytest.approx(ref, rel=1e-12)
    assert CrossEntropyLoss()(logits, t).item() == pytest.approx(ref, rel=1e-12)
    # Closed form: uniform logits give log K.
    assert cross_entropy(torch.zeros(3, 5), torch.tensor([0, 1, 2])).item() == pytest.approx(math.log(5))
    # Shares with a global divisor sum to the mean.
    parts = cross_entropy(logits[:3], t[:3], 7) + cross_entropy(logits[3:], t[3:], 7)
    assert parts.item() == pytest.approx(ref, rel=1e-12)


def test_cross_entropy_fp32_under_autocast() -> None:
    logits = torch.randn(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# The siamese distance task (seed 002's distance baseline; cytonet/losses/siamese.py)


def np_siamese(out: np.ndarray, c: np.ndarray, scale: float) -> float:
    """L = (1/N) sum_i [(1/(N-1)) sum_{k!=i} (||u_i - u_k|| - ||c_i - c_k||/s)^2 + (1/3) ||l_i - c_i/s||^2]."""
    n, d = out.shape[0], out.shape[1] - 3
    total = 0.0
    for i in range(n):
        pairs = 0.0
        for k in range(n):
            if k != i:
                predicted = math.sqrt(sum((out[i, j] - out[k, j]) ** 2 for j in range(d)))
                target = math.sqrt(sum((c[i, j] - c[k, j]) ** 2 for j in range(3))) / scale
                pairs += (predicted - target) ** 2
        location = sum((out[i, d + j] - c[i, j] / scale) ** 2 for j in range(3)) / 3
        total += pairs / (n - 1) + location
    return total / n


def siamese_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 5 + 3, generator=g, dtype=torch.float64)
    return out, torch.rand(n, 3, generator=g, dtype=torch.float64) * 30.0 - 10.0


def test_siamese_matches_numpy() -> None:
    out, c = siamese_batch(9, 4)
    got = siamese_distance(out, c, scale_mm=7.0).item()
    assert got == pytest.approx(np_siamese(out.numpy(), c.numpy(), 7.0), rel=1e-7)  # EPS under the root
    assert SiameseLoss(7.0)(out, c).item() == got


def test_siamese_perfect_prediction_is_zero_with_finite_gradients() -> None:
    """Embeddings that are the scaled coordinates predict every distance and location: L = 0 (up to EPS),
    and equal embeddings (a patch seen twice) keep the gradient finite."""
    _, c = siamese_batch(6, 5)
    c = torch.cat([c, c[:1]])  # the first patch twice
    out = torch.cat([c / 4.0, c / 4.0], dim=1).requires_grad_(True)
    loss = siamese_distance(out, c, scale_mm=4.0)
    assert loss.item() < 1e-7
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()


def test_siamese_rank_shares_sum_to_full_loss_and_gradient() -> None:
    n, sizes = 11, [4, 0, 5, 2]
    out, c = siamese_batch(n, 6)
    out.requires_grad_(True)
    full = siamese_distance(out, c, 5.0)
    (g_full,) = torch.autograd.grad(full, out)
    shares, offset = [], 0
    for size in sizes:
        rows = slice(offset, offset + size)
        shares.append(siamese_share(out[rows], out, c[rows], c, offset, 5.0))
        offset += size
    total = torch.stack(shares).sum()
    (g_sum,) = torch.autograd.grad(total, out)
    assert total.item() == pytest.approx(full.item(), rel=1e-13)
    torch.testing.assert_close(g_sum, g_full, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"loss\.kind=siamese needs"):
        SiameseLoss(5.0)(out, c[:, 0])
