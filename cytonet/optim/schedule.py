"""Learning-rate schedules as pure functions of the step.

Seed 002: lr = base_lr * N_global / 128 with base_lr = 0.01, constant. Options: linear warm-up over
``warmup_steps`` steps (from peak / warmup_steps up to the peak) and cosine decay to 0 after it.
The training loop sets the rate every step with :func:`set_lr`, so nothing besides the step has to be saved
in a checkpoint.

Entry points: :func:`peak_lr`, :func:`lr_at`, :func:`set_lr`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from cytonet.config import OptimConfig


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Seed 002 scaling rule: ``base_lr * global_batch / 128`` (0.01 * 4096 / 128 = 0.32)."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    return base_lr * global_batch / 128.0


def lr_at(step: int, cfg: OptimConfig, global_batch: int, total_steps: int | None = None) -> float:
    """Learning rate at optimiser step ``step`` (0-based).

    Warm-up (step < warmup_steps): peak * (step + 1) / warmup_steps. Then ``constant``: peak; ``cosine``:
    peak * (1 + cos(pi * t)) / 2 with t = (step - warmup_steps) / (total_steps - warmup_steps), clipped to 1.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = peak_lr(cfg.base_lr, global_batch)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if total_steps is None or total_steps <= cfg.warmup_steps:
        raise ValueError(
            f"optim.schedule=cosine needs total_steps > optim.warmup_steps ({cfg.warmup_steps}), got {total_steps}"
        )
    t = min(1.0, (step - cfg.warmup_steps) / (total_steps - cfg.warmup_steps))
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (groups may scale it with an ``lr_scale`` key)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
