"""Encoder features for analysis: per patch of a patch-store split, or on a dense grid over a section.

The feature of a patch is the encoder's pooled representation h (seed 002: the output of f, before the
projection head g; seed 000: "the last hidden layer"). For the paper encoder it is the mean of a ReLU output,
hence non-negative, which the NMF of :mod:`cytonet.analysis.factors` needs.

A :class:`FeatureSet` is an (N, D) float32 matrix plus one metadata column per row and a few attributes
(names of areas, brains and sections). On disk it is a chunked zarr v3 group::

    features    (N, D) float32, chunks of up to 4096 rows
    <column>    (N,) or (N, 3) per metadata column (patch mode: the patch store's metadata columns;
                dense mode: section, row, col, y, x, area, depth)
    attrs       kind ("patches" or "dense"), names, settings (what the content depends on), and for dense
                sets the grid: per section its shape (h, w), stride, factor, patch size

Dense sets reuse the dense inference trunk (:class:`cytonet.infer.dense.DenseEncoder`; a per-patch
evaluation for encoders that are not sliding-window functions): grid point (i, j) is the patch of edge P
(model pixels) whose top-left corner is model pixel (i s, j s); its centre lies at model pixel
(i s + P // 2, j s + P // 2), i.e. at section pixel ``m f + f // 2`` for model pixel m and extraction factor
f, the same centre convention as the patch store. ``area`` there is the section's label (0 background, 1 white
matter, >= 2 areas) and ``depth`` the cortical depth at that pixel.

Entry points: :func:`load_encoder`, :func:`patch_features`, :func:`dense_section_features`,
:func:`write_features`, :func:`read_features`, :func:`subset_ids`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytonet.config import ModelConfig
from cytonet.data.augment import center_crop
from cytonet.data.patches import PatchStore
from cytonet.errors import CytonetError, InputError, OutputExistsError
from cytonet.models.base import Encoder
from cytonet.models.build import build_encoder

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096
FEATURES = "features"


@dataclass
class FeatureSet:
    """Features (N, D) float32 with per-row metadata ``columns`` (each (N, ...)) and JSON ``attrs``."""

    features: np.ndarray
    columns: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def take(self, idx: np.ndarray) -> FeatureSet:
        """The rows ``idx`` (same attrs)."""
        return FeatureSet(self.features[idx], {k: v[idx] for k, v in self.columns.items()}, dict(self.attrs))

    @staticmethod
    def concat(parts: list[FeatureSet]) -> FeatureSet:
        """Rows of all ``parts`` (attrs of the first; the parts must share their name tables)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        keys = list(parts[0].columns)
        return FeatureSet(
            np.concatenate([p.features for p in parts]),
            {k: np.concatenate([p.columns[k] for p in parts]) for k in keys},
            dict(parts[0].attrs),
        )


def load_encoder(model_cfg: ModelConfig, path: Path, device: torch.device | str = "cpu") -> Encoder:
    """The encoder of ``encoder.pt`` at ``path`` (``{"encoder": state_dict, "config": dict}``), in eval mode.

    Built from ``model_cfg`` and loaded strictly: a file from other model settings is refused naming them.
    """
    from cytonet.train.loop import load_encoder_weights

    weights = load_encoder_weights(path)
    encoder = build_encoder(model_cfg)
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CytonetError(
            f"the encoder in {path} does not fit model settings {model_cfg}: {str(exc).splitlines()[0]}"
        ) from None
    return encoder.to(device).eval()


def subset_ids(start: int, stop: int, max_n: int, seed: int) -> np.ndarray:
    """Ids ``start..stop-1``, or a seeded random subset of ``max_n`` of them (sorted); ``max_n=0``: all."""
    ids = np.arange(start, stop, dtype=np.int64)
    if max_n <= 0 or max_n >= len(ids):
        return ids
    rng = np.random.default_rng([seed, 8, start])
    return np.sort(rng.choice(ids, size=max_n, replace=False))


