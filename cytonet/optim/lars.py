"""LARS: layer-wise adaptive rate scaling, You, Gitman & Ginsburg 2017 (arXiv:1708.03888), Algorithm 1.

Seed 002 trains with LARS at a constant learning rate 0.01 * N / 128 (N = 4096). For every parameter tensor
w (one layer's weight) with gradient g = dL/dw, global learning rate gamma, momentum m, weight decay beta and
trust coefficient eta:

    local_lr = eta * ||w|| / (||g|| + beta * ||w||)          (trust ratio; 1 when ||w|| = 0 or ||g|| = 0)
    v <- m * v + gamma * local_lr * (g + beta * w)
    w <- w - v

Parameter groups with ``lars=False`` (biases and normalisation parameters, see
:func:`cytonet.optim.param_groups`) are excluded from the adaptation and from weight decay: they receive the
plain momentum update v <- m * v + gamma * g, w <- w - v.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """LARS with momentum and weight decay (You et al. 2017, Algorithm 1; formula in the module docstring).

    Args:
        params: parameters or parameter groups; a group may set ``lars`` (default True), ``weight_decay``,
            ``momentum``, ``trust_coefficient`` and ``lr``.
        lr: global learning rate gamma.
        momentum: m.
        weight_decay: beta (only where ``lars`` is True).
        trust_coefficient: eta (You et al.: 0.001).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars": True,
        }
        super().__init__(params, defaults)

    @staticmethod
    def trust_ratio(w: torch.Tensor, g: torch.Tensor, weight_decay: float, eta: float) -> torch.Tensor:
        """eta * ||w|| / (||g|| + beta * ||w||) as a 0-d tensor; 1 when ||w|| or ||g|| is 0 (no host sync)."""
        # Norms in at least fp32 (16-bit parameters would overflow / lose the ratio); fp64 stays fp64.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        w_norm = torch.linalg.vector_norm(w, dtype=dtype)
        g_norm = torch.linalg.vector_norm(g, dtype=dtype)
        ratio = eta * w_norm / (g_norm + weight_decay * w_norm)
        ok = (w_norm > 0) & (g_norm > 0)
        return torch.where(ok, ratio, torch.ones_like(ratio))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            wd, eta, adapt = group["weight_decay"], group["trust_coefficient"], group["lars"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                if adapt:
                    local_lr = self.trust_ratio(p, g, wd, eta)
                    update = (g + wd * p) * (local_lr * lr) if wd else g * (local_lr * lr)
                else:
                    update = g * lr
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(m).add_(update)
                p.sub_(buf)
        return loss
