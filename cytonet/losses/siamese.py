"""The self-supervised distance task behind seed 002's ``distance`` baseline (``loss.kind=siamese``).

Seed 002 initialises one of its baselines "with weights obtained with the self-supervised distance task from
[5]" (Spitzer et al., MICCAI 2018: a siamese network predicts the distance between pairs of patches and their
3D locations in the reference brain; seed 003 shows it). cytonet's version, for patches with 3D reference-space
coordinates c (mm, the ones seed 004's loss uses):

- the two branches of the siamese network are the shared encoder f and an MLP embedding, u = e(f(x)); the
  predicted distance of a pair is the Euclidean distance of their embeddings, ||u_i - u_k|| (symmetric, 0 for
  a patch and itself); a linear head predicts each patch's location l_i = A f(x_i) + b;
- targets in units of ``loss.scale_mm`` = s: d_ik = ||c_i - c_k|| / s and c_i / s (Euclidean distance in the
  reference space, where [5] used geodesic distance on the cortical surface, which a section store does not
  hold);
- over a global batch of N patches, every pair of distinct patches counts:

      L = (1/N) sum_i [ (1/(N-1)) sum_{k != i} (||u_i - u_k|| - d_ik)^2 + (1/3) ||l_i - c_i / s||^2 ].

Distribution as in :mod:`cytonet.losses.contrastive`: a rank's anchors are its B_l rows, the candidates the
B_g rows of all ranks gathered with gradient; each rank returns its share (its anchors' terms divided by the
global N), so the shares sum to L and DDP (which averages) backpropagates ``share * world_size``.

Entry points: the pure functions :func:`siamese_distance` (one process) and :func:`siamese_share` (a rank's
share), and the module :class:`SiameseLoss`.
"""

from __future__ import annotations

import torch
from torch import nn

from cytonet.losses.contrastive import _fp32, _self_mask, at_least_fp32, gather_batch

#: Added under the square root of the embedding distance: its gradient stays finite for equal embeddings.
EPS = 1e-8


def _pair_distances(u: torch.Tensor, u_all: torch.Tensor) -> torch.Tensor:
    """(B_l, B_g) ||u_i - u_k|| (with :data:`EPS`), without a (B_l, B_g, D) temporary."""
    sq = (u * u).sum(1, keepdim=True) + (u_all * u_all).sum(1)[None, :] - 2.0 * u @ u_all.T
    return torch.sqrt(sq.clamp_min(0.0) + EPS)


def siamese_share(
    out: torch.Tensor,
    out_all: torch.Tensor,
    coords: torch.Tensor,
    coords_all: torch.Tensor,
    offset: int = 0,
    scale_mm: float = 10.0,
) -> torch.Tensor:
    """A rank's share of L: the bracketed terms of its anchors ``out`` (B_l, D + 3) against the candidates
    ``out_all`` (B_g, D + 3) of the global batch, summed and divided by B_g; ``offset``: the anchors' first
    row in the candidates; ``coords`` (B_l, 3) and ``coords_all`` (B_g, 3) in mm."""
    with _fp32(out.device):
        out, out_all = at_least_fp32(out), at_least_fp32(out_all)
        c, c_all = at_least_fp32(coords.detach()) / scale_mm, at_least_fp32(coords_all.detach()) / scale_mm
        u, loc = out[:, :-3], out[:, -3:]
        predicted = _pair_distances(u, out_all[:, :-3])
        target = torch.cdist(c, c_all, compute_mode="donot_use_mm_for_euclid_dist")
        b_g = out_all.shape[0]
        off_diagonal = ~_self_mask(out.shape[0], b_g, offset, out.device)
        pairs = ((predicted - target) ** 2 * off_diagonal).sum(1) / max(b_g - 1, 1)
        location = ((loc - c) ** 2).sum(1) / 3.0
        return (pairs + location).sum() / b_g


def siamese_distance(out: torch.Tensor, coords: torch.Tensor, scale_mm: float = 10.0) -> torch.Tensor:
    """L of the module docstring on one process: ``out`` (N, D + 3) from :class:`~cytonet.models.heads.SiameseHead`
    (embeddings, then locations), ``coords`` (N, 3) in mm."""
    return siamese_share(out, out, coords, coords, 0, scale_mm)


class SiameseLoss(nn.Module):
    """``forward(out (B_l, D + 3), coords (B_l, 3))``: this rank's share of L over the global batch (gathered
    from every rank of the default process group; identity on one process)."""

    def __init__(self, scale_mm: float) -> None:
        super().__init__()
        self.scale_mm = scale_mm

    def forward(self, out: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise ValueError(f"loss.kind=siamese needs (B, 3) coordinates, got shape {tuple(coords.shape)}")
        g = gather_batch(out, coords)
        return siamese_share(out, g.z_all, coords, g.targets_all, g.offset, self.scale_mm)