@torch.no_grad()
def encode_batches(encoder: Encoder, batches: Any, device: torch.device | str) -> np.ndarray:
    """Concatenated ``encoder(x)`` (N, D) float32 of an iterable of (B, 1, P, P) float tensors."""
    out = [encoder(x.to(device)).float().cpu() for x in batches]
    if not out:
        return np.zeros((0, encoder.out_dim), np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def patch_features(
    encoder: Encoder,
    store: PatchStore,
    split: str,
    *,
    crop_px: int,
    max_patches: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FeatureSet:
    """Features of the centre crops (``crop_px``, no augmentation) of the patches of ``split``.

    Columns: every column of the store's metadata table (``patch_id``, ``area``, ``brain``, ``section``, ...).
    """
    if crop_px > store.geometry.stored_px:
        raise InputError(f"{store.path}: patches of {store.geometry.stored_px} px cannot give {crop_px} px crops")
    start, stop = store.split_range(split)
    ids = subset_ids(start, stop, max_patches, seed)

    def batches() -> Any:
        for i in range(0, len(ids), batch_size):
            raw = np.stack([store.read(int(j)) for j in ids[i : i + batch_size]])
            yield center_crop(torch.from_numpy(raw), crop_px)

    feats = encode_batches(encoder, batches(), device)
    meta = store.metadata[ids]
    columns = {name: np.ascontiguousarray(meta[name]) for name in meta.dtype.names or ()}
    attrs = {
        "kind": "patches",
        "split": split,
        "areas": {str(k): v for k, v in store.areas.items()},
        "brains": list(store.brains),
        "sections": [s["name"] for s in store.manifest["sections"]],
        "pixel_size_um": store.geometry.pixel_size_um,
    }
    return FeatureSet(feats, columns, attrs)


def _dense_module(encoder: Encoder, patch_px: int, stride_px: int, batch_size: int) -> torch.nn.Module:
    from cytonet.infer.dense import DenseEncoder, DenseError, PerPatchEncoder

    try:
        return DenseEncoder(encoder, patch_px, stride_px).eval()
    except DenseError as exc:
        log.info("features: per-patch evaluation on the dense grid (%s)", exc)
        return PerPatchEncoder(encoder, patch_px, stride_px, batch_size).eval()


@torch.no_grad()
def dense_section_features(
    encoder: Encoder,
    section_path: str | Path,
    *,
    factor: int,
    patch_px: int,
    stride_px: int,
    section_id: int = 0,
    tile_out: int = 64,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> FeatureSet:
    """Features on a grid of step ``stride_px`` (model pixels) over a whole section, tile by tile.

    The section is read at the model's pixel size (block means of ``factor`` section pixels, as extraction
    does). Tiles cover ``tile_out`` x ``tile_out`` grid points (input ``(tile_out - 1) s + P`` px), so memory
    stays bounded for paper-sized sections. Grid points whose centre lies on background (label 0) are kept
    (the caller masks them); the returned rows run over the grid in row-major order.
    """
    from cytonet.data.sections import open_section

    dense = _dense_module(encoder, patch_px, stride_px, batch_size).to(device)
    with open_section(section_path) as reader:
        h_sec, w_sec = reader.shape
        h_mod, w_mod = h_sec // factor, w_sec // factor
        gh = max(0, (h_mod - patch_px) // stride_px + 1)
        gw = max(0, (w_mod - patch_px) // stride_px + 1)
        if gh == 0 or gw == 0:
            raise InputError(
                f"section {section_path} ({h_mod} x {w_mod} model px) is smaller than one {patch_px} px patch"
            )
        fmap = np.zeros((gh, gw, encoder.out_dim), np.float32)
        span = (tile_out - 1) * stride_px + patch_px
        for i0 in range(0, gh, tile_out):
            for j0 in range(0, gw, tile_out):
                y0, x0 = i0 * stride_px, j0 * stride_px
                img = reader.read_image(factor, y0, min(y0 + span, h_mod), x0, min(x0 + span, w_mod))
                x = torch.from_numpy(img).float().div_(255.0)[None, None].to(device)
                out = dense(x)[0].permute(1, 2, 0).float().cpu().numpy()  # (h, w, D)
                hi, wj = min(tile_out, gh - i0), min(tile_out, gw - j0)
                fmap[i0 : i0 + hi, j0 : j0 + wj] = out[:hi, :wj]
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        my = rows * stride_px + patch_px // 2  # centre model pixel of every grid point
        mx = cols * stride_px + patch_px // 2
        ys = (my * factor + factor // 2).astype(np.int32)
        xs = (mx * factor + factor // 2).astype(np.int32)
        labels = _sample_layer(reader, "labels", ys[:, 0], xs[0], 0).astype(np.int32)
        depth = _sample_layer(reader, "depth", ys[:, 0], xs[0], np.nan).astype(np.float32)
        meta = reader.meta
    n = gh * gw
    columns = {
        "section": np.full(n, section_id, np.int32),
        "row": rows.ravel().astype(np.int32),
        "col": cols.ravel().astype(np.int32),
        "y": ys.ravel(),
        "x": xs.ravel(),
        "area": labels.ravel(),
        "depth": depth.ravel(),
    }
    attrs = {
        "kind": "dense",
        "areas": {str(k): v for k, v in meta.label_table.items()},
        "brains": [meta.brain],
        "sections": [f"{meta.brain}_s{meta.section_index:04d}"],
        "grids": [
            {
                "section": f"{meta.brain}_s{meta.section_index:04d}",
                "shape": [gh, gw],
                "stride_px": stride_px,
                "factor": factor,
                "patch_px": patch_px,
                "section_shape": [h_sec, w_sec],
            }
        ],
        "pixel_size_um": meta.pixel_size_um * factor,
    }
    return FeatureSet(fmap.reshape(n, -1), columns, attrs)


def _sample_layer(reader: Any, layer: str, ys: np.ndarray, xs: np.ndarray, fill: float) -> np.ndarray:
    """Values of ``layer`` at the section pixels of rows ``ys`` x columns ``xs`` (increasing): shape
    ``(len(ys), len(xs))``; ``fill`` where the section has no such layer. Read at the points only, from the
    layer's sampled level where the points are its pixel centres (:meth:`SectionReader.read_points`): never
    the full-resolution rows around them."""
    if not reader.has(layer):
        return np.full((len(ys), len(xs)), fill)
    return np.asarray(reader.read_points(layer, ys, xs))


# ----------------------------------------------------------------------------------------------------------
# Storage


def write_features(path: Path, fs: FeatureSet, overwrite: bool = False) -> Path:
    """Write ``fs`` as a chunked zarr v3 group at ``path`` (through ``<path>.partial``, renamed when done)."""
    import zarr

    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.open_group(str(partial), mode="w", zarr_format=3)
    n, d = fs.features.shape
    rows = max(1, min(CHUNK_ROWS, n))
    group.create_array(FEATURES, shape=(n, d), chunks=(rows, d), dtype=np.float32)[:] = fs.features
    for name, col in fs.columns.items():
        arr = np.ascontiguousarray(col)
        chunks = (rows, *arr.shape[1:])
        group.create_array(name, shape=arr.shape, chunks=chunks, dtype=arr.dtype)[:] = arr
    group.attrs.update({**fs.attrs, "columns": list(fs.columns)})
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def read_features(path: Path) -> FeatureSet:
    """A feature set written by :func:`write_features`."""
    import zarr

    if not path.is_dir():
        raise InputError(f"feature store {path} does not exist: run `cytonet features` first")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs: dict[str, Any] = dict(group.attrs)
        names = [str(name) for name in attrs.pop("columns")]
        arrays: Any = group  # zarr's stubs type group[...] for arrays and groups alike
        feats = np.asarray(arrays[FEATURES][:], dtype=np.float32)
        columns = {name: np.asarray(arrays[name][:]) for name in names}
    except (KeyError, ValueError, OSError) as exc:
        raise InputError(f"{path} is not a cytonet feature store: {exc}") from None
    return FeatureSet(feats, columns, attrs)


def stored_settings(path: Path) -> dict[str, Any] | None:
    """The ``settings`` attribute of an existing feature store (None when there is none or it is unreadable)."""
    import zarr

    if not path.is_dir():
        return None
    try:
        value = zarr.open_group(str(path), mode="r").attrs.get("settings")
    except Exception:  # a half-written or foreign folder: treated as absent, the caller refuses or replaces it
        return None
    return value if isinstance(value, dict) else None


__all__ = [
    "FeatureSet",
    "dense_section_features",
    "encode_batches",
    "load_encoder",
    "patch_features",
    "read_features",
    "stored_settings",
    "subset_ids",
    "write_features",
]
