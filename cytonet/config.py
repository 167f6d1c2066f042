"""Typed configuration: one dataclass per concern, loaded from YAML, validated in one place.

Entry points:
- :func:`load_config` (path, dotted overrides) -> :class:`Config`; the only YAML reader in cytonet.
- :func:`config_from_dict` for configs built in code (tests), :func:`config_to_dict` / :func:`save_config`
  to write the resolved config into an output directory, checkpoint or volume attributes.

Loading is strict: unknown keys raise an error listing the valid keys of that section, values are
type-checked against the dataclass annotations (``Literal`` choices name the allowed values), every number
is checked against its section's ``bounds`` (a finite range for every int and float setting), then each
section's ``validate()`` checks the rules across keys, naming the keys and the fix. Errors name where each
value came from: the file, a command-line override (each key may be given once), a flag or the default.
Derived values are properties; nothing here is rewritten at run time.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml

from cytonet.errors import ConfigError, UsageError, not_found

Backend = Literal["zarr", "hdf5"]


class SettingError(ConfigError):
    """A :class:`ConfigError` about settings named by dotted ``keys``: the one its message starts with first,
    then the others a rule across keys involves. :func:`load_config` names where each came from (the file, a
    command-line override, a flag or the default)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)  # keys stay out of args: a pickled error (from a worker) rebuilds from args
        self.keys = keys


def check_value(ok: bool, key: str, value: Any, allowed: str, *, also: tuple[str, ...] = ()) -> None:
    """Raise a :class:`ConfigError` naming ``key``, its ``value`` and what is ``allowed`` (the one message
    format of every config check, also used by other typed YAML files such as ``hpc/site.py``'s profiles).
    ``also``: the other keys of a rule across keys (name them in ``allowed`` too), so that the error can say
    where each one's value came from."""
    if not ok:
        raise SettingError(f"{key}={value!r} is invalid: {allowed}", (key, *also))


_check = check_value


def is_int(value: Any) -> bool:
    """An integer, not a bool (YAML and JSON read ``true`` as one, Python counts it as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(x: float) -> str:
    """A bound as it reads best: integers in full (4294967295, not 4.29497e+09), other numbers with %g."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """The range of a numeric setting: every number it holds (the value, each item of a list, each key and
    value of a mapping; null is left to the type) must lie in it. Every int and float setting has one, with a
    finite maximum: a value far out of range fails here, naming the key, instead of as an OverflowError, a
    MemoryError, a hang or a crash in whichever library first computes with it."""

    lo: float
    hi: float
    note: str = ""
    """Said after the range: what the bound protects, what 0 means, the papers' values."""
    above: bool = False
    """``lo`` itself is excluded (lengths, rates: > 0)."""
    below: bool = False
    """``hi`` itself is excluded (fractions: < 1)."""

    def allows(self, x: float) -> bool:
        return (x > self.lo if self.above else x >= self.lo) and (x < self.hi if self.below else x <= self.hi)

    def describe(self, name: str) -> str:
        """What to use, e.g. ``use 1-1000``, ``use 0 < temperature <= 10``, then the note."""
        lo, hi = _fmt(self.lo), _fmt(self.hi)
        if self.above or self.below:
            text = f"use {lo} {'<' if self.above else '<='} {name} {'<' if self.below else '<='} {hi}"
        else:
            text = f"use {lo}{' to ' if self.lo < 0 else '-'}{hi}"
        return text + (f" ({self.note})" if self.note else "")


def _numbers(value: Any, key: str) -> typing.Iterator[tuple[str, Any, float]]:
    """(key to name, value to show, number) for every number in a setting's value (bools are not numbers)."""
    if isinstance(value, dict):
        for k, v in value.items():
            for x in (k, v):
                if is_number(x):
                    yield f"{key}.{k}", v, x
    elif isinstance(value, list | tuple):
        for x in value:
            if is_number(x):
                yield key, list(value), x
    elif is_number(value):
        yield key, value, value


def check_bounds(section: Any, prefix: str) -> None:
    """Check every setting of a config section against its ``bounds`` (before the section's other rules, which
    may compute with the values: ``2 ** (pyramid_levels - 1)`` of a 23-digit number would never finish)."""
    for name, bound in type(section).bounds.items():
        for key, shown, x in _numbers(getattr(section, name), f"{prefix}.{name}"):
            _check(bound.allows(x), key, shown, bound.describe(name))


#: Seeds: scikit-learn and UMAP (numpy's RandomState) take 0 .. 2^32 - 1, torch.manual_seed up to 2^64 - 1,
#: numpy's Generator and cytonet's hashes any size; one range for every seed, the one all of them take.
SEED = Bound(0, 2**32 - 1, "a non-negative integer below 2^32")
#: Optimiser steps of one training stage (also warm-up, checkpoint and log intervals): 10^8 is years of steps.
STEPS = 10**8
#: Threads or processes of one process or rank: twice the cores of a 128-core node (its hardware threads);
#: beyond, thread pools fail (100000 BLAS threads crash, 4096 hang) long before they help.
THREADS = 256


def diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested settings mappings, sorted; a key missing from one
    counts as None there."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def lookup(d: Any, key: str) -> tuple[bool, Any]:
    """(whether nested mapping ``d`` holds dotted ``key``, its value or None)."""
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False, None
        d = d[part]
    return True, d


def expand_user(path: str | Path, key: str = "") -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded (``run.root_dir=~/runs`` means the home folder, not a
    folder named ``~``); raises :class:`ConfigError` naming ``key`` (else the path) when it cannot be expanded."""
    try:
        return Path(path).expanduser()
    except RuntimeError as exc:  # ~user of an unknown user, or no home folder at all
        where = f"{key}={str(path)!r}" if key else f"path {str(path)!r}"
        raise ConfigError(f"{where} is invalid: cannot expand '~' ({exc})") from None


#: Factors a section store's image level may have (powers of two, like every image pyramid).
IMAGE_LEVEL_FACTORS = (2, 4, 8, 16, 32, 64)


def image_levels_valid(levels: tuple[int, ...] | list[int]) -> bool:
    """Whether ``levels`` are increasing :data:`IMAGE_LEVEL_FACTORS` (the config and the section writer check
    this one rule)."""
    return all(f in IMAGE_LEVEL_FACTORS for f in levels) and list(levels) == sorted(set(levels))


@dataclass
class RunConfig:
    """Where a run lives, how it logs, how its process treats host memory."""

    root_dir: str = "runs/demo"
    """Root folder of the run; every command's default output folder lies below it."""
    seed: int = 0
    """Global seed for everything that is random and not seeded more specifically."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level on rank 0 (other ranks log warnings and errors only)."""
    reuse_host_memory: bool = True
    """Training and inference keep freed host memory for reuse (glibc malloc settings, see cytonet.hostmem)
    instead of returning every large tensor's pages to the OS: the paper encoder's CPU forward pass runs 2.5x
    faster; inference's input buffers are kept by the process from run to run. The process then keeps its peak
    memory until it exits; false restores the C library's behaviour (and buffers kept for one run only)."""

    bounds: ClassVar[dict[str, Bound]] = {"seed": SEED}

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        _check(bool(self.root_dir), f"{prefix}.root_dir", self.root_dir, "give a folder path")


