"""Mixed precision: autocast and gradient scaling from ``optim.precision``.

- ``fp32``: no autocast.
- ``bf16``: autocast to bfloat16 on CPU and CUDA (same exponent range as fp32: no loss scaling needed). Fast on
  CPUs with AMX-bf16 and on tensor cores, especially with ``model.channels_last``.
- ``fp16``: autocast to float16 with a dynamic ``torch.amp.GradScaler``; CUDA only.

The losses switch autocast off and compute in fp32 themselves; BatchNorm statistics are fp32 either way.

Entry points: :func:`check_precision`, :func:`autocast_dtype`, :class:`MixedPrecision`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from cytonet.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]


def check_precision(precision: Precision, device: torch.device, key: str = "optim.precision") -> None:
    """Raise :class:`ConfigError` when ``precision`` cannot run on ``device`` (fp16 needs CUDA); the message
    names the setting ``key``."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{key}='fp16' is invalid on {device.type}: fp16 autocast with loss scaling needs CUDA; use bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}='bf16' is invalid on this GPU: it has no bf16 support (pre-Ampere); use fp16 or fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{key}={precision!r} is invalid: use fp32, bf16 or fp16")


def ieee_fp32(device: torch.device) -> None:
    """Make fp32 mean fp32 on ``device``: cuDNN runs fp32 convolutions in TF32 (a 10-bit mantissa) by default
    on Ampere and later GPUs, which puts probabilities ~1e-3 off the fp32 result; inference promises 1e-4.
    Process-wide (torch has no narrower switch); a no-op off CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class MixedPrecision:
    """Autocast context and optional gradient scaler for one device.

    Use::

        mp = MixedPrecision(cfg.optim.precision, device)
        with mp.autocast():
            loss = loss_fn(model(x), y)
        mp.backward(loss)
        mp.unscale_(optimizer)  # only when clipping gradients
        stepped = mp.step(optimizer)  # False when fp16 gradients overflowed and the step was skipped
    """

    def __init__(self, precision: Precision, device: torch.device) -> None:
        check_precision(precision, device)
        self.precision = precision
        self.device = device
        self.dtype = autocast_dtype(precision)
        self.scaler: torch.amp.GradScaler | None = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the configured dtype (a null context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when a gradient scaler is active."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale_(self, optimizer: Optimizer) -> None:
        """Unscale the gradients in place (before clipping); no-op without a scaler."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: Optimizer) -> bool:
        """Optimiser step (skipped by the scaler on inf/nan gradients); returns whether the step was taken.

        With a scaler this reads the scale back to the host: a CPU-GPU sync point once per step.
        """
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict[str, Any]:
        """Scaler state for checkpoints (empty without a scaler)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
