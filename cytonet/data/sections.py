"""Section stores: one chunked store per brain section, zarr v3 (default) or HDF5, with one reader API.

A section store holds up to four 2D layers of the same height and width (H x W):

========  ==========  ===========================================================================
layer     dtype       meaning
========  ==========  ===========================================================================
image     uint8       the cell-body stained scan (dark cells on light neuropil)
labels    uint16      area id per pixel; the id -> name table is the ``label_table`` attribute
depth     float32     cortical depth, 0 at the pial surface, 1 at the white-matter border, NaN outside
coords    float32     H x W x 3: position in the shared 3D reference space, mm
========  ==========  ===========================================================================

Writers may quantise the float layers to make them compress well: the synthetic generator stores depth in
steps of 1/4096 and coordinates in the power-of-two step at or below half a pixel (1/256 mm at 8 um/px).

Image levels: a store may also hold downsampled copies of the image, ``image_x<f>`` for powers of two f
(``SectionMeta.image_levels``), pixel m being the mean of section pixels [m f, (m+1) f) in both axes, rounded
as :func:`block_mean_uint8`, with zeros past the section's edge (so the level has ceil(H / f) rows). They are
exactly what averaging the full resolution gives, so :meth:`SectionReader.read_image` reads a coarse pixel
size from its level when there is one, f^2 times fewer bytes, and averages the full resolution otherwise.
With each image level the store holds the labels and depth layers sampled at the level's pixel centres,
``labels_x<f>`` and ``depth_x<f>``: pixel m is the layer's section pixel m f + f // 2 (the fill value past
the edge). Inference looks these layers up at exactly those pixels (the centre of a patch centred on a model
pixel), so :meth:`SectionReader.read_points` serves such points from the sampled level, f^2 times fewer bytes
to decode; stores without them (written before they existed) read the full resolution.

Layout on disk: a zarr v3 group ``<name>.zarr/`` with one array per layer, or one HDF5 file ``<name>.h5``
with one dataset per layer; metadata (:class:`SectionMeta`) as attributes of the group / file root.

Entry points: :func:`create_section` returns a :class:`SectionWriter` that writes regions (e.g. one chunk
row at a time, so a 20000^2 section never sits in memory) into ``<path>.partial`` and renames it into place
on :meth:`SectionWriter.close`, so a crash never leaves a store that looks complete, and an existing store is
replaced only with ``overwrite=True``. :func:`open_section` returns a :class:`SectionReader` that reads any
region lazily. :func:`list_sections` finds the stores below a folder; :func:`store_stamp` fingerprints how a
store was written (a store written anew under the same name gets another).

HDF5 files are opened by the reader on first use, never at construction, so a reader can be created before
a DataLoader forks and still opens its own handle in each worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cytonet import __version__
from cytonet.config import IMAGE_LEVEL_FACTORS, image_levels_valid, is_int
from cytonet.data.chunks import SHUFFLES, ChunkCache, ChunkedArray, open_chunked
from cytonet.data.patches import library_error, publish, remove_path
from cytonet.errors import InputError, OutputExistsError, not_found

FORMAT_VERSION = 1
LAYER_DTYPES: dict[str, np.dtype[Any]] = {
    "image": np.dtype(np.uint8),
    "labels": np.dtype(np.uint16),
    "depth": np.dtype(np.float32),
    "coords": np.dtype(np.float32),
}
LAYER_FILL: dict[str, float] = {"image": 0, "labels": 0, "depth": float("nan"), "coords": float("nan")}
#: blosc (cname, clevel, shuffle) of the uint8 arrays (the image and its levels) with ``compression=blosc-zstd``.
#: Level 1 without shuffle beat level 3 with bit shuffle on the synthetic section at full resolution in every
#: respect (benchmarks/bench_section_codec.py, 2 cores): 1.55x against 1.30x smaller, written 2.4x and read
#: 1.2x as fast; at x4 1.86x against 1.57x, read as fast. Reading is what inference readers do all day.
IMAGE_BLOSC: tuple[Literal["zstd"], int, str] = ("zstd", 1, "noshuffle")
#: ... and of the other arrays (labels, depth, coordinates): byte shuffle suits their 2- and 4-byte values.
LAYER_BLOSC: tuple[Literal["zstd"], int, str] = ("zstd", 3, "shuffle")
#: Decoded chunks a zarr section reader keeps (neighbouring reads share the chunks of their overlap) in LRU
#: order, and at most how many more it keeps for the reads declared ahead (:meth:`SectionReader.expect_image`).
CHUNK_CACHE_BYTES = 64 << 20
PLANNED_CACHE_BYTES = 512 << 20
#: Fewest rows, and pixels, of a strip :meth:`SectionReader.read_image` gives a thread of its own (a 1 MP box,
#: the demo model's smallest block, read no faster on two threads than on one: the threads' start-up ate it).
READ_STRIP_MIN_ROWS = 256
READ_STRIP_MIN_PX = 2 << 20
#: Edge of the full-resolution tiles image levels are computed from (bounds the memory of writing them).
LEVEL_TILE_PX = 1024
SUFFIXES = {"zarr": ".zarr", "hdf5": ".h5"}
BACKEND_OF_SUFFIX = {".zarr": "zarr", ".h5": "hdf5", ".hdf5": "hdf5"}

#: Ids every label table shares; cortical areas are numbered from 2.
BACKGROUND_ID = 0
WHITE_MATTER_ID = 1


@dataclass(frozen=True)
class SectionMeta:
    """Metadata of one section, stored as attributes of its store."""

    brain: str
    """Brain identifier, e.g. ``B00``."""
    section_index: int
    """Number of the section within its brain."""
    z_mm: float
    """Position of the section plane along the cutting axis, mm."""
    pixel_size_um: float
    """In-plane pixel size, um."""
    shape: tuple[int, int]
    """Height and width in pixels."""
    label_table: dict[int, str] = field(default_factory=dict)
    """Area id -> name; includes 0 (background) and 1 (white matter) when labels exist."""
    seed: int | None = None
    """Generator seed for synthetic sections, None for imported ones."""
    source: str = ""
    """Where the data came from (``synthetic`` or the imported file)."""
    cytonet_version: str = __version__
    """Version of cytonet that wrote the store."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further JSON-serialisable attributes (e.g. the resolved config)."""
    image_levels: tuple[int, ...] = ()
    """Factors of the stored image levels (``image_x<f>``, see the module doc); set by the writer."""

    def to_attrs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["image_levels"] = list(self.image_levels)
        d["label_table"] = {str(k): v for k, v in self.label_table.items()}
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> SectionMeta:
        """The metadata in a store's attributes (as :meth:`to_attrs` wrote them), read strictly and checked
        (:meth:`check`): an InputError names ``where`` (the store), the attribute and its value."""
        version = attrs.get("format_version", -1)
        if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
            raise InputError(
                f"{where}: section store format version {_shown(version)} is not supported (expected {FORMAT_VERSION})"
            )

        def get(key: str, kinds: tuple[type, ...], want: str, *default: Any) -> Any:
            if key not in attrs:
                if default:
                    return default[0]
                raise InputError(f"{where}: section metadata lacks the attribute {key!r}")
            value = attrs[key]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise InputError(f"{where}: not a cytonet section store (attribute {key!r}={_shown(value)}: {want})")
            return value

        brain = get("brain", (str,), "a text")
        section_index = get("section_index", (int,), "an integer")
        z_mm = float(get("z_mm", (int, float), "a number (mm)"))
        pixel_size_um = float(get("pixel_size_um", (int, float), "a number (um)"))
        shape = get("shape", (list,), "a list of height and width in pixels")
        table = get("label_table", (dict,), "an object of area id -> name", {})
        levels = get("image_levels", (list,), "a list of factors", [])
        seed = get("seed", (int, type(None)), "an integer or null", None)
        for key, value, ok, want in [
            ("shape", shape, len(shape) == 2 and all(is_int(v) for v in shape), "a list of 2 integers"),
            ("label_table", table, all(re.fullmatch(r"[0-9]{1,5}", k) and isinstance(v, str) for k, v in table.items()),
             "area ids (decimal text) -> names"),
            ("image_levels", levels, all(is_int(f) for f in levels), "a list of integer factors"),
        ]:  # fmt: skip
            if not ok:
                raise InputError(f"{where}: not a cytonet section store (attribute {key!r}={_shown(value)}: {want})")
        meta = cls(
            brain=brain,
            section_index=section_index,
            z_mm=z_mm,
            pixel_size_um=pixel_size_um,
            shape=(shape[0], shape[1]),
            label_table={int(k): v for k, v in table.items()},
            seed=seed,
            source=get("source", (str,), "a text", ""),
            cytonet_version=get("cytonet_version", (str,), "a text", ""),
            extra=get("extra", (dict,), "an object", {}),
            image_levels=tuple(levels),
        )
        meta.check(where)
        return meta

    def check(self, where: str) -> None:
        """Refuse values no section has, naming ``where`` (the store), the attribute and its value: every reader
        divides by the pixel size and takes its logarithm, so 0, NaN or 1e-300 must not reach them. Called when
        a store is opened and before one is written."""

        def refuse(key: str, value: Any, want: str) -> InputError:
            return InputError(f"{where}: section store attribute {key}={_shown(value)} is invalid: {want}")

        lo, hi = PIXEL_SIZE_RANGE_UM
        if not (math.isfinite(self.pixel_size_um) and lo <= self.pixel_size_um <= hi):
            raise refuse("pixel_size_um", self.pixel_size_um, f"a pixel size is finite and within {lo:g}..{hi:g} um")
        if not (math.isfinite(self.z_mm) and abs(self.z_mm) <= COORDS_MAX_MM):
            raise refuse("z_mm", self.z_mm, f"a section plane lies within {COORDS_MAX_MM:g} mm of the origin")
        if not (self.brain and self.brain.strip() == self.brain and not set(self.brain) & set("/\\\0")):
            raise refuse("brain", self.brain, "a brain is named by a non-empty text without slashes")
        if self.section_index < 0:
            raise refuse("section_index", self.section_index, "section numbers are >= 0")
        if not all(1 <= n <= MAX_SECTION_PX for n in self.shape):
            raise refuse("shape", list(self.shape), f"height and width are 1..{MAX_SECTION_PX} px")
        bad_ids = [i for i in self.label_table if not 0 <= i <= 65535]
        if bad_ids:
            raise refuse("label_table", bad_ids, "area ids are 0..65535 (labels are uint16)")
        if self.seed is not None and self.seed < 0:
            raise refuse("seed", self.seed, "seeds are >= 0")
        check_image_levels(self.image_levels, f"{where}: section store attribute image_levels")


