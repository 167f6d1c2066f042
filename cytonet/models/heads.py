"""Heads on top of an encoder: the projection network g of seed 002 and the linear classifier.

- :class:`ProjectionHead`: g(h) = z~ with one hidden layer (seed 002: 128) with BatchNorm and ReLU, output
  D_p = 128, then z = z~ / ||z~||_2 (the normalised input of the contrastive loss). The normalisation runs in
  fp32 so that ||z|| = 1 holds under bf16/fp16 autocast too.
- :class:`SiameseHead`: the embedding and location heads of the siamese distance task (``loss.kind=siamese``).
- :class:`LinearClassifier`: one linear layer on h, for the linear probe (frozen encoder) and for scratch
  training (end to end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """MLP ``in_dim -> hidden_dim (BN, ReLU) -> out_dim`` with L2-normalised output: (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 128, out_dim: int = 128) -> None:
        super().__init__()
        # No bias before BatchNorm: it would be removed by the normalisation anyway.
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) representations -> (B, out_dim) unit vectors z (fp32, or fp64 for an fp64 model)."""
        z = self.fc2(self.relu(self.bn1(self.fc1(h))))
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        return F.normalize(z, dim=1, eps=1e-12)


class SiameseHead(nn.Module):
    """The heads of the siamese distance task (:mod:`cytonet.losses.siamese`) on representations h:
    (B, in_dim) -> (B, out_dim + 3), an embedding u (MLP ``in_dim -> hidden_dim (ReLU) -> out_dim``) whose
    Euclidean distances predict the patches' 3D distances, then a linear prediction of each patch's 3D location.
    Per sample, so that the pairs are formed over the whole global batch in the loss."""

    def __init__(self, in_dim: int, hidden_dim: int = 128, out_dim: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.location = nn.Linear(in_dim, 3)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.fc2(self.relu(self.fc1(h))), self.location(h)], dim=1)


class LinearClassifier(nn.Module):
    """Linear layer (B, in_dim) -> (B, n_classes) logits."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.fc = nn.Linear(in_dim, n_classes)
        self.n_classes = n_classes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)
