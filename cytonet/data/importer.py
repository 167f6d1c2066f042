"""Import a real section (image, optional labels, coordinates, depth) into a section store.

Entry point: :func:`import_section` (``cytonet import CONFIG importer.image=PATH ...``). The store is written to
``<out>/<brain>/<brain>_s<index>.<zarr|h5>`` with the settings of ``cfg.sections``; the resolved config is
saved beside it as ``<out>/<brain>_s<index>.import.yaml`` (one file per imported section, so that imports of
several sections into one folder do not overwrite each other's record) and into the store's attributes.

Inputs, given as strings in ``cfg.importer``:

- TIFF / OME-TIFF (``.tif``, ``.tiff``, ``.ome.tif``, ``.ome.tiff``, ``.btf``, ``.tf8``). Read through
  tifffile's zarr store (tile by tile or strip by strip), or memory-mapped when the image is stored uncompressed
  and contiguous. A pyramid (OME sub-IFDs or reduced-resolution pages) gives its level 0; further series that
  are smaller than the first (thumbnails, label or macro images of slide scanners) are ignored. A stack (several
  full-size pages: z, time, channels) is refused, as is a compression this installation cannot decode (LZW,
  JPEG and JPEG 2000 are decoded through ``imagecodecs``, a dependency; a codec it lacks is refused up front).
- HDF5: ``file.h5:/path/to/dataset`` (also ``.hdf5``, ``.hdf``, ``.he5``); without ``:dataset`` the file must hold
  exactly one dataset.
- zarr (v2 or v3): ``path.zarr`` (an array, an OME-Zarr multiscale group whose level 0 is taken, or a group
  holding exactly one array) or ``path.zarr:array/in/group``.

Size-1 leading axes are dropped (``1 x H x W``, ``1 x 1 x 1 x H x W`` OME-Zarr), as is a size-1 last axis.

Layers and conversions:

- ``image`` -> uint8. uint8 is copied as is. uint16 is mapped linearly so that the 0.1th percentile becomes 0
  and the 99.9th percentile 255 (rounded, clipped); the percentiles (inverted-CDF definition) come from a
  subsample (at most :data:`SAMPLE_BANDS` bands of rows spread evenly over the image, strided to at most about
  :data:`SAMPLE_PIXELS` values) and are recorded in the store's ``extra.image_conversion`` attribute. A float
  image must hold finite values in [0, 1], mapped to ``round(255 x)``. RGB / RGBA uint8 (``H x W x 3|4`` or
  ``3|4 x H x W``) becomes grey ``round(0.299 R + 0.587 G + 0.114 B)`` (ITU-R BT.601 luma); alpha is ignored.
  Anything else is refused with an :class:`~cytonet.errors.InputError`.
- ``labels`` (optional): any integer dtype with ids in 0..65535 -> uint16, same H x W as the image.
- ``coords`` (optional): float, ``H x W x 3`` or ``3 x H x W``, mm -> float32 ``H x W x 3``.
- ``depth`` (optional): float ``H x W`` -> float32; NaN outside the cortex. Values outside [0, 1] are logged.

Label table (``SectionMeta.label_table``): with a label image, it holds ``0: background``,
``1: white_matter``, then ``importer.label_names`` (which may rename those two), then ``area_<id>`` for every id
found in the label image that has no name (a warning lists them). Without a label image it is
``importer.label_names`` as given.

Memory: every layer is copied in bands of ``cfg.sections.chunk_px`` full-width rows (whole chunk rows of the
output), one band of one layer at a time; the uint16 percentile sample and the label-id scan (done before the
store is created, so that bad labels fail before anything is written) read band by band as well.

Replacing: an existing store of the section (in either backend: a ``.zarr`` and an ``.h5`` of one section would
both be listed by :func:`~cytonet.data.sections.list_sections`) is replaced only with ``overwrite``, and only
once the new store is complete.

Bad inputs (missing, truncated or corrupt files, unknown dataset keys, unsupported formats, dtypes or shapes,
shape mismatches) raise :class:`~cytonet.errors.InputError` naming the file; an existing output store raises
:class:`~cytonet.errors.OutputExistsError` unless ``overwrite`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytonet.config import Config, config_to_dict, save_config
from cytonet.data.sections import (
    BACKEND_OF_SUFFIX,
    BACKGROUND_ID,
    WHITE_MATTER_ID,
    SectionMeta,
    SectionWriter,
    create_section,
    section_filename,
)
from cytonet.errors import ConfigError, InputError, OutputExistsError

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
ZARR_SUFFIXES = (".zarr",)
FORMATS_HELP = (
    "use a TIFF/OME-TIFF (.tif, .tiff, .ome.tif), an HDF5 dataset (file.h5:/path/to/dataset) "
    "or a zarr array (path.zarr or path.zarr:array/in/group)"
)
IMAGE_ALLOWED = (
    "allowed: uint8 or uint16 H x W, float H x W with values in [0, 1], or RGB/RGBA uint8 (H x W x 3|4 or 3|4 x H x W)"
)
#: At most this many bands of rows are read to estimate the uint16 percentiles.
SAMPLE_BANDS = 8
#: At most about this many pixel values enter the uint16 percentile estimate.
SAMPLE_PIXELS = 1 << 22
#: Percentiles of a uint16 image that map to 0 and 255.
UINT16_PERCENTILES = (0.1, 99.9)
#: ITU-R BT.601 luma weights of R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: A TIFF strip or tile larger than this is decoded whole; warn, because it is held in memory at once.
LARGE_SEGMENT_BYTES = 256 << 20

_KEYED_SPEC = re.compile(r"^(?P<path>.+?\.(?:h5|hdf5|hdf|he5|zarr))(?::(?P<key>.*))?$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------
# Opening sources


@dataclass
class Source:
    """One input array, seen as ``H x W`` or ``H x W x C``, readable in bands of rows.

    ``array`` is any lazily sliceable array (zarr.Array, h5py.Dataset, numpy.memmap); ``prefix`` indexes away
    leading size-1 axes; ``channels`` says where a channel axis sits (``None``, ``"last"`` or ``"first"``);
    ``drop_last`` removes a trailing size-1 axis.
    """

    spec: str
    """The input as the user gave it (used in every error message)."""
    array: Any
    raw_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    prefix: tuple[int, ...] = ()
    channels: str | None = None
    drop_last: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """Canonical shape: ``(H, W)`` or ``(H, W, C)``."""
        core = self.raw_shape[len(self.prefix) :]
        if self.drop_last:
            core = core[:-1]
        if self.channels == "first":
            return (*core[1:], core[0])
        return core

    @property
    def hw(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    def describe(self) -> str:
        return f"{self.spec} (dtype {self.dtype}, shape {'x'.join(map(str, self.raw_shape))})"

    def read_rows(self, y0: int, y1: int, xstep: int = 1) -> np.ndarray:
        """Rows ``y0:y1`` (every ``xstep``-th column) as ``h x W`` or ``h x W x C``; only those rows are read."""
        rows, cols = slice(y0, y1), slice(None, None, xstep)
        if self.channels == "first":
            index: tuple[Any, ...] = (*self.prefix, slice(None), rows, cols)
        else:
            index = (*self.prefix, rows, cols)
            if self.drop_last:
                index = (*index, 0)
        try:
            block = np.asarray(self.array[index])
        except Exception as exc:  # backends raise their own types (TiffFileError, OSError, zarr errors, ...)
            raise InputError(
                f"{self.spec}: reading rows {y0}:{y1} failed, the file may be truncated or corrupt "
                f"({exc.__class__.__name__}: {exc})"
            ) from None
        if self.channels == "first":
            block = np.moveaxis(block, 0, -1)
        return block

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):  # closing a reader must not hide the error that led here
                closer()
        self.closers.clear()


def split_spec(spec: str) -> tuple[Path, str]:
    """``file.h5:/a/b`` -> (``file.h5``, ``/a/b``); a path that exists as given has no key."""
    if os.path.exists(spec):
        return Path(spec), ""
    m = _KEYED_SPEC.match(spec)
    if m:
        return Path(m.group("path")), m.group("key") or ""
    return Path(spec), ""


def open_source(spec: str, what: str) -> Source:
    """Open the input ``spec`` (``what`` names its role, e.g. ``image``) lazily and work out its layout."""
    path, key = split_spec(spec)
    name = path.name.lower()
    if not path.exists():
        raise InputError(f"{what} file {spec} does not exist")
    if name.endswith(TIFF_SUFFIXES):
        if key:
            raise InputError(f"{what} {spec}: a TIFF takes no ':key'; {FORMATS_HELP}")
        source = _open_tiff(spec, path)
    elif name.endswith(HDF5_SUFFIXES):
        source = _open_hdf5(spec, path, key)
    elif name.endswith(ZARR_SUFFIXES) or any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
        source = _open_zarr(spec, path, key)
    else:
        raise InputError(f"{what} {spec}: unsupported input format {path.suffix or '(no suffix)'!r}; {FORMATS_HELP}")
    try:
        _layout(source)
    except InputError:
        source.close()
        raise
    return source


def _layout(src: Source) -> None:
    """Drop size-1 leading / trailing axes and find a channel axis of 3 or 4 (set on ``src``)."""
    shape = src.raw_shape
    lead = 0
    while len(shape) - lead > 2 and shape[lead] == 1:
        lead += 1
    core = shape[lead:]
    src.prefix = (0,) * lead
    if len(core) > 2 and core[-1] == 1:
        src.drop_last = True
        core = core[:-1]
    if len(core) == 3:
        if core[-1] in (3, 4):
            src.channels = "last"
        elif core[0] in (3, 4):
            src.channels = "first"
    if any(n == 0 for n in shape):
        raise InputError(f"{src.describe()}: the array is empty")


def _open_tiff(spec: str, path: Path) -> Source:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # TiffFileError, struct.error on a truncated header, OSError
        raise InputError(
            f"{spec}: not a readable TIFF file, it may be truncated or corrupt ({exc.__class__.__name__}: {exc})"
        ) from None
    try:
        series_list = tif.series
        if not series_list:
            raise InputError(f"{spec}: the TIFF holds no image")
        series = series_list[0]
        level0 = series.levels[0] if series.levels else series
        pages = [p for p in level0.pages if p is not None]
        shape = tuple(int(n) for n in level0.shape)
        if len(pages) > 1:
            raise InputError(
                f"{spec}: multi-page TIFF holding {len(pages)} images (shape {shape}, axes {level0.axes}); "
                "only a single image or a pyramid (levels as sub-IFDs or reduced-resolution pages) is supported"
            )
        hw = _tiff_hw(level0.axes, shape)
        for other in series_list[1:]:
            other_hw = _tiff_hw(other.axes, tuple(int(n) for n in other.shape))
            if other_hw[0] >= hw[0] or other_hw[1] >= hw[1] or len(other.pages) > 1:
                raise InputError(
                    f"{spec}: multi-page TIFF with {len(series_list)} images of shapes "
                    f"{[tuple(s.shape) for s in series_list]}; only a single image or a pyramid is supported"
                )
        if len(series_list) > 1:
            log.info(
                "%s: using the first of %d images (the others are smaller: thumbnails or labels)",
                spec,
                len(series_list),
            )
        if series.levels and len(series.levels) > 1:
            log.info("%s: pyramid with %d levels; importing level 0 %s", spec, len(series.levels), shape)
        page = pages[0]
        _check_tiff_extent(spec, path, page)
        _check_tiff_codecs(spec, page)
        array: Any = None
        closers: list[Callable[[], None]] = [tif.close]
        if page.is_memmappable:
            with contextlib.suppress(ValueError):  # tifffile refuses some layouts; the zarr path reads those
                array = tifffile.memmap(path, series=0, level=0, mode="r")
        if array is None:
            store = tif.aszarr(series=0, level=0)
            closers.insert(0, store.close)
            array = zarr.open_array(store, mode="r")
            segment = int(np.prod(array.chunks)) * array.dtype.itemsize
            if segment > LARGE_SEGMENT_BYTES:
                log.warning(
                    "%s: stored in strips/tiles of %.0f MiB, each decoded whole (re-save it tiled to bound memory)",
                    spec,
                    segment / 2**20,
                )
    except InputError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise InputError(
            f"{spec}: cannot read the TIFF structure, it may be truncated or corrupt ({exc.__class__.__name__}: {exc})"
        ) from None
    return Source(spec, array, tuple(int(n) for n in array.shape), np.dtype(array.dtype), closers=closers)


def _tiff_hw(axes: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if "Y" in axes and "X" in axes and len(axes) == len(shape):
        return shape[axes.index("Y")], shape[axes.index("X")]
    return (shape[-2], shape[-1]) if len(shape) >= 2 else (0, 0)


def _check_tiff_extent(spec: str, path: Path, page: Any) -> None:
    """Refuse a TIFF whose strips/tiles reach past the end of the file (truncated copy or download)."""
    size = path.stat().st_size
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.size and counts.size == offsets.size:
        end = offsets + counts
        bad = np.flatnonzero(end > size)
        if bad.size:
            raise InputError(
                f"{spec}: the file is truncated: {bad.size} of {offsets.size} strips/tiles end past its "
                f"end (byte {int(end.max())}, file size {size})"
            )


def _check_tiff_codecs(spec: str, page: Any) -> None:
    """Refuse up front a compression or predictor this installation cannot decode (JPEG, LZW, JPEG 2000, ...)."""
    from tifffile import TIFF

    for table, value, what in (
        (TIFF.DECOMPRESSORS, page.compression, "compression"),
        (TIFF.PREDICTORS, page.predictor, "predictor"),
    ):
        try:
            table[value]
        except KeyError:
            name = getattr(value, "name", str(value))
            raise InputError(
                f"{spec}: TIFF {what} {name} cannot be decoded here: it needs the 'imagecodecs' package "
                "(install it, or re-save the image uncompressed or zlib/deflate compressed)"
            ) from None


def _list_hdf5_datasets(group: Any, limit: int = 30) -> list[str]:
    import h5py

    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append(str(obj.name))  # absolute path, also when ``group`` is not the root

    group.visititems(visit)
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def _open_hdf5(spec: str, path: Path, key: str) -> Source:
    import h5py
    import hdf5plugin  # noqa: F401  registers the blosc/zstd filters; compressed datasets fail to read without it

    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # OSError for a corrupt or truncated file
        raise InputError(f"{spec}: not a readable HDF5 file ({exc.__class__.__name__}: {exc})") from None
    try:
        datasets = _list_hdf5_datasets(f)
        if not key:
            if len(datasets) != 1:
                raise InputError(
                    f"{spec}: the HDF5 file holds {len(datasets)} datasets; name one as {path}:/path/to/dataset "
                    f"(available: {', '.join(datasets) or 'none'})"
                )
            key = datasets[0]
        if key not in f:
            raise InputError(
                f"{spec}: no dataset {key!r} in {path} (available datasets: {', '.join(datasets) or 'none'})"
            )
        ds = f[key]
        if not isinstance(ds, h5py.Dataset):
            inside = _list_hdf5_datasets(ds)
            raise InputError(
                f"{spec}: {key!r} is a group, not a dataset (datasets in it: {', '.join(inside) or 'none'})"
            )
        shape = tuple(int(n) for n in (ds.shape or ()))
        dtype = np.dtype(ds.dtype)
    except InputError:
        f.close()
        raise
    except Exception as exc:
        f.close()
        raise InputError(f"{spec}: cannot read the HDF5 file ({exc.__class__.__name__}: {exc})") from None
    return Source(spec, ds, shape, dtype, closers=[f.close])


def _zarr_level0(group: Any) -> str | None:
    """Path of the full-resolution array of an OME-Zarr multiscale group (NGFF 0.4 or 0.5), else None."""
    attrs = dict(group.attrs)
    multiscales: Any = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    try:
        return str(multiscales[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return None


def _open_zarr(spec: str, path: Path, key: str) -> Source:
    import zarr

    try:
        node: Any = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises its own error types for a folder that is no zarr store
        raise InputError(f"{spec}: not a readable zarr array or group ({exc.__class__.__name__}: {exc})") from None
    try:
        if isinstance(node, zarr.Group):
            arrays = sorted(name for name, obj in node.members(max_depth=None) if isinstance(obj, zarr.Array))
            if not key:
                key = _zarr_level0(node) or ""
                if key:
                    log.info("%s: OME-Zarr multiscale group; importing level 0 %r", spec, key)
                elif len(arrays) == 1:
                    key = arrays[0]
                else:
                    raise InputError(
                        f"{spec}: the zarr group holds {len(arrays)} arrays; name one as {path}:array/in/group "
                        f"(available: {', '.join(arrays) or 'none'})"
                    )
            key = key.strip("/")
            if key not in arrays:
                raise InputError(
                    f"{spec}: no array {key!r} in {path} (available arrays: {', '.join(arrays) or 'none'})"
                )
            node = node[key]
        elif key:
            raise InputError(f"{spec}: {path} is a zarr array, not a group; drop ':{key}'")
        shape = tuple(int(n) for n in node.shape)
        dtype = np.dtype(node.dtype)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{spec}: cannot read the zarr store ({exc.__class__.__name__}: {exc})") from None
    return Source(spec, node, shape, dtype)


# ---------------------------------------------------------------------------------------------------------
# Conversions


@dataclass(frozen=True)
class ImageConversion:
    """How one image band becomes uint8 (see the module docstring for the rules)."""

    kind: str
    """``copy`` (uint8), ``uint16-percentile``, ``float-unit`` or ``rgb-luma``."""
    lo: float = 0.0
    hi: float = 255.0

    def to_attrs(self) -> dict[str, Any]:
        return {"rule": self.kind, "lo": self.lo, "hi": self.hi}


def _band_ranges(height: int, band_rows: int) -> list[tuple[int, int]]:
    return [(y0, min(y0 + band_rows, height)) for y0 in range(0, height, band_rows)]


def image_kind(src: Source) -> str:
    """Which conversion rule applies to the image ``src`` (checks shape and dtype; reads no pixels)."""
    shape, dt = src.shape, src.dtype
    if len(shape) == 3 and src.channels is not None:
        if dt == np.uint8:
            return "rgb-luma"
        raise InputError(f"image {src.describe()}: a colour image must be uint8; {IMAGE_ALLOWED}")
    if len(shape) != 2:
        raise InputError(f"image {src.describe()}: unsupported shape; {IMAGE_ALLOWED}")
    if dt == np.uint8:
        return "copy"
    if dt.kind == "f":
        return "float-unit"
    if dt.kind == "u" and dt.itemsize == 2:
        return "uint16-percentile"
    raise InputError(f"image {src.describe()}: unsupported dtype {dt}; {IMAGE_ALLOWED}")


def image_conversion(src: Source, band_rows: int) -> ImageConversion:
    """Decide how ``src`` becomes uint8; for uint16, estimate the percentiles from a subsample."""
    kind = image_kind(src)
    if kind == "float-unit":
        return ImageConversion(kind, 0.0, 1.0)
    if kind == "uint16-percentile":
        lo, hi = _uint16_percentiles(src, band_rows)
        log.info("image %s: uint16 mapped to uint8 by [%g, %g] -> [0, 255]", src.spec, lo, hi)
        return ImageConversion(kind, lo, hi)
    return ImageConversion(kind)


def _uint16_percentiles(src: Source, band_rows: int) -> tuple[float, float]:
    """The :data:`UINT16_PERCENTILES` of a subsample (inverted-CDF definition, from a 65536-bin histogram)."""
    h, w = src.hw
    bands = _band_ranges(h, band_rows)
    picks = sorted(set(np.linspace(0, len(bands) - 1, min(SAMPLE_BANDS, len(bands))).round().astype(int).tolist()))
    rows_read = sum(bands[i][1] - bands[i][0] for i in picks)
    step = max(1, math.ceil(math.sqrt(rows_read * w / SAMPLE_PIXELS)))
    counts = np.zeros(1 << 16, dtype=np.int64)
    for i in picks:
        y0, y1 = bands[i]
        sample = src.read_rows(y0, y1, xstep=step)[::step]
        counts += np.bincount(sample.astype(np.uint16, copy=False).ravel(), minlength=1 << 16)
    cdf = np.cumsum(counts)
    lo, hi = (float(np.searchsorted(cdf, q / 100.0 * cdf[-1])) for q in UINT16_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0  # a (nearly) constant image: map its value to 0 rather than divide by zero
    return lo, hi


def convert_image_band(band: np.ndarray, conv: ImageConversion, src: Source, y0: int) -> np.ndarray:
    """One band of the image as uint8 (h x W); float work happens in place in one float32 buffer."""
    if conv.kind == "copy":
        return band
    if conv.kind == "uint16-percentile":
        f = band.astype(np.float32)
        f -= np.float32(conv.lo)
        f *= np.float32(255.0 / (conv.hi - conv.lo))
    elif conv.kind == "float-unit":
        f = band.astype(np.float32)
        ok = (f >= 0) & (f <= 1)  # False for NaN as well
        if not ok.all():
            yy, xx = np.unravel_index(int(np.argmin(ok)), ok.shape)
            raise InputError(
                f"image {src.spec}: float images must hold finite values in [0, 1]; pixel ({y0 + yy}, {xx}) is "
                f"{band[yy, xx]!r} (rescale it, or save it as uint8/uint16)"
            )
        del ok
        f *= np.float32(255.0)
    elif conv.kind == "rgb-luma":
        f = np.multiply(band[..., 0], np.float32(LUMA_WEIGHTS[0]), dtype=np.float32)
        tmp = np.empty_like(f)
        for channel in (1, 2):
            np.multiply(band[..., channel], np.float32(LUMA_WEIGHTS[channel]), out=tmp, dtype=np.float32)
            f += tmp
        del tmp
    else:
        raise ValueError(f"unknown image conversion {conv.kind!r}")  # a bug in this module, not user input
    np.rint(f, out=f)
    np.clip(f, 0, 255, out=f)
    return f.astype(np.uint8)


def _check_same_hw(src: Source, what: str, image: Source) -> None:
    if src.hw != image.hw:
        raise InputError(
            f"{what} {src.describe()}: height x width {src.hw[0]} x {src.hw[1]} differs from the image "
            f"{image.spec} ({image.hw[0]} x {image.hw[1]})"
        )


def check_labels(src: Source, image: Source) -> None:
    if len(src.shape) != 2 or src.dtype.kind not in "iu":
        raise InputError(f"labels {src.describe()}: need an integer H x W label image (ids 0..65535)")
    _check_same_hw(src, "labels", image)


def scan_labels(src: Source, band_rows: int) -> set[int]:
    """Check every label id fits uint16 and return the ids present (band by band)."""
    present = np.zeros(1 << 16, dtype=bool)
    needs_range = not (src.dtype.kind == "u" and src.dtype.itemsize <= 2)
    for y0, y1 in _band_ranges(src.hw[0], band_rows):
        band = src.read_rows(y0, y1)
        if needs_range and band.size:
            lo, hi = int(band.min()), int(band.max())
            if lo < 0 or hi > 65535:
                bad = lo if lo < 0 else hi
                raise InputError(
                    f"labels {src.spec}: id {bad} in rows {y0}:{y1} does not fit uint16 (ids must be 0..65535)"
                )
        present |= np.bincount(band.astype(np.uint16, copy=False).ravel(), minlength=1 << 16) > 0
    return {int(i) for i in np.flatnonzero(present)}


def check_coords(src: Source, image: Source) -> None:
    if len(src.shape) != 3 or src.shape[2] != 3 or src.dtype.kind != "f":
        raise InputError(f"coords {src.describe()}: need a float coordinate map H x W x 3 or 3 x H x W (mm)")
    _check_same_hw(src, "coords", image)


def check_depth(src: Source, image: Source) -> None:
    if len(src.shape) != 2 or src.dtype.kind != "f":
        raise InputError(f"depth {src.describe()}: need a float H x W depth map (NaN outside the cortex)")
    _check_same_hw(src, "depth", image)


def build_label_table(names: dict[int, str], found: set[int] | None) -> dict[int, str]:
    """Label table for the store (rule in the module docstring); ``found`` is None without a label image."""
    if found is None:
        return dict(sorted(names.items()))
    table = {BACKGROUND_ID: "background", WHITE_MATTER_ID: "white_matter", **names}
    unnamed = sorted(found - set(table))
    if unnamed:
        shown = ", ".join(map(str, unnamed[:20])) + (" ..." if len(unnamed) > 20 else "")
        log.warning("labels: %d ids have no name in importer.label_names; named area_<id>: %s", len(unnamed), shown)
    table.update({i: f"area_{i}" for i in unnamed})
    return dict(sorted(table.items()))


# ---------------------------------------------------------------------------------------------------------
# Entry point


def import_section(cfg: Config, out: Path, *, overwrite: bool) -> Path:
    """Import ``cfg.importer``'s files into ``out/<brain>/<section store>``; returns the store path."""
    imp, store_cfg = cfg.importer, cfg.sections
    if not imp.image:
        raise ConfigError("importer.image is empty: give the section image, e.g. importer.image=scan.ome.tif")
    bad_ids = [i for i in imp.label_names if not 0 <= i <= 65535]
    if bad_ids:
        raise ConfigError(f"importer.label_names has ids {bad_ids} outside 0..65535 (labels are stored as uint16)")
    out = Path(out)
    target = out / imp.brain / section_filename(imp.brain, imp.section_index, store_cfg.backend)
    started = time.perf_counter()
    band_rows = store_cfg.chunk_px
    with contextlib.ExitStack() as stack:
        sources: dict[str, Source] = {}
        for layer in ("image", "labels", "depth", "coords"):
            spec = getattr(imp, layer)
            if spec:
                sources[layer] = open_source(spec, layer)
                stack.callback(sources[layer].close)
        image = sources["image"]
        image_kind(image)
        if "labels" in sources:
            check_labels(sources["labels"], image)
        if "coords" in sources:
            check_coords(sources["coords"], image)
        if "depth" in sources:
            check_depth(sources["depth"], image)
        # Inputs first (opening them reads headers only), then the output, then the passes that read data.
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it")
        # The same section in the other backend would be listed twice by list_sections.
        others = [p for p in _other_backend_stores(target) if p.exists()]
        if others and not overwrite:
            raise OutputExistsError(
                f"{others[0]} already holds section {imp.section_index} of brain {imp.brain} (another backend); "
                "pass --overwrite to replace it"
            )
        conversion = image_conversion(image, band_rows)
        h, w = image.hw
        found = scan_labels(sources["labels"], band_rows) if "labels" in sources else None
        meta = SectionMeta(
            brain=imp.brain,
            section_index=imp.section_index,
            z_mm=imp.z_mm,
            pixel_size_um=imp.pixel_size_um,
            shape=(h, w),
            label_table=build_label_table(imp.label_names, found),
            seed=None,
            source=_absolute(imp.image),
            extra={
                "config": config_to_dict(cfg),
                "sources": {layer: _absolute(src.spec) for layer, src in sources.items()},
                "image_conversion": conversion.to_attrs(),
            },
        )
        log.info("import: %s (%d x %d %s, %s) -> %s", image.spec, h, w, image.dtype, conversion.kind, target)
        layers = tuple(layer for layer in ("image", "labels", "depth", "coords") if layer in sources)
        with create_section(
            target,
            meta,
            layers=layers,
            chunk_px=store_cfg.chunk_px,
            compression=store_cfg.compression,
            overwrite=overwrite,
            image_levels=store_cfg.image_levels,
        ) as writer:
            for layer in layers:
                _copy_layer(writer, layer, sources[layer], conversion, band_rows)
        for other in others:
            log.warning("import: removing %s, the previous store of this section in another backend", other)
            if other.is_dir():
                shutil.rmtree(other)
            else:
                other.unlink()
    save_config(cfg, out, name=f"{target.name.rsplit('.', 1)[0]}.import.yaml")
    log.info("import: wrote %s (%s) in %.1f s", target, ", ".join(layers), time.perf_counter() - started)
    return target