#: Pixel sizes (um) a section store may have. Scans of cell bodies are taken at 0.1-20 um/px; the bounds are
#: far outside that, and refuse a size in the wrong unit (nm or mm read as um) for the scans cytonet is for.
PIXEL_SIZE_RANGE_UM = (0.01, 1000.0)
#: No position in a brain's reference space (mm), coordinate or section plane, lies farther than this from its
#: origin: a value that does is in another unit (um maps of human brains reach tens of thousands).
COORDS_MAX_MM = 1000.0
#: Largest height or width of a section (px): 2 m at 1 um/px, a bound on what a damaged shape can make readers do.
MAX_SECTION_PX = 2_000_000


def _shown(value: Any) -> str:
    """``value`` for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def section_filename(brain: str, section_index: int, backend: str) -> str:
    """Canonical file name of a section store, e.g. ``B00_s0003.zarr``."""
    return f"{brain}_s{section_index:04d}{SUFFIXES[backend]}"


def backend_of(path: str | Path) -> str:
    """Backend from the suffix (``.zarr`` / ``.h5`` / ``.hdf5``); raises for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in BACKEND_OF_SUFFIX:
        raise InputError(f"{path}: unknown section store suffix {suffix!r}; use .zarr, .h5 or .hdf5")
    return BACKEND_OF_SUFFIX[suffix]


