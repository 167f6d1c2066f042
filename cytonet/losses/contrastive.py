"""Contrastive losses of cytonet: supervised contrastive (seed 002) and distance-weighted (seed 004).

Both are one soft-target contrastive loss with different target weights w_ik. For anchor i and candidates k
(every other sample of the global batch),

    p_ik = exp(<z_i, z_k> / tau) / sum_{l != i} exp(<z_i, z_l> / tau)
    L_i  = -(sum_{k != i} w_ik log p_ik) / (sum_{k != i} w_ik)
    L    = mean of L_i over the anchors with a non-zero weight sum.

- Supervised contrastive loss, Schiffer et al. ISBI 2021 (seed 002) eq. (1)-(2), after Khosla et al. 2020:
  w_ik = 1 if y_i = y_k else 0, so the denominator is N_{y_i} (the other samples of the same class) and L is
  the mean of eq. (2) over anchors (eq. 1; anchors without any positive are left out instead of giving 0/0).
- Distance-weighted contrastive loss, Schiffer et al. CytoNet poster (seed 004), as corrected in
  seeds/README.md: w_ik = g(d_ik), with d_ik the Euclidean distance of the samples' 3D reference-space
  coordinates and g a distance transfer function (:func:`transfer_weights`: Gaussian, step, inverse).

Distribution. Anchors are the B_l rows of this rank; candidates are the B_g rows of the global batch gathered
with :func:`cytonet.distributed.gather_with_grad`. Every tensor is O(B_l x B_g) per rank, never B_g^2. The
anchors' own positions in the global batch (``offset + i``) are excluded as k = i. Each rank returns its
*share* of the loss, sum of its anchors' L_i divided by the *global* number of valid anchors, so the shares sum
to L over ranks and the gradients of the shares, summed over ranks, are the single-process gradient exactly.
DistributedDataParallel averages gradients over ranks, so with DDP call ``backward()`` on
``share * world_size`` (and log the all-reduced sum of the shares). See :class:`ContrastiveLoss`.

Precision: the logits, the log-sum-exp and the weights are computed in fp32 with autocast disabled, whatever
the dtype of z; the log-sum-exp makes the loss stable for any tau.

Entry points: the pure functions :func:`soft_target_contrastive`, :func:`supcon`, :func:`distance_weighted`,
:func:`transfer_weights`, and the modules :class:`ContrastiveLoss` (built from ``LossConfig``),
:class:`SupConLoss`, :class:`DistanceWeightedLoss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cytonet import distributed
from cytonet.config import LossConfig

Transfer = Literal["gaussian", "step", "inverse"]


def _fp32(device: torch.device) -> torch.autocast:
    """A context that switches autocast off on ``device`` (the loss runs in fp32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is a 16-bit float (fp64 stays fp64: exact references and gradchecks)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def transfer_weights(d: torch.Tensor, transfer: Transfer, radius: float) -> torch.Tensor:
    """Distance transfer function g of seed 004: similarity weights in [0, 1] from distances.

    Args:
        d: distances (any shape), in the unit of ``radius`` (mm in cytonet).
        transfer: ``gaussian`` g(d) = exp(-d^2 / (2 r^2)); ``step`` g(d) = 1 if d <= r else 0;
            ``inverse`` g(d) = r / (r + d) (1 at d = 0, 1/2 at d = r).
        radius: the scale r > 0.

    Returns:
        Weights of the shape of ``d``, g(0) = 1.
    """
    if radius <= 0:
        raise ValueError(f"transfer radius must be > 0, got {radius}")
    if transfer == "gaussian":
        return torch.exp(-(d**2) / (2.0 * radius**2))
    if transfer == "step":
        return (d <= radius).to(d.dtype)
    if transfer == "inverse":
        return radius / (radius + d)
    raise ValueError(f"unknown distance transfer {transfer!r}: use gaussian, step or inverse")


def soft_target_contrastive(
    z: torch.Tensor,
    z_all: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    offset: int = 0,
    n_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Soft-target contrastive loss of the anchors ``z`` against the candidates ``z_all``.

    L_i = -(sum_{k != i} w_ik log p_ik) / (sum_{k != i} w_ik),
    p_ik = exp(<z_i, z_k> / tau) / sum_{l != i} exp(<z_i, z_l> / tau)   (seed 002 eq. 2 with soft targets).

    Args:
        z: (B_l, D) anchor embeddings (L2-normalised by the projection head).
        z_all: (B_g, D) candidate embeddings; rows ``offset .. offset + B_l - 1`` are the anchors themselves
            (they are excluded as k = i). Single process: ``z_all is z`` and ``offset = 0``.
        weights: (B_l, B_g) non-negative target weights w_ik (no gradient); the diagonal entries
            ``[i, offset + i]`` are ignored.
        temperature: tau > 0.
        offset: position of this rank's first anchor in the global batch.
        n_valid: number of anchors with a non-zero weight sum over the *whole* global batch (all ranks); None:
            the local count (single process). The result is ``sum_i L_i / n_valid``.

    Returns:
        Scalar fp32 tensor: this rank's share of the mean loss (0 when no anchor has a positive weight).
    """
    if z.dim() != 2 or z_all.dim() != 2 or z.shape[1] != z_all.shape[1]:
        raise ValueError(f"expected z (B_l, D) and z_all (B_g, D), got {tuple(z.shape)} and {tuple(z_all.shape)}")
    b_l, b_g = z.shape[0], z_all.shape[0]
    if weights.shape != (b_l, b_g):
        raise ValueError(f"weights must have shape (B_l, B_g) = {(b_l, b_g)}, got {tuple(weights.shape)}")
    if not 0 <= offset <= b_g - b_l:
        raise ValueError(f"offset {offset} does not place {b_l} anchors inside {b_g} candidates")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    self_mask = _self_mask(b_l, b_g, offset, z.device)
    w = weights.detach().masked_fill(self_mask, 0.0)  # a copy: the caller's tensor is never modified
    return _masked_contrastive(z, z_all, w, self_mask, temperature, n_valid)


def _masked_contrastive(
    z: torch.Tensor,
    z_all: torch.Tensor,
    w: torch.Tensor,
    self_mask: torch.Tensor,
    temperature: float,
    n_valid: torch.Tensor | float | None,
) -> torch.Tensor:
    """:func:`soft_target_contrastive` with ``w`` (B_l, B_g) already 0 on ``self_mask`` (B_l, B_g).

    Uses log p_ik = s_ik - lse_i with s_ik = <z_i, z_k> / tau and lse_i = logsumexp_{l != i} s_il, so that
    L_i = lse_i - (sum_k w_ik s_ik) / (sum_k w_ik): no (B_l, B_g) log-probability matrix is materialised, and
    the log-sum-exp keeps everything finite for any tau. Peak memory is a few (B_l, B_g) fp32 matrices.
    """
    if z_all.shape[0] < 2:  # no candidate besides the anchor itself: nothing to contrast
        return (z.sum() * 0.0).float()
    with _fp32(z.device):
        logits = (at_least_fp32(z) @ at_least_fp32(z_all).T) / temperature  # (B_l, B_g)
        w = w.to(logits.dtype)
        w_sum = w.sum(dim=1)  # (B_l,)
        valid = ~(w_sum <= 0)  # NaN weights (a NaN coordinate) count as valid: the loss turns NaN, not silently 0
        weighted = (w * logits).sum(dim=1)  # sum_k w_ik s_ik; autograd keeps w only, not logits
        # In place (saves a matrix): the -inf removes k = i from the normaliser; no saved tensor is modified.
        log_norm = torch.logsumexp(logits.masked_fill_(self_mask, float("-inf")), dim=1)
        per_anchor = log_norm - weighted / torch.where(valid, w_sum, torch.ones_like(w_sum))
        total = torch.where(valid, per_anchor, torch.zeros_like(per_anchor)).sum()
        if n_valid is None:
            n_valid = valid.sum()
        if isinstance(n_valid, torch.Tensor):
            return total / n_valid.to(total.dtype).clamp_min(1.0)
        return total / max(float(n_valid), 1.0)


def _self_mask(b_l: int, b_g: int, offset: int, device: torch.device) -> torch.Tensor:
    """(B_l, B_g) bool, True at ``[i, offset + i]``: the anchors' own columns (k = i)."""
    rows = torch.arange(b_l, device=device)
    mask = torch.zeros((b_l, b_g), dtype=torch.bool, device=device)
    mask[rows, rows + offset] = True
    return mask


def label_weights(labels: torch.Tensor, labels_all: torch.Tensor) -> torch.Tensor:
    """(B_l, B_g) SupCon targets: 1 where ``labels[i] == labels_all[k]``, else 0 (labels: (B_l,), (B_g,))."""
    return (labels.view(-1, 1) == labels_all.view(1, -1)).float()


def distance_weights(coords: torch.Tensor, coords_all: torch.Tensor, transfer: Transfer, radius: float) -> torch.Tensor:
    """(B_l, B_g) seed-004 targets g(d_ik) from 3D coordinates (B_l, 3) and (B_g, 3), computed in >= fp32."""
    with _fp32(coords.device):
        c, c_all = at_least_fp32(coords.detach()), at_least_fp32(coords_all.detach())
        # Direct differences, not the |a|^2 + |b|^2 - 2ab expansion: exact 0 for equal points, no cancellation;
        # cdist does it without a (B_l, B_g, 3) temporary.
        d = torch.cdist(c, c_all, compute_mode="donot_use_mm_for_euclid_dist")
        return transfer_weights(d, transfer, radius)


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss of seed 002 eq. (1)-(2) on one process.

    Args:
        z: (N, D) L2-normalised projections.
        labels: (N,) integer class labels.
        temperature: tau (seed 002: 0.07).

    Returns:
        Scalar: mean over anchors with at least one positive of L_i (eq. 2).
    """
    return soft_target_contrastive(z, z, label_weights(labels, labels), temperature)


def distance_weighted(
    z: torch.Tensor,
    coords: torch.Tensor,
    temperature: float = 0.07,
    transfer: Transfer = "gaussian",
    radius: float = 2.0,
) -> torch.Tensor:
    """Distance-weighted contrastive loss of seed 004 on one process.

    Args:
        z: (N, D) L2-normalised projections.
        coords: (N, 3) reference-space coordinates (unit of ``radius``, mm).
        temperature: tau.
        transfer: distance transfer function g (:func:`transfer_weights`).
        radius: its scale r.

    Returns:
        Scalar: mean over anchors with a non-zero weight sum of L_i.
    """
    return soft_target_contrastive(z, z, distance_weights(coords, coords, transfer, radius), temperature)


@dataclass(frozen=True)
class GatheredBatch:
    """A rank's view of the global batch: the gathered candidates and where its own anchors sit in them."""

    z_all: torch.Tensor
    """(B_g, D) embeddings of all ranks, differentiable."""
    targets_all: torch.Tensor
    """(B_g,) labels or (B_g, 3) coordinates of all ranks."""
    offset: int
    """Index of this rank's first row in the global batch."""


def gather_batch(z: torch.Tensor, targets: torch.Tensor) -> GatheredBatch:
    """Gather embeddings (with gradient) and labels/coordinates (without) of every rank, unequal sizes allowed."""
    sizes = distributed.all_gather_sizes(z.shape[0], z.device)
    return GatheredBatch(
        z_all=distributed.gather_with_grad(z, sizes),
        targets_all=distributed.all_gather_nograd(targets, sizes),
        offset=distributed.rank_offset(sizes),
    )


class ContrastiveLoss(nn.Module):
    """Pretraining loss from :class:`~cytonet.config.LossConfig`: SupCon (``kind=supcon``, targets are labels)
    or distance-weighted (``kind=distance``, targets are (B, 3) coordinates in mm).

    ``forward(z, targets)`` with z (B_l, D) gathers the global batch over all ranks of the default process group
    (identity on one process) and returns this rank's share (see the module docstring): the shares sum to the
    global loss. Under DDP, which averages gradients, backpropagate ``share * world_size``.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def weights(self, targets: torch.Tensor, targets_all: torch.Tensor) -> torch.Tensor:
        """(B_l, B_g) target weights for this loss kind."""
        if self.cfg.kind == "supcon":
            if targets.dim() != 1:
                raise ValueError(f"loss.kind=supcon needs (B,) labels, got shape {tuple(targets.shape)}")
            return label_weights(targets, targets_all)
        if targets.dim() != 2 or targets.shape[1] != 3:
            raise ValueError(f"loss.kind=distance needs (B, 3) coordinates, got shape {tuple(targets.shape)}")
        return distance_weights(targets, targets_all, self.cfg.transfer, self.cfg.radius_mm)

    def forward(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = gather_batch(z, targets)
        w = self.weights(targets, g.targets_all)  # a fresh tensor: masked in place
        self_mask = _self_mask(w.shape[0], w.shape[1], g.offset, w.device)
        w.masked_fill_(self_mask, 0.0)
        # The global count of valid anchors is one tiny all_reduce (no host sync: it stays a tensor).
        n_valid = distributed.all_reduce_sum((w.sum(dim=1) > 0).sum().float())
        return _masked_contrastive(z, g.z_all, w, self_mask, self.cfg.temperature, n_valid)


class SupConLoss(ContrastiveLoss):
    """Supervised contrastive loss (seed 002 eq. 1-2) as a module; ``forward(z (B, D), labels (B,))``."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__(LossConfig(kind="supcon", temperature=temperature))


class DistanceWeightedLoss(ContrastiveLoss):
    """Distance-weighted contrastive loss (seed 004) as a module; ``forward(z (B, D), coords (B, 3))``."""

    def __init__(self, temperature: float = 0.07, transfer: Transfer = "gaussian", radius_mm: float = 2.0) -> None:
        super().__init__(LossConfig(kind="distance", temperature=temperature, transfer=transfer, radius_mm=radius_mm))


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    """The pretraining loss of ``cfg``."""
    return ContrastiveLoss(cfg)
