"""Training augmentation of seed 002 as batched torch operations on the training device.

Input: a batch of stored patches (B, S, S) uint8 with margin (:mod:`cytonet.data.patches`), their global patch
ids and the epoch. Output: (B, 1, P, P) float32 crops, intensities in [0, 1] before the intensity transform
(no mean/std normalisation here; that belongs to the model).

Transforms (defaults from :class:`cytonet.config.AugmentConfig`, seed 002):

1. Geometry, one bilinear resample (``affine_grid`` + ``grid_sample``): rotation by theta ~ U[-pi, pi],
   translation of the patch centre by d ~ U[0, 0.2 mm] in a direction phi ~ U[0, 2 pi) (converted to pixels
   with the store's pixel size), vertical mirror with p = 0.5. Output pixel offset q (from the crop centre,
   (x, y) = (column, row)) samples the stored patch at ``t + R(-theta) M q``, with ``M = diag(1, -1)`` when
   mirrored and ``t = d (cos phi, sin phi)``: unmirrored, a feature at offset p from the sampled centre
   appears at ``R(theta) p``. The resampled area is the crop plus ``pad`` pixels on each side for the blur.
2. Unbiased gamma augmentation alpha * x^gamma + beta, alpha ~ U[0.9, 1], beta ~ U[-0.1, 0.1],
   gamma = log(0.5 + Z / sqrt 2) / log(0.5 - Z / sqrt 2), Z ~ U[-0.05, 0.05] (seed 002 with the erratum in
   seeds/README.md: x^gamma passes through (0.5 - Z/sqrt 2, 0.5 + Z/sqrt 2), gamma = 1 at Z = 0).
3. With p = 0.25 a Gaussian blur G_sigma(x), else with p = 0.25 sharpening x + delta (G_sigma(x) - x) as
   printed in seed 002 (``augment.sharpen_formula=unsharp_mask`` gives x + delta (x - G_sigma(x))), sigma ~
   U[0.125, 1] px, delta ~ U[0.5, 1.5]. The Gaussian (radius ``pad`` = ceil(3 sigma_max)) is separable and
   per sample (grouped convolution); it runs 'valid' on the padded resample, which is exactly the centre crop
   of the blurred patch.

Randomness: every parameter of sample i is a hash of (augment.seed, epoch, view, parameter, patch id)
(:mod:`cytonet.data.rng`), drawn on the CPU (11 numbers per sample) and moved to the device. A sample is
therefore augmented identically whichever batch, rank or worker it lands in, and a resumed run reproduces it.

Entry points: :class:`BatchAugmenter` (what the loader calls), :func:`sample_params`, :func:`augment`, and the
pure transforms :func:`geometric_resample`, :func:`gamma_transform`, :func:`gaussian_filter_valid`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from cytonet.config import AugmentConfig
from cytonet.data import rng
from cytonet.data.patches import PatchGeometry, stored_edge_px
from cytonet.errors import ConfigError

_TAG = 31
#: Order of the uniform numbers drawn per sample.
_DRAWS = ("angle", "shift_d", "shift_phi", "mirror", "intensity", "alpha", "beta", "z", "filter", "sigma", "delta")


@dataclass
class AugmentParams:
    """Per-sample parameters; every field has shape (B,) (``shift_px``: (B, 2) as (dx, dy))."""

    angle: torch.Tensor
    """Rotation theta, radians."""
    shift_px: torch.Tensor
    """Centre translation t in stored pixels, (dx, dy)."""
    mirror: torch.Tensor
    """Vertical mirror (bool)."""
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    z: torch.Tensor
    """Z of the unbiased gamma formula (0 with gamma 1, alpha 1, beta 0 when the intensity step is skipped)."""
    blur: torch.Tensor
    """Apply G_sigma (bool)."""
    sharpen: torch.Tensor
    """Apply the sharpening (bool; never together with ``blur``)."""
    sigma: torch.Tensor
    delta: torch.Tensor

    def to(self, device: torch.device | str) -> AugmentParams:
        """These parameters on ``device``: themselves when they are there, else :func:`copy_packed`."""
        device = torch.device(device)
        if all(getattr(self, f.name).device == device for f in fields(self)):
            return self
        return copy_packed(self, device)


def copy_packed(params: AugmentParams, device: torch.device) -> AugmentParams:
    """``params`` on ``device`` in one copy: the fields (float32 and bool, every value exact in float32) packed
    into one float32 buffer, page-locked for a CUDA device so that the copy does not block the host, and
    unpacked there. One copy per field would be eleven small blocking host-to-device copies per batch."""
    tensors = [getattr(params, f.name) for f in fields(params)]
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])
    if device.type == "cuda" and torch.cuda.is_available():
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, at = {}, 0
    for f, t in zip(fields(params), tensors):
        out[f.name] = flat[at : at + t.numel()].view(t.shape).to(t.dtype)
        at += t.numel()
    return AugmentParams(**out)


def gamma_from_z(z: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """gamma = log(0.5 + Z / sqrt 2) / log(0.5 - Z / sqrt 2)."""
    c = 2.0**-0.5
    if isinstance(z, torch.Tensor):
        return torch.log(0.5 + c * z) / torch.log(0.5 - c * z)
    return np.log(0.5 + c * z) / np.log(0.5 - c * z)


def _lerp(u: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u


def sample_params(
    cfg: AugmentConfig,
    index: torch.Tensor | np.ndarray,
    epoch: int,
    pixel_size_um: float,
    view: int = 0,
) -> AugmentParams:
    """Parameters for the samples with global ids ``index`` (B,), on the CPU; pure function of its arguments."""
    idx = np.asarray(index.cpu().numpy() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
    b = len(idx)
    u = np.stack(
        [rng.uniform(rng.hash_words((cfg.seed, _TAG, epoch, view, j), idx)) for j in range(len(_DRAWS))], axis=1
    ).reshape(b, len(_DRAWS))
    d = {name: u[:, j] for j, name in enumerate(_DRAWS)}
    if not cfg.enabled:
        zeros = np.zeros(b)
        angle, shift, mirror = zeros, np.zeros((b, 2)), zeros.astype(bool)
        intensity, blur, sharpen = mirror, mirror, mirror
    else:
        angle = np.radians(cfg.rotation_max_deg) * (2.0 * d["angle"] - 1.0)
        dist = cfg.shift_max_mm * 1000.0 / pixel_size_um * d["shift_d"]
        phi = 2.0 * math.pi * d["shift_phi"]
        shift = np.stack([dist * np.cos(phi), dist * np.sin(phi)], axis=1)
        mirror = d["mirror"] < cfg.mirror_p
        intensity = d["intensity"] < cfg.intensity_p
        blur = d["filter"] < cfg.blur_p
        sharpen = (~blur) & (d["filter"] < cfg.blur_p + cfg.sharpen_p)
    z = np.where(intensity, cfg.gamma_z_max * (2.0 * d["z"] - 1.0), 0.0)
    alpha = np.where(intensity, _lerp(d["alpha"], cfg.alpha_range), 1.0)
    beta = np.where(intensity, _lerp(d["beta"], cfg.beta_range), 0.0)
    gamma = np.asarray(gamma_from_z(z))

    def t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    return AugmentParams(
        angle=t(angle),
        shift_px=t(shift),
        mirror=t(mirror, torch.bool),
        alpha=t(alpha),
        beta=t(beta),
        gamma=t(gamma),
        z=t(z),
        blur=t(blur, torch.bool),
        sharpen=t(sharpen, torch.bool),
        sigma=t(_lerp(d["sigma"], cfg.sigma_range_px)),
        delta=t(_lerp(d["delta"], cfg.sharpen_delta_range)),
    )


def affine_theta(params: AugmentParams, stored_px: int, out_px: int) -> torch.Tensor:
    """(B, 2, 3) matrices for ``affine_grid(align_corners=True)`` mapping output to stored-patch coordinates."""
    a_in = (stored_px - 1) / 2.0
    a_out = (out_px - 1) / 2.0
    s = a_out / a_in
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    m = 1.0 - 2.0 * params.mirror.to(cos.dtype)  # -1 flips the row axis
    # p = t + R(-theta) M q, with R(-theta) = [[cos, sin], [-sin, cos]] and q scaled by a_out, p by 1/a_in.
    row0 = torch.stack([cos * s, sin * m * s, params.shift_px[:, 0] / a_in], dim=1)
    row1 = torch.stack([-sin * s, cos * m * s, params.shift_px[:, 1] / a_in], dim=1)
    return torch.stack([row0, row1], dim=1)


def sampling_grid(theta: torch.Tensor, out_px: int) -> torch.Tensor:
    """``affine_grid(theta, (B, 1, out, out), align_corners=True)`` by broadcasting: (B, out, out, 2).

    Same result; affine_grid multiplies a (B, out^2, 3) base grid by theta with ``bmm``, which on CPU cost as
    much as the resample itself (17 ms of 48 for a demo batch).
    """
    lin = torch.linspace(-1.0, 1.0, out_px, dtype=theta.dtype, device=theta.device)
    gx, gy = lin.view(1, 1, out_px), lin.view(1, out_px, 1)
    t = theta.view(-1, 6, 1, 1)
    x = t[:, 0] * gx + t[:, 1] * gy + t[:, 2]
    y = t[:, 3] * gx + t[:, 4] * gy + t[:, 5]
    return torch.stack([x, y], dim=-1)


def geometric_resample(patches: torch.Tensor, params: AugmentParams, out_px: int) -> torch.Tensor:
    """Rotate, shift, mirror and crop in one bilinear resample: (B, 1, S, S) float -> (B, 1, out, out)."""
    s = patches.shape[-1]
    theta = affine_theta(params, s, out_px).to(patches.dtype)
    grid = sampling_grid(theta, out_px)
    return F.grid_sample(patches, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def gamma_transform(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """alpha * x^gamma + beta per sample; x (B, 1, H, W) in [0, 1]."""
    shape = (-1, 1, 1, 1)
    return params.alpha.view(shape) * x.clamp_min(0.0).pow(params.gamma.view(shape)) + params.beta.view(shape)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2 radius + 1) normalised 1D Gaussian taps of per-sample ``sigma`` (px)."""
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_filter_valid(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable per-sample Gaussian, 'valid': (B, 1, H, W) -> (B, 1, H - 2r, W - 2r)."""
    b, _, h, w = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), radius)
    y = F.conv2d(x.view(1, b, h, w), k.view(b, 1, 1, 2 * radius + 1), groups=b)
    y = F.conv2d(y, k.view(b, 1, 2 * radius + 1, 1), groups=b)
    return y.view(b, 1, h - 2 * radius, w - 2 * radius)


def augment(
    patches: torch.Tensor,
    params: AugmentParams,
    crop_px: int,
    pad_px: int,
    sharpen_formula: str = "as_printed",
) -> torch.Tensor:
    """Apply ``params`` to stored patches (B, S, S) uint8 (or float in [0, 1]); returns (B, 1, crop, crop) float32."""
    x = patches.unsqueeze(1) if patches.dim() == 3 else patches
    params = params.to(x.device)
    y = geometric_resample(x.float(), params, crop_px + 2 * pad_px)
    if patches.dtype == torch.uint8:
        y = y * (1.0 / 255.0)  # the resample is linear: scale the crop, not the larger stored patch
    y = gamma_transform(y, params)
    blurred = gaussian_filter_valid(y, params.sigma, pad_px)
    centre = y[:, :, pad_px : pad_px + crop_px, pad_px : pad_px + crop_px]
    delta = params.delta.view(-1, 1, 1, 1)
    sharpened = (
        centre + delta * (blurred - centre) if sharpen_formula == "as_printed" else centre + delta * (centre - blurred)
    )
    out = torch.where(params.blur.view(-1, 1, 1, 1), blurred, centre)
    return torch.where(params.sharpen.view(-1, 1, 1, 1), sharpened, out)


def center_crop(patches: torch.Tensor, crop_px: int) -> torch.Tensor:
    """Exact centre crop without resampling (evaluation): (B, S, S) uint8 -> (B, 1, crop, crop) float32 in [0, 1]."""
    x = patches.unsqueeze(1) if patches.dim() == 3 else patches
    lo = (x.shape[-1] - crop_px) // 2
    x = x[:, :, lo : lo + crop_px, lo : lo + crop_px]
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class PatchMarginError(ConfigError, ValueError):
    """The store's patches are too small for the crop, shift and blur the settings ask for: a settings error
    (the CLI says so in one line, exit 2); still a ValueError, as it was."""


class BatchAugmenter:
    """Augments collated batches on their device: ``augmenter(patches, index, epoch) -> (B, 1, P, P)``.

    Checks at construction that the stored patches have margin enough for the crop, shift and blur.
    """

    def __init__(self, cfg: AugmentConfig, geometry: PatchGeometry, crop_px: int) -> None:
        self.cfg = cfg
        self.geometry = geometry
        self.crop_px = crop_px
        self.pad_px = cfg.blur_radius_px
        shift_mm = cfg.shift_max_mm if cfg.enabled else 0.0
        if not geometry.allows(crop_px, shift_mm, self.pad_px):
            need = stored_edge_px(crop_px, shift_mm * 1000.0 / geometry.pixel_size_um, self.pad_px)
            raise PatchMarginError(
                f"stored patches of {geometry.stored_px} px are too small for a {crop_px} px crop shifted by up to "
                f"{shift_mm} mm with blur radius {self.pad_px} px (needs {need} px); extract again with these "
                f"settings, or lower model.patch_size_px / augment.shift_max_mm"
            )

    def params(self, index: torch.Tensor | np.ndarray, epoch: int, view: int = 0) -> AugmentParams:
        return sample_params(self.cfg, index, epoch, self.geometry.pixel_size_um, view)

    def __call__(self, patches: torch.Tensor, index: torch.Tensor, epoch: int, view: int = 0) -> torch.Tensor:
        if not self.cfg.enabled:
            return center_crop(patches, self.crop_px)
        params = self.params(index, epoch, view)
        return augment(patches, params, self.crop_px, self.pad_px, self.cfg.sharpen_formula)
