"""Builders from :class:`~cytonet.config.ModelConfig` and the composite models the training loops wrap in DDP.

- :func:`build_encoder`: the paper encoder (``model.encoder=paper``) or a ResNet (``resnet50``/``resnet101``).
- :class:`ContrastiveModel`: encoder f + projection head g; ``forward(x)`` gives z (what the contrastive loss
  takes), :meth:`ContrastiveModel.encode` gives h. With a :class:`SiameseHead` instead of g
  (:func:`build_siamese_model`), the model of the siamese distance task.
- :class:`ClassificationModel`: encoder + linear classifier; ``freeze_encoder=True`` is the linear probe of
  seed 002 (encoder parameters fixed, its BatchNorm kept in eval mode, no autograd graph through it), False is
  scratch training end to end.
"""

from __future__ import annotations

import torch
from torch import nn

from cytonet.config import ModelConfig
from cytonet.models.base import Encoder
from cytonet.models.heads import LinearClassifier, ProjectionHead, SiameseHead
from cytonet.models.paper_encoder import PaperEncoder
from cytonet.models.resnet import resnet50, resnet101

#: File of a finished probe or scratch stage holding encoder, linear classifier and area table (written by the
#: training loop, read by ``cytonet infer``).
MODEL_FILE = "model.pt"
MODEL_FORMAT = "cytonet-classifier-1"


def build_encoder(cfg: ModelConfig, in_channels: int = 1) -> Encoder:
    """The encoder of ``cfg`` (weights in channels_last format when ``cfg.channels_last``)."""
    enc: Encoder
    if cfg.encoder == "paper":
        enc = PaperEncoder(cfg.n_blocks, cfg.padding, in_channels=in_channels, channels_last=cfg.channels_last)
    elif cfg.encoder == "resnet50":
        enc = resnet50(in_channels, cfg.channels_last)
    elif cfg.encoder == "resnet101":
        enc = resnet101(in_channels, cfg.channels_last)
    else:
        raise ValueError(f"model.encoder={cfg.encoder!r}: use paper, resnet50 or resnet101")
    if cfg.channels_last:
        enc.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place; missing in torch's stubs
    return enc


def build_projection_head(cfg: ModelConfig, in_dim: int) -> ProjectionHead:
    """Projection MLP ``in_dim -> proj_hidden_dim -> proj_dim`` of ``cfg``."""
    return ProjectionHead(in_dim, cfg.proj_hidden_dim, cfg.proj_dim)


class ContrastiveModel(nn.Module):
    """Encoder f and projection head g: (B, 1, P, P) -> (B, proj_dim) unit vectors z = g(f(x))."""

    def __init__(self, encoder: Encoder, head: ProjectionHead | SiameseHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, P, P) -> (B, D_e) representations h."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_contrastive_model(cfg: ModelConfig) -> ContrastiveModel:
    """Encoder and projection head of ``cfg``."""
    enc = build_encoder(cfg)
    return ContrastiveModel(enc, build_projection_head(cfg, enc.out_dim))


def build_siamese_model(cfg: ModelConfig) -> ContrastiveModel:
    """Encoder and the siamese distance task's heads (``loss.kind=siamese``): (B, 1, P, P) -> (B, proj_dim + 3),
    embeddings and 3D locations (:class:`SiameseHead`)."""
    enc = build_encoder(cfg)
    return ContrastiveModel(enc, SiameseHead(enc.out_dim, cfg.proj_hidden_dim, cfg.proj_dim))


class ClassificationModel(nn.Module):
    """Encoder and linear classifier: (B, 1, P, P) -> (B, n_classes) logits.

    With ``freeze_encoder`` (linear probe) the encoder's parameters do not require gradients, the encoder stays
    in eval mode whatever :meth:`train` is called with (its BatchNorm statistics stay fixed), and it runs without
    building an autograd graph.
    """

    def __init__(self, encoder: Encoder, n_classes: int, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = LinearClassifier(encoder.out_dim, n_classes)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ClassificationModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                h = self.encoder(x)
            return self.classifier(h.float())
        return self.classifier(self.encoder(x))


def build_classifier(cfg: ModelConfig, n_classes: int, freeze_encoder: bool = False) -> ClassificationModel:
    """A fresh encoder of ``cfg`` with a linear classifier (scratch training; load weights for a probe)."""
    return ClassificationModel(build_encoder(cfg), n_classes, freeze_encoder)
