"""Cross-entropy for the linear probe and for training from scratch (seed 002, "scratch" and probe baselines).

Like the contrastive losses, the distributed form returns this rank's *share*: the sum of its samples' losses
divided by the global number of samples, so the shares sum to the global mean and gradients summed over ranks
equal the single-process gradient (with unequal per-rank batches too). Under DDP, which averages gradients,
backpropagate ``share * world_size``. Computed in fp32 with autocast off.

Entry points: :func:`cross_entropy` (pure), :class:`CrossEntropyLoss` (module, global normalisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cytonet import distributed
from cytonet.losses.contrastive import at_least_fp32


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, n_total: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Cross-entropy -log softmax(logits)[target], summed over samples and divided by ``n_total``.

    Args:
        logits: (B, K) class scores.
        targets: (B,) class indices in 0 .. K - 1.
        n_total: the divisor (global sample count over all ranks); None: B (the plain mean).

    Returns:
        Scalar fp32 tensor.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, K) and targets (B,), got {tuple(logits.shape)}, {tuple(targets.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        total = F.cross_entropy(at_least_fp32(logits), targets.long(), reduction="sum")
        if n_total is None:
            n_total = float(logits.shape[0])
        if isinstance(n_total, torch.Tensor):
            return total / n_total.to(total.dtype).clamp_min(1.0)
        return total / max(float(n_total), 1.0)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy normalised by the global batch size: ``forward(logits (B_l, K), targets (B_l,))`` returns
    this rank's share of the global mean (the plain mean on one process)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = distributed.all_reduce_sum(torch.tensor(float(logits.shape[0]), device=logits.device))
        return cross_entropy(logits, targets, n)
