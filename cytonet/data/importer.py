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
- zarr (v2 or v3): ``path.zarr`` (an array, an OME-Zarr multiscale group whose level 0 is taken, the first
  image of a bioformats2raw layout, or a group holding exactly one array) or ``path.zarr:array/in/group``.

Axes: an OME-Zarr array's axes come from its multiscale metadata (``t``, ``c``, ``z``, ``y``, ``x``; a 5-D array
without it is read as ``t, c, z, y, x``): ``y`` and ``x`` are the image, a ``c`` axis of size > 1 the channels,
and every other axis must have size 1 (one plane). Other arrays: size-1 leading axes are dropped
(``1 x H x W``), as is a size-1 last axis, and a first or last axis of 3 or 4 is the channel axis.

Pixel size: ``importer.pixel_size_um`` null (the default) takes the one the image file states; a value given
there must agree with it (within :data:`PIXEL_SIZE_RTOL`), else the import is refused naming both. Either must
lie in :data:`~cytonet.data.sections.PIXEL_SIZE_RANGE_UM` (0.01-1000 µm), which every reader of section stores
requires (as ``importer.z_mm`` must lie within ``COORDS_MAX_MM`` of the origin). Read from:
OME-TIFF ``PhysicalSizeX/Y`` (``PhysicalSizeX/YUnit``, default µm), an ImageJ TIFF's calibration (``unit`` and
``XResolution/YResolution``), OME-Zarr ``coordinateTransformations`` scale of the dataset imported (with the
axes' ``unit``; a scale without a unit is no pixel size), a ``pixel_size_um`` attribute of an HDF5 dataset or
zarr array, or of the group of a cytonet section store when the array is its full-resolution layer. Plain TIFF
``XResolution/ResolutionUnit`` tags are ignored: writers fill them with placeholders (72 dpi, or libvips' 10
pixels per cm) that cannot be told from real values. A file stating none needs ``importer.pixel_size_um``; a
file stating different X and Y sizes (anisotropic pixels) is refused. Labels, depth or coordinates files that
state a pixel size must agree with the image's.

Layers and conversions:

- ``image`` -> uint8. uint8 is copied as is. uint16 is mapped linearly so that the 0.1th percentile becomes 0
  and the 99.9th percentile 255 (rounded, clipped); the percentiles (inverted-CDF definition) come from a
  subsample (at most :data:`SAMPLE_BANDS` bands of rows spread evenly over the image, strided to at most about
  :data:`SAMPLE_PIXELS` values) and are recorded in the store's ``extra.image_conversion`` attribute. A float
  image must hold finite values in [0, 1], mapped to ``round(255 x)``. RGB / RGBA uint8 (``H x W x 3|4`` or
  ``3|4 x H x W``) becomes grey ``round(0.299 R + 0.587 G + 0.114 B)`` (ITU-R BT.601 luma); alpha is ignored.
  TIFF photometric interpretations: min-is-black and RGB as above (JPEG-compressed YCbCr is decoded to RGB);
  a min-is-white unsigned integer image is inverted first (``2**bits - 1 - v``, recorded as ``inverted_max``;
  a float one is refused); a palette image becomes the grey of its colour map (``palette-grey`` when R = G = B,
  else ``palette-luma``, the luma of each colour); CMYK (SEPARATED), CIE L*a*b*, undecoded YCbCr and the rest
  are refused. Labels, depth and coordinates are values, not intensities: their photometric is not applied.
  Anything else is refused with an :class:`~cytonet.errors.InputError`.
- ``labels`` (optional): any integer dtype with ids in 0..65535 -> uint16, same H x W as the image. An image
  where more than half of the horizontally neighbouring pixels differ is refused (:data:`LABEL_CHANGE_MAX`):
  areas are regions, so that is an intensity image given as labels.
- ``coords`` (optional): float, ``H x W x 3`` or ``3 x H x W``, mm (or µm with ``importer.coords_unit=um``,
  divided by 1000) -> float32 ``H x W x 3`` in mm; NaN where a pixel has no coordinate. A map with a finite value
  farther than :data:`~cytonet.data.sections.COORDS_MAX_MM` from the origin is refused (no brain is that large:
  the map is in another unit), and so is one with an infinite value (also a value too large for float32); a
  subsample is checked before the store is created, every value while copying.
- ``depth`` (optional): float ``H x W`` -> float32, the normalised cortical depth: 0 at the pial surface, 1 at the
  white-matter border, NaN outside the cortex. Values within :data:`DEPTH_SLACK` past either end are rounding,
  clipped to [0, 1]; any other value (below, above, infinite) is refused, naming the file and the pixel; checked
  like the coordinates.

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

Bad inputs (missing, truncated or corrupt files, unknown dataset keys, unsupported formats, dtypes, shapes or
photometric interpretations, shape mismatches, pixel sizes missing or disagreeing) raise
:class:`~cytonet.errors.InputError` naming the file; an existing output store raises
:class:`~cytonet.errors.OutputExistsError` unless ``overwrite`` is set, as does an output folder (or its brain
folder) that exists as a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytonet.config import Config, config_to_dict, save_config
from cytonet.data.patches import library_error
from cytonet.data.sections import (
    BACKEND_OF_SUFFIX,
    BACKGROUND_ID,
    COORDS_MAX_MM,
    PIXEL_SIZE_RANGE_UM,
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
#: Relative difference within which two pixel sizes agree (file vs config, X vs Y): float32 and decimal
#: rounding of stated sizes stay far below it; 0.1% over a 20000 px section is 20 px.
PIXEL_SIZE_RTOL = 1e-3
#: Micrometres per unit of length, by the names OME-XML (UnitsLength), OME-Zarr (UDUNITS-2) and ImageJ use.
UM_PER_UNIT = {
    "m": 1e6,
    "meter": 1e6,
    "dm": 1e5,
    "decimeter": 1e5,
    "cm": 1e4,
    "centimeter": 1e4,
    "mm": 1e3,
    "millimeter": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "micrometer": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "pm": 1e-6,
    "picometer": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "in": 25400.0,
    "inch": 25400.0,
    "thou": 25.4,
}
#: Units that say "no physical size" (an uncalibrated image), not a length one could convert.
NO_LENGTH_UNITS = ("", "pixel", "pixels", "px", "reference frame")
#: TIFF photometric interpretations of an image that are imported (others are refused).
IMAGE_PHOTOMETRICS = ("MINISBLACK", "RGB", "MINISWHITE", "PALETTE")
#: JPEG compressions whose YCbCr data tifffile decodes to RGB.
JPEG_COMPRESSIONS = (6, 7, 33007, 34892)

_KEYED_SPEC = re.compile(r"^(?P<path>.+?\.(?:h5|hdf5|hdf|he5|zarr))(?::(?P<key>.*))?$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------
# Opening sources


@dataclass(frozen=True)
class StatedPixelSize:
    """A pixel size an input file states, in µm, and where in the file it was found."""

    y_um: float
    x_um: float
    origin: str
    """e.g. ``OME-XML PhysicalSizeX/Y``, for messages and the store's ``extra.pixel_size_source``."""

    def describe(self) -> str:
        if math.isclose(self.y_um, self.x_um, rel_tol=PIXEL_SIZE_RTOL):
            return f"{self.x_um:g} µm ({self.origin})"
        return f"{self.x_um:g} µm in x and {self.y_um:g} µm in y ({self.origin})"


@dataclass
class Source:
    """One input array, seen as ``H x W`` or ``H x W x C``, readable in bands of rows.

    ``array`` is any lazily sliceable array (zarr.Array, h5py.Dataset, numpy.memmap). ``roles`` (set by
    :func:`_layout`) says what each of its axes is: ``y``, ``x``, ``c`` (channels), ``""`` (a size-1 axis indexed
    away) or ``"?"`` (an axis of an array whose layout is not understood: the layer checks refuse such arrays
    before anything is read).
    """

    spec: str
    """The input as the user gave it (used in every error message)."""
    array: Any
    raw_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    axis_names: tuple[str, ...] | None = None
    """Names the file gives the axes (OME-Zarr ``t``, ``c``, ``z``, ``y``, ``x``), if it names them."""
    roles: tuple[str, ...] = ()
    pixel_size: StatedPixelSize | None = None
    """The pixel size the file states, if any."""
    pixel_size_note: str = ""
    """Why a pixel size found in the file is unusable (a unit that is no length, a scale without a unit)."""
    photometric: str = ""
    """TIFF PhotometricInterpretation name (``MINISBLACK``, ``PALETTE``, ...); empty for other formats."""
    colormap: np.ndarray | None = None
    """TIFF palette, ``3 x 2**bits`` uint16, of a ``PALETTE`` image."""
    bits_per_sample: int = 0
    invert_max: int | None = None
    """Set for a min-is-white image: every value ``v`` is read as ``invert_max - v``."""
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """Canonical shape: ``(H, W)`` or ``(H, W, C)`` (the kept axes in file order if not understood)."""
        sizes = dict(zip(self.roles, self.raw_shape, strict=True))
        if "y" in sizes and "x" in sizes:
            hw = (sizes["y"], sizes["x"])
            return (*hw, sizes["c"]) if "c" in sizes else hw
        return tuple(n for role, n in zip(self.roles, self.raw_shape, strict=True) if role)

    @property
    def hw(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    def describe(self) -> str:
        return f"{self.spec} (dtype {self.dtype}, shape {'x'.join(map(str, self.raw_shape))})"

    def read_rows(self, y0: int, y1: int, xstep: int = 1) -> np.ndarray:
        """Rows ``y0:y1`` (every ``xstep``-th column) as ``h x W`` or ``h x W x C``; only those rows are read."""
        rows, cols = slice(y0, y1), slice(None, None, xstep)
        picks = {"y": rows, "x": cols, "": 0}
        index = tuple(picks.get(role, slice(None)) for role in self.roles)
        try:
            block = np.asarray(self.array[index])
        except Exception as exc:  # backends raise their own types (TiffFileError, OSError, zarr errors, ...)
            raise InputError(
                f"{self.spec}: reading rows {y0}:{y1} failed, the file may be truncated or corrupt "
                f"({library_error(exc)})"
            ) from None
        kept = [role for role in self.roles if role]
        order = [kept.index(role) for role in ("y", "x", "c") if role in kept]
        if order != sorted(order):
            block = np.transpose(block, order)
        if self.invert_max is not None:
            if self.invert_max < np.iinfo(block.dtype).max:
                block = np.minimum(block, self.invert_max)  # values above 2**bits - 1 would wrap around
            block = np.subtract(self.invert_max, block, dtype=block.dtype)
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
        if what == "image":
            _image_photometric(source)
    except InputError:
        source.close()
        raise
    return source


def _layout(src: Source) -> None:
    """Set ``src.roles``: from the file's axis names, else the OME-Zarr 5-D convention, else the shape."""
    shape = src.raw_shape
    if any(n == 0 for n in shape):
        raise InputError(f"{src.describe()}: the array is empty")
    roles = _roles_from_names(src) if src.axis_names is not None else None
    if roles is None and len(shape) == 5 and shape[0] == 1 and shape[2] == 1:
        roles = ("", "c" if shape[1] > 1 else "", "", "y", "x")  # OME-Zarr's t, c, z, y, x
    src.roles = roles if roles is not None else _roles_from_shape(shape)


def _roles_from_names(src: Source) -> tuple[str, ...] | None:
    """Roles from named axes: ``y``/``x`` are the image, ``c`` the channels, any other axis must have size 1."""
    names, shape = src.axis_names or (), src.raw_shape
    if len(names) != len(shape) or len(set(names)) != len(names) or "y" not in names or "x" not in names:
        log.info("%s: axes %s do not fit shape %s or lack y and x; ignoring them", src.spec, names, shape)
        return None
    roles = []
    for name, n in zip(names, shape, strict=True):
        if name in ("y", "x"):
            roles.append(name)
        elif n == 1:
            roles.append("")
        elif name == "c":
            roles.append("c")
        else:
            raise InputError(
                f"{src.describe()}: axis {name!r} (of axes {', '.join(names)}) has size {n}; only one plane is "
                "supported: every axis other than y, x and c must have size 1"
            )
    return tuple(roles)


def _roles_from_shape(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Roles from the shape alone: size-1 leading and last axes dropped, a channel axis of 3 or 4 first or last."""
    lead = 0
    while len(shape) - lead > 2 and shape[lead] == 1:
        lead += 1
    core = shape[lead:]
    trail = len(core) > 2 and core[-1] == 1
    if trail:
        core = core[:-1]
    body: tuple[str, ...]
    if len(core) == 2:
        body = ("y", "x")
    elif len(core) == 3 and core[-1] in (3, 4):
        body = ("y", "x", "c")
    elif len(core) == 3 and core[0] in (3, 4):
        body = ("c", "y", "x")
    else:
        body = ("?",) * len(core)
    return ("",) * lead + body + (("",) if trail else ())


def _image_photometric(src: Source) -> None:
    """Check a TIFF image's photometric interpretation; set up the inversion of a min-is-white one."""
    photometric = src.photometric
    if not photometric:  # not a TIFF
        return
    if photometric not in IMAGE_PHOTOMETRICS:
        raise InputError(
            f"image {src.describe()}: TIFF photometric interpretation {photometric} is not supported "
            f"(supported: {', '.join(IMAGE_PHOTOMETRICS)}, and JPEG-compressed YCBCR); save the image as "
            "greyscale or RGB"
        )
    if photometric == "MINISWHITE":
        if src.dtype.kind == "f":
            raise InputError(
                f"image {src.describe()}: TIFF photometric MINISWHITE (0 is white) on a float image is not "
                "supported; save it as min-is-black (1 - v) or as integers"
            )
        if src.dtype.kind == "u":
            bits = src.bits_per_sample if 0 < src.bits_per_sample <= 8 * src.dtype.itemsize else 8 * src.dtype.itemsize
            src.invert_max = (1 << bits) - 1
            log.info("image %s: TIFF photometric MINISWHITE; values inverted (%d - v)", src.spec, src.invert_max)


def _open_tiff(spec: str, path: Path) -> Source:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # TiffFileError, struct.error on a truncated header, OSError
        raise InputError(
            f"{spec}: not a readable TIFF file, it may be truncated or corrupt ({library_error(exc)})"
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
        keyframe: Any = page.keyframe  # the page itself, or the page whose tags a TiffFrame shares
        photometric = str(getattr(keyframe.photometric, "name", keyframe.photometric))
        if photometric == "YCBCR" and keyframe.compression in JPEG_COMPRESSIONS:
            photometric = "RGB"  # tifffile's JPEG decoder converts YCbCr to RGB
        colormap = None if keyframe.colormap is None else np.asarray(keyframe.colormap)
        pixel_size, note = _tiff_pixel_size(tif, keyframe)
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
            f"{spec}: cannot read the TIFF structure, it may be truncated or corrupt ({library_error(exc)})"
        ) from None
    return Source(
        spec,
        array,
        tuple(int(n) for n in array.shape),
        np.dtype(array.dtype),
        pixel_size=pixel_size,
        pixel_size_note=note,
        photometric=photometric,
        colormap=colormap,
        bits_per_sample=int(keyframe.bitspersample),
        closers=closers,
    )


def _um_per_unit(unit: str) -> float | None:
    """Micrometres per ``unit`` (a name from :data:`UM_PER_UNIT`, any case; ImageJ's escaped µ too)."""
    name = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").replace("\u03bc", "µ").lower()
    return UM_PER_UNIT.get(name)


def _stated_size(y: float, x: float, y_unit: str, x_unit: str, origin: str) -> tuple[StatedPixelSize | None, str]:
    """A pixel size from two values and their units, or None and why it is unusable ("" if none is stated)."""
    if y_unit.strip().lower() in NO_LENGTH_UNITS and x_unit.strip().lower() in NO_LENGTH_UNITS:
        return None, ""
    y_factor, x_factor = _um_per_unit(y_unit), _um_per_unit(x_unit)
    if y_factor is None or x_factor is None:
        unit = y_unit if y_factor is None else x_unit
        return None, f"its {origin} unit {unit!r} is not a length cytonet knows"
    y_um, x_um = y * y_factor, x * x_factor
    if not (math.isfinite(y_um) and math.isfinite(x_um) and y_um > 0 and x_um > 0):
        return None, f"its {origin} ({y} {y_unit}, {x} {x_unit}) is not a positive size"
    return StatedPixelSize(y_um, x_um, origin), ""


def _tiff_pixel_size(tif: Any, page: Any) -> tuple[StatedPixelSize | None, str]:
    """The pixel size an OME-TIFF (OME-XML) or ImageJ TIFF (calibration) states; plain resolution tags are not
    used (see the module docstring)."""
    if tif.is_ome and tif.ome_metadata:
        return _ome_xml_pixel_size(tif.ome_metadata)
    imagej = tif.imagej_metadata or {}
    unit = str(imagej.get("unit", ""))
    if unit.strip().lower() in NO_LENGTH_UNITS:
        return None, ""
    x_res, y_res = page.resolution  # pixels per unit
    if not (x_res > 0 and y_res > 0):
        return None, f"its ImageJ resolution {page.resolution} is not positive"
    return _stated_size(1.0 / y_res, 1.0 / x_res, unit, unit, "ImageJ calibration (unit, XResolution/YResolution)")


def _ome_xml_pixel_size(xml: str) -> tuple[StatedPixelSize | None, str]:
    """``PhysicalSizeX/Y`` of the first image (series 0) of an OME-XML document; the default unit is µm."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return None, f"its OME-XML cannot be parsed ({exc})"
    image = next((el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"), None)
    pixels = None if image is None else next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, ""
    x, y = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
    if x is None and y is None:
        return None, ""
    if x is None or y is None:
        return None, f"its OME-XML states only PhysicalSize{'X' if y is None else 'Y'}"
    try:
        x_value, y_value = float(x), float(y)
    except ValueError:
        return None, f"its OME-XML PhysicalSizeX/Y ({x!r}, {y!r}) are not numbers"
    return _stated_size(
        y_value,
        x_value,
        pixels.get("PhysicalSizeYUnit", "µm"),
        pixels.get("PhysicalSizeXUnit", "µm"),
        "OME-XML PhysicalSizeX/Y",
    )


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
        raise InputError(f"{spec}: not a readable HDF5 file ({library_error(exc)})") from None
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
        pixel_size, note = _attr_pixel_size(dict(ds.attrs), dict(ds.parent.attrs), shape, "HDF5")
    except InputError:
        f.close()
        raise
    except Exception as exc:
        f.close()
        raise InputError(f"{spec}: cannot read the HDF5 file ({library_error(exc)})") from None
    return Source(spec, ds, shape, dtype, pixel_size=pixel_size, pixel_size_note=note, closers=[f.close])


def _attr_value(value: Any) -> Any:
    """An attribute as written: cytonet's HDF5 section stores keep JSON text; bytes and numpy scalars unwrap."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _attr_pixel_size(
    attrs: dict[str, Any], group_attrs: dict[str, Any], shape: tuple[int, ...], fmt: str
) -> tuple[StatedPixelSize | None, str]:
    """A ``pixel_size_um`` attribute of the array, or of the group of a cytonet section store whose ``shape``
    attribute is the array's (its full-resolution layers; its image levels are smaller)."""
    origin = f"{fmt} attribute pixel_size_um"
    value = _attr_value(attrs["pixel_size_um"]) if "pixel_size_um" in attrs else None
    if value is None and "pixel_size_um" in group_attrs and "format_version" in group_attrs:
        store_shape = _attr_value(group_attrs.get("shape"))
        if isinstance(store_shape, list) and [int(n) for n in store_shape] == list(shape[:2]):
            value = _attr_value(group_attrs["pixel_size_um"])
            origin = f"{fmt} section store attribute pixel_size_um"
    if value is None:
        return None, ""
    try:
        um = float(value)
    except (TypeError, ValueError):
        return None, f"its {origin} {value!r} is not a number"
    return _stated_size(um, um, "µm", "µm", origin)


def _multiscales(attrs: dict[str, Any]) -> Any:
    """The OME-Zarr ``multiscales`` list of a group's attributes (NGFF 0.4: top level, 0.5: under ``ome``)."""
    return attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")


def _zarr_level0(group: Any) -> str | None:
    """Path of the full-resolution array of an OME-Zarr multiscale group (NGFF 0.4 or 0.5), else None."""
    try:
        return str(_multiscales(dict(group.attrs))[0]["datasets"][0]["path"])
    except (TypeError, KeyError, IndexError):
        return None


@dataclass
class NgffInfo:
    """What an OME-Zarr multiscale group says about one of its arrays."""

    axis_names: tuple[str, ...] | None = None
    pixel_size: StatedPixelSize | None = None
    note: str = ""


def _ngff_info(group_attrs: dict[str, Any], name: str) -> NgffInfo:
    """Axes and pixel size of the dataset ``name`` of a multiscale group (empty if it is not listed there)."""
    for multiscale in _multiscales(group_attrs) or []:
        try:
            datasets = [d for d in multiscale["datasets"] if str(d["path"]).strip("/") == name]
        except (TypeError, KeyError):
            continue
        if datasets:
            try:
                return _ngff_dataset_info(multiscale, datasets[0])
            except (TypeError, KeyError, ValueError, IndexError) as exc:
                return NgffInfo(note=f"its OME-Zarr multiscales metadata is malformed ({library_error(exc)})")
    return NgffInfo()


def _ngff_dataset_info(multiscale: dict[str, Any], dataset: dict[str, Any]) -> NgffInfo:
    axes = multiscale.get("axes")
    if not axes:
        return NgffInfo()
    names: list[str] = []
    units: list[str] = []
    for axis in axes:
        if isinstance(axis, str):  # NGFF 0.3: plain names
            axis = {"name": axis}
        name, kind = str(axis.get("name", "")).lower(), str(axis.get("type", "")).lower()
        names.append("c" if kind == "channel" and name not in ("y", "x") else name)
        units.append(str(axis.get("unit") or ""))
    info = NgffInfo(axis_names=tuple(names))
    if "y" not in names or "x" not in names:
        return info
    scale = [1.0] * len(names)
    # The dataset's transformations, then the multiscale's own (applied after them).
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for transform in transforms or []:
            if transform.get("type") != "scale":
                continue
            if "scale" not in transform:
                info.note = "its OME-Zarr scale is stored in a separate file (a 'path' transformation)"
                return info
            values = [float(v) for v in transform["scale"]]
            if len(values) != len(names):
                info.note = f"its OME-Zarr scale {values} does not match the axes {names}"
                return info
            scale = [a * b for a, b in zip(scale, values, strict=True)]
    iy, ix = names.index("y"), names.index("x")
    sy, sx, uy, ux = scale[iy], scale[ix], units[iy], units[ix]
    if not uy and not ux:
        if (sy, sx) != (1.0, 1.0):
            info.note = f"its OME-Zarr scale for y, x is ({sy:g}, {sx:g}) but the axes give no unit"
        return info
    if not uy or not ux:
        info.note = f"its OME-Zarr y, x axes give units {uy!r} and {ux!r}"
        return info
    info.pixel_size, info.note = _stated_size(sy, sx, uy, ux, "OME-Zarr multiscales scale")
    return info


def _open_zarr(spec: str, path: Path, key: str) -> Source:
    import zarr

    try:
        node: Any = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises its own error types for a folder that is no zarr store
        raise InputError(f"{spec}: not a readable zarr array or group ({library_error(exc)})") from None
    try:
        parent_attrs: dict[str, Any] = {}
        name = path.name
        if isinstance(node, zarr.Group):
            arrays = sorted(n for n, obj in node.members(max_depth=None) if isinstance(obj, zarr.Array))
            if not key:
                key = _zarr_level0(node) or _bioformats2raw_level0(spec, node) or ""
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
            group_path, _, name = key.rpartition("/")
            parent_attrs = dict((node[group_path] if group_path else node).attrs)
            node = node[key]
        elif key:
            raise InputError(f"{spec}: {path} is a zarr array, not a group; drop ':{key}'")
        elif any((path.parent / m).exists() for m in ("zarr.json", ".zgroup")):
            with contextlib.suppress(Exception):  # the folder above may hold a group (an OME-Zarr level)
                parent_attrs = dict(zarr.open_group(str(path.parent), mode="r").attrs)
        shape = tuple(int(n) for n in node.shape)
        dtype = np.dtype(node.dtype)
        ngff = _ngff_info(parent_attrs, name)
        pixel_size, note = ngff.pixel_size, ngff.note
        if pixel_size is None and not note:
            pixel_size, note = _attr_pixel_size(dict(node.attrs), parent_attrs, shape, "zarr")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{spec}: cannot read the zarr store ({library_error(exc)})") from None
    return Source(spec, node, shape, dtype, axis_names=ngff.axis_names, pixel_size=pixel_size, pixel_size_note=note)


def _bioformats2raw_level0(spec: str, root: Any) -> str | None:
    """Level 0 of the first image of a bioformats2raw layout (a root group of one multiscale group per image)."""
    attrs = dict(root.attrs)
    ome = dict(attrs.get("ome") or {})  # OME-Zarr 0.5 keeps the marker under "ome", 0.4 at the top level
    if "bioformats2raw.layout" not in attrs and "bioformats2raw.layout" not in ome:
        return None
    series = sorted(
        (n for n, obj in root.groups() if _zarr_level0(obj)),
        key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n),
    )
    if not series:
        return None
    if len(series) > 1:
        log.info("%s: bioformats2raw layout with %d images; importing the first, %r", spec, len(series), series[0])
    return f"{series[0]}/{_zarr_level0(root[series[0]])}"


# ---------------------------------------------------------------------------------------------------------
# Conversions


@dataclass(frozen=True)
class ImageConversion:
    """How one image band becomes uint8 (see the module docstring for the rules)."""

    kind: str
    """``copy`` (uint8), ``uint16-percentile``, ``float-unit``, ``rgb-luma``, ``palette-grey`` or
    ``palette-luma``."""
    lo: float = 0.0
    hi: float = 255.0
    inverted_max: int | None = None
    """Set when a min-is-white image was inverted (``inverted_max - v``) before the rule."""
    lut: np.ndarray | None = field(default=None, compare=False, repr=False)
    """uint8 grey of each palette index (``palette-*`` rules)."""

    def to_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"rule": self.kind, "lo": self.lo, "hi": self.hi}
        if self.inverted_max is not None:
            attrs["inverted_max"] = self.inverted_max
        return attrs


def _band_ranges(height: int, band_rows: int) -> list[tuple[int, int]]:
    return [(y0, min(y0 + band_rows, height)) for y0 in range(0, height, band_rows)]


def image_kind(src: Source) -> str:
    """Which conversion rule applies to the image ``src`` (checks shape and dtype; reads no pixels)."""
    shape, dt = src.shape, src.dtype
    if src.photometric == "PALETTE":
        if len(shape) != 2 or dt.kind != "u" or src.colormap is None or np.ndim(src.colormap) != 2:
            raise InputError(f"image {src.describe()}: a TIFF palette image needs H x W indices and a colour map")
        return "palette"
    if len(shape) == 3 and "c" in src.roles and shape[2] in (3, 4):
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
    if kind == "palette":
        return _palette_conversion(src)
    if kind == "float-unit":
        return ImageConversion(kind, 0.0, 1.0)
    if kind == "uint16-percentile":
        lo, hi = _uint16_percentiles(src, band_rows)
        log.info("image %s: uint16 mapped to uint8 by [%g, %g] -> [0, 255]", src.spec, lo, hi)
        return ImageConversion(kind, lo, hi, inverted_max=src.invert_max)
    return ImageConversion(kind, inverted_max=src.invert_max)


def _palette_conversion(src: Source) -> ImageConversion:
    """A palette image's grey per index: the palette itself when it is grey, else the luma of its colours."""
    cmap = np.asarray(src.colormap, dtype=np.float64)
    if cmap.shape[0] != 3:
        raise InputError(f"image {src.describe()}: TIFF colour map of shape {cmap.shape}, expected 3 x N")
    # The TIFF colour map is 16-bit; like libtiff, take one whose values all fit 8 bits as an 8-bit map.
    cmap8 = cmap if cmap.max() < 256 else cmap / 257.0
    if (cmap[0] == cmap[1]).all() and (cmap[1] == cmap[2]).all():
        kind, grey = "palette-grey", cmap8[0]
    else:
        kind, grey = "palette-luma", np.asarray(LUMA_WEIGHTS) @ cmap8
        log.warning("image %s: colour palette converted to grey by its luma (0.299 R + 0.587 G + 0.114 B)", src.spec)
    lut = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return ImageConversion(kind, lut=lut)


def _sample_rows(src: Source, band_rows: int) -> Iterator[np.ndarray]:
    """A subsample of ``src``: at most :data:`SAMPLE_BANDS` bands spread evenly, strided to at most about
    :data:`SAMPLE_PIXELS` pixels."""
    for _, _, sample in _sample_bands(src, band_rows):
        yield sample


def _sample_bands(src: Source, band_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """:func:`_sample_rows` with each band's first row and the stride: sample pixel (i, j) is ``src`` pixel
    (first + i * stride, j * stride)."""
    h, w = src.hw
    bands = _band_ranges(h, band_rows)
    picks = sorted(set(np.linspace(0, len(bands) - 1, min(SAMPLE_BANDS, len(bands))).round().astype(int).tolist()))
    rows_read = sum(bands[i][1] - bands[i][0] for i in picks)
    step = max(1, math.ceil(math.sqrt(rows_read * w / SAMPLE_PIXELS)))
    for i in picks:
        y0, y1 = bands[i]
        yield y0, step, src.read_rows(y0, y1, xstep=step)[::step]


def _uint16_percentiles(src: Source, band_rows: int) -> tuple[float, float]:
    """The :data:`UINT16_PERCENTILES` of a subsample (inverted-CDF definition, from a 65536-bin histogram)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for sample in _sample_rows(src, band_rows):
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
    if conv.lut is not None:
        top = int(band.max()) if band.size else 0
        if top >= conv.lut.size:
            raise InputError(
                f"image {src.spec}: palette index {top} in rows {y0}:{y0 + band.shape[0]} is beyond the "
                f"{conv.lut.size} colours of the TIFF colour map"
            )
        return conv.lut[band]
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


#: Largest share of horizontally neighbouring pixels of a label image that may carry different ids. A label
#: map's areas are regions of one id, so only their borders differ (a few % of the pixels); in a scan, a
#: thumbnail or any intensity image given as labels by mistake, nearly every neighbour differs.
LABEL_CHANGE_MAX = 0.5
#: Fewest neighbour pairs for that test (a tiny image's share says nothing).
LABEL_CHANGE_MIN_PAIRS = 4096


def scan_labels(src: Source, band_rows: int) -> set[int]:
    """Check every label id fits uint16 and that the image is a map of regions (:data:`LABEL_CHANGE_MAX`), and
    return the ids present (band by band)."""
    present = np.zeros(1 << 16, dtype=bool)
    needs_range = not (src.dtype.kind == "u" and src.dtype.itemsize <= 2)
    pairs = changes = 0
    for y0, y1 in _band_ranges(src.hw[0], band_rows):
        band = src.read_rows(y0, y1)
        pairs += band[:, 1:].size
        changes += int(np.count_nonzero(band[:, 1:] != band[:, :-1]))
        if needs_range and band.size:
            lo, hi = int(band.min()), int(band.max())
            if lo < 0 or hi > 65535:
                bad = lo if lo < 0 else hi
                raise InputError(
                    f"labels {src.spec}: id {bad} in rows {y0}:{y1} does not fit uint16 (ids must be 0..65535)"
                )
        present |= np.bincount(band.astype(np.uint16, copy=False).ravel(), minlength=1 << 16) > 0
    if pairs >= LABEL_CHANGE_MIN_PAIRS and changes > LABEL_CHANGE_MAX * pairs:
        raise InputError(
            f"labels {src.spec}: {100 * changes / pairs:.0f}% of horizontally neighbouring pixels have different "
            f"ids ({int(present.sum())} ids); a label map's areas are regions of one id, so this looks like an "
            "intensity image (the scan, or a thumbnail of it), not a label map: check importer.labels"
        )
    return {int(i) for i in np.flatnonzero(present)}


def check_coords(src: Source, image: Source) -> None:
    if len(src.shape) != 3 or src.shape[2] != 3 or src.dtype.kind != "f":
        raise InputError(f"coords {src.describe()}: need a float coordinate map H x W x 3 or 3 x H x W (mm)")
    _check_same_hw(src, "coords", image)


def coords_to_mm(band: np.ndarray, unit: str) -> np.ndarray:
    """A band of the coordinate map as float32 mm (``unit``: ``mm`` or ``um``); a value too large for float32
    becomes inf, which :func:`check_finite_coords` refuses (so numpy's overflow warning is not printed)."""
    with np.errstate(over="ignore"):
        if unit == "um":
            # Divided in float32 or the source's higher precision (float16 would lose digits), stored as float32.
            return (band.astype(np.promote_types(band.dtype, np.float32), copy=False) / 1000.0).astype(np.float32)
        return band.astype(np.float32, copy=False)


def depth_to_float32(band: np.ndarray) -> np.ndarray:
    """A band of the depth map as float32; a value too large for it becomes inf, refused by
    :func:`check_depth_band` (so numpy's overflow warning is not printed)."""
    with np.errstate(over="ignore"):
        return band.astype(np.float32, copy=False)


class CoordsRange:
    """Per-axis range of the finite values of a coordinate map (mm), refused beyond :data:`COORDS_MAX_MM`."""

    def __init__(self) -> None:
        self.lo = np.full(3, np.inf)
        self.hi = np.full(3, -np.inf)

    def add(self, band_mm: np.ndarray) -> None:
        """Take in a band without infinite values (:func:`check_finite_coords` refuses those first)."""
        values = band_mm.reshape(-1, 3)
        if not len(values):
            return
        # Per axis, NaN left out (fmin/fmax): an axis that is NaN everywhere (no z, say) must not hide the others
        # from the check. One strided pass per axis: 6x faster than masked copies reduced over rows.
        for a in range(3):
            self.lo[a] = np.fmin(self.lo[a], np.fmin.reduce(values[:, a]))
            self.hi[a] = np.fmax(self.hi[a], np.fmax.reduce(values[:, a]))

    def check(self, src: Source, unit: str, where: str) -> None:
        seen = np.isfinite(self.lo)
        if not seen.any():
            return
        if max(np.abs(self.lo[seen]).max(), np.abs(self.hi[seen]).max()) <= COORDS_MAX_MM:
            return
        spans = ", ".join(f"[{self.lo[i]:g}, {self.hi[i]:g}]" for i in range(3))
        raise InputError(
            f"coords {src.spec}: the finite coordinates span {spans} mm on its 3 axes ({where}, reading the values "
            f"as importer.coords_unit={unit}); no brain reaches {COORDS_MAX_MM:g} mm from the origin, so the map "
            "is in another unit: set importer.coords_unit=um for a map in micrometres, or convert it to mm"
        )


def precheck_coords(src: Source, unit: str, band_rows: int) -> None:
    """Refuse a coordinate map in the wrong unit, or with infinite values, from a subsample, before anything is
    written."""
    seen = CoordsRange()
    for y0, step, sample in _sample_bands(src, band_rows):
        band = coords_to_mm(sample, unit)
        check_finite_coords(band, sample, src, y0, step)
        seen.add(band)
    seen.check(src, unit, "a subsample of its rows")


def check_finite_coords(band_mm: np.ndarray, band: np.ndarray, src: Source, y0: int, step: int = 1) -> None:
    """Refuse an infinite coordinate of ``band_mm`` (float32 mm, h x W x 3; ``band``: as read from ``src``),
    also one too large for float32: NaN means no coordinate, inf is no position. ``y0``: the band's first row;
    ``step``: the stride of a subsample's rows and columns."""
    bad = np.isinf(band_mm)
    if not bad.any():
        return
    yy, xx, axis = np.unravel_index(int(np.argmax(bad)), bad.shape)
    raise InputError(
        f"coords {src.spec}: value {float(band[yy, xx, axis]):g} at pixel ({y0 + yy * step}, {xx * step}), axis "
        f"{axis}, is not a finite coordinate (stored as float32 mm); use NaN where a pixel has no coordinate"
    )


#: How far past [0, 1] a depth may lie and be taken as rounding (of a solver's or a resampling's), clipped to
#: [0, 1] as it is written; beyond, the map is refused (another quantity, or depth in other units).
DEPTH_SLACK = 0.01


def check_depth_band(band32: np.ndarray, band: np.ndarray, src: Source, y0: int, step: int = 1) -> None:
    """Refuse a depth of ``band32`` (float32, h x W; ``band``: as read from ``src``) that is neither NaN nor in
    [0, 1] give or take :data:`DEPTH_SLACK`. ``y0``: the band's first row; ``step``: the stride of a subsample's
    rows and columns."""
    bad = ~(np.isnan(band32) | ((band32 >= -DEPTH_SLACK) & (band32 <= 1 + DEPTH_SLACK)))
    if not bad.any():
        return
    yy, xx = np.unravel_index(int(np.argmax(bad)), bad.shape)
    raise InputError(
        f"depth {src.spec}: value {float(band[yy, xx]):g} at pixel ({y0 + yy * step}, {xx * step}) is outside the "
        "cortical depth's range: 0 at the pial surface .. 1 at the white-matter border, NaN outside the cortex"
    )


def precheck_depth(src: Source, band_rows: int) -> None:
    """Refuse a depth map out of range from a subsample, before anything is written."""
    for y0, step, sample in _sample_bands(src, band_rows):
        check_depth_band(depth_to_float32(sample), sample, src, y0, step)


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
    # label ids, z and the pixel size are bounded in the config (importer.*: Bound) as section stores bound them
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
        pixel_size_um, pixel_size_source = resolve_pixel_size(imp.pixel_size_um, sources)
        # Inputs first (opening them reads headers only), then the output, then the passes that read data.
        _check_output_folders(out, imp.brain)
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
        if "coords" in sources:
            precheck_coords(sources["coords"], imp.coords_unit, band_rows)
        if "depth" in sources:
            precheck_depth(sources["depth"], band_rows)
        meta = SectionMeta(
            brain=imp.brain,
            section_index=imp.section_index,
            z_mm=imp.z_mm,
            pixel_size_um=pixel_size_um,
            shape=(h, w),
            label_table=build_label_table(imp.label_names, found),
            seed=None,
            source=_absolute(imp.image),
            extra={
                "config": config_to_dict(cfg),
                "sources": {layer: _absolute(src.spec) for layer, src in sources.items()},
                "image_conversion": conversion.to_attrs(),
                "pixel_size_source": pixel_size_source,
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
                _copy_layer(writer, layer, sources[layer], conversion, band_rows, imp.coords_unit)
        for other in others:
            log.warning("import: removing %s, the previous store of this section in another backend", other)
            if other.is_dir():
                shutil.rmtree(other)
            else:
                other.unlink()
    save_config(cfg, out, name=f"{target.name.rsplit('.', 1)[0]}.import.yaml")
    log.info("import: wrote %s (%s) in %.1f s", target, ", ".join(layers), time.perf_counter() - started)
    return target


def resolve_pixel_size(configured: float | None, sources: dict[str, Source]) -> tuple[float, str]:
    """The section's pixel size (µm) and where it comes from: ``importer.pixel_size_um``, checked against the
    size the image file states, or (null) the file's; every other layer's stated size must agree."""
    image = sources["image"]
    for layer, src in sources.items():
        stated = src.pixel_size
        if stated is not None and not math.isclose(stated.y_um, stated.x_um, rel_tol=PIXEL_SIZE_RTOL):
            raise InputError(
                f"{layer} {src.spec}: the file states anisotropic pixels, {stated.describe()}; only square pixels "
                "are supported (resample the image to one pixel size)"
            )
    stated = image.pixel_size
    lo, hi = PIXEL_SIZE_RANGE_UM
    allowed = f"a section's pixel size must lie in {lo:g}..{hi:g} µm"
    if stated is not None and not lo <= stated.x_um <= hi:
        raise InputError(
            f"image {image.spec}: the file states a pixel size of {stated.describe()}, out of range: {allowed}"
        )
    if configured is None:
        if stated is None:
            why = f" ({image.pixel_size_note})" if image.pixel_size_note else ""
            raise InputError(
                f"image {image.spec}: the file states no pixel size{why}; set importer.pixel_size_um (µm), "
                "e.g. importer.pixel_size_um=2"
            )
        value, origin = stated.x_um, stated.origin
        log.info("image %s: pixel size %g µm from the file (%s)", image.spec, value, origin)
    else:
        if stated is not None and not math.isclose(stated.x_um, configured, rel_tol=PIXEL_SIZE_RTOL):
            raise InputError(
                f"image {image.spec}: the file states a pixel size of {stated.describe()}, but "
                f"importer.pixel_size_um={configured:g}; set importer.pixel_size_um={stated.x_um:g} (or null to "
                "take the file's)"
            )
        if stated is None and image.pixel_size_note:
            log.warning("image %s: %s; using importer.pixel_size_um=%g", image.spec, image.pixel_size_note, configured)
        value, origin = float(configured), "importer.pixel_size_um"
    for layer, src in sources.items():
        if layer != "image" and src.pixel_size is not None:
            if not math.isclose(src.pixel_size.x_um, value, rel_tol=PIXEL_SIZE_RTOL):
                raise InputError(
                    f"{layer} {src.spec}: the file states a pixel size of {src.pixel_size.describe()}, but the "
                    f"image's is {value:g} µm (from {origin} for {image.spec}); {layer} must be on the image's grid"
                )
    return value, origin


def _check_output_folders(out: Path, brain: str) -> None:
    """Refuse an output folder (or its brain folder, or a folder above) that exists as something else."""
    for folder in (out / brain, out, *out.parents):
        if folder.is_dir():
            return
        if folder.exists() or folder.is_symlink():
            fix = "another --out or importer.brain" if folder == out / brain else "another --out"
            raise OutputExistsError(f"import: output {folder} exists and is not a folder (give {fix})")


def _copy_layer(
    writer: SectionWriter,
    layer: str,
    src: Source,
    conversion: ImageConversion,
    band_rows: int,
    coords_unit: str = "mm",
) -> None:
    """Copy one layer band by band (``band_rows`` full-width rows: whole chunk rows of the output)."""
    coords_range = CoordsRange()
    for y0, y1 in _band_ranges(src.hw[0], band_rows):
        raw = band = src.read_rows(y0, y1)
        if layer == "image":
            band = convert_image_band(band, conversion, src, y0)
        elif layer == "labels":
            band = band.astype(np.uint16, copy=False)  # ids were range-checked by scan_labels
        elif layer == "depth":
            band = depth_to_float32(band)
            check_depth_band(band, raw, src, y0)
            band = np.clip(band, 0.0, 1.0, out=band if band is not raw else None)  # rounding past the ends; NaN stays
        else:
            band = coords_to_mm(band, coords_unit)
            check_finite_coords(band, raw, src, y0)
            coords_range.add(band)
            coords_range.check(src, coords_unit, f"rows 0:{y1}")
        writer.write(layer, y0, 0, band)
        log.debug("import: %s rows %d:%d written", layer, y0, y1)


def _other_backend_stores(target: Path) -> list[Path]:
    """Paths the same section would have as a store of another backend (``.zarr`` / ``.h5`` / ``.hdf5``)."""
    stem = target.name.rsplit(".", 1)[0]
    return [target.with_name(stem + suffix) for suffix in BACKEND_OF_SUFFIX if stem + suffix != target.name]


def _absolute(spec: str) -> str:
    path, key = split_spec(spec)
    return str(path.resolve()) + (f":{key}" if key else "")
