"""cytonet.models: encoders (seed 002 paper encoder, ResNet-50/101 of seed 004), heads and builders.

Modules: :mod:`~cytonet.models.base` (encoder interface), :mod:`~cytonet.models.paper_encoder`,
:mod:`~cytonet.models.resnet`, :mod:`~cytonet.models.heads` (projection MLP, linear classifier),
:mod:`~cytonet.models.build` (constructors from ``ModelConfig``, composite models).
"""

from cytonet.models.base import Encoder
from cytonet.models.build import (
    ClassificationModel,
    ContrastiveModel,
    build_classifier,
    build_contrastive_model,
    build_encoder,
    build_projection_head,
)
from cytonet.models.heads import LinearClassifier, ProjectionHead
from cytonet.models.paper_encoder import PaperEncoder
from cytonet.models.resnet import ResNet, resnet50, resnet101

__all__ = [
    "ClassificationModel",
    "ContrastiveModel",
    "Encoder",
    "LinearClassifier",
    "PaperEncoder",
    "ProjectionHead",
    "ResNet",
    "build_classifier",
    "build_contrastive_model",
    "build_encoder",
    "build_projection_head",
    "resnet50",
    "resnet101",
]
