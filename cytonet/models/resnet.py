"""ResNet-50 and ResNet-101 encoders for 1-channel images (seed 004: "R50/R101" CytoNet encoders).

He et al., CVPR 2016 ("Deep residual learning for image recognition"), bottleneck variant with the stride on
the 3x3 convolution ("ResNet v1.5"), written in cytonet (torchvision is unusable here). The stem takes
``in_channels`` (1: grey-value histology) and there is no classification layer: the encoder ends with global
average pooling to D_e = 2048. Parameter counts equal the standard architectures minus the fc layer and with a
1-channel stem: ResNet-50 23,501,760, ResNet-101 42,493,888.

Entry points: :class:`ResNet`, :func:`resnet50`, :func:`resnet101`.
"""

from __future__ import annotations

import torch
from torch import nn

from cytonet.models.base import Encoder, init_weights

#: Bottleneck blocks per stage.
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand x4), BN after each, ReLU after the residual sum."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Encoder):
    """Bottleneck ResNet encoder: (B, in_channels, H, W) -> (B, 2048); total stride 32."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        in_channels: int = 1,
        channels_last: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        c_in = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(Bottleneck(c_in, width, stride=2 if (j == 0 and i > 0) else 1))
                c_in = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = c_in
        self.channels_last = channels_last
        init_weights(self)
        if zero_init_residual:
            # Each residual branch starts as zero: the block is the identity at initialisation (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 2048, H/32, W/32)."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet50(in_channels: int = 1, channels_last: bool = False) -> ResNet:
    """ResNet-50 encoder without fc (23,501,760 parameters with 1 input channel)."""
    return ResNet(RESNET_LAYERS["resnet50"], in_channels, channels_last)


def resnet101(in_channels: int = 1, channels_last: bool = False) -> ResNet:
    """ResNet-101 encoder without fc (42,493,888 parameters with 1 input channel)."""
    return ResNet(RESNET_LAYERS["resnet101"], in_channels, channels_last)
