"""Parameter groups and the optimiser from :class:`~cytonet.config.OptimConfig`.

Biases and normalisation parameters (every parameter of a BatchNorm/GroupNorm/LayerNorm module, and every
parameter with fewer than 2 dimensions) go into a group with ``lars=False`` and ``weight_decay=0``: LARS
applies neither the trust ratio nor weight decay to them (You et al. 2017 exclude them; so do SimCLR and
BYOL), and SGD/AdamW apply no weight decay to them. Frozen parameters (``requires_grad=False``) are left out.

Entry points: :func:`param_groups`, :func:`build_optimizer`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import SGD, AdamW, Optimizer

from cytonet.config import OptimConfig
from cytonet.optim.lars import LARS
from cytonet.optim.schedule import peak_lr

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: ``adapted`` (weights: LARS adaptation and weight decay) and ``bias_and_norm`` (neither)."""
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (excluded if isinstance(module, _NORMS) or p.ndim < 2 else adapted).append(p)
    groups = [
        {"params": adapted, "name": "adapted", "lars": True, "weight_decay": weight_decay},
        {"params": excluded, "name": "bias_and_norm", "lars": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> Optimizer:
    """The optimiser of ``cfg`` over ``model``'s trainable parameters, at the peak rate base_lr * N / 128."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    lr = peak_lr(cfg.base_lr, global_batch)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return AdamW(groups, lr=lr)
    raise ValueError(f"optim.name={cfg.name!r}: use lars, sgd or adamw")
