"""LARS against the formula of You et al. 2017 (Algorithm 1) computed by hand, parameter groups (biases and
normalisation parameters get plain momentum updates without weight decay), learning-rate schedules and the
mixed-precision helper."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from cytonet.config import ModelConfig, OptimConfig
from cytonet.errors import ConfigError
from cytonet.models import build_contrastive_model
from cytonet.optim import LARS, build_optimizer, lr_at, param_groups, peak_lr, set_lr
from cytonet.precision import MixedPrecision, autocast_dtype, check_precision


def lars_by_hand(
    w: np.ndarray, g: np.ndarray, v: np.ndarray | None, lr: float, m: float, wd: float, eta: float
) -> tuple[np.ndarray, np.ndarray]:
    """One step of You et al. 2017 Algorithm 1: local_lr = eta ||w|| / (||g|| + wd ||w||);
    v = m v + lr local_lr (g + wd w); w = w - v (v starts as the first update)."""
    local_lr = eta * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w))
    update = lr * local_lr * (g + wd * w)
    v = update if v is None else m * v + update
    return w - v, v


def test_lars_two_steps_by_hand() -> None:
    lr, m, wd, eta = 0.32, 0.9, 1e-4, 0.001
    layer = nn.Linear(3, 2).double()
    w0 = layer.weight.detach().numpy().copy()
    b0 = layer.bias.detach().numpy().copy()
    opt = LARS(param_groups(layer, wd), lr=lr, momentum=m, trust_coefficient=eta)
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    gb1, gb2 = rng.normal(size=2), rng.normal(size=2)

    for gw, gb in ((g1, gb1), (g2, gb2)):
        layer.weight.grad = torch.from_numpy(gw.copy())
        layer.bias.grad = torch.from_numpy(gb.copy())
        opt.step()

    w1, v1 = lars_by_hand(w0, g1, None, lr, m, wd, eta)
    w2, _ = lars_by_hand(w1, g2, v1, lr, m, wd, eta)
    np.testing.assert_allclose(layer.weight.detach().numpy(), w2, rtol=1e-12)
    # The bias is excluded: plain momentum, no trust ratio, no weight decay.
    vb1 = lr * gb1
    b2 = b0 - vb1 - (m * vb1 + lr * gb2)
    np.testing.assert_allclose(layer.bias.detach().numpy(), b2, rtol=1e-12)


def test_trust_ratio_is_one_for_zero_norms() -> None:
    z, g = torch.zeros(3, 3), torch.ones(3, 3)
    assert LARS.trust_ratio(z, g, 0.1, 0.001).item() == 1.0
    assert LARS.trust_ratio(g, z, 0.1, 0.001).item() == 1.0
    assert LARS.trust_ratio(g, g, 0.0, 0.5).item() == pytest.approx(0.5)


def test_param_groups_exclude_bias_and_norm() -> None:
    model = build_contrastive_model(ModelConfig(n_blocks=2, patch_size_px=49))
    groups = {g["name"]: g for g in param_groups(model, 1e-6)}
    adapted = {id(p) for p in groups["adapted"]["params"]}
    excluded = {id(p) for p in groups["bias_and_norm"]["params"]}
    assert groups["adapted"]["lars"] and groups["adapted"]["weight_decay"] == 1e-6
    assert not groups["bias_and_norm"]["lars"] and groups["bias_and_norm"]["weight_decay"] == 0.0
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            is_norm = isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d)
            assert (id(p) in excluded) == (is_norm or p.ndim == 1)
            assert (id(p) in adapted) != (id(p) in excluded)
    assert len(adapted) + len(excluded) == len(list(model.parameters()))


def test_bn_parameters_get_plain_momentum_updates() -> None:
    bn = nn.BatchNorm1d(4)
    opt = LARS(param_groups(bn, 0.5), lr=0.1, momentum=0.9)
    w0 = bn.weight.detach().clone()
    bn.weight.grad = torch.full((4,), 2.0)
    bn.bias.grad = torch.full((4,), -1.0)
    opt.step()
    torch.testing.assert_close(bn.weight.detach(), w0 - 0.1 * 2.0)  # no decay, no trust ratio
    torch.testing.assert_close(bn.bias.detach(), torch.full((4,), 0.1))


def test_frozen_parameters_are_left_out() -> None:
    layer = nn.Linear(2, 2)
    layer.weight.requires_grad_(False)
    groups = param_groups(layer, 0.1)
    assert [g["name"] for g in groups] == ["bias_and_norm"]


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer_scales_lr(name: str) -> None:
    cfg = OptimConfig(name=name, base_lr=0.01)  # type: ignore[arg-type]
    opt = build_optimizer(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), cfg, global_batch=4096)
    assert all(g["lr"] == pytest.approx(0.32) for g in opt.param_groups)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"adapted": 1e-6, "bias_and_norm": 0.0}


def test_schedules() -> None:
    assert peak_lr(0.01, 4096) == pytest.approx(0.32)  # seed 002
    const = OptimConfig(base_lr=0.01)
    assert [lr_at(s, const, 128) for s in (0, 10, 10_000)] == [0.01, 0.01, 0.01]
    warm = OptimConfig(base_lr=0.01, warmup_steps=4, schedule="cosine")
    lrs = [lr_at(s, warm, 256, total_steps=14) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.005, 0.01, 0.015, 0.02])
    assert lrs[4] == pytest.approx(0.02)
    assert lrs[9] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.0, abs=1e-15) and lrs[15] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(5, warm, 256)
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25


def test_precision_rules() -> None:
    cpu = torch.device("cpu")
    check_precision("bf16", cpu)
    with pytest.raises(ConfigError, match=r"optim\.precision='fp16'.*CUDA"):
        check_precision("fp16", cpu)
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mixed_precision_train_step(precision: str) -> None:
    torch.manual_seed(0)
    model = build_contrastive_model(ModelConfig(n_blocks=2, patch_size_px=49, channels_last=precision == "bf16"))
    opt = build_optimizer(model, OptimConfig(), global_batch=8)
    mp = MixedPrecision(precision, torch.device("cpu"))  # type: ignore[arg-type]
    assert mp.scaler is None and mp.state_dict() == {}
    before = [p.detach().clone() for p in model.parameters()]
    with mp.autocast():
        z = model(torch.rand(8, 1, 49, 49))
        loss = -(z[:4] * z[4:]).sum(dim=1).mean()
    mp.backward(loss)
    mp.unscale_(opt)
    assert mp.step(opt)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
