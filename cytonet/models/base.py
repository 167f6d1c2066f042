"""The encoder interface shared by the paper encoder and the ResNets.

An :class:`Encoder` maps (B, C_in, H, W) images to (B, D_e) vectors through a convolutional trunk
(:meth:`Encoder.features`, the dense feature map used for whole-section inference) followed by global average
pooling. ``out_dim`` is D_e. With ``channels_last`` the input is converted to the channels_last memory format
on entry (the module's weights are converted by the builder), which is what makes bf16 convolutions fast on
CPUs with AMX and on tensor cores.
"""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class: subclasses set ``out_dim`` and implement :meth:`features`."""

    out_dim: int
    """Width D_e of the pooled representation h."""
    channels_last: bool = False
    """Convert inputs to the channels_last memory format in :meth:`forward`."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional trunk: (B, C_in, H, W) -> (B, D_e, h, w) feature map."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, D_e) representations h (mean over the final feature map)."""
        if x.dim() != 4:
            raise ValueError(f"encoder input must be (B, C, H, W), got shape {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features(x).mean(dim=(2, 3))


def init_weights(module: nn.Module) -> None:
    """He-normal (fan_out) convolutions, BatchNorm weight 1 and bias 0; other layers keep torch's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