def _copy_layer(writer: SectionWriter, layer: str, src: Source, conversion: ImageConversion, band_rows: int) -> None:
    """Copy one layer band by band (``band_rows`` full-width rows: whole chunk rows of the output)."""
    depth_range = [math.inf, -math.inf]
    for y0, y1 in _band_ranges(src.hw[0], band_rows):
        band = src.read_rows(y0, y1)
        if layer == "image":
            band = convert_image_band(band, conversion, src, y0)
        elif layer == "labels":
            band = band.astype(np.uint16, copy=False)  # ids were range-checked by scan_labels
        elif layer == "depth":
            band = band.astype(np.float32, copy=False)
            if np.isfinite(band).any():
                depth_range[0] = min(depth_range[0], float(np.nanmin(band)))
                depth_range[1] = max(depth_range[1], float(np.nanmax(band)))
        else:
            band = band.astype(np.float32, copy=False)
        writer.write(layer, y0, 0, band)
        log.debug("import: %s rows %d:%d written", layer, y0, y1)
    if layer == "depth" and (depth_range[0] < 0 or depth_range[1] > 1):
        log.warning(
            "depth %s: values span [%g, %g], outside the expected 0 (pial surface) .. 1 (white matter)",
            src.spec,
            depth_range[0],
            depth_range[1],
        )


def _other_backend_stores(target: Path) -> list[Path]:
    """Paths the same section would have as a store of another backend (``.zarr`` / ``.h5`` / ``.hdf5``)."""
    stem = target.name.rsplit(".", 1)[0]
    return [target.with_name(stem + suffix) for suffix in BACKEND_OF_SUFFIX if stem + suffix != target.name]


def _absolute(spec: str) -> str:
    path, key = split_spec(spec)
    return str(path.resolve()) + (f":{key}" if key else "")