@dataclass
class SynthConfig:
    """The built-in synthetic brains (``cytonet synth``); how they are stored is the ``sections`` section."""

    out_dir: str = "sections"
    """Folder the section stores are written to; relative paths lie below ``run.root_dir``; ``--out`` overrides."""
    n_brains: int = 4
    """Number of brains; each has its own stain, cell-size scale, thickness and distortion."""
    sections_per_brain: int = 5
    """Number of serial sections written per brain."""
    section_thickness_um: float = 20.0
    """Physical thickness of one cut section."""
    section_spacing_um: float = 20.0
    """Distance between the cut planes of consecutive sections (>= thickness: skipped sections between)."""
    section_stride: int = 30
    """Write every ``section_stride``-th cut section (serial sections at coarse z spacing)."""
    pixel_size_um: float = 8.0
    """In-plane pixel size of the generated images."""
    n_areas: int = 8
    """Number of cytoarchitectonic areas K along the cortical ribbon."""
    brain_width_mm: float = 24.0
    """Width (x) of the section image in mm; the brain outline is fitted inside it."""
    brain_height_mm: float = 18.0
    """Height (y) of the section image in mm."""
    cortex_thickness_mm: tuple[float, float] = (2.0, 3.0)
    """Range of the cortical thickness (mm); each brain draws a scale inside the range."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same bytes."""

    @property
    def section_step_um(self) -> float:
        """Distance in z between two written sections."""
        return self.section_spacing_um * self.section_stride

    #: A synthetic brain is at most this long in every direction (a human brain: about 170 x 140 x 120 mm).
    max_extent_mm: ClassVar[float] = 200.0
    bounds: ClassVar[dict[str, Bound]] = {
        "n_brains": Bound(1, 1000, "paper: 9, demo: 4"),
        # section stores are named <brain>_s<4-digit index>: 10000 keeps their names in order
        "sections_per_brain": Bound(1, 10000, "section numbers have 4 digits"),
        "section_thickness_um": Bound(0, 1000, "um; paper: 20", above=True),
        "section_spacing_um": Bound(0, 10000, "um; paper: 20", above=True),
        "section_stride": Bound(1, 10000),
        "pixel_size_um": Bound(0.25, 64, "um/px; paper: 2, demo: 8"),
        "n_areas": Bound(2, 250),
        # the geometry is evaluated on a 40 um grid of the whole section: 200 x 200 mm is 25 M points
        "brain_width_mm": Bound(2, max_extent_mm, "mm; paper: 48", above=True),
        "brain_height_mm": Bound(2, max_extent_mm, "mm; paper: 40", above=True),
        "cortex_thickness_mm": Bound(0.5, 6, "give [low, high] mm"),
        "seed": SEED,
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        _check(
            self.section_spacing_um >= self.section_thickness_um,
            f"{prefix}.section_spacing_um",
            self.section_spacing_um,
            f"must be >= {prefix}.section_thickness_um ({self.section_thickness_um}): sections cannot overlap",
            also=(f"{prefix}.section_thickness_um",),
        )
        depth_mm = (self.sections_per_brain - 1) * self.section_step_um / 1000.0
        _check(
            depth_mm <= self.max_extent_mm,
            f"{prefix}.sections_per_brain",
            self.sections_per_brain,
            f"the stack of sections spans ({prefix}.sections_per_brain - 1) x {prefix}.section_spacing_um x "
            f"{prefix}.section_stride = {depth_mm:g} mm; use at most {_fmt(self.max_extent_mm)} mm, the largest "
            "brain",
            also=(f"{prefix}.section_spacing_um", f"{prefix}.section_stride"),
        )
        lo, hi = self.cortex_thickness_mm
        _check(
            lo <= hi,
            f"{prefix}.cortex_thickness_mm",
            list(self.cortex_thickness_mm),
            "give [low, high] mm with 0.5 <= low <= high <= 6",
        )


@dataclass
class SectionStoreConfig:
    """How section stores (image, labels, depth, coordinates) are written."""

    backend: Backend = "zarr"
    """``zarr`` (zarr v3 group per section) or ``hdf5`` (one .h5 file per section)."""
    chunk_px: int = 512
    """Chunk edge in pixels of every 2D array."""
    compression: Literal["blosc-zstd", "none"] = "blosc-zstd"
    """Codec of the image and label arrays."""
    image_levels: tuple[int, ...] = (2, 4, 8, 16)
    """Downsampled copies of the image stored beside it (factor f: means of f x f pixels, exactly what
    averaging the full resolution gives): inference and dense features at f times the pixel size read f^2
    times fewer bytes. Powers of two up to 64; [] stores none (+33% image bytes for the default)."""

    bounds: ClassVar[dict[str, Bound]] = {
        "chunk_px": Bound(16, 8192, "px"),
        "image_levels": Bound(min(IMAGE_LEVEL_FACTORS), max(IMAGE_LEVEL_FACTORS), "image level factors"),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        _check(
            image_levels_valid(self.image_levels),
            f"{prefix}.image_levels",
            list(self.image_levels),
            f"increasing factors among {list(IMAGE_LEVEL_FACTORS)} (or [])",
        )


@dataclass
class ImportConfig:
    """``cytonet import``: ingest a real section into a section store."""

    image: str = ""
    """Path of the section image: .tif/.tiff/.ome.tif, an HDF5 file (``file.h5:dataset``) or a zarr array."""
    labels: str = ""
    """Optional area label image of the same shape (same formats as ``image``)."""
    coords: str = ""
    """Optional coordinate map (H x W x 3 in the reference space; same formats)."""
    coords_unit: Literal["mm", "um"] = "mm"
    """Unit of the values in ``coords``; ``um`` maps are divided by 1000 (section stores hold mm)."""
    depth: str = ""
    """Optional cortical depth map (H x W, 0 at the pial surface, 1 at the white-matter border)."""
    label_names: dict[int, str] = field(default_factory=dict)
    """Names of the label ids, e.g. ``{0: background, 1: white_matter, 2: hOc1}``."""
    pixel_size_um: float | None = None
    """In-plane pixel size of the image; null: the one the image file states (OME-TIFF, ImageJ TIFF, OME-Zarr),
    refused if it states none. A value given must agree with the file's, if it states one."""
    brain: str = "B01"
    """Brain identifier written into the metadata."""
    section_index: int = 0
    """Section number within the brain."""
    z_mm: float = 0.0
    """Position of the section plane along the cutting axis, mm."""
    out_dir: str = "sections"
    """Folder the section store is written to; relative paths lie below ``run.root_dir``; ``--out`` overrides."""

    bounds: ClassVar[dict[str, Bound]] = {
        "label_names": Bound(0, 65535, "label ids: labels are stored as uint16"),
        "pixel_size_um": Bound(0.01, 1000, "um/px, as a section store may hold; or null: the file's"),
        "section_index": Bound(0, 999999),
        "z_mm": Bound(-1000, 1000, "mm"),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        _check(
            bool(self.brain) and all(ch.isalnum() or ch in "-_." for ch in self.brain) and self.brain[0] != ".",
            f"{prefix}.brain",
            self.brain,
            "use letters, digits, '-', '_' or '.' (it names a folder), e.g. B01",
        )


@dataclass
class ModelConfig:
    """Encoder, projection head and classifier."""

    encoder: Literal["paper", "resnet50", "resnet101"] = "paper"
    """``paper``: the encoder of seed 002 (valid convolutions, ``n_blocks`` of its six blocks);
    ``resnet50``/``resnet101``: seed 004."""
    n_blocks: int = 4
    """Blocks of the paper encoder (4: 265 px, 5: 553 px, 6: 1129 px receptive field; seed 002 uses 6,
    configs/paper-isbi2021.yaml; 4 keeps patches small for CPU runs)."""
    padding: Literal["valid", "same"] = "valid"
    """Convolution padding of the paper encoder; ``valid`` makes dense inference exact."""
    patch_size_px: int = 265
    """Input patch edge in pixels."""
    proj_hidden_dim: int = 128
    """Hidden width of the projection MLP."""
    proj_dim: int = 128
    """Output width of the projection MLP (L2-normalised)."""
    channels_last: bool = False
    """Use the channels_last memory format. Measured (benchmarks/bench_encoder.py, 2 AMX cores): 1.3-1.5x the
    images/s of the default layout in fp32, 2.4-2.9x together with ``optim.precision=bf16``. Off by default:
    torch's CPU BatchNorm kernel for channels_last is ~10x less accurate in fp32, enough to make a 1-rank and
    a 2-rank run drift apart over a few steps; turn it on with bf16 for speed."""

    @property
    def receptive_field_px(self) -> int:
        """Receptive field of the valid-padded paper encoder with ``n_blocks`` blocks."""
        return paper_receptive_field(self.n_blocks)

    bounds: ClassVar[dict[str, Bound]] = {
        "n_blocks": Bound(1, 6, "the paper encoder has 6 blocks"),
        "patch_size_px": Bound(1, 8192, "px; paper: 1129, seed 004: 2048"),
        "proj_hidden_dim": Bound(1, 16384, "paper: 128"),
        "proj_dim": Bound(1, 16384, "paper: 128"),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        if self.encoder == "paper" and self.padding == "valid":
            rf = self.receptive_field_px
            stride = paper_total_stride(self.n_blocks)
            ok = self.patch_size_px >= rf and (self.patch_size_px - rf) % stride == 0
            _check(
                ok,
                f"{prefix}.patch_size_px",
                self.patch_size_px,
                f"with {prefix}.n_blocks={self.n_blocks} valid blocks use {rf} + k*{stride} px "
                f"(valid: {', '.join(str(rf + k * stride) for k in range(3))}, ...)",
                also=(f"{prefix}.n_blocks",),
            )
        else:
            _check(self.patch_size_px >= 32, f"{prefix}.patch_size_px", self.patch_size_px, ">= 32 px")


def paper_total_stride(n_blocks: int) -> int:
    """Total stride of the paper encoder: first conv stride 4, then a 2x2 pool after each block but the last."""
    return 4 * 2 ** (n_blocks - 1)


def paper_receptive_field(n_blocks: int) -> int:
    """Receptive field (px) of the valid paper encoder: the input size whose final feature map is 1x1.

    Walks the layers backwards from a 1x1 output: the last block has two 3x3 convs; every earlier block has a
    2x2/2 pool after its two 3x3 convs; the first conv of block 1 is 5x5 stride 4.
    """
    size = 1
    for block in range(n_blocks, 0, -1):
        if block < n_blocks:
            size = size * 2  # 2x2 max pool, stride 2
        size += 2  # second 3x3 conv
        if block == 1:
            size = (size - 1) * 4 + 5  # 5x5 stride-4 conv
        else:
            size += 2  # first 3x3 conv
    return size


@dataclass
class LossConfig:
    """Contrastive loss of pretraining."""

    kind: Literal["supcon", "distance", "siamese"] = "supcon"
    """``supcon``: seed 002 eq. (1)-(2); ``distance``: seed 004 distance-weighted contrastive loss;
    ``siamese``: the self-supervised distance task of seed 002's ``distance`` baseline (its ref. [5], Spitzer
    et al. 2018: 3D distance and location prediction; :mod:`cytonet.losses.siamese`), whose encoder
    ``scratch.init_from`` then trains end to end."""
    temperature: float = 0.07
    """Temperature tau."""
    transfer: Literal["gaussian", "step", "inverse"] = "gaussian"
    """Distance transfer function g(d) of the distance-weighted loss."""
    radius_mm: float = 2.0
    """Scale of g: Gaussian sigma, step radius, or the distance at which the inverse weight is 1/2."""
    scale_mm: float = 10.0
    """``siamese``: distances and coordinates are regressed in units of this length (targets of order 1)."""

    @property
    def needs_coords(self) -> bool:
        """Whether the loss trains on the patches' 3D coordinates (distance-weighted, siamese), not labels."""
        return self.kind in ("distance", "siamese")

    bounds: ClassVar[dict[str, Bound]] = {
        # exp(<z_i, z_k> / tau) of unit vectors: 0.01 and 10 are already far from any useful temperature
        "temperature": Bound(0, 10, "paper: 0.07", above=True),
        # distances in a brain are below 200 mm: a metre is flat everywhere
        "radius_mm": Bound(0, 1000, "mm; seed 004: 2", above=True),
        "scale_mm": Bound(0, 1000, "mm", above=True),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    """Optimiser; seed 002 uses LARS."""
    base_lr: float = 0.01
    """Base learning rate; the effective rate is ``base_lr * global_batch / 128`` (seed 002)."""
    momentum: float = 0.9
    """Momentum."""
    weight_decay: float = 1e-6
    """Weight decay (not applied to biases and normalisation parameters)."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta."""
    warmup_steps: int = 0
    """Linear warm-up steps (0: none, as in seed 002)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 uses a gradient scaler and needs CUDA. bf16 measured 1.6-2.1x the images/s of fp32
    (2.4-2.9x with ``model.channels_last``) on 2 AMX cores; the default stays fp32 so that runs on different
    numbers of ranks agree to float rounding (bf16 rounds differently per batch split)."""

    bounds: ClassVar[dict[str, Bound]] = {
        # any rate that float32 (the weights' type) holds: too large a rate stops training with "the loss is not
        # finite", which a test of diverging runs relies on (optim.base_lr=1e30)
        "base_lr": Bound(0, 1e38, "paper: 0.01", above=True),
        "momentum": Bound(0, 1, below=True),
        # decoupled or not, a decay above 1 per unit of learning rate flips the weights' sign
        "weight_decay": Bound(0, 1, "paper: 1e-6"),
        "trust_coefficient": Bound(0, 10, "LARS: 0.001, demo: 1", above=True),
        "warmup_steps": Bound(0, STEPS),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)


@dataclass
class DistConfig:
    """torch.distributed settings (the launcher's variables are read in ``hpc/``, not here)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; ``auto``: nccl when CUDA is available, gloo otherwise."""
    timeout_s: float = 300.0
    """Collective timeout: a dead rank makes the others fail after this long instead of hanging."""
    sync_batchnorm: bool = True
    """Synchronise BatchNorm statistics across ranks (seed 002)."""
    check_replicas: bool = False
    """After every step, check that all ranks hold bitwise identical weights (a debugging aid; one collective)."""
    sync_batchnorm_impl: Literal["auto", "torch", "cytonet", "apex"] = "auto"
    """Synced BatchNorm implementation: ``auto``: torch's on CUDA, cytonet's on CPU (torch's refuses CPU
    tensors); ``apex``: NVIDIA apex's (must be importable, CUDA only)."""

    bounds: ClassVar[dict[str, Bound]] = {
        # torch turns the timeout into integer nanoseconds and milliseconds: 1e10 s overflows into a timeout that
        # fires at once, 1e12 s raises. A week is longer than any job's time limit a collective could wait out.
        "timeout_s": Bound(0, 7 * 24 * 3600, "s, at most a week", above=True),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)


@dataclass
class ExtractConfig:
    """``cytonet extract``: sample patch centres from section stores into a sharded patch store."""

    sections_dir: str = "sections"
    """Folder holding the section stores; relative paths lie below ``run.root_dir``."""
    out_dir: str = "patches"
    """Folder of the patch store; relative paths lie below ``run.root_dir``; ``--out`` overrides."""
    sampling: Literal["centerline", "cortex"] = "centerline"
    """``centerline``: centres where the cortical depth is 0.5 +- ``centerline_tolerance`` (seed 002);
    ``cortex``: centres uniformly inside the cortex, depth 0..1 (seed 004)."""
    centerline_tolerance: float = 0.05
    """Half-width of the depth band around 0.5 that counts as the centre line of the cortical ribbon."""
    candidate_stride_px: int = 1
    """Only pixels on a grid of this step (in section pixels) are candidate centres; >1 saves survey time."""
    patches_per_area: int = 256
    """Training patches per area (paper: 1200); areas with fewer candidate pixels are oversampled."""
    eval_patches_per_area: int = 64
    """Patches per area in the ``test`` and ``unseen`` splits (never oversampled: fewer if fewer candidates)."""
    test_fraction: float = 0.2
    """Fraction of the sections of each training brain held out as the ``test`` split (seed 004: 80/20)."""
    heldout_brains: list[str] = field(default_factory=list)
    """Brains whose sections form the ``unseen`` split; empty: the last ``n_heldout_brains`` in sorted order."""
    n_heldout_brains: int = 1
    """Number of held-out brains when ``heldout_brains`` is empty (0: no ``unseen`` split)."""
    patch_size_px: int | None = None
    """Edge of the crop the model sees (px); null: ``model.patch_size_px``. Patches are stored larger (margin)."""
    pixel_size_um: float | None = None
    """Pixel size of the stored patches; null: the sections' own. Must be an integer multiple of the sections'
    pixel size (patches are block-averaged); paper: 2, demo: 8."""
    patches_per_shard: int = 128
    """Patches per shard file; a zarr shard is buffered in memory while written (paper patches: 3.3 MB each)."""
    backend: Backend = "hdf5"
    """Patch store backend: ``hdf5`` (one .h5 file per shard) or ``zarr`` (one zarr group per shard)."""
    compression: Literal["blosc-zstd", "none"] = "none"
    """Codec of the stored patches (see benchmarks/bench_patch_reads.py for the measured trade-off)."""
    seed: int = 0
    """Seed of the sampling, the split of sections and the order of patches in shards."""

    bounds: ClassVar[dict[str, Bound]] = {
        "centerline_tolerance": Bound(0, 0.5, "depth runs 0..1", above=True),
        "candidate_stride_px": Bound(1, 1024, "px"),
        # areas with fewer candidates are oversampled: the plan holds n_areas x patches_per_area records
        "patches_per_area": Bound(1, 100000, "paper: 1200"),
        "eval_patches_per_area": Bound(0, 100000, "paper: 200"),
        "test_fraction": Bound(0, 1, "seed 004: 0.2", below=True),
        "n_heldout_brains": Bound(0, 1000),
        "patch_size_px": Bound(8, 8192, "px, or null: model.patch_size_px"),
        # patches are block means of (pixel_size_um / the sections' pixel size)^2 section pixels, read whole
        "pixel_size_um": Bound(0, 64, "um/px, or null: the sections'; paper: 2, demo: 16", above=True),
        # a zarr shard is buffered whole while written (paper patches: 3.3 MB each)
        "patches_per_shard": Bound(1, 4096),
        "seed": SEED,
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)


@dataclass
class InferConfig:
    """``cytonet infer``: per-area probability maps and label maps of whole sections (seeds 001, 002, 003)."""

    model_from: str = "probe"
    """Run folder of the probe or scratch stage whose ``model.pt`` (encoder + classifier) is applied."""
    sections_dir: str | None = None
    """Folder of the section stores; null: ``extract.sections_dir``. Relative paths lie below ``run.root_dir``."""
    sections: list[str] = field(default_factory=list)
    """Section names to map (store names without suffix); empty: the sections of ``splits``."""
    splits: list[str] = field(default_factory=lambda: ["test", "unseen"])
    """With ``sections`` empty: map the sections the patch store put in these splits (recorded in model.pt);
    sections the model never saw split information for are all mapped when this is empty."""
    out_dir: str = "infer"
    """Output folder; relative paths lie below ``run.root_dir``; ``--out`` overrides."""
    format: Literal["ome-zarr", "hdf5"] = "ome-zarr"
    """``ome-zarr``: one OME-Zarr (NGFF 0.5, zarr v3) image per section, blocks written in parallel;
    ``hdf5``: one .h5 file per section, written by a single process (HDF5 has no safe concurrent writers)."""
    stride_px: int = 8
    """Model pixels between two predictions (seed 001's field size; paper patch / 16 at the default)."""
    chunk_px: int = 128
    """Output pixels per chunk edge at full resolution; a block is one chunk (or one shard). Larger blocks
    amortise the per-write cost and re-read less receptive-field context (benchmarks/bench_infer.py)."""
    shard_chunks: int = 0
    """Chunks per shard edge (zarr v3 sharding); 0: no sharding. With sharding a block is one shard."""
    pyramid_levels: int = 3
    """Resolution levels of the output (level l: 2^l times coarser), at least 1."""
    mode: Literal["dense", "per_patch"] = "dense"
    """``dense``: the trunk once per block (exact for the valid-padding paper encoder); ``per_patch``: one
    encoder call per grid point (the reference, and the path for ResNets)."""
    batch_size: int = 64
    """Patches per forward pass in ``per_patch`` mode."""
    io_threads: int = 0
    """Reader threads and writer threads (each; one block more than readers is read ahead, so a reader that
    finishes has the next one waiting, and blocks found empty do not count): ``0`` picks, from this worker's
    share of the node's cores, a quarter (at least 1) for a CPU model, whose threads the other cores are for,
    and all but two (at most 32) for an accelerator: decoding the input is what limits a GPU there. HDF5
    output always has one writer (per file)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward pass (fp16: CUDA only)."""
    channels_last: bool = True
    """Dense evaluation in the channels_last memory format (BatchNorm folded into the convolutions, so the
    inaccurate channels_last BatchNorm kernel of ``model.channels_last`` is not used): 1.6-2x faster in fp32
    on CPU (benchmarks/bench_dense_cpu.py), and the layout tensor cores want; same results to about 1e-6."""
    tissue_max_intensity: int = 230
    """Tissue mask: an output pixel is tissue when the mean grey value of its footprint is below this
    (cell-body stains: tissue is darker than the slide); blocks without tissue are not evaluated."""
    roi: Literal["tissue", "cortex", "centerline"] = "tissue"
    """Where to predict, besides the tissue mask, judged at each patch centre: ``tissue`` everywhere;
    ``cortex`` where the section's labels layer marks an area (label >= 2: used as a cortex mask, the area ids
    are not used); ``centerline`` where its depth layer is 0.5 +- ``extract.centerline_tolerance``, the band
    that ``extract.sampling=centerline`` trains the classifier on (seed 002)."""
    compression: Literal["blosc-lz4", "blosc-zstd", "none"] = "blosc-lz4"
    """Codec of the output arrays (byte shuffle first): ``blosc-lz4`` encodes probabilities about 9x faster
    than ``blosc-zstd`` (level 3) at 2.0x instead of 2.4x smaller; ``blosc-zstd`` when disk matters more."""
    cleanup: Literal["none", "knn2d", "knn3d"] = "knn2d"
    """Clean-up of the label maps (seed 001): keep the largest connected components of each area as seeds and
    relabel the rest by the k nearest seeds in position, per section (2D) or across the section stack (3D)."""
    cleanup_k: int = 15
    """k of the nearest-neighbour vote."""
    cleanup_components: int = 1
    """Connected components kept per area as seeds (seed 001: m_i, the expected number of pieces of an area)."""
    cleanup_components_per_area: dict[str, int] = field(default_factory=dict)
    """m_i of named areas (area name -> components kept), e.g. ``{hOc1: 2}`` for an area cut into two pieces
    in a section; the areas not named keep ``cleanup_components``. Names must be areas of the model."""

    @property
    def label_images(self) -> list[str]:
        """Label images each output holds: the argmax map, and the cleaned one unless ``cleanup`` is none."""
        return ["argmax", "cleaned"] if self.cleanup != "none" else ["argmax"]

    #: Output pixels per block edge at most (chunk_px, times shard_chunks when sharded).
    max_block_px: ClassVar[int] = 8192
    bounds: ClassVar[dict[str, Bound]] = {
        "stride_px": Bound(1, max_block_px, "px; at most the model's patch size"),
        "chunk_px": Bound(1, max_block_px, "px"),
        "shard_chunks": Bound(0, max_block_px, "0: no sharding"),
        # chunk_px must be a multiple of 2^(pyramid_levels - 1), and at most 8192 = 2^13
        "pyramid_levels": Bound(1, 14),
        "batch_size": Bound(1, 8192),
        "io_threads": Bound(0, 64, "0: automatic"),
        "tissue_max_intensity": Bound(1, 256, "256: everything is tissue"),
        # the vote queries 2^18 points x k neighbours at a time: 16 bytes x 2^18 x 100 = 420 MB
        "cleanup_k": Bound(1, 100, "seed 001: 15"),
        "cleanup_components": Bound(1, 1000),
        "cleanup_components_per_area": Bound(1, 1000, "components kept"),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        coarsest = 2 ** (self.pyramid_levels - 1)  # bounded above: never a 23-digit power
        _check(
            self.chunk_px % coarsest == 0,
            f"{prefix}.chunk_px",
            self.chunk_px,
            f"a multiple of 2^({prefix}.pyramid_levels - 1) = {coarsest}, so that every block owns whole chunks at "
            "every level",
            also=(f"{prefix}.pyramid_levels",),
        )
        _check(
            self.shard_chunks == 0 or self.format == "ome-zarr",
            f"{prefix}.shard_chunks",
            self.shard_chunks,
            f"{prefix}.format={self.format} has no shards (zarr v3 sharding only): use 0, or "
            f"{prefix}.format=ome-zarr (larger HDF5 blocks: raise {prefix}.chunk_px)",
            also=(f"{prefix}.format",),
        )
        _check(
            self.chunk_px * max(1, self.shard_chunks) <= self.max_block_px,
            f"{prefix}.shard_chunks",
            self.shard_chunks,
            f"{prefix}.chunk_px * {prefix}.shard_chunks must be <= {self.max_block_px} output px "
            f"({prefix}.chunk_px={self.chunk_px})",
            also=(f"{prefix}.chunk_px",),
        )
        bad = [sp for sp in self.splits if sp not in ("train", "test", "unseen")]
        _check(not bad, f"{prefix}.splits", self.splits, "a list of train, test, unseen")


@dataclass
class AugmentConfig:
    """Training augmentation, applied batched on the training device (defaults: seed 002)."""

    enabled: bool = True
    """Apply the random transforms; false: only the centre crop (evaluation)."""
    rotation_max_deg: float = 180.0
    """Rotation angle drawn from U[-max, max] degrees (seed 002: U[-pi, pi])."""
    shift_max_mm: float = 0.2
    """Patch centre moved in a random direction by U[0, max] mm (seed 002: 0.2); sets the stored margin."""
    mirror_p: float = 0.5
    """Probability of a vertical mirror."""
    intensity_p: float = 1.0
    """Probability of the unbiased gamma augmentation alpha * x^gamma + beta (seed 002: always)."""
    alpha_range: tuple[float, float] = (0.9, 1.0)
    """alpha ~ U[low, high]."""
    beta_range: tuple[float, float] = (-0.1, 0.1)
    """beta ~ U[low, high]."""
    gamma_z_max: float = 0.05
    """gamma = log(0.5 + Z/sqrt 2) / log(0.5 - Z/sqrt 2), Z ~ U[-max, max] (seed 002 with the README erratum)."""
    blur_p: float = 0.25
    """Probability of a Gaussian blur G_sigma(x)."""
    sharpen_p: float = 0.25
    """Probability of sharpening (exclusive with the blur)."""
    sigma_range_px: tuple[float, float] = (0.125, 1.0)
    """sigma ~ U[low, high] px of the Gaussian used by blur and sharpening."""
    sharpen_delta_range: tuple[float, float] = (0.5, 1.5)
    """delta ~ U[low, high] of the sharpening."""
    sharpen_formula: Literal["as_printed", "unsharp_mask"] = "as_printed"
    """``as_printed``: x + delta * (G(x) - x) as seed 002 prints it (moves towards the blur);
    ``unsharp_mask``: x + delta * (x - G(x)), a true sharpening."""
    seed: int = 0
    """Seed of the per-sample parameters, drawn from (seed, epoch, sample index, view)."""

    @property
    def blur_radius_px(self) -> int:
        """Half-width of the Gaussian kernel: 3 sigma_max, rounded up (the resampled area is this much larger)."""
        import math

        return max(1, math.ceil(3.0 * self.sigma_range_px[1]))

    bounds: ClassVar[dict[str, Bound]] = {
        "rotation_max_deg": Bound(0, 180, "degrees"),
        "shift_max_mm": Bound(0, 5, "mm; paper: 0.2"),
        "mirror_p": Bound(0, 1, "a probability"),
        "intensity_p": Bound(0, 1, "a probability"),
        "blur_p": Bound(0, 1, "a probability"),
        "sharpen_p": Bound(0, 1, "a probability"),
        # patches hold intensities in [0, 1]
        "alpha_range": Bound(0, 10, "give [low, high]; seed 002: [0.9, 1.0]", above=True),
        "beta_range": Bound(-1, 1, "give [low, high]; seed 002: [-0.1, 0.1]"),
        "gamma_z_max": Bound(
            0, 0.5 * 2**0.5, "1/sqrt 2: log of a non-positive number otherwise; paper: 0.05", below=True
        ),
        "sigma_range_px": Bound(0, 8, "give [low, high] px", above=True),
        "sharpen_delta_range": Bound(0, 10, "give [low, high]; seed 002: [0.5, 1.5]"),
        "seed": SEED,
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        _check(
            self.blur_p + self.sharpen_p <= 1,
            f"{prefix}.sharpen_p",
            self.sharpen_p,
            f"blur_p + sharpen_p must be <= 1 (they exclude each other; {prefix}.blur_p={self.blur_p})",
            also=(f"{prefix}.blur_p",),
        )
        for name in ("alpha_range", "beta_range", "sigma_range_px", "sharpen_delta_range"):
            lo, hi = getattr(self, name)
            _check(lo <= hi, f"{prefix}.{name}", [lo, hi], "give [low, high] with low <= high")


@dataclass
class LoaderConfig:
    """Reading patch stores for training: sampler, batching and DataLoader workers."""

    workers: int = 2
    """DataLoader worker processes per rank (they read and decompress; augmentation runs on the device)."""
    prefetch_factor: int = 4
    """Batches each worker reads ahead."""
    shard_block: int = 4
    """Shards shuffled together: each epoch shuffles the shard order, then the samples within blocks of this
    many shards (read locality vs. mixing)."""
    class_aware: bool = True
    """Build global batches of groups of ``samples_per_class`` same-area samples, so SupCon has positives."""
    samples_per_class: int = 4
    """Samples per area group in a class-aware batch; must divide each rank's batch (the stage's
    ``global_batch_size`` divided by the world size)."""
    seed: int = 0
    """Seed of the per-epoch shuffle (the order is a function of seed and epoch only)."""
    pin_memory: bool = True
    """Pin host memory of batches when training on CUDA."""

    bounds: ClassVar[dict[str, Bound]] = {
        "workers": Bound(0, THREADS, "0: read in the main process"),
        # held in memory: workers x prefetch_factor batches
        "prefetch_factor": Bound(1, 64),
        "shard_block": Bound(1, 100000),
        "samples_per_class": Bound(1, 4096),
        "seed": SEED,
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)


@dataclass
class TrainConfig:
    """One training stage (``pretrain``, ``probe`` or ``scratch``): length, batch, checkpoints, preemption."""

    out_dir: str = "pretrain"
    """Run folder of the stage (checkpoints, metrics, logs); relative paths lie below ``run.root_dir``."""
    epochs: int = 20
    """Passes over the training split (seed 002: pretrain 150, probe 30, scratch 180)."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0: run all ``epochs``)."""
    global_batch_size: int = 64
    """Samples per step over all ranks; divided by the world size (seed 002: 4096; seed 004: 2048)."""
    checkpoint_every_steps: int = 50
    """Write a checkpoint every this many steps (and at the end, and on preemption)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    log_every_steps: int = 10
    """Log loss and throughput every this many steps (rank 0)."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that request a checkpoint and a requeue exit at the next step boundary."""
    requeue_exit_code: int = 75
    """Exit status after a preemption checkpoint (75 = EX_TEMPFAIL): the launchers requeue on it."""
    bounds: ClassVar[dict[str, Bound]] = {
        "epochs": Bound(1, 100000, "seed 002: pretrain 150, probe 30"),
        "max_steps": Bound(0, STEPS, "0: all epochs"),
        # LARS was shown to 32768 (You et al.); every rank also holds the global batch's embeddings
        "global_batch_size": Bound(2, 65536, "seed 002: 4096"),
        "checkpoint_every_steps": Bound(1, STEPS),
        "keep_checkpoints": Bound(1, 1000),
        "log_every_steps": Bound(1, STEPS),
        "requeue_exit_code": Bound(1, 127, "128 and above mean a signal"),
    }

    def per_rank_batch(self, world_size: int, prefix: str, multiple_of: int = 1) -> int:
        """The batch of one rank; raises naming the key when the global batch does not divide by the world size,
        or the per-rank batch not by ``multiple_of`` (``loader.samples_per_class`` for class-aware batches)."""
        _check(
            self.global_batch_size % world_size == 0,
            f"{prefix}.global_batch_size",
            self.global_batch_size,
            f"must be divisible by the world size {world_size}",
        )
        per_rank = self.global_batch_size // world_size
        _check(
            per_rank % multiple_of == 0,
            f"{prefix}.global_batch_size",
            self.global_batch_size,
            f"each of the {world_size} ranks gets {per_rank}, which loader.samples_per_class={multiple_of} must divide",
        )
        return per_rank

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        valid = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGCONT")
        for name in self.preempt_signals:
            _check(name in valid, f"{prefix}.preempt_signals", self.preempt_signals, f"use names among {valid}")


@dataclass
class ProbeConfig(TrainConfig):
    """Linear probe: frozen pretrained encoder, projection head dropped, linear classifier (seed 002: 30 epochs)."""

    out_dir: str = "probe"
    epochs: int = 30
    encoder_from: str = "pretrain"
    """Run folder of the pretraining whose final encoder is probed; relative paths lie below ``run.root_dir``."""


@dataclass
class ScratchConfig(TrainConfig):
    """Baseline: the same encoder plus a linear head trained end to end with cross-entropy."""

    out_dir: str = "scratch"
    epochs: int = 0
    """0: as many epochs as pretraining plus probe (seed 002: 150 + 30 = 180)."""
    init_from: str = ""
    """Empty: random initial weights (seed 002's ``scratch``). A pretraining's run folder: its final encoder
    initialises the encoder, which then trains end to end (seed 002's ``distance``: the encoder of the
    ``loss.kind=siamese`` task); relative paths lie below ``run.root_dir``."""

    bounds: ClassVar[dict[str, Bound]] = {
        **TrainConfig.bounds,
        "epochs": Bound(0, 100000, "0: pretrain + probe epochs"),
    }


@dataclass
class AnalysisConfig:
    """Feature analysis (``cytonet features``, ``cytonet analyze``): Ward clustering and t-SNE (seed 002), UMAP
    (seed 004), NMF factors with greedy selection and Gaussian mixtures (seed 000); figures, tables, report."""

    out_dir: str = "analysis"
    """Folder of features, figures, tables and ``report.html``; relative paths lie below ``run.root_dir``;
    ``--out`` overrides."""
    encoder_from: str = "pretrain"
    """Run folder whose ``encoder.pt`` computes the features (representation h, before the projection head);
    relative paths lie below ``run.root_dir``; ``--encoder PATH`` overrides."""
    splits: list[str] = field(default_factory=lambda: ["test"])
    """Patch-store splits whose features are analysed together (seed 002 clusters the held-out sections)."""
    max_patches_per_split: int = 0
    """Analyse at most this many patches per split, a seeded random subset (0: all)."""
    batch_size: int = 64
    """Patches (or dense tiles) per forward pass of the encoder."""
    n_clusters: int = 10
    """Clusters of the Ward hierarchical clustering (seed 002: 10)."""
    table_top_areas: int = 6
    """Most frequent areas listed per cluster in the cluster table (seed 002 Table 1: 6)."""
    tsne_perplexity: float = 30.0
    """t-SNE perplexity (scikit-learn's default; seed 002 does not state it); capped at (n - 1) / 3."""
    umap_subsample: int = 50
    """UMAP keeps one sample in this many, a seeded random subset (seed 004: subsample 50; 1: all)."""
    umap_min_points: int = 1000
    """...but at least this many (all when there are fewer): seed 004's 1 in 50 of 135,600 samples kept ~2,700,
    while 1 in 50 of a demo's few hundred patches would leave too few to embed. Where a section map needs the
    samples left out, they get the weighted mean position of their nearest fitted neighbours."""
    umap_neighbors: int = 15
    """UMAP ``n_neighbors`` (umap-learn's default)."""
    umap_min_dist: float = 0.1
    """UMAP ``min_dist`` (umap-learn's default)."""
    nmf_components: int = 15
    """NMF rank k (seed 000: 15)."""
    nmf_max_iter: int = 400
    """Iterations of the NMF solver (coordinate descent)."""
    nmf_select: int = 0
    """Factors p chosen by the greedy coverage/leakage selection (seed 000: 6, one per region of interest);
    0: one per region, at most ``nmf_components``."""
    selection_lambda: float = 0.5
    """lambda weighting the leakage score against the coverage score (seed 000: 0.5)."""
    nmf_active_threshold: float = 0.0
    """A coefficient counts as positive in the coverage and leakage scores when it exceeds this fraction of
    its factor's largest coefficient (0: strictly positive, as printed in seed 000)."""
    layer_borders: list[float] = field(default_factory=lambda: [0.0, 0.08, 0.17, 0.44, 0.55, 0.76, 1.0])
    """Cortical depths (0 pial, 1 white matter) of the borders of the layers against which the RGB map's three
    factors are selected on the cortex points of a dense section (seed 000 Fig. 2B1: "selected to be
    uncorrelated across the layers"): layers I-VI of a typical isocortex, the synthetic areas' mean profile."""
    gmm_components: int = 6
    """Components of the Gaussian mixture fitted to the NMF factors of cortex samples (not stated in seed 000,
    which shows four of them; 6: one per cortical layer)."""
    gmm_factors: Literal["all", "selected"] = "all"
    """Factors the mixture is fitted to: ``all`` k (seed 000 Fig. 2B3: "clustering the 15D NMF cortical
    features") or the ``selected`` p."""
    dense: bool = True
    """Also compute features on a dense grid over ``dense_sections`` and paint factors, mixture clusters and
    the first UMAP dimension onto the section."""
    dense_sections: list[str] = field(default_factory=list)
    """Sections mapped densely, by name (``B03_s0000``) among the stores below ``extract.sections_dir``;
    empty: the first section of the patch store's ``unseen`` split (else of ``test``, else the first)."""
    dense_stride_px: int = 16
    """Step of the dense grid in pixels of the patch store (16 px at the demo's 16 um/px: 256 um)."""
    seed: int = 0
    """Seed of subsampling, t-SNE, UMAP, NMF initialisation and the mixture."""
    threads: int = 1
    """BLAS/OpenMP threads of clustering, t-SNE, NMF and the mixture (0: the libraries' default). Measured on
    the busy 2-core development machine: 1 thread ran t-SNE of 512 patches in 2.2 s, 2 threads in 33 s (NMF and
    mixture of 3.7k points: 0.5 s vs 4.3 s); the matrices here are too small to gain from threads."""

    bounds: ClassVar[dict[str, Bound]] = {
        "max_patches_per_split": Bound(0, 10**8, "0: all"),
        "batch_size": Bound(1, 8192),
        # Ward clustering, t-SNE, UMAP, NMF and the mixture hold n x n or n x k matrices: small k, n up to 10^8
        "n_clusters": Bound(2, 1000, "seed 002: 10"),
        "table_top_areas": Bound(1, 250, "seed 002: 6"),
        "tsne_perplexity": Bound(0, 1000, "default 30", above=True),
        "umap_subsample": Bound(1, 100000, "seed 004: 50"),
        "umap_min_points": Bound(4, 10**8),
        "umap_neighbors": Bound(2, 1000, "default 15"),
        "umap_min_dist": Bound(0, 1),
        "nmf_components": Bound(1, 1000, "seed 000: 15"),
        "nmf_max_iter": Bound(1, 100000),
        "nmf_select": Bound(0, 1000, "0: one per region"),
        "selection_lambda": Bound(0, 100, "seed 000: 0.5"),
        "nmf_active_threshold": Bound(0, 1, "0: strictly positive, seed 000", below=True),
        "layer_borders": Bound(0, 1, "cortical depths run 0..1"),
        "gmm_components": Bound(1, 1000),
        "dense_stride_px": Bound(1, 1024, "px"),
        "seed": SEED,
        "threads": Bound(0, THREADS, "0: the libraries' default"),
    }

    def validate(self, prefix: str) -> None:
        check_bounds(self, prefix)
        valid = ("train", "test", "unseen")
        _check(
            bool(self.splits) and all(s in valid for s in self.splits) and len(set(self.splits)) == len(self.splits),
            f"{prefix}.splits",
            self.splits,
            f"list distinct splits among {valid} (seed 002: [test])",
        )
        _check(
            len(self.layer_borders) >= 3
            and self.layer_borders[0] == 0.0
            and self.layer_borders[-1] == 1.0
            and all(a < b for a, b in zip(self.layer_borders, self.layer_borders[1:])),
            f"{prefix}.layer_borders",
            self.layer_borders,
            "increasing depths from 0.0 to 1.0, at least two layers",
        )
        _check(
            self.nmf_select <= self.nmf_components,
            f"{prefix}.nmf_select",
            self.nmf_select,
            f"use 0 (one per region) .. {prefix}.nmf_components ({self.nmf_components})",
            also=(f"{prefix}.nmf_components",),
        )


@dataclass
class Config:
    """The whole configuration; every section is a dataclass of its own."""

    run: RunConfig = field(default_factory=RunConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    sections: SectionStoreConfig = field(default_factory=SectionStoreConfig)
    importer: ImportConfig = field(default_factory=ImportConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    @property
    def scratch_epochs(self) -> int:
        """Epochs of the scratch baseline: ``scratch.epochs``, or pretrain + probe epochs when it is 0."""
        return self.scratch.epochs or self.pretrain.epochs + self.probe.epochs

    @property
    def root_path(self) -> Path:
        """``run.root_dir`` as a path, ``~`` expanded."""
        return expand_user(self.run.root_dir, "run.root_dir")

    def resolve_path(self, path: str) -> Path:
        """A configured path, ``~`` expanded: absolute as given, relative ones below ``run.root_dir``."""
        p = expand_user(path)
        return p if p.is_absolute() else self.root_path / p

    def validate(self) -> None:
        """Validate every section, then the rules that span sections."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.loader.class_aware:
            for name in ("pretrain", "probe", "scratch"):
                stage = getattr(self, name)
                _check(
                    stage.global_batch_size % self.loader.samples_per_class == 0,
                    "loader.samples_per_class",
                    self.loader.samples_per_class,
                    f"must divide {name}.global_batch_size ({stage.global_batch_size}) for class-aware batches",
                    also=(f"{name}.global_batch_size",),
                )


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> typed dataclasses

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form (ints widen to float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SettingError(f"{key}={value!r} is invalid: expected a mapping of the section's keys", (key,))
        return _build(tp, value, key)  # type: ignore[arg-type]
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise SettingError(f"{key}={value!r} is invalid: use {_type_name(tp)}", (key,))
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        finite = [e for e in errors if e.endswith("expected a finite number")]
        if finite:  # a number, but inf or nan: say so rather than "expected float or null"
            raise SettingError(finite[0], (key,))
        raise SettingError(f"{key}={value!r} is invalid: expected {_type_name(tp)}", (key,))
    if tp is type(None):
        if value is not None:
            raise SettingError(f"{key}={value!r} is invalid: expected null", (key,))
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingError(f"{key}={value!r} is invalid: expected true or false", (key,))
        return value
    if tp is int:
        if not is_int(value):
            raise SettingError(f"{key}={value!r} is invalid: expected an integer", (key,))
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            # YAML 1.1 reads 1e-6 (no dot) as a string; accept any numeric spelling.
            try:
                number = float(value)
            except ValueError:
                raise SettingError(f"{key}={value!r} is invalid: expected a number", (key,)) from None
        if not is_number(number):
            raise SettingError(f"{key}={value!r} is invalid: expected a number", (key,))
        try:
            number = float(number)
        except OverflowError:  # an integer with hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            # inf passes every lower bound (`dist.timeout_s > 0`) and then fails deep inside a library (an
            # OverflowError when the process group starts); nan makes every comparison false. Refused here, once.
            raise SettingError(f"{key}={value!r} is invalid: expected a finite number", (key,))
        return number
    if tp is str:
        if not isinstance(value, str):
            quote = is_number(value)  # YAML read `90` as a number
            raise SettingError(
                f"{key}={value!r} is invalid: expected a string" + (f' (quote it in YAML: "{value}")' if quote else ""),
                (key,),
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise SettingError(f"{key}={value!r} is invalid: expected a list ({_type_name(tp)})", (key,))
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SettingError(
                    f"{key}={value!r} is invalid: expected {len(args)} values ({_type_name(tp)})", (key,)
                )
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingError(f"{key}={value!r} is invalid: expected a mapping ({_type_name(tp)})", (key,))
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in this module, not user input


_FIELDS: dict[type, tuple[dict[str, Any], list[str]]] = {}


def _fields(cls: type) -> tuple[dict[str, Any], list[str]]:
    """Resolved annotations and field names of a config dataclass, resolved once per class (resolving them was
    most of the time of building a config: a model file's config is built in every `cytonet infer`)."""
    if cls not in _FIELDS:
        _FIELDS[cls] = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    return _FIELDS[cls]


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints, names = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            where = f"section '{prefix}'" if prefix else "the top level"
            raise SettingError(
                f"unknown key '{_join(prefix, str(key))}' in {where}; valid keys: {', '.join(names)}",
                (_join(prefix, str(key)),),
            )
        kwargs[key] = _coerce(value, hints[key], _join(prefix, key))
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build any config-style dataclass from a plain dict with the same strict rules as :class:`Config`
    (unknown keys list the valid ones, values are type-checked); for other typed YAML files such as the
    site profiles of ``hpc/site.py``. The caller validates the result."""
    return _build(cls, data, prefix)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain (YAML-like) dict."""
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping holds the same key twice (plain YAML keeps the last value and drops the first silently)."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        super().__init__(f"key '{key}' appears twice, on lines {first_line} and {line}")
        self.key, self.line, self.first_line = key, line, first_line


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys: a section written twice would otherwise lose its first
    block without a word. Merge keys (``<<: *base``) may still be overridden, as YAML intends."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._check_duplicates(node, "", set())
        return self.construct_document(node)

    def _check_duplicates(self, node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or a recursive structure)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                name = prefix
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                    name = _join(prefix, str(key))
                    line = key_node.start_mark.line + 1
                    try:
                        if key in first:
                            raise DuplicateKeyError(name, line, first[key])
                        first[key] = line
                    except TypeError:  # unhashable: the constructor reports it
                        pass
                self._check_duplicates(value_node, name, seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, f"{prefix}[{i}]", seen)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python data, safely, refusing duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: builds only plain data, never objects


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["synth.n_brains=2", "loss.kind=distance"]`` into a nested dict; values are parsed as YAML.

    Each key may be given once: ``synth.n_brains=2 synth.n_brains=3`` is refused (the last would silently win,
    as in a YAML file with a key written twice), and so is a key given inside another override's value
    (``synth={n_brains: 2} synth.n_brains=3``)."""
    nested: dict[str, Any] = {}
    given: dict[str, str] = {}  # dotted key -> the override that set it
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"override {item!r} is malformed: use section.key=value (e.g. synth.n_brains=2)")
        for other, earlier in given.items():
            if other == key:
                raise UsageError(
                    f"override {item!r}: key '{key}' is given twice (also {earlier!r}); the last would silently "
                    "win: give it once"
                )
            if _at_or_below(key, other) or _at_or_below(other, key):
                raise UsageError(
                    f"override {item!r}: key '{key}' overlaps the earlier override {earlier!r}: give each key once"
                )
        given[key] = item
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except DuplicateKeyError as exc:
            raise UsageError(f"override {item!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return nested


def layer_overrides(*groups: typing.Sequence[str]) -> list[str]:
    """Join groups of dotted overrides, each later group's keys replacing the same keys (and the keys below them)
    of the earlier groups: for code that composes its defaults with specific settings (tests, benchmarks). On
    the command line each key is given once (:func:`parse_overrides`)."""
    out: list[str] = []
    for group in groups:
        keys = [item.partition("=")[0] for item in group]
        out = [item for item in out if not any(_at_or_below(item.partition("=")[0], key) for key in keys)]
        out += group
    return out


def _at_or_below(key: str, other: str) -> bool:
    """Whether dotted ``key`` is ``other`` or a key below it."""
    return key == other or key.startswith(other + ".")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping safely (every config and site profile goes through here); one-line errors name
    the file (``what``: how to call it) and, for syntax errors, the line and column. A key written twice in
    one mapping is refused, naming the key and both lines."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a folder, not a YAML file")
    if not p.is_file():  # missing, or a device such as /dev/null
        raise ConfigError(not_found(p, what) if p.exists() else f"{what} {str(p)!r} does not exist")
    try:
        data = parse_yaml(p.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{what} {str(p)!r}, line {exc.line}: key '{exc.key}' is written twice (first on line "
            f"{exc.first_line}); YAML would silently keep only the last one: merge them"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where (line, column, 1-based) and what, without PyYAML's source excerpt."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if context:
        # where the construct it was parsing began: often the line at fault (a key without its colon)
        start = getattr(exc, "context_mark", None)
        context += f" that began on line {start.line + 1}" if start is not None else ""
    return where + str(problem) + (f" ({context})" if context else "")


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    flags: dict[str, tuple[str, Any]] | None = None,
) -> Config:
    """Load ``path`` (None: defaults only), apply dotted ``overrides`` and validate.

    ``flags`` maps dotted keys to (command-line flag, value), e.g. ``{"run.root_dir": ("--out", "runs/x #2")}``:
    values set verbatim after the overrides, never parsed as YAML (a folder named ``2024-06-01``, ``null`` or
    ``x #2`` stays that string); errors about them name the flag.
    """
    from_file = read_yaml(path) if path is not None else {}
    from_overrides = parse_overrides(overrides or [])
    data = _merge(from_file, from_overrides)
    for key, (_, value) in (flags or {}).items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            child = node.get(part, {})
            if not isinstance(child, dict):
                break  # the file's own value of the section is refused by the type check below
            node[part] = child = dict(child)
            node = child
        else:
            node[last] = value
    try:
        return config_from_dict(data)
    except SettingError as exc:
        # Name where each value the error is about came from: a flag, a command-line override, the file or the
        # default (a rule across keys may involve values from all of them).
        origins = {}
        for key in exc.keys:
            name = re.sub(r"(\[\d+\])+$", "", key)  # an item of a list: where the list came from
            flag = next((f for k, (f, _) in (flags or {}).items() if name == k or name.startswith(k + ".")), None)
            if flag is not None:
                origins[key] = f"set by {flag}"
            elif _sets(from_overrides, name):
                origins[key] = "set by a command-line override"
            elif path is not None and _sets(from_file, name):
                origins[key] = f"in {path}"
            else:
                origins[key] = "left at its default"
        if len(set(origins.values())) > 1:
            where = " (" + "; ".join(f"{key} {origin}" for key, origin in origins.items()) + ")"
        elif origins and next(iter(origins.values())) != "left at its default":
            where = f" ({next(iter(origins.values()))})"
        else:
            where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None
    except ConfigError as exc:
        # An error that names no keys: blame an override its text starts with, else the file.
        text = str(exc)
        keys = [item.split("=", 1)[0].strip() for item in overrides or []]
        if any(text.startswith((f"{key}=", f"{key}[", f"{key}.")) for key in keys):
            where = " (set by a command-line override)"
        else:
            where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{text}{where}") from None


def _sets(data: Any, key: str) -> bool:
    """Whether nested mapping ``data`` (a file's or the overrides' settings) holds dotted ``key``: the key
    itself, or a mapping holding keys below it (``synth.n_brains`` of ``synth.n_brains.x=1``). Mapping keys are
    compared as text (``importer.label_names.7``) and may hold dots."""
    if not isinstance(data, dict):
        return False
    for k, value in data.items():
        name = str(k)
        if key == name or (key.startswith(name + ".") and _sets(value, key[len(name) + 1 :])):
            return True
    return False


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain dict of builtins (lists for tuples) that YAML, JSON and ``torch.load(weights_only)`` accept."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    # libyaml's emitter when PyYAML has it (10x faster, same text): every command writes its config once.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(config_to_dict(cfg), Dumper=dumper, sort_keys=False)


def save_config(cfg: Config, out_dir: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the resolved config into ``out_dir`` (created if needed); returns the file path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path