def _layer_shape(layer: str, shape: tuple[int, int]) -> tuple[int, ...]:
    return (*shape, 3) if layer == "coords" else shape


#: The layers stored sampled at every image level's pixel centres (see the module doc).
SAMPLED_LAYERS = ("labels", "depth")


def level_name(factor: int, layer: str = "image") -> str:
    """Array name of ``layer``'s level with ``factor``: the image's mean, or a sampled layer's centres."""
    return f"{layer}_x{factor}"


def level_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """Shape of the image level with ``factor`` of a section of ``shape`` (partial edge pixels included)."""
    return (-(-shape[0] // factor), -(-shape[1] // factor))


def check_image_levels(levels: tuple[int, ...] | list[int], where: str) -> tuple[int, ...]:
    """``levels`` as a tuple, or an InputError naming ``where`` unless they are increasing
    :data:`~cytonet.config.IMAGE_LEVEL_FACTORS`."""
    out = tuple(int(f) for f in levels)
    if not image_levels_valid(out):
        raise InputError(
            f"{where}: image levels {list(levels)} must be increasing factors among {list(IMAGE_LEVEL_FACTORS)}"
        )
    return out


def _layer_chunks(layer: str, shape: tuple[int, int], chunk_px: int) -> tuple[int, ...]:
    c = (min(chunk_px, shape[0]), min(chunk_px, shape[1]))
    return (*c, 3) if layer == "coords" else c


class SectionWriter:
    """Writes regions of the layers of one new section store; use as a context manager.

    Data goes to ``<path>.partial``; :meth:`close` renames it to ``path``. Leaving the ``with`` block through
    an exception deletes the partial store and leaves any existing store untouched.
    """

    def __init__(
        self,
        path: Path,
        meta: SectionMeta,
        layers: tuple[str, ...],
        chunk_px: int,
        compression: Literal["blosc-zstd", "none"],
        overwrite: bool,
        image_levels: tuple[int, ...] = (),
    ) -> None:
        self.path = path
        self.meta = dataclasses.replace(meta, image_levels=check_image_levels(image_levels, str(path)))
        self.meta.check(str(path))  # a store readers would refuse is never written
        self.chunk_px = chunk_px
        self.layers = layers
        self.backend = backend_of(path)
        self.overwrite = overwrite
        self.partial = path.with_name(path.name + ".partial")
        unknown = [name for name in layers if name not in LAYER_DTYPES]
        if unknown or "image" not in layers:
            raise InputError(f"{path}: layers must include 'image' and be among {list(LAYER_DTYPES)}, got {layers}")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        remove_path(self.partial)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._closed = False
        self._arrays: dict[str, Any] = {}
        if self.backend == "zarr":
            self._open_zarr(chunk_px, compression)
        else:
            self._open_hdf5(chunk_px, compression)

    def _level_layers(self) -> tuple[str, ...]:
        """The layers this store keeps levels of: the image's means, and the sampled layers it holds."""
        return ("image", *(n for n in SAMPLED_LAYERS if n in self.layers))

    def _array_specs(self, chunk_px: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], np.dtype[Any], float]]:
        """(name, shape, chunks, dtype, fill) of every array: the layers, then the image levels."""
        specs = [
            (name, _layer_shape(name, self.meta.shape), _layer_chunks(name, self.meta.shape, chunk_px),
             LAYER_DTYPES[name], LAYER_FILL[name])
            for name in self.layers
        ]  # fmt: skip
        for f in self.meta.image_levels:
            shape = level_shape(self.meta.shape, f)
            for layer in self._level_layers():
                chunks = _layer_chunks(layer, shape, chunk_px)
                specs.append((level_name(f, layer), shape, chunks, LAYER_DTYPES[layer], LAYER_FILL[layer]))
        return specs

    def _open_zarr(self, chunk_px: int, compression: str) -> None:
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        for name, shape, chunks, dtype, fill in self._array_specs(chunk_px):
            codec: Any = "auto"
            if compression == "none":
                codec = None
            elif compression == "blosc-zstd":
                cname, clevel, shuffle = IMAGE_BLOSC if dtype.itemsize == 1 else LAYER_BLOSC
                codec = BloscCodec(cname=cname, clevel=clevel, shuffle=BloscShuffle(shuffle))
            # Every chunk is written, also those of only the fill value (a background of label 0 or depth NaN):
            # a chunk file missing from such a store is damage (an rsync cut short), which readers refuse
            # (CHUNKS_ATTR) instead of reading it as the fill value.
            self._arrays[name] = group.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                fill_value=fill,
                compressors=codec,
                config={"write_empty_chunks": True},
            )
        group.attrs.update({**self.meta.to_attrs(), CHUNKS_ATTR: "all"})
        self._group = group

    def _open_hdf5(self, chunk_px: int, compression: str) -> None:
        import h5py
        import hdf5plugin

        self._file = h5py.File(self.partial, "w")
        for name, shape, chunks, dtype, fill in self._array_specs(chunk_px):
            kwargs: dict[str, Any] = {}
            if compression == "blosc-zstd":
                cname, clevel, shuffle = IMAGE_BLOSC if dtype.itemsize == 1 else LAYER_BLOSC
                kwargs.update(hdf5plugin.Blosc(cname=cname, clevel=clevel, shuffle=SHUFFLES[shuffle]))
            self._arrays[name] = self._file.create_dataset(
                name, shape=shape, chunks=chunks, dtype=dtype, fillvalue=fill, **kwargs
            )
        for key, value in self.meta.to_attrs().items():
            self._file.attrs[key] = json.dumps(value)

    def _write_levels(self) -> None:
        """Fill the image levels and the sampled layers' levels from the written layers, tile by tile: one
        read of the full resolution serves every level. A tile is a whole number of pixels of the coarsest
        level, at most LEVEL_TILE_PX px wide (1 MB of image) unless that level's pixels are wider, so memory
        stays small at any section size."""
        if not self.meta.image_levels:
            return
        h, w = self.meta.shape
        top = self.meta.image_levels[-1]
        tile = top * max(1, min(self.chunk_px, LEVEL_TILE_PX // top))
        for layer in self._level_layers():
            full = self._arrays[layer]
            for y0 in range(0, h, tile):
                for x0 in range(0, w, tile):
                    part = np.asarray(full[y0 : min(y0 + tile, h), x0 : min(x0 + tile, w)])
                    ph, pw = -(-part.shape[0] // top) * top, -(-part.shape[1] // top) * top
                    if part.shape != (ph, pw):  # the section's edge: what reading past the edge gives
                        pad = ((0, ph - part.shape[0]), (0, pw - part.shape[1]))
                        part = np.pad(part, pad, constant_values=LAYER_FILL[layer])
                    for f in self.meta.image_levels:
                        lh, lw = level_shape(self.meta.shape, f)
                        ly, lx = y0 // f, x0 // f
                        ny, nx = min(ph // f, lh - ly), min(pw // f, lw - lx)
                        level = block_mean_uint8(part, f) if layer == "image" else part[f // 2 :: f, f // 2 :: f]
                        self._arrays[level_name(f, layer)][ly : ly + ny, lx : lx + nx] = level[:ny, :nx]

    def write(self, layer: str, y0: int, x0: int, data: np.ndarray) -> None:
        """Write ``data`` (h x w, or h x w x 3 for coords) with its top-left corner at (y0, x0)."""
        if layer not in self._arrays:
            raise KeyError(f"{self.path}: no layer {layer!r}; layers: {list(self._arrays)}")
        arr = self._arrays[layer]
        h, w = data.shape[:2]
        if y0 < 0 or x0 < 0 or y0 + h > self.meta.shape[0] or x0 + w > self.meta.shape[1]:
            raise ValueError(f"{self.path}: region {(y0, x0, h, w)} outside the section shape {self.meta.shape}")
        arr[y0 : y0 + h, x0 : x0 + w] = np.asarray(data, dtype=LAYER_DTYPES[layer])

    def close(self) -> Path:
        """Finish the store and move it into place; returns its final path."""
        if self._closed:
            return self.path
        self._write_levels()
        if self.backend == "hdf5":
            self._file.close()
        self._closed = True
        if self.path.exists():
            remove_path(self.path)  # allowed: the constructor refused an existing path without overwrite
        publish(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial store."""
        if self.backend == "hdf5" and not self._closed:
            self._file.close()
        self._closed = True
        remove_path(self.partial)

    def __enter__(self) -> SectionWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def create_section(
    path: str | Path,
    meta: SectionMeta,
    *,
    layers: tuple[str, ...] = ("image", "labels", "depth", "coords"),
    chunk_px: int = 512,
    compression: Literal["blosc-zstd", "none"] = "blosc-zstd",
    overwrite: bool = False,
    image_levels: tuple[int, ...] = (),
) -> SectionWriter:
    """Start a new section store at ``path`` (suffix picks the backend: .zarr or .h5); ``image_levels``: the
    factors of the image levels to store (see the module doc), written when the store is closed."""
    return SectionWriter(Path(path), meta, layers, chunk_px, compression, overwrite, image_levels)


#: Store attribute of zarr stores whose writer wrote every chunk file (:class:`SectionWriter`): a missing one
#: is damage. Stores without it (written before) may omit chunks of only the fill value.
CHUNKS_ATTR = "chunks_written"


class SectionReader:
    """Lazy, region-wise access to one section store. Picklable before first use (for DataLoader workers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"section store {self.path} does not exist")
        self.backend = backend_of(self.path)
        self._handle: Any = None
        self._pid: int | None = None
        self._fast: dict[str, ChunkedArray | None] | None = None
        self._fast_pid: int | None = None
        self._cache: ChunkCache | None = None
        self._lock = threading.Lock()  # several reader threads may share one reader (inference)
        self._names: dict[str, bool] = {}  # array name -> in the store (:meth:`_holds`)
        self._layout_ok: set[str] = set()  # arrays whose dtype and shape were checked (:meth:`_check_layout`)
        try:
            attrs = self._read_attrs()
        finally:
            self.close()  # do not keep the HDF5 handle across a fork; close it rather than leave it to the GC
        self.meta = SectionMeta.from_attrs(attrs, str(self.path))
        self._whole = attrs.get(CHUNKS_ATTR) == "all"  # every chunk file was written: a missing one is damage

    # -- handle management ------------------------------------------------------------------------------
    def _open(self) -> Any:
        with self._lock:
            return self._open_locked()

    def _open_locked(self) -> Any:
        if self._handle is not None and self._pid == os.getpid():
            return self._handle
        try:
            if self.backend == "zarr":
                import zarr

                self._handle = zarr.open_group(str(self.path), mode="r")
            else:
                import h5py
                import hdf5plugin  # noqa: F401  registers the blosc filter; reading fails without it

                self._handle = h5py.File(self.path, "r")
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"cannot open section store {self.path}: {library_error(exc, named=False)}") from None
        except Exception as exc:  # zarr raises its own error types for malformed groups
            raise InputError(f"cannot open section store {self.path}: {library_error(exc)}") from None
        self._pid = os.getpid()
        return self._handle

    def _chunked(self, name: str) -> ChunkedArray | None:
        """Array ``name`` of a zarr store for direct chunk reads (:mod:`cytonet.data.chunks`), else None."""
        if self.backend != "zarr":
            return None
        with self._lock:
            if self._fast is None or self._cache is None or self._fast_pid != os.getpid():
                # first use, or a forked process: it drops what the parent cached
                self._fast, self._fast_pid = {}, os.getpid()
                self._cache = ChunkCache(CHUNK_CACHE_BYTES, PLANNED_CACHE_BYTES)
            if name not in self._fast:
                self._fast[name] = open_chunked(self.path / name, self._cache, whole=self._whole)
            return self._fast[name]

    def _read_attrs(self) -> dict[str, Any]:
        if self.backend == "zarr":
            # A zarr v3 group's attributes are in its zarr.json: read there, opening costs no zarr group (1 ms
            # through zarr's event loop, for every section a job plans and opens). Anything else through zarr.
            meta_file = self.path / "zarr.json"
            try:
                doc = json.loads(meta_file.read_text())
            except FileNotFoundError:
                doc = None  # a zarr v2 store, or no zarr store at all: zarr says which
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"{meta_file}: cannot read the section store's metadata: {library_error(exc)}"
                ) from None
            if isinstance(doc, dict) and doc.get("node_type") == "group" and isinstance(doc.get("attributes"), dict):
                return dict(doc["attributes"])
            return dict(self._open().attrs)
        attrs = {}
        for key, value in self._open().attrs.items():
            try:  # the writer stores every attribute as JSON text; a foreign HDF5 file holds anything
                attrs[key] = json.loads(value)
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"{self.path}: not a cytonet section store (attribute {key!r} is not JSON text: {exc})"
                ) from None
        return attrs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        state["_fast"] = state["_cache"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.meta.shape

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for name in LAYER_DTYPES if self._holds(name))

    def has(self, layer: str) -> bool:
        return self._holds(layer)

    def chunk_shape(self, layer: str) -> tuple[int, int]:
        """Rows and columns of ``layer``'s chunks: from the fast chunk path of a zarr store (opening the array
        through zarr costs more than reading a patch), else the backend array's."""
        fast = self._chunked(layer)
        rows, cols = fast.chunks[:2] if fast is not None else self.array(layer).chunks[:2]
        return int(rows), int(cols)

    def array(self, layer: str) -> Any:
        """The backend array object of ``layer`` (zarr.Array or h5py.Dataset), sliceable like numpy."""
        handle = self._open()
        with self._metadata_errors(layer):
            # A zarr array whose metadata file is there but damaged is not "absent" (zarr's `in` says False).
            present = self._zarr_meta_file(layer) is not None or layer in handle
            array = handle[layer] if present else None
        if array is None:
            raise InputError(f"section store {self.path} has no layer {layer!r}; layers: {list(self.layers)}")
        if not hasattr(array, "shape"):
            where = self._zarr_meta_file(layer) or self.path
            raise InputError(f"{where}: {layer!r} is a group, not an array (the {layer} layer must be an array)")
        return array

    def _zarr_meta_file(self, name: str) -> Path | None:
        """The metadata file of a zarr store's array ``name`` (``zarr.json``, or v2's), None when there is none."""
        if self.backend != "zarr":
            return None
        return next((f for n in ZARR_META_FILES if (f := self.path / name / n).is_file()), None)

    @contextlib.contextmanager
    def _metadata_errors(self, name: str) -> Iterator[None]:
        """Turn an error of zarr or h5py reading array ``name``'s metadata (a damaged ``zarr.json`` raises a bare
        JSONDecodeError) into an InputError naming the file."""
        try:
            yield
        except InputError:
            raise
        except Exception as exc:
            where = self._zarr_meta_file(name) or self.path
            raise InputError(f"{where}: cannot read the metadata of array {name!r}: {library_error(exc)}") from None

    def read(self, layer: str, y0: int = 0, y1: int | None = None, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Read ``layer[y0:y1, x0:x1]``; the box must lie inside the section (use :meth:`read_padded` else)."""
        h, w = self.shape
        y1 = h if y1 is None else y1
        x1 = w if x1 is None else x1
        if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
            raise ValueError(f"{self.path}: box y[{y0}:{y1}] x[{x0}:{x1}] is outside the section ({h} x {w})")
        return self._read_array(layer, y0, y1, x0, x1)

    def _check_layout(self, name: str, fast: ChunkedArray | None) -> None:
        """Refuse array ``name`` (a layer or one of its levels) whose dtype or shape is not the layer's: a store
        written by other tools (a 16-bit scan, coordinates without their axis of 3) would otherwise be read as
        something else without a word. Once per array and reader."""
        if name in self._layout_ok:
            return
        layer, _, level = name.partition("_x")
        if layer in LAYER_DTYPES and (not level or level.isdigit()):
            if fast is not None:
                shape, dtype = tuple(fast.shape), np.dtype(fast.dtype)
            else:
                arr = self.array(name)
                shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            want = _layer_shape(layer, level_shape(self.shape, int(level) if level else 1))
            kind_ok = {"image": dtype == np.uint8, "labels": dtype.kind in "ui"}.get(layer, dtype.kind == "f")
            if shape != want or not kind_ok:
                kind = {"image": "uint8", "labels": "integer"}.get(layer, "floating-point")
                raise InputError(
                    f"{self.path}: array {name!r} is {shape} {dtype}, but the {layer} layer must be {want} "
                    f"{kind} (import scans with `cytonet import`, which converts them)"
                )
        self._layout_ok.add(name)

    def _read_array(self, name: str, y0: int, y1: int, x0: int, x1: int, out: np.ndarray | None = None) -> np.ndarray:
        """``name[y0:y1, x0:x1]`` (inside the array), into ``out`` when given (a view of the box's shape)."""
        fast = self._chunked(name)
        self._check_layout(name, fast)
        try:
            if fast is not None:
                return fast.read((y0, y1), (x0, x1), out=out)
            if out is None:
                return np.asarray(self.array(name)[y0:y1, x0:x1])
            out[...] = self.array(name)[y0:y1, x0:x1]
            return out
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: reading {name}[{y0}:{y1}, {x0}:{x1}] failed: {library_error(exc, named=False)}"
            ) from None

    def read_points(self, layer: str, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """``layer`` at the section pixels of rows ``ys`` x columns ``xs`` (increasing; they may lie past the
        section's edge, where the value is the layer's fill): shape ``(len(ys), len(xs))`` (+ ``(3,)`` for
        coords). Sparse points of a zarr store are read chunk by chunk (:meth:`ChunkedArray.points`), which
        costs a fraction of reading the box around them; others read the box and pick the points."""
        ys, xs = np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64)
        name, shape = layer, self.shape
        f = self._sampled_level(layer, ys, xs)
        if f > 1:  # every point is a pixel centre of the level: read it there
            name, shape, ys, xs = level_name(f, layer), level_shape(self.shape, f), ys // f, xs // f
        out = np.full(_layer_shape(layer, (len(ys), len(xs))), LAYER_FILL[layer], dtype=LAYER_DTYPES[layer])
        (r0, r1), (c0, c1) = np.searchsorted(ys, [0, shape[0]]), np.searchsorted(xs, [0, shape[1]])
        if r0 == r1 or c0 == c1:
            return out
        iy, ix = ys[r0:r1], xs[c0:c1]
        y0, y1, x0, x1 = int(iy[0]), int(iy[-1]) + 1, int(ix[0]), int(ix[-1]) + 1
        fast = self._chunked(name)
        self._check_layout(name, fast)
        if fast is None or len(fast.shape) != 2:
            out[r0:r1, c0:c1] = self._read_array(name, y0, y1, x0, x1)[np.ix_(iy - y0, ix - x0)]
            return out
        try:
            out[r0:r1, c0:c1] = fast.points(iy, ix)
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"{self.path}: reading {name} at points in [{y0}:{y1}, {x0}:{x1}] failed: "
                f"{library_error(exc, named=False)}"
            ) from None
        return out

    def _sampled_level(self, layer: str, ys: np.ndarray, xs: np.ndarray) -> int:
        """The largest factor f of a stored sampled level of ``layer`` at whose pixel centres (m f + f // 2)
        all the points lie, else 1 (the full resolution)."""
        if layer not in SAMPLED_LAYERS or not (len(ys) and len(xs)):
            return 1
        for f in sorted(self.meta.image_levels, reverse=True):
            if (ys % f == f // 2).all() and (xs % f == f // 2).all() and self._holds(level_name(f, layer)):
                return f
        return 1

    def _holds(self, name: str) -> bool:
        """Whether the store has array ``name`` (stores written before the sampled levels lack them; layers
        are optional). Looked up once per reader; for a zarr store, as the array's metadata file (a zarr group
        answers through its event loop, 0.5 ms a name, which the first block of an inference run waits for)."""
        with self._lock:
            if name not in self._names:
                if self.backend == "zarr" and (self.path / name / "zarr.json").is_file():
                    self._names[name] = True
                else:  # other zarr formats, HDF5
                    with self._metadata_errors(name):
                        self._names[name] = name in self._open_locked()
            return self._names[name]

    def read_padded(self, layer: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read a box that may extend past the section; the outside is the layer's fill value."""
        return self._read_padded(layer, self.shape, layer, y0, y1, x0, x1)

    def _read_padded(
        self,
        name: str,
        shape: tuple[int, int],
        layer: str,
        y0: int,
        y1: int,
        x0: int,
        x1: int,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Box of array ``name`` (2D extent ``shape``, dtype and fill of ``layer``), padded past its edge;
        decoded into ``out`` when given. Only the padding is filled: the inside is written once."""
        h, w = shape
        if y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w:
            return self._read_array(name, y0, y1, x0, x1, out)  # inside: no padded copy
        if out is None:
            out = np.empty(_layer_shape(layer, (y1 - y0, x1 - x0)), dtype=LAYER_DTYPES[layer])
        fill = LAYER_FILL[layer]
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if not (cy0 < cy1 and cx0 < cx1):
            out[...] = fill
            return out
        iy0, iy1, ix0, ix1 = cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0
        out[:iy0] = fill
        out[iy1:] = fill
        out[iy0:iy1, :ix0] = fill
        out[iy0:iy1, ix1:] = fill
        self._read_array(name, cy0, cy1, cx0, cx1, out[iy0:iy1, ix0:ix1])
        return out

    @property
    def image_levels(self) -> tuple[int, ...]:
        """Factors of the image levels this store holds."""
        return self.meta.image_levels

    def read_image(
        self, factor: int, y0: int, y1: int, x0: int, x1: int, threads: int = 1, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) of the image at ``factor`` times its pixel size (pixel m = means of
        section pixels [m f, (m+1) f), rounded as :func:`block_mean_uint8`; zero past the edge): from the
        stored level when there is one, else by averaging the full resolution. Same values either way.

        ``threads`` > 1 reads that many horizontal strips of the box side by side (decoding releases the GIL):
        for one large read whose caller has nothing else for its cores to do, such as the first block of an
        inference run, which everything else waits for. ``out``: a uint8 array of the box's shape to read into
        (such as page-locked memory for a copy to an accelerator); it is returned."""
        if out is None:
            out = np.empty((y1 - y0, x1 - x0), dtype=np.uint8)
        elif out.shape != (y1 - y0, x1 - x0) or out.dtype != np.uint8:
            raise ValueError(f"{self.path}: out is {out.dtype} {out.shape}, the box is uint8 {(y1 - y0, x1 - x0)}")
        n = max(1, min(threads, (y1 - y0) // READ_STRIP_MIN_ROWS, (y1 - y0) * (x1 - x0) // READ_STRIP_MIN_PX))
        if n == 1:
            return self._read_image_into(factor, y0, x0, x1, out)
        from concurrent.futures import ThreadPoolExecutor

        # Strips cut at chunk rows where the level is stored in chunks: a chunk row cut in two is decoded twice.
        name, _ = self._image_array(factor)
        fast = self._chunked(name) if name is not None else None
        rows = fast.chunks[0] if fast is not None else 1
        cuts = sorted({y0, y1, *(min(max((y0 + (y1 - y0) * k // n) // rows * rows, y0), y1) for k in range(1, n))})
        with ThreadPoolExecutor(n, thread_name_prefix="section-read") as pool:
            parts = [
                pool.submit(self._read_image_into, factor, a, x0, x1, out[a - y0 : b - y0])
                for a, b in itertools.pairwise(cuts)
            ]
            for part in parts:
                part.result()
        return out

    def _image_array(self, factor: int) -> tuple[str | None, tuple[int, int]]:
        """The array :meth:`read_image` reads at ``factor`` and its 2D shape (None: it averages the full
        resolution)."""
        if factor == 1:
            return "image", self.shape
        if factor in self.meta.image_levels:
            return level_name(factor), level_shape(self.shape, factor)
        return None, self.shape

    def expect_image(self, factor: int, boxes: Iterable[tuple[int, int, int, int]]) -> None:
        """Declare reads to come, :meth:`read_image` of each ``(y0, y1, x0, x1)`` box at ``factor``, one call
        each: the chunks they share (the overlapping context of inference's blocks) are then decoded once and
        kept until their last read (:meth:`ChunkCache.expect`), however large the boxes. Zarr stores at a stored
        level; otherwise nothing."""
        name, (h, w) = self._image_array(factor)
        fast = self._chunked(name) if name is not None else None
        if fast is None or self._cache is None:
            return
        keys: list[Any] = []
        for y0, y1, x0, x1 in boxes:
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
            if cy0 < cy1 and cx0 < cx1:
                keys.extend(fast.chunk_keys((cy0, cy1), (cx0, cx1)))
        self._cache.expect(keys)

    def _read_image_into(self, factor: int, y0: int, x0: int, x1: int, out: np.ndarray) -> np.ndarray:
        """:meth:`read_image` of the rows ``y0 .. y0 + len(out)`` into ``out``."""
        y1 = y0 + out.shape[0]
        name, shape = self._image_array(factor)
        if name is not None:
            return self._read_padded(name, shape, "image", y0, y1, x0, x1, out)
        img = self.read_padded("image", y0 * factor, y1 * factor, x0 * factor, x1 * factor)
        out[...] = block_mean_uint8(img, factor)
        return out

    def iter_rows(self, layer: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (y0, block) for consecutive horizontal bands of ``rows`` rows (bounded memory)."""
        for y0 in range(0, self.shape[0], rows):
            yield y0, self.read(layer, y0, min(y0 + rows, self.shape[0]))

    def close(self) -> None:
        if self._handle is not None and self.backend == "hdf5" and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._pid = None
        self._fast = self._cache = None

    def __enter__(self) -> SectionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.meta
        return f"SectionReader({str(self.path)!r}, brain={m.brain}, section={m.section_index}, shape={m.shape})"


def open_section(path: str | Path) -> SectionReader:
    """Open a section store for lazy reading."""
    return SectionReader(path)


def block_factor(target_um: float, native_um: float) -> int | None:
    """The integer f with ``target_um = f * native_um`` (to a relative 1e-6), or None when there is none: the
    coarser pixel size a section can be seen at through :func:`block_mean_uint8`."""
    ratio = target_um / native_um
    factor = round(ratio)
    return factor if factor >= 1 and math.isclose(ratio, factor, rel_tol=1e-6) else None


def block_sums(img: np.ndarray, factor: int) -> np.ndarray:
    """(H f, W f) uint8 -> (H, W) uint32 sums of f x f blocks (partial blocks at the end dropped).

    Rows are summed first in uint16 (exact for f <= 257) over contiguous runs, then the f strided columns
    added up: 10x faster than one reduction over both block axes."""
    h, w = img.shape[0] // factor, img.shape[1] // factor
    rows = img[: h * factor, : w * factor].reshape(h, factor, w * factor)
    rows = rows.sum(axis=1, dtype=np.uint16 if factor <= 257 else np.uint32)
    if factor > 32:  # few, long column runs: one reduction is faster than f strided adds
        return rows.reshape(h, w, factor).sum(axis=2, dtype=np.uint32)
    acc = rows[:, 0::factor].astype(np.uint32)
    for j in range(1, factor):
        acc += rows[:, j::factor]
    return acc


def block_mean_uint8(img: np.ndarray, factor: int) -> np.ndarray:
    """(H f, W f) uint8 -> (H, W) uint8 means of f x f blocks, rounded half up (patch extraction and inference
    see sections at coarser pixel sizes through this one function; partial blocks at the end dropped)."""
    if factor == 1:
        return np.ascontiguousarray(img)
    n = factor * factor
    return ((block_sums(img, factor) + n // 2) // n).astype(np.uint8)


def list_sections(root: str | Path) -> list[Path]:
    """All finished section stores below ``root`` (partial ones are ignored), sorted by path."""
    base = Path(root)
    if not base.is_dir():
        raise InputError(not_found(base, "section folder", folder=True))
    # Walk the folders but never into a store: a zarr store of a real section holds millions of chunk files.
    stores = []
    for folder, dirs, files in os.walk(base):
        here = Path(folder)
        for name in [*dirs, *files]:
            if Path(name).suffix.lower() in BACKEND_OF_SUFFIX and not name.endswith(".partial"):
                stores.append(here / name)
        dirs[:] = [d for d in dirs if Path(d).suffix.lower() not in BACKEND_OF_SUFFIX and not d.endswith(".partial")]
    return sorted(stores)


#: Metadata files of a zarr store (v3, and v2 for stores written by other tools), in the group and each array.
ZARR_META_FILES = ("zarr.json", ".zgroup", ".zattrs", ".zarray")


def store_stamp(path: str | Path) -> str:
    """A short fingerprint of how a section store was written: the size and modification time (ns) of an HDF5
    file, or of a zarr store's metadata files (the group's and each array's ``zarr.json``; never the chunks,
    which may be millions). A store written anew (:class:`SectionWriter` writes every file afresh and renames
    the store into place) gets another stamp even when its name, shape and attributes are the same; a copy that
    keeps modification times (``cp -a``, ``rsync -a``, ``mv``) keeps it. Chunks edited in place without touching
    the metadata files go unseen."""
    base = Path(path)
    if not base.is_dir():
        files = [base]
    else:
        folders = [base, *sorted(p for p in base.iterdir() if p.is_dir())]
        files = [f for d in folders for name in ZARR_META_FILES if (f := d / name).is_file()]
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.relative_to(base) if f != base else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
