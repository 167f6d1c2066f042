"""cytonet.optim: LARS (:mod:`~cytonet.optim.lars`), parameter groups and the optimiser builder
(:mod:`~cytonet.optim.build`), learning-rate schedules as pure functions of the step
(:mod:`~cytonet.optim.schedule`)."""

from cytonet.optim.build import build_optimizer, param_groups
from cytonet.optim.lars import LARS
from cytonet.optim.schedule import lr_at, peak_lr, set_lr

__all__ = ["LARS", "build_optimizer", "lr_at", "param_groups", "peak_lr", "set_lr"]
