"""The encoder of Schiffer et al. ISBI 2021 (seed 002, "Model architecture"), after Spitzer et al. 2017.

Six blocks of two convolutions with 16, 32, 64, 64, 128, 128 filters; the first convolution is 5x5 with
stride 4, all others 3x3 with stride 1; every convolution is followed by BatchNorm and ReLU; 2x2 max-pooling
follows every block but the last; global pooling gives D_e = 128 (the width of the last block).

cytonet defaults to unpadded ('valid') convolutions: then the encoder is a pure sliding-window function of its
input, its receptive field with n blocks is ``paper_receptive_field(n)`` (4: 265 px, 5: 553 px, 6: 1129 px),
the total stride is ``paper_total_stride(n)`` (6 blocks: 128), and a patch of exactly the receptive field gives
a 1x1 final map. Running :meth:`PaperEncoder.features` once over a whole tile therefore reproduces the
per-patch result at every grid point (PLATFORM.md, dense inference). ``padding='same'`` zero-pads every
convolution instead (the final map is then not a function of the patch content alone).

Convolutions have no bias: the BatchNorm that follows each one removes any per-channel constant. For the same
reason (with valid padding) an affine intensity normalisation of the input would change nothing, so inputs in
[0, 1] are used as they are.

Entry point: :class:`PaperEncoder` (built from ``ModelConfig`` by :func:`cytonet.models.build_encoder`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cytonet.config import paper_receptive_field, paper_total_stride
from cytonet.models.base import Encoder, init_weights

#: Filters per block (seed 002).
PAPER_WIDTHS: tuple[int, ...] = (16, 32, 64, 64, 128, 128)


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    """Convolution (no bias) -> BatchNorm -> ReLU."""
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class PaperBlock(nn.Sequential):
    """Two conv-BN-ReLU layers; the first of block 1 is 5x5 stride 4, all others 3x3 stride 1."""

    def __init__(self, c_in: int, c_out: int, first: bool, padding: Literal["valid", "same"]) -> None:
        k1, s1 = (5, 4) if first else (3, 1)
        p1 = k1 // 2 if padding == "same" else 0
        p2 = 1 if padding == "same" else 0
        super().__init__(*conv_bn_relu(c_in, c_out, k1, s1, p1), *conv_bn_relu(c_out, c_out, 3, 1, p2))


class PaperEncoder(Encoder):
    """Seed-002 encoder with ``n_blocks`` blocks: (B, in_channels, H, W) -> (B, widths[n_blocks - 1]).

    Trunk layout (attribute ``trunk``, an ``nn.Sequential``): block 1, pool, block 2, pool, ..., block n.
    Each block is a :class:`PaperBlock`; each pool is ``nn.MaxPool2d(2, 2)``. Dense inference code can walk
    ``trunk`` to replace pools by stride-1 pools and dilate the convolutions that follow.
    """

    def __init__(
        self,
        n_blocks: int = 6,
        padding: Literal["valid", "same"] = "valid",
        widths: tuple[int, ...] = PAPER_WIDTHS,
        in_channels: int = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= n_blocks <= len(widths):
            raise ValueError(f"n_blocks={n_blocks} must be in 1..{len(widths)}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for b in range(n_blocks):
            layers.append(PaperBlock(c_in, widths[b], first=b == 0, padding=padding))
            if b < n_blocks - 1:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            c_in = widths[b]
        self.trunk = nn.Sequential(*layers)
        self.n_blocks = n_blocks
        self.padding = padding
        self.out_dim = widths[n_blocks - 1]
        self.channels_last = channels_last
        init_weights(self)

    @property
    def receptive_field_px(self) -> int:
        """Input edge whose final map is 1x1 with valid padding (the receptive field)."""
        return paper_receptive_field(self.n_blocks)

    @property
    def total_stride(self) -> int:
        """Input pixels per step of the final feature map."""
        return paper_total_stride(self.n_blocks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, D_e, h, w); valid padding: h = (H - receptive_field) // total_stride + 1."""
        return self.trunk(x)
