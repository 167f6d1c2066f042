"""Augmentation (seed 002): geometry of rotation/shift/mirror/crop, the margin, gamma formula, blur/sharpening,
parameter statistics, per-sample reproducibility."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from cytonet.config import AugmentConfig, load_config
from cytonet.data.augment import (
    AugmentParams,
    BatchAugmenter,
    augment,
    center_crop,
    copy_packed,
    gamma_from_z,
    gamma_transform,
    gaussian_filter_valid,
    gaussian_kernels,
    geometric_resample,
    sample_params,
)
from cytonet.data.patches import PatchGeometry, stored_edge_px
from cytonet.errors import ConfigError

PIXEL_UM = 8.0


def params(b: int, **fields: torch.Tensor | float | bool) -> AugmentParams:
    """Identity parameters for ``b`` samples, with some fields replaced (scalars are broadcast)."""
    base = {
        "angle": 0.0,
        "mirror": False,
        "alpha": 1.0,
        "beta": 0.0,
        "gamma": 1.0,
        "z": 0.0,
        "blur": False,
        "sharpen": False,
        "sigma": 0.5,
        "delta": 1.0,
    }
    base.update({k: v for k, v in fields.items() if k != "shift_px"})
    out = {}
    for k, v in base.items():
        dtype = torch.bool if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool) else None
        t = torch.as_tensor(v, dtype=dtype if dtype else torch.float32)
        out[k] = t.expand(b).clone() if t.dim() == 0 else t
    shift = fields.get("shift_px", torch.zeros(b, 2))
    return AugmentParams(shift_px=torch.as_tensor(shift, dtype=torch.float32), **out)


def test_gamma_parameters_follow_the_formula() -> None:
    cfg = AugmentConfig()
    p = sample_params(cfg, np.arange(20000), epoch=0, pixel_size_um=PIXEL_UM)
    z = p.z.double()
    assert z.min() >= -0.05 and z.max() <= 0.05
    assert abs(float(z.mean())) < 0.002 and float(z.std()) == pytest.approx(0.05 / math.sqrt(3), rel=0.03)
    expected = torch.log(0.5 + z / math.sqrt(2)) / torch.log(0.5 - z / math.sqrt(2))
    assert torch.allclose(p.gamma.double(), expected, rtol=1e-6)
    assert p.alpha.min() >= 0.9 and p.alpha.max() <= 1.0 and p.beta.min() >= -0.1 and p.beta.max() <= 0.1
    assert float(gamma_from_z(torch.tensor(0.0))) == 1.0
    # Unbiased: log gamma is odd in Z, so its mean is ~0; the curve x^gamma passes (0.5 - Z/sqrt2, 0.5 + Z/sqrt2).
    assert abs(float(torch.log(p.gamma).mean())) < 0.003
    x = (0.5 - p.z[:50] / math.sqrt(2)).view(-1, 1, 1, 1)
    y = gamma_transform(x, params(50, gamma=p.gamma[:50]))
    assert torch.allclose(y.view(-1), 0.5 + p.z[:50] / math.sqrt(2), atol=1e-6)
    # alpha and beta are applied as alpha * x^gamma + beta.
    y = gamma_transform(torch.full((2, 1, 1, 1), 0.25), params(2, alpha=torch.tensor([0.9, 1.0]), beta=0.1, gamma=2.0))
    assert torch.allclose(y.view(-1), torch.tensor([0.9 * 0.0625 + 0.1, 0.0625 + 0.1]))


def test_parameter_statistics_match_the_config() -> None:
    cfg = AugmentConfig()
    p = sample_params(cfg, np.arange(20000), epoch=4, pixel_size_um=PIXEL_UM)
    angle = p.angle.double()
    assert angle.min() >= -math.pi and angle.max() <= math.pi
    assert abs(float(angle.mean())) < 0.05 and float(angle.std()) == pytest.approx(math.pi / math.sqrt(3), rel=0.02)
    dist = p.shift_px.double().norm(dim=1)
    max_px = 0.2 * 1000 / PIXEL_UM  # 25 px
    assert dist.max() <= max_px + 1e-4 and float(dist.mean()) == pytest.approx(max_px / 2, rel=0.02)
    direction = p.shift_px.double() / dist[:, None]
    assert float(direction.mean(0).abs().max()) < 0.02  # uniform direction
    assert float(p.mirror.double().mean()) == pytest.approx(0.5, abs=0.02)
    assert float(p.blur.double().mean()) == pytest.approx(0.25, abs=0.015)
    assert float(p.sharpen.double().mean()) == pytest.approx(0.25, abs=0.015)
    assert not bool((p.blur & p.sharpen).any())
    assert p.sigma.min() >= 0.125 and p.sigma.max() <= 1.0
    assert p.delta.min() >= 0.5 and p.delta.max() <= 1.5
    # Every parameter comes from the config.
    custom = load_config(
        None, ["augment.mirror_p=0", "augment.blur_p=1", "augment.sharpen_p=0", "augment.intensity_p=0"]
    )
    q = sample_params(custom.augment, np.arange(1000), epoch=0, pixel_size_um=PIXEL_UM)
    assert not q.mirror.any() and q.blur.all() and not q.sharpen.any()
    assert torch.all(q.gamma == 1) and torch.all(q.alpha == 1) and torch.all(q.beta == 0)


def test_parameters_are_per_sample_and_reproducible() -> None:
    cfg = AugmentConfig()
    a = sample_params(cfg, np.array([5, 9, 11]), epoch=2, pixel_size_um=PIXEL_UM)
    b = sample_params(cfg, torch.tensor([11, 5]), epoch=2, pixel_size_um=PIXEL_UM)
    for name in ("angle", "shift_px", "mirror", "gamma", "sigma", "blur"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x[0], y[1]) and torch.equal(x[2], y[0]), name  # independent of batch composition
    assert not torch.equal(a.angle, sample_params(cfg, np.array([5, 9, 11]), 3, PIXEL_UM).angle)  # epoch
    assert not torch.equal(a.angle, sample_params(cfg, np.array([5, 9, 11]), 2, PIXEL_UM, view=1).angle)  # view
    other = AugmentConfig(seed=1)
    assert not torch.equal(a.angle, sample_params(other, np.array([5, 9, 11]), 2, PIXEL_UM).angle)


def blob_patch(size: int, cy: float, cx: float, sigma: float = 1.5) -> torch.Tensor:
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)).float()


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """(x, y) = (column, row) centroid of a non-negative image, relative to its centre."""
    h, w = img.shape
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    m = img.double().clamp_min(0)
    return float((m * x).sum() / m.sum()) - (w - 1) / 2, float((m * y).sum() / m.sum()) - (h - 1) / 2


@pytest.mark.parametrize("degrees", [30.0, -60.0, 100.0, 180.0, -135.0])
def test_rotated_pattern_has_the_expected_angle(degrees: float) -> None:
    s, crop = 91, 61
    c = (s - 1) / 2
    # A blob 15 px right of the centre (x = column) and an elongated bar through the centre along x.
    blob = blob_patch(s, c, c + 15)
    theta = math.radians(degrees)
    out = geometric_resample(blob.view(1, 1, s, s), params(1, angle=theta), crop)[0, 0]
    x, y = centroid(out)
    assert math.degrees(math.atan2(y, x)) == pytest.approx(((degrees + 180) % 360) - 180, abs=0.5)
    assert math.hypot(x, y) == pytest.approx(15, abs=0.1)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    bar = (torch.exp(-((yy - c) ** 2) / 4.0) * (torch.abs(xx - c) < 25)).float()
    out = geometric_resample(bar.view(1, 1, s, s), params(1, angle=theta), crop)[0, 0].double()
    h = out.shape[0]
    r = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    mxx, myy, mxy = (out * gx * gx).sum(), (out * gy * gy).sum(), (out * gx * gy).sum()
    orientation = 0.5 * math.degrees(math.atan2(2 * float(mxy), float(mxx - myy)))
    assert (orientation - degrees) % 180 == pytest.approx(0, abs=0.5) or (orientation - degrees) % 180 == pytest.approx(
        180, abs=0.5
    )


def test_shift_moves_the_crop_centre_and_mirror_flips_rows() -> None:
    s, crop = 81, 41
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    ramp = (0.2 + 0.004 * xx + 0.003 * yy).view(1, 1, s, s)  # bilinear interpolation is exact on it
    plain = center_crop(ramp.view(1, s, s), crop)
    shift = torch.tensor([[7.5, -3.25]])
    out = geometric_resample(ramp, params(1, shift_px=shift), crop)
    assert torch.allclose(out - plain, torch.full_like(out, 0.004 * 7.5 - 0.003 * 3.25), atol=1e-5)
    mirrored = geometric_resample(ramp, params(1, mirror=True), crop)
    assert torch.allclose(mirrored, plain.flip(-2), atol=1e-5)
    # Unrotated and unshifted, the resample is the exact centre crop (same parity of stored and crop edges).
    same = geometric_resample(ramp, params(1), crop)
    assert torch.allclose(same, plain, atol=1e-5)


def test_crop_after_any_rotation_and_shift_never_touches_missing_margin() -> None:
    crop, pad = 65, 3
    shift_px = 0.2 * 1000 / PIXEL_UM
    s = stored_edge_px(crop, shift_px, pad)
    # A sweep of angles with the full shift in every direction, plus the worst cases: a crop corner pointing
    # along an axis (45 + k 90 degrees) and the full shift along that axis.
    sweep = torch.linspace(-math.pi, math.pi, 73)
    phi = torch.linspace(0, 2 * math.pi, 73)
    worst_angle = torch.tensor([math.radians(45 + 90 * k) for k in range(4) for _ in range(4)])
    axes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]).repeat(4, 1)
    angles = torch.cat([sweep, worst_angle])
    shifts = shift_px * torch.cat([torch.stack([torch.cos(phi), torch.sin(phi)], dim=1), axes])
    n = len(angles)
    p = params(n, angle=angles, shift_px=shifts, mirror=torch.arange(n) % 2 == 0)
    ones = torch.ones(n, 1, s, s)
    out = geometric_resample(ones, p, crop + 2 * pad)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)  # zero padding outside would pull values down
    # The margin is tight: 4 px less and the worst case reads outside the stored patch.
    smaller = geometric_resample(torch.ones(n, 1, s - 4, s - 4), p, crop + 2 * pad)
    assert float(smaller.min()) < 0.99
    # Through the full pipeline with random parameters (blur/sharpen of a constant is the constant).
    cfg = load_config(None, ["augment.intensity_p=0"]).augment
    geometry = PatchGeometry.for_crop(crop, PIXEL_UM, 0.2, pad)
    aug = BatchAugmenter(cfg, geometry, crop)
    res = aug(torch.full((256, geometry.stored_px, geometry.stored_px), 255, dtype=torch.uint8), torch.arange(256), 0)
    assert res.shape == (256, 1, crop, crop)
    assert torch.allclose(res, torch.ones_like(res), atol=1e-4)


def test_blur_and_sharpening() -> None:
    sigma = torch.tensor([0.125, 0.5, 1.0])
    k = gaussian_kernels(sigma, 3).double()
    taps = torch.arange(-3, 4, dtype=torch.float64)
    assert torch.allclose(k.sum(1), torch.ones(3, dtype=torch.float64))
    var = (k * taps**2).sum(1)
    assert float(var[2]) == pytest.approx(1.0, rel=0.01)  # sigma 1 px, truncated at 3 sigma
    assert float(var[0]) < float(var[1]) < float(var[2])
    # A delta blurs into the separable kernel's outer product; a constant stays constant; 'valid' output size.
    delta = torch.zeros(3, 1, 15, 15)
    delta[:, :, 7, 7] = 1.0
    blurred = gaussian_filter_valid(delta, sigma, 3)
    assert blurred.shape == (3, 1, 9, 9)
    assert torch.allclose(blurred[:, 0, 1:8, 1:8].double(), k[:, :, None] * k[:, None, :], atol=1e-6)
    assert torch.allclose(gaussian_filter_valid(torch.full((3, 1, 9, 9), 0.3), sigma, 3), torch.full((3, 1, 3, 3), 0.3))
    # Through augment(): blur gives G(x); sharpening as printed x + delta (G(x) - x); unsharp x + delta (x - G(x)).
    torch.manual_seed(0)
    x = torch.rand(3, 41, 41)
    crop, pad = 21, 3
    centre = center_crop(x, crop)
    g = gaussian_filter_valid(center_crop(x, crop + 2 * pad), torch.full((3,), 0.8), pad)
    blur = augment(x, params(3, blur=True, sigma=0.8), crop, pad)
    assert torch.allclose(blur, g, atol=1e-5)
    sharp = augment(x, params(3, sharpen=True, sigma=0.8, delta=1.3), crop, pad)
    assert torch.allclose(sharp, centre + 1.3 * (g - centre), atol=1e-5)
    unsharp = augment(x, params(3, sharpen=True, sigma=0.8, delta=1.3), crop, pad, sharpen_formula="unsharp_mask")
    assert torch.allclose(unsharp, centre + 1.3 * (centre - g), atol=1e-5)
    assert float(unsharp.std()) > float(centre.std()) > float(sharp.std())


def test_augmenter_refuses_patches_without_margin() -> None:
    geometry = PatchGeometry.for_crop(33, PIXEL_UM, 0.04, 3)
    BatchAugmenter(load_config(None, ["augment.shift_max_mm=0.04"]).augment, geometry, 33)
    with pytest.raises(ValueError, match="shift_max_mm"):
        BatchAugmenter(AugmentConfig(), geometry, 33)  # 0.2 mm needs a larger stored patch
    with pytest.raises(ValueError, match="patch_size_px") as info:
        BatchAugmenter(load_config(None, ["augment.shift_max_mm=0.04"]).augment, geometry, 65)
    # A settings error: the CLI reports it in one line with exit 2, not as an "unexpected ValueError".
    assert isinstance(info.value, ConfigError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu() -> None:
    geometry = PatchGeometry.for_crop(65, PIXEL_UM, 0.2, 3)
    aug = BatchAugmenter(AugmentConfig(), geometry, 65)
    x = torch.randint(0, 256, (64, geometry.stored_px, geometry.stored_px), dtype=torch.uint8)
    idx = torch.arange(64)
    cpu = aug(x, idx, 1)
    gpu = aug(x.cuda(), idx, 1)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    p = sample_params(AugmentConfig(), idx, epoch=1, pixel_size_um=PIXEL_UM)
    q = p.to("cuda")  # one copy from page-locked memory (copy_packed)
    for f in fields(p):
        a, b = getattr(p, f.name), getattr(q, f.name)
        assert b.is_cuda and a.dtype == b.dtype and torch.equal(a, b.cpu()), f.name


def test_params_copy_packed_keeps_every_field_exactly() -> None:
    """The one-copy transfer to the device (float32 buffer, unpacked there) keeps values, dtypes and shapes."""
    p = sample_params(AugmentConfig(), np.arange(37), epoch=3, pixel_size_um=PIXEL_UM)
    assert p.mirror.any() and p.blur.any() and p.sharpen.any()  # the bools take both values
    q = copy_packed(p, torch.device("cpu"))
    for f in fields(p):
        a, b = getattr(p, f.name), getattr(q, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
    assert p.to("cpu") is p  # already there: no copy
