"""cytonet.losses: pure loss functions plus thin ``nn.Module`` wrappers.

- :mod:`cytonet.losses.contrastive`: supervised contrastive loss (seed 002 eq. 1-2) and the distance-weighted
  contrastive loss (seed 004), one soft-target formulation, distributed over ranks with O(B_local x B_global)
  memory.
- :mod:`cytonet.losses.siamese`: the self-supervised siamese distance task (3D distance and location
  regression) behind seed 002's ``distance`` baseline, distributed the same way.
- :mod:`cytonet.losses.classification`: cross-entropy for the linear probe and scratch training.
"""

from cytonet.losses.classification import CrossEntropyLoss, cross_entropy
from cytonet.losses.contrastive import (
    ContrastiveLoss,
    DistanceWeightedLoss,
    SupConLoss,
    build_loss,
    distance_weighted,
    distance_weights,
    label_weights,
    soft_target_contrastive,
    supcon,
    transfer_weights,
)
from cytonet.losses.siamese import SiameseLoss, siamese_distance, siamese_share

__all__ = [
    "ContrastiveLoss",
    "CrossEntropyLoss",
    "DistanceWeightedLoss",
    "SiameseLoss",
    "SupConLoss",
    "build_loss",
    "cross_entropy",
    "distance_weighted",
    "distance_weights",
    "label_weights",
    "siamese_distance",
    "siamese_share",
    "soft_target_contrastive",
    "supcon",
    "transfer_weights",
]
