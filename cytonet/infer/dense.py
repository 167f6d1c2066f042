"""Dense evaluation of a patch encoder over whole tiles: one trunk pass per tile instead of one per patch.

With unpadded ('valid') convolutions the paper encoder is a sliding-window function of its input, so its
convolutional trunk run once over a tile yields, at every step of its total stride T, exactly the feature
vector that the same patch evaluated alone would give (PLATFORM.md, "Dense inference"). Predictions at a
stride s < T need the layers after the split point to keep the finer grid: the layer whose stride would
overshoot s runs with a smaller stride, and every later layer is dilated by the factor dropped ("a trous").
Max-pooling and 3x3 convolutions stay exact under this rewrite; BatchNorm (eval) and ReLU are pointwise.
BatchNorm with running statistics is an affine map per channel, so :func:`fold_batchnorm` merges it into the
convolution before it (weights scaled, a bias added): one pass over the activations less per layer, and no
BatchNorm kernel to run in channels_last, whose fp32 CPU kernel is the inaccurate one (``model.channels_last``).

- :class:`DenseEncoder` ``(B, 1, H, W) -> (B, D_e, h, w)``: output ``[:, :, i, j]`` equals
  ``encoder(x[:, :, i*s : i*s+P, j*s : j*s+P])`` (the pooled representation h of the patch of edge P whose
  top-left corner is (i*s, j*s)), with ``h = (H - P) // s + 1``. Patches larger than the receptive field R
  (P > R) average the final map of the patch, which the dense path reproduces by a dilated average pool.
- :class:`PerPatchEncoder` the same mapping by cutting every patch out and running the encoder on batches of
  patches: the reference for tests and benchmarks, and the fallback for encoders that are not sliding-window
  functions (ResNets, 'same' padding).
- :func:`check_dense` says whether an encoder allows dense evaluation (:class:`DenseError` if not).
- :func:`fold_batchnorm` merges every Conv2d -> BatchNorm2d pair of a module in place.
- :func:`dense_classifier_logits` applies a linear classifier (B, D_e) -> (B, K) to a (B, D_e, h, w) map.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
from torch import nn

from cytonet.errors import ConfigError
from cytonet.models.base import Encoder
from cytonet.models.paper_encoder import PaperEncoder


class DenseError(ConfigError, ValueError):
    """The encoder or the stride does not allow exact dense evaluation (the message says what to change).
    A :class:`ConfigError` (the CLI reports its message); still a ValueError, as it was."""


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def achievable_stride(encoder: PaperEncoder, stride_px: int) -> int:
    """The dense map's stride e: the largest divisor of ``stride_px`` that divides the total stride T.

    The output grid is then every (stride_px / e)-th point of the dense map. Every divisor of T is reachable
    because all layer strides are powers of two (4, 2, 2, ...).
    """
    if stride_px < 1:
        raise DenseError(f"infer.stride_px={stride_px} must be >= 1")
    return math.gcd(stride_px, encoder.total_stride)


def check_dense(encoder: Encoder, patch_size_px: int) -> PaperEncoder:
    """``encoder``, if :class:`DenseEncoder` can evaluate it exactly on patches of ``patch_size_px`` (a paper
    encoder with valid padding, unpadded max-pooling and a receptive field within the patch), else
    :class:`DenseError` naming ``infer.mode``. Cheap (nothing is copied): callers check before they change
    anything."""
    if not isinstance(encoder, PaperEncoder):
        raise DenseError(
            f"infer.mode=dense needs the paper encoder with valid padding, got {type(encoder).__name__}; "
            "use infer.mode=per_patch"
        )
    if encoder.padding != "valid":
        raise DenseError(
            f"infer.mode=dense is exact only with model.padding=valid (got {encoder.padding!r}): zero padding "
            "makes every output depend on its patch borders; use infer.mode=per_patch"
        )
    for m in encoder.trunk.modules():
        if isinstance(m, nn.MaxPool2d) and (m.ceil_mode or _pair(m.padding)[0] != 0):
            raise DenseError("infer.mode=dense needs unpadded max-pooling; use infer.mode=per_patch")
    rf = encoder.receptive_field_px
    if patch_size_px < rf:
        raise DenseError(
            f"infer.mode=dense: the patch of {patch_size_px} px is smaller than the encoder's receptive field "
            f"{rf} px; use infer.mode=per_patch"
        )
    return encoder


class DenseEncoder(nn.Module):
    """Sliding-window evaluation of a valid-padding :class:`PaperEncoder` at stride ``stride_px`` (see module doc).

    The trunk is a deep copy of ``encoder.trunk`` with rewritten strides and dilations and its BatchNorm layers
    folded into the convolutions (with their running statistics: the eval-mode encoder; in train mode the
    statistics of a tile would differ from those of a patch anyway). Its weights are copied, so later changes
    to ``encoder`` are not seen. ``channels_last``: the trunk's memory format (None: the encoder's).
    """

    def __init__(self, encoder: Encoder, patch_size_px: int, stride_px: int, channels_last: bool | None = None) -> None:
        super().__init__()
        encoder = check_dense(encoder, patch_size_px)
        rf, total = encoder.receptive_field_px, encoder.total_stride
        self.patch_size_px = patch_size_px
        self.stride_px = stride_px
        self.dense_stride = achievable_stride(encoder, stride_px)
        self.subsample = stride_px // self.dense_stride
        self.channels_last = encoder.channels_last if channels_last is None else channels_last
        self.trunk = copy.deepcopy(encoder.trunk)
        fold_batchnorm(self.trunk)
        self.trunk.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)  # type: ignore[call-overload]
        budget, dilation = self.dense_stride, 1
        for m in self.trunk.modules():
            if isinstance(m, nn.Conv2d | nn.MaxPool2d):
                s = _pair(m.stride)[0]
                keep = math.gcd(s, budget)
                budget //= keep
                if isinstance(m, nn.Conv2d):
                    m.stride = (keep, keep)
                    m.dilation = (dilation * _pair(m.dilation)[0],) * 2
                else:
                    m.stride = keep
                    m.dilation = dilation * _pair(m.dilation)[0]
                dilation *= s // keep
        # Final maps of a P px patch: k x k positions, T px apart (T / e apart on the dense map).
        self.pool_k = (patch_size_px - rf) // total + 1
        self.pool_dilation = total // self.dense_stride
        self.out_dim = encoder.out_dim

    def out_size(self, n_in: int) -> int:
        """Output positions along an axis of ``n_in`` input pixels."""
        return max(0, (n_in - self.patch_size_px) // self.stride_px + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D_e, (H - P)//s + 1, (W - P)//s + 1)."""
        if x.dim() != 4 or min(x.shape[-2:]) < self.patch_size_px:
            raise ValueError(f"input must be (B, C, H, W) with H, W >= {self.patch_size_px}, got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.trunk(x)
        if self.pool_k > 1:
            # mean over the k x k final positions of each patch = avg-pool with dilation T / e
            f = _dilated_mean(f, self.pool_k, self.pool_dilation)
        if self.subsample > 1:
            f = f[:, :, :: self.subsample, :: self.subsample]
        h, w = self.out_size(x.shape[-2]), self.out_size(x.shape[-1])
        return f[:, :, :h, :w]


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> None:
    """Merge every ``Conv2d`` directly followed by a ``BatchNorm2d`` (inside an ``nn.Sequential``) into the
    convolution, in place: with s = gamma / sqrt(running_var + eps), w' = w s and b' = (b - running_mean) s +
    beta, computed in float64; the BatchNorm becomes ``nn.Identity``. The result is the eval-mode module to
    float rounding. BatchNorms without running statistics are left as they are."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue
            scale = (bn.weight.double() if bn.weight is not None else 1.0) / torch.sqrt(
                bn.running_var.double() + bn.eps
            )
            shift = bn.bias.double() if bn.bias is not None else 0.0
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
            folded_bias = (bias - bn.running_mean.double()) * scale + shift
            conv.bias = nn.Parameter(folded_bias.to(conv.weight.dtype), requires_grad=False)
            seq._modules[b] = nn.Identity()


def _dilated_mean(f: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """Mean over k x k taps spaced d apart, valid: (B, C, H, W) -> (B, C, H - (k-1)d, W - (k-1)d)."""
    span = (k - 1) * d
    h, w = f.shape[-2] - span, f.shape[-1] - span
    # Summed in at least fp32: k^2 fp16/bf16 additions would lose the mean's low bits (autocast runs in 16 bits).
    acc = torch.zeros(f.shape[0], f.shape[1], h, w, dtype=torch.promote_types(f.dtype, torch.float32), device=f.device)
    for a in range(k):
        for b in range(k):
            acc += f[:, :, a * d : a * d + h, b * d : b * d + w]
    return (acc / (k * k)).to(f.dtype)


class PerPatchEncoder(nn.Module):
    """The same mapping as :class:`DenseEncoder`, one encoder call per patch (in batches of ``batch_size``)."""

    def __init__(self, encoder: Encoder, patch_size_px: int, stride_px: int, batch_size: int = 64) -> None:
        super().__init__()
        if stride_px < 1 or batch_size < 1:
            raise DenseError(f"stride_px={stride_px} and batch_size={batch_size} must be >= 1")
        self.encoder = encoder
        self.patch_size_px = patch_size_px
        self.stride_px = stride_px
        self.batch_size = batch_size
        self.out_dim = encoder.out_dim

    def out_size(self, n_in: int) -> int:
        return max(0, (n_in - self.patch_size_px) // self.stride_px + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D_e, h, w) by unfolding patches."""
        p, s = self.patch_size_px, self.stride_px
        b, c = x.shape[:2]
        h, w = self.out_size(x.shape[-2]), self.out_size(x.shape[-1])
        windows = x.unfold(2, p, s).unfold(3, p, s)[:, :, :h, :w]  # (B, C, h, w, P, P), a view
        patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(b * h * w, c, p, p)
        out = [self.encoder(patches[i : i + self.batch_size]) for i in range(0, len(patches), self.batch_size)]
        feats = torch.cat(out) if out else x.new_zeros(0, self.out_dim)
        return feats.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def dense_classifier_logits(features: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """A linear classifier applied at every position: (B, D_e, h, w) -> (B, K, h, w) logits."""
    return torch.einsum("bdhw,kd->bkhw", features.to(fc.weight.dtype), fc.weight) + fc.bias.view(1, -1, 1, 1)
